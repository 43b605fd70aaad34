// Embedding gather, RMSNorm, RoPE, SwiGLU, KV append and row copies (layer_kernels.h).
#include <algorithm>

#include "kernels/model/dispatch.cuh"
#include "kernels/model/layer_kernels.h"

namespace deft::kernels {
namespace {

constexpr int kThreads = 256;

int Blocks(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void EmbeddingKernel(const __grid_constant__ EmbeddingParams p) {
  GridDependencyWait();  // launched by LaunchPdl
  GridDependentsMayLaunch();
  const int r = blockIdx.y;
  const T* row = static_cast<const T*>(p.table) + static_cast<int64_t>(p.tokens[r]) * p.hidden;
  float* out = p.out + static_cast<int64_t>(r) * p.hidden;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < p.hidden; j += gridDim.x * blockDim.x) {
    out[j] = ToFloat(row[j]);
  }
}

// One CTA per row: sum of squares in fp32 (block reduction), then the scaled store.
template <typename T>
__global__ void RmsNormKernel(const __grid_constant__ RmsNormParams p) {
  GridDependencyWait();  // launched by LaunchPdl
  GridDependentsMayLaunch();
  const int r = blockIdx.x;
  const int src = p.rows != nullptr ? p.rows[r] : r;
  const float* x = p.x + static_cast<int64_t>(src) * p.hidden;
  float ss = 0.f;
  for (int j = threadIdx.x; j < p.hidden; j += blockDim.x) ss += x[j] * x[j];
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) warp_sums[0] = s;
  }
  __syncthreads();
  const float scale = rsqrtf(warp_sums[0] / p.hidden + p.eps);
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(r) * p.hidden;
  for (int j = threadIdx.x; j < p.hidden; j += blockDim.x) {
    out[j] = FromFloat<T>(p.weight[j] * (x[j] * scale));
  }
}

// One thread per (row, head, rotated pair), each computing its own angle (a per-pair loop over
// the heads serialized 32 dependent load/store rounds per thread: ~7 us per launch at
// Llama-3-8B decode shapes; fp64 sincos per thread costs far less). The same threads then copy
// the pass-through dims and V.
template <typename T>
__global__ void RopeKvAppendKernel(const __grid_constant__ RopeKvAppendParams p) {
  GridDependencyWait();  // launched by LaunchPdl
  GridDependentsMayLaunch();
  const int half = p.rope_dim / 2;
  const int r = blockIdx.y;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int heads = p.num_heads + p.num_kv_heads;
  const int kv_dim = p.num_kv_heads * p.head_dim;
  const int32_t slot = p.slots[r];
  const T* in = static_cast<const T*>(p.qkv) + r * p.qkv_row_stride;
  // Where head h of this row goes: Q heads to q_out, K heads to the pool (or nowhere).
  auto head_out = [&](int h) -> T* {
    if (h < p.num_heads) {
      return static_cast<T*>(p.q_out) + (static_cast<int64_t>(r) * p.num_heads + h) * p.head_dim;
    }
    if (slot < 0) return nullptr;
    return static_cast<T*>(p.k_pool) + static_cast<int64_t>(slot) * kv_dim +
           static_cast<int64_t>(h - p.num_heads) * p.head_dim;
  };
  if (idx < heads * half) {
    const int h = idx / half, i = idx % half;
    T* out = head_out(h);
    if (out != nullptr) {
      const double angle = static_cast<double>(p.positions[r]) / p.linear_scale * p.inv_freq[i];
      double sd, cd;
      sincos(angle, &sd, &cd);
      const float cs = static_cast<float>(cd), sn = static_cast<float>(sd);
      const int a = p.neox ? i : 2 * i, b = p.neox ? i + half : 2 * i + 1;
      const T* v = in + static_cast<int64_t>(h) * p.head_dim;
      const float x0 = ToFloat(v[a]), x1 = ToFloat(v[b]);
      out[a] = FromFloat<T>(x0 * cs - x1 * sn);
      out[b] = FromFloat<T>(x0 * sn + x1 * cs);
    }
  }
  const int rest = p.head_dim - p.rope_dim;  // none for Llama
  if (idx < heads * rest) {
    const int h = idx / rest, d = p.rope_dim + idx % rest;
    T* out = head_out(h);
    if (out != nullptr) out[d] = in[static_cast<int64_t>(h) * p.head_dim + d];
  }
  if (idx < kv_dim && slot >= 0) {
    static_cast<T*>(p.v_pool)[static_cast<int64_t>(slot) * kv_dim + idx] =
        in[static_cast<int64_t>(heads) * p.head_dim + idx];
  }
}

