#include "engine/gpu/attach_backend.h"

namespace deft::gpu {

absl::StatusOr<std::string> AttachStepBackend(LlamaModel& model, bool force_cpu,
                                              const GpuBackendOptions& options) {
  if (force_cpu || !CudaDevicePresent()) {
    model.SetStepBackend(nullptr);
    return std::string("cpu");
  }
  auto gpu = GpuBackend::Create(model.config(), model.loaded().weights, options);
  if (!gpu.ok()) return gpu.status();
  model.SetStepBackend(std::move(*gpu));
  return std::string("cuda");
}

}  // namespace deft::gpu
