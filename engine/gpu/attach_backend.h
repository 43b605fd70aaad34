// Start-up choice of the step backend: the GPU backend when a CUDA device is present (unless
// forced off), the CPU reference otherwise. Callers built with DEFT_CUDA call this after
// LlamaModel::Create and before making the KV pool (LlamaModel::NewKvPool).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/gpu/gpu_backend.h"
#include "engine/model/llama_model.h"

namespace deft::gpu {

// Returns the name of the backend `model` runs on afterwards: "cuda" (weights uploaded and
// dequantized on the device) or "cpu" (force_cpu, or no device). Errors from the upload (a
// weight type the device cannot read, not enough device memory) are returned, and the model
// stays on the CPU.
absl::StatusOr<std::string> AttachStepBackend(LlamaModel& model, bool force_cpu,
                                              const GpuBackendOptions& options);

}  // namespace deft::gpu
