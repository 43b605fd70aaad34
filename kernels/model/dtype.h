// Element types of the model kernels' activations, weights and KV pool, and the dispatch helper
// that turns a runtime Dtype into a compile-time CUDA type (the only place that does).
#pragma once

#include <cstdint>

namespace deft::kernels {

enum class Dtype : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

inline constexpr int DtypeBytes(Dtype d) { return d == Dtype::kFloat32 ? 4 : 2; }

}  // namespace deft::kernels
