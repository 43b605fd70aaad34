// GGML dequantization to fp16/bf16 and synthetic weight generation (weight_kernels.h).
// Dequantization runs one thread per output element, decoding its value from its block exactly
// as engine/gguf/ggml_types.cc does (same formulas, same fp32 products); it runs once at load,
// so simplicity wins over bandwidth here.
#include "kernels/model/dispatch.cuh"
#include "kernels/model/synthetic_values.h"
#include "kernels/model/weight_kernels.h"

namespace deft::kernels {
namespace {

struct TypeLayout {
  int32_t id;
  int32_t block_elems;
  int32_t block_bytes;
};
constexpr TypeLayout kLayouts[] = {
    {0, 1, 4},      {1, 1, 2},      {2, 32, 18},    {3, 32, 20},    {6, 32, 22},
    {7, 32, 24},    {8, 32, 34},    {9, 32, 36},    {10, 256, 84},  {11, 256, 110},
    {12, 256, 144}, {13, 256, 176}, {14, 256, 210}, {15, 256, 292}, {30, 1, 2},
};

const TypeLayout* FindLayout(int32_t id) {
  for (const TypeLayout& l : kLayouts) {
    if (l.id == id) return &l;
  }
  return nullptr;
}

__device__ __forceinline__ float Half(const uint8_t* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}
__device__ __forceinline__ uint32_t U32(const uint8_t* p) {
  return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

// Scale and min of sub-block j (0..7) of Q4_K/Q5_K (ggml_types.cc ScaleMinK4).
__device__ __forceinline__ void ScaleMinK4(const uint8_t* q, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Element e of the block at b.
__device__ float DequantElement(int32_t type, const uint8_t* b, int e) {
  switch (type) {
    case 0:
      return __uint_as_float(U32(b + 4 * e));
    case 1:
      return Half(b + 2 * e);
    case 30:
      return __uint_as_float(static_cast<uint32_t>(b[2 * e] | (b[2 * e + 1] << 8)) << 16);
    case 2: {  // Q4_0: d, qs[16]; element j low nibble of qs[j], j+16 high nibble
      const int q = e < 16 ? (b[2 + e] & 0xF) : (b[2 + e - 16] >> 4);
      return Half(b) * static_cast<float>(q - 8);
    }
    case 3: {  // Q4_1: d, m, qs[16]
      const int q = e < 16 ? (b[4 + e] & 0xF) : (b[4 + e - 16] >> 4);
      return Half(b) * static_cast<float>(q) + Half(b + 2);
    }
    case 6: {  // Q5_0: d, qh[4], qs[16]
      const int lo = e < 16 ? (b[6 + e] & 0xF) : (b[6 + e - 16] >> 4);
      const int q = lo | (((U32(b + 2) >> e) & 1) << 4);
      return Half(b) * static_cast<float>(q - 16);
    }
    case 7: {  // Q5_1: d, m, qh[4], qs[16]
      const int lo = e < 16 ? (b[8 + e] & 0xF) : (b[8 + e - 16] >> 4);
      const int q = lo | (((U32(b + 4) >> e) & 1) << 4);
      return Half(b) * static_cast<float>(q) + Half(b + 2);
    }
    case 8:  // Q8_0: d, qs[32]
      return Half(b) * static_cast<float>(static_cast<int8_t>(b[2 + e]));
    case 9:  // Q8_1: d, s, qs[32]
      return Half(b) * static_cast<float>(static_cast<int8_t>(b[4 + e]));
    case 10: {  // Q2_K: scales[16], qs[64], d, dmin
      const int g = e / 16;
      const float dl = Half(b + 80) * static_cast<float>(b[g] & 0xF);
      const float ml = Half(b + 82) * static_cast<float>(b[g] >> 4);
      const int shift = 2 * ((e / 32) % 4);
      const int q = (b[16 + 32 * (e / 128) + e % 32] >> shift) & 3;
      return dl * static_cast<float>(q) - ml;
    }
    case 11: {  // Q3_K: hmask[32], qs[64], scales[12], d
      const uint8_t* sc = b + 96;
      const int g = e / 16;
      const int low = g < 8 ? (sc[g] & 0xF) : (sc[g - 8] >> 4);
      const int high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
      const float dl = Half(b + 108) * static_cast<float>((low | (high << 4)) - 32);
      const int h = e / 128, s = (e / 32) % 4;
      const int q = (b[32 + 32 * h + e % 32] >> (2 * s)) & 3;
      const int hbit = (b[e % 32] >> (4 * h + s)) & 1;
      return dl * static_cast<float>(q - (hbit ? 0 : 4));
    }
    case 12:    // Q4_K: d, dmin, scales[12], qs[128]
    case 13: {  // Q5_K: d, dmin, scales[12], qh[32], qs[128]
      const int c = e / 64, l = e % 32, sub = 2 * c + (e % 64 >= 32 ? 1 : 0);
      int sc, m;
      ScaleMinK4(b + 4, sub, &sc, &m);
      const float d = Half(b) * static_cast<float>(sc), mn = Half(b + 2) * static_cast<float>(m);
      const uint8_t* qs = b + (type == 12 ? 16 : 48);
      int q = (sub % 2 == 0) ? (qs[32 * c + l] & 0xF) : (qs[32 * c + l] >> 4);
      if (type == 13) q |= ((b[16 + l] >> sub) & 1) << 4;
      return d * static_cast<float>(q) - mn;
    }
    case 14: {  // Q6_K: ql[128], qh[64], scales[16] (int8), d
      const int h = e / 128, k = (e % 128) / 32, l = e % 32;
      const uint8_t lo = b[64 * h + 32 * (k % 2) + l];
      const int nibble = k < 2 ? (lo & 0xF) : (lo >> 4);
      const int q = nibble | (((b[128 + 32 * h + l] >> (2 * k)) & 3) << 4);
      const int8_t s = static_cast<int8_t>(b[192 + 8 * h + 2 * k + (l < 16 ? 0 : 1)]);
      return (Half(b + 208) * static_cast<float>(s)) * static_cast<float>(q - 32);
    }
    case 15:  // Q8_K: d (fp32), qs[256], bsums
      return __uint_as_float(U32(b)) * static_cast<float>(static_cast<int8_t>(b[4 + e]));
  }
  return __int_as_float(0x7fc00000);  // unreachable: the launcher checks the type
}

template <typename T>
__global__ void DequantKernel(const __grid_constant__ DequantParams p, TypeLayout layout) {
  const int64_t total = p.rows * p.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i % p.cols;
    const uint8_t* block =
        p.src + r * p.src_row_bytes + (c / layout.block_elems) * layout.block_bytes;
    static_cast<T*>(p.out)[i] =
        FromFloat<T>(DequantElement(p.ggml_type, block, static_cast<int>(c % layout.block_elems)));
  }
}

template <typename T>
__global__ void SyntheticFillKernel(const __grid_constant__ SyntheticFillParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = SyntheticValue(p.seed, static_cast<uint64_t>(i), p.scale, p.offset);
    if constexpr (sizeof(T) == 4) {
      static_cast<float*>(p.out)[i] = v;
    } else {
      static_cast<T*>(p.out)[i] = FromFloat<T>(v);
    }
  }
}

int GridFor(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + 255) / 256, int64_t{132} * 32));
}

}  // namespace

bool GgmlTypeOnDevice(int32_t ggml_type) { return FindLayout(ggml_type) != nullptr; }

cudaError_t LaunchDequant(const DequantParams& p, cudaStream_t stream) {
  const TypeLayout* layout = FindLayout(p.ggml_type);
  if (layout == nullptr || p.rows < 0 || p.cols <= 0 || p.cols % layout->block_elems != 0 ||
      p.src_row_bytes < p.cols / layout->block_elems * layout->block_bytes) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  DEFT_DISPATCH_HALF(p.dtype, T,
                     DequantKernel<T><<<GridFor(p.rows * p.cols), 256, 0, stream>>>(p, *layout));
  return LastLaunchError();
}

cudaError_t LaunchSyntheticFill(const SyntheticFillParams& p, cudaStream_t stream) {
  if (p.n < 0) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  if (p.dtype == Dtype::kFloat32) {
    SyntheticFillKernel<float><<<GridFor(p.n), 256, 0, stream>>>(p);
    return LastLaunchError();
  }
  DEFT_DISPATCH_HALF(p.dtype, T, SyntheticFillKernel<T><<<GridFor(p.n), 256, 0, stream>>>(p));
  return LastLaunchError();
}

}  // namespace deft::kernels
