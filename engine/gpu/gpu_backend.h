// The CUDA step backend (StepBackend, engine/model/step_backend.h): runs LlamaModel::ForwardStep
// on one GPU with the model kernels (kernels/model), cuBLASLt GEMMs and DeFT tree attention
// (kernels/attention) over a device KV pool (device_kv_storage.h).
//
// A step: the step's token ids, positions, KV slots and logit rows go up in one packed
// cudaMemcpyAsync and the plan in another (GpuTreeAttention::Upload); then per layer RMSNorm ->
// fused QKV GEMM -> RoPE + KV append (q to its own buffer, rotated k and v into the pool) -> tree
// attention -> O GEMM added onto the fp32 residual -> RMSNorm -> fused gate/up GEMM -> SwiGLU ->
// down GEMM added onto the residual; the output head runs on the logit rows only. ForwardStep
// copies the logits to the host; ForwardStepOnDevice leaves them on the device for SampleOnDevice.
//
// Precision: weights, activations between kernels and the KV pool in `dtype` (bf16 by default),
// residual stream and logits fp32, every GEMM accumulates in fp32.
//
// Thread safety: one step at a time (as StepBackend); the backend owns its CUDA stream.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/gpu/cuda_util.h"
#include "engine/gpu/device_kv_storage.h"
#include "engine/gpu/device_weights.h"
#include "engine/attention/gpu_chunking.h"
#include "engine/gpu/gpu_tree_attention.h"
#include "engine/model/llama_config.h"
#include "engine/model/step_backend.h"
#include "engine/model/synthetic_model.h"
#include "kernels/model/gemm.h"
#include "kernels/model/sampling.h"

namespace deft::gpu {

struct GpuBackendOptions {
  kernels::Dtype dtype = kernels::Dtype::kBFloat16;  // weights/activations/KV (loaded models)
  // Fraction of the device memory free when the pool is made that the KV pool takes.
  double kv_memory_fraction = 0.85;
  // Capture a step in a CUDA graph when the next step has the same launch parameters (token
  // count, plan sizes and device addresses, buffers) and replay it for every later step that
  // does. In a decode the plan's arrays keep their device addresses as the tree grows
  // (DeviceTreeAttentionPlan's regions), so most steps replay: bench/gpu_decode's growing
  // decode measures 3-7% less time per Llama-3-8B step where the plan's shape holds, and no
  // loss where it changes every step (such shapes are never captured).
  bool cuda_graphs = true;
  // Batch-invariant steps: a token's logits do not depend on the other tokens in its step (how
  // many, which trees, which shapes), so a branch decodes the same alone or forked beside
  // others, as on the CPU reference. Costs speed: the GEMMs run the row-invariant kernel
  // (invariant_gemm.h) instead of cuBLASLt, and attention always plans in seq mode with
  // `invariant_chunk_tokens`-token chunks cut from the start of each query's path (the same
  // cut, partial states and merge order for a query whatever else is in the step).
  bool batch_invariant = false;
  int32_t invariant_chunk_tokens = 256;
  // Sample the rows ForwardStep is asked to (StepSampling) on the device (sampling.h), so that
  // only their tokens come back to the host instead of [rows, vocab] fp32 logits sampled on the
  // CPU. Off: ForwardStep leaves them to the caller.
  bool device_sampling = true;
};

class GpuBackend : public StepBackend {
 public:
  // The weights of a loaded model, dequantized on the device. FAILED_PRECONDITION without a
  // device; INVALID_ARGUMENT for a shape the kernels do not support (head_dim 64 or 128, 1..8
  // query heads per KV head) or a weight type the device cannot read.
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const LlamaConfig& config,
                                                            const LlamaWeights& weights,
                                                            const GpuBackendOptions& options);
  // Synthetic weights generated on the device (the dtype is the spec's).
  static absl::StatusOr<std::unique_ptr<GpuBackend>> CreateSynthetic(
      const SyntheticModelSpec& spec, const GpuBackendOptions& options);
  ~GpuBackend() override;

  std::string_view name() const override { return "cuda"; }
  KvStorageFactory kv_storage() override;
  int64_t KvPoolBlocks(const KvPoolShape& shape, int64_t requested_bytes) override;
  // With `sampling` (and options.device_sampling) its rows are sampled on the device; the
  // logits are copied to the host only where sampling->need_logits (or nothing samples here).
  absl::Status ForwardStep(const StepInput& step, KvBlockPool& kv_pool, const PartitionPlan& plan,
                           std::vector<float>* logits, StepSampling* sampling = nullptr) override;
  // Chunk sizes for the GPU kernels (GpuChunkChooser: the cost model of gpu_chunking.h, chosen
  // again when the step's shape moves), the mode and IO accounting of planner.options().
  absl::Status Plan(PartitionPlanner& planner, std::span<const PlanSegment> segments,
                    std::span<const PlanQuery> queries, PartitionPlan* plan) override;

