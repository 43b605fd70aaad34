// Embedding gather, RMSNorm, RoPE, SwiGLU, KV append and row copies (layer_kernels.h).
#include "kernels/model/dispatch.cuh"
#include "kernels/model/layer_kernels.h"

namespace deft::kernels {
namespace {

constexpr int kThreads = 256;

int Blocks(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void EmbeddingKernel(const __grid_constant__ EmbeddingParams p) {
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

// One thread per (row, head, rotated pair), each computing its own angle: a per-pair loop over
// the heads instead serialized 32 dependent load/store rounds per thread (in == out may alias)
// and ran ~7 us per launch at Llama-3-8B decode shapes; fp64 sincos per thread costs far less.
template <typename T>
__global__ void RopeKernel(const __grid_constant__ RopeParams p) {
  const int half = p.rope_dim / 2;
  const int r = blockIdx.y;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const T* in = static_cast<const T*>(p.in) + r * p.in_row_stride;
  T* out = static_cast<T*>(p.out) + r * p.out_row_stride;
  if (idx < p.heads * half) {
    const int h = idx / half, i = idx % half;
    const double angle = static_cast<double>(p.positions[r]) / p.linear_scale * p.inv_freq[i];
    double sd, cd;
    sincos(angle, &sd, &cd);
    const float cs = static_cast<float>(cd), sn = static_cast<float>(sd);
    const int a = p.neox ? i : 2 * i, b = p.neox ? i + half : 2 * i + 1;
    const int64_t base = static_cast<int64_t>(h) * p.head_dim;
    const float x0 = ToFloat(in[base + a]), x1 = ToFloat(in[base + b]);
    out[base + a] = FromFloat<T>(x0 * cs - x1 * sn);
    out[base + b] = FromFloat<T>(x0 * sn + x1 * cs);
  }
  // Dims past rope_dim (none for Llama) pass through.
  const int rest = p.head_dim - p.rope_dim;
  if (idx < p.heads * rest) {
    const int64_t at = static_cast<int64_t>(idx / rest) * p.head_dim + p.rope_dim + idx % rest;
    out[at] = in[at];
  }
}

template <typename T>
__global__ void SwigluKernel(const __grid_constant__ SwigluParams p) {
  const int r = blockIdx.y;
  const T* gu = static_cast<const T*>(p.gate_up) + static_cast<int64_t>(r) * 2 * p.ffn;
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(r) * p.ffn;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < p.ffn; j += gridDim.x * blockDim.x) {
    const float g = ToFloat(gu[j]), u = ToFloat(gu[p.ffn + j]);
    out[j] = FromFloat<T>(g / (1.f + expf(-g)) * u);
  }
}

// 16-byte vectors when every row start is aligned, else elements: the copies are exact either way.
template <typename V>
__global__ void KvAppendKernel(const __grid_constant__ KvAppendParams p, int vec_per_row,
                               int64_t stride_vecs) {
  const int r = blockIdx.y;
  const int32_t slot = p.slots[r];
  if (slot < 0) return;
  const V* k = static_cast<const V*>(p.k) + r * stride_vecs;
  const V* v = static_cast<const V*>(p.v) + r * stride_vecs;
  V* kd = static_cast<V*>(p.k_pool) + static_cast<int64_t>(slot) * vec_per_row;
  V* vd = static_cast<V*>(p.v_pool) + static_cast<int64_t>(slot) * vec_per_row;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < vec_per_row;
       j += gridDim.x * blockDim.x) {
    kd[j] = k[j];
    vd[j] = v[j];
  }
}

template <typename V>
__global__ void CopyRowsKernel(const __grid_constant__ CopyRowsParams p, int64_t row_vecs,
                               int64_t array_vecs) {
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
  DEFT_DISPATCH_HALF(p.dtype, T, EmbeddingKernel<T><<<grid, kThreads, 0, stream>>>(p));
  return LastLaunchError();
}

cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.hidden <= 0) return cudaErrorInvalidValue;
  if (p.num_rows == 0) return cudaSuccess;
  DEFT_DISPATCH_HALF(p.dtype, T, RmsNormKernel<T><<<p.num_rows, 1024, 0, stream>>>(p));
  return LastLaunchError();
}

cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.heads <= 0 || p.rope_dim <= 0 || p.rope_dim % 2 != 0 ||
      p.rope_dim > p.head_dim || p.num_rows > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.num_rows == 0) return cudaSuccess;
  const int64_t per_row = int64_t{p.heads} * std::max(p.rope_dim / 2, p.head_dim - p.rope_dim);
  dim3 grid(Blocks(per_row), p.num_rows);
  DEFT_DISPATCH_HALF(p.dtype, T, RopeKernel<T><<<grid, kThreads, 0, stream>>>(p));
  return LastLaunchError();
}

cudaError_t LaunchSwiglu(const SwigluParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.ffn <= 0 || p.rows > 65535) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  dim3 grid(std::min(Blocks(p.ffn), 64), p.rows);
  DEFT_DISPATCH_HALF(p.dtype, T, SwigluKernel<T><<<grid, kThreads, 0, stream>>>(p));
  return LastLaunchError();
}

cudaError_t LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.kv_dim <= 0 || p.num_rows > 65535 || DtypeBytes(p.dtype) != 2) {
    return cudaErrorInvalidValue;
  }
  if (p.num_rows == 0) return cudaSuccess;
  const int64_t row_bytes = int64_t{p.kv_dim} * 2, stride_bytes = p.src_row_stride * 2;
  const bool vec = row_bytes % 16 == 0 && stride_bytes % 16 == 0 && Aligned16(p.k) &&
                   Aligned16(p.v) && Aligned16(p.k_pool) && Aligned16(p.v_pool);
  const int unit = vec ? 16 : 2;
  const int per_row = static_cast<int>(row_bytes / unit);
  dim3 grid(std::min(Blocks(per_row), 8), p.num_rows);
  if (vec) {
    KvAppendKernel<uint4><<<grid, kThreads, 0, stream>>>(p, per_row, stride_bytes / unit);
  } else {
    KvAppendKernel<uint16_t><<<grid, kThreads, 0, stream>>>(p, per_row, stride_bytes / unit);
  }
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
    CopyRowsKernel<uint4><<<grid, kThreads, 0, stream>>>(p, row_units, array_bytes / unit);
  } else if (bytes == 4) {
    CopyRowsKernel<uint32_t><<<grid, kThreads, 0, stream>>>(p, row_units, array_bytes / unit);
  } else {
    CopyRowsKernel<uint16_t><<<grid, kThreads, 0, stream>>>(p, row_units, array_bytes / unit);
  }
  return LastLaunchError();
}

}  // namespace deft::kernels