template <typename T>
__global__ void SwigluKernel(const __grid_constant__ SwigluParams p) {
  GridDependencyWait();  // launched by LaunchPdl
  GridDependentsMayLaunch();
  const int r = blockIdx.y;
  const T* gu = static_cast<const T*>(p.gate_up) + static_cast<int64_t>(r) * 2 * p.ffn;
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(r) * p.ffn;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < p.ffn; j += gridDim.x * blockDim.x) {
    const float g = ToFloat(gu[j]), u = ToFloat(gu[p.ffn + j]);
    out[j] = FromFloat<T>(g / (1.f + expf(-g)) * u);
  }
}

template <typename V>
__global__ void CopyRowsKernel(const __grid_constant__ CopyRowsParams p, int64_t row_vecs,
                               int64_t array_vecs) {
  GridDependencyWait();  // launched by LaunchPdl
  GridDependentsMayLaunch();
  const int pair = blockIdx.y;
  const int a = blockIdx.z;
  V* base = static_cast<V*>(p.base) + a * array_vecs;
  const V* src = base + p.src_rows[pair] * row_vecs;
  V* dst = base + p.dst_rows[pair] * row_vecs;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < row_vecs;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[j] = src[j];
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.hidden <= 0 || p.rows > 65535) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  dim3 grid(std::min(Blocks(p.hidden), 16), p.rows);
  DEFT_DISPATCH_HALF(p.dtype, T, return LaunchPdl(EmbeddingKernel<T>, grid, kThreads, 0, stream, p));
  return LastLaunchError();
}

cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.hidden <= 0) return cudaErrorInvalidValue;
  if (p.num_rows == 0) return cudaSuccess;
  DEFT_DISPATCH_HALF(p.dtype, T, return LaunchPdl(RmsNormKernel<T>, p.num_rows, 1024, 0, stream, p));
  return LastLaunchError();
}

cudaError_t LaunchRopeKvAppend(const RopeKvAppendParams& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.rope_dim <= 0 ||
      p.rope_dim % 2 != 0 || p.rope_dim > p.head_dim || p.num_rows > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.num_rows == 0) return cudaSuccess;
  const int64_t heads = int64_t{p.num_heads} + p.num_kv_heads;
  const int64_t per_row = std::max({heads * (p.rope_dim / 2), heads * (p.head_dim - p.rope_dim),
                                    int64_t{p.num_kv_heads} * p.head_dim});
  dim3 grid(Blocks(per_row), p.num_rows);
  DEFT_DISPATCH_HALF(p.dtype, T, return LaunchPdl(RopeKvAppendKernel<T>, grid, kThreads, 0, stream, p));
  return LastLaunchError();
}

cudaError_t LaunchSwiglu(const SwigluParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.ffn <= 0 || p.rows > 65535) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  dim3 grid(std::min(Blocks(p.ffn), 64), p.rows);
  DEFT_DISPATCH_HALF(p.dtype, T, return LaunchPdl(SwigluKernel<T>, grid, kThreads, 0, stream, p));
  return LastLaunchError();
}

cudaError_t LaunchCopyRows(const CopyRowsParams& p, cudaStream_t stream) {
  if (p.num_pairs < 0 || p.num_arrays <= 0 || p.row_elems <= 0 || p.num_pairs > 65535 ||
      p.num_arrays > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.num_pairs == 0) return cudaSuccess;
  const int64_t bytes = DtypeBytes(p.dtype);
  const int64_t row_bytes = p.row_elems * bytes, array_bytes = p.array_stride * bytes;
  const bool vec = row_bytes % 16 == 0 && array_bytes % 16 == 0 && Aligned16(p.base);
  const int64_t unit = vec ? 16 : bytes;
  const int64_t row_units = row_bytes / unit;
  dim3 grid(static_cast<unsigned>(std::min<int64_t>((row_units + kThreads - 1) / kThreads, 64)),
            p.num_pairs, p.num_arrays);
  if (vec) {
    return LaunchPdl(CopyRowsKernel<uint4>, grid, kThreads, 0, stream, p, row_units,
                     array_bytes / unit);
  }
  if (bytes == 4) {
    return LaunchPdl(CopyRowsKernel<uint32_t>, grid, kThreads, 0, stream, p, row_units,
                     array_bytes / unit);
  }
  return LaunchPdl(CopyRowsKernel<uint16_t>, grid, kThreads, 0, stream, p, row_units,
                   array_bytes / unit);
}

}  // namespace deft::kernels