  // The step without the logits' copy: they stay in device_logits() [logit rows, vocab] until
  // the next step. Queued on stream() (not synchronized).
  absl::Status ForwardStepOnDevice(const StepInput& step, KvBlockPool& kv_pool,
                                   const PartitionPlan& plan);
  const float* device_logits() const { return logits_.as<float>(); }
  // Samples one token per logit row of the last step on the device (sampling.h: the CPU
  // Sampler's token for the same seed and step; rows without penalty entries) and waits.
  absl::StatusOr<std::vector<int32_t>> SampleOnDevice(
      const std::vector<kernels::SampleRowParams>& rows);

  cudaStream_t stream() const { return stream_; }
  void set_cuda_graphs(bool on) { options_.cuda_graphs = on; }
  // Profiling: with it on, every step records an event after each phase (graphs are not used),
  // and LastStepPhases() gives the device seconds per phase of the last step, summed over the
  // layers, in first-seen order ("rmsnorm", "gemm qkv", "rope + kv append", "attention",
  // "gemm o", "gemm gate/up", "swiglu", "gemm down", "output head", "other": embedding and the
  // gaps between layers). Waits for the step.
  void set_profiling(bool on) { profile_ = on; }
  absl::StatusOr<std::vector<std::pair<std::string, double>>> LastStepPhases();
  int64_t graph_captures() const { return graph_captures_; }
  // Rows ForwardStep sampled on the device (StepSampling), since the backend was made.
  int64_t device_sampled_rows() const { return device_sampled_rows_; }
  int64_t graph_replays() const { return graph_replays_; }
  const LlamaConfig& config() const { return config_; }
  const DeviceWeights& weights() const { return *weights_; }

 private:
  GpuBackend(const LlamaConfig& config, const GpuBackendOptions& options);
  std::unique_ptr<GpuChunkChooser> chunk_chooser_;  // made in Init (needs the device's SMs)
  absl::Status Init();  // stream, GEMM runner, RoPE table; validates the shape
  absl::Status Reserve(int64_t tokens, int64_t logit_rows);
  absl::Status UploadStep(const StepInput& step);
  // Queues every launch of the step (inputs and plan already uploaded).
  absl::Status EnqueueStep(const DeviceKvStorage& kv, int64_t n, int64_t rows);
  void ClearGraphs();
  // Queues the sampling of rows.size() rows of the last step's logits (row r: logit row
  // logit_rows[r], or r when logit_rows is empty) and the copies of their tokens (and
  // log-probabilities, when `logprobs` is not null; and [rows, max_top] alternatives, when
  // `top_ids` is not null) to the host; the caller synchronizes.
  absl::Status EnqueueSample(const std::vector<kernels::SampleRowParams>& rows,
                             const std::vector<int32_t>& logit_rows, int32_t* tokens,
                             float* logprobs, int32_t max_top, int32_t* top_ids,
                             float* top_logprobs, const std::vector<int32_t>& penalty_ids,
                             const std::vector<int32_t>& penalty_counts);
  absl::Status Mark(const char* phase);  // records a profiling event when profiling
  absl::Status Gemm(const void* w, const void* x, void* y, int64_t m, int64_t n, int64_t k,
                    kernels::Dtype out, bool accumulate);

  LlamaConfig config_;
  GpuBackendOptions options_;
  kernels::Dtype dtype_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<DeviceWeights> weights_;
  std::unique_ptr<kernels::GemmRunner> gemm_;
  GpuTreeAttention attention_;
  DeviceBuffer inv_freq_;  // fp64 [rope_dim / 2]
  // Step inputs: pinned staging and its device copy; `uploaded_` marks the copy's completion.
  void* host_inputs_ = nullptr;
  size_t host_inputs_bytes_ = 0;
  cudaEvent_t uploaded_ = nullptr;
  bool upload_pending_ = false;
  DeviceBuffer inputs_;
  const int32_t* d_tokens_ = nullptr;
  const int64_t* d_positions_ = nullptr;
  const int32_t* d_slots_ = nullptr;
  const int32_t* d_rows_ = nullptr;
  int64_t step_rows_ = 0;
  // Activations (grown to the largest step seen).
  DeviceBuffer x_, xn_, qkv_, q_, attn_, gate_up_, ffn_, logits_;
  DeviceBuffer sample_params_, sample_tokens_, sample_workspace_;
  int64_t device_sampled_rows_ = 0;
  // Captured steps, oldest first.
  struct GraphKey {
    int64_t n, rows, mode;
    kernels::TreeAttentionPlanView plan;
    const void* kv;
    const void* buffers[9];
  };
  struct Graph {
    GraphKey key;
    cudaGraphExec_t exec;
  };
  static constexpr size_t kMaxGraphs = 8;
  std::vector<Graph> graphs_;
  GraphKey last_key_;  // the previous step's key (captured when the next step repeats it)
  bool last_key_valid_ = false;
  int32_t max_entries_ = 0;
  int64_t graph_captures_ = 0, graph_replays_ = 0;
  bool profile_ = false;
  std::vector<cudaEvent_t> events_;  // reused across steps
  std::vector<const char*> marks_;   // phase ended by events_[i]
};

}  // namespace deft::gpu
