#include "engine/gpu/gpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/gpu/device_kv_storage.h"
#include "kernels/model/layer_kernels.h"

namespace deft::gpu {
namespace {

using kernels::Dtype;

constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;

size_t Align(size_t n) { return (n + 255) / 256 * 256; }

#define DEFT_RETURN_IF_ERROR(expr)                     \
  do {                                                 \
    if (absl::Status _s = (expr); !_s.ok()) return _s; \
  } while (0)

}  // namespace

GpuBackend::GpuBackend(const LlamaConfig& config, const GpuBackendOptions& options)
    : config_(config), options_(options), dtype_(options.dtype) {}

GpuBackend::~GpuBackend() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  ClearGraphs();
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  if (uploaded_ != nullptr) cudaEventDestroy(uploaded_);
  if (host_inputs_ != nullptr) cudaFreeHost(host_inputs_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status GpuBackend::Plan(PartitionPlanner& planner, std::span<const PlanSegment> segments,
                              std::span<const PlanQuery> queries, PartitionPlan* plan) {
  if (options_.batch_invariant) {
    PlannerOptions o = planner.options();
    o.mode = AttentionMode::kSeq;
    o.seq_chunk_tokens = options_.invariant_chunk_tokens;
    return PartitionPlanner(o).Plan(segments, queries, plan);
  }
  return chunk_chooser_->Plan(planner.options(), segments, queries, plan);
}

absl::Status GpuBackend::Init() {
  const LlamaConfig& c = config_;
  {
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      sms = 132;
    }
    GpuAttentionCostModel m;
    m.num_heads = static_cast<int32_t>(c.num_heads);
    m.num_kv_heads = static_cast<int32_t>(c.num_kv_heads);
    m.head_dim = static_cast<int32_t>(c.head_dim);
    m.elem_bytes = 2;
    m.sms = sms;
    chunk_chooser_ = std::make_unique<GpuChunkChooser>(m);
  }
  if (!CudaDevicePresent()) return absl::FailedPreconditionError("no CUDA device");
  if (options_.batch_invariant && options_.invariant_chunk_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("invariant_chunk_tokens must be >= 1, not ",
                                                   options_.invariant_chunk_tokens));
  }
  if ((c.head_dim != 64 && c.head_dim != 128) || c.num_kv_heads <= 0 ||
      c.num_heads % c.num_kv_heads != 0 || c.num_heads / c.num_kv_heads > 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the GPU kernels support head_dim 64 or 128 and 1..8 query heads per KV head; the model "
        "has head_dim ",
        c.head_dim, ", ", c.num_heads, " heads, ", c.num_kv_heads, " KV heads"));
  }
  if (c.rope_dim <= 0 || c.rope_dim > c.head_dim || c.rope_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported rope_dim ", c.rope_dim));
  }
  DEFT_RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream"));
  DEFT_RETURN_IF_ERROR(
      CudaStatus(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming), "event"));
  DEFT_RETURN_IF_ERROR(
      CudaStatus(kernels::GemmRunner::Create(kGemmWorkspaceBytes, &gemm_), "cuBLASLt"));
  const std::vector<double> inv = RopeInverseFrequencies(c);
  DEFT_RETURN_IF_ERROR(inv_freq_.Reserve(inv.size() * sizeof(double)));
  return CudaStatus(
      cudaMemcpy(inv_freq_.get(), inv.data(), inv.size() * sizeof(double), cudaMemcpyHostToDevice),
      "RoPE table");
}

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const LlamaConfig& config,
                                                               const LlamaWeights& weights,
                                                               const GpuBackendOptions& options) {
  std::unique_ptr<GpuBackend> b(new GpuBackend(config, options));
  DEFT_RETURN_IF_ERROR(b->Init());
  auto w = DeviceWeights::Upload(config, weights, options.dtype, b->stream_);
  if (!w.ok()) return w.status();
  b->weights_ = std::move(*w);
  return b;
}

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::CreateSynthetic(
    const SyntheticModelSpec& spec, const GpuBackendOptions& options) {
  GpuBackendOptions o = options;
  o.dtype = spec.dtype == GgmlType::kF16 ? Dtype::kFloat16 : Dtype::kBFloat16;
  std::unique_ptr<GpuBackend> b(new GpuBackend(spec.config, o));
  DEFT_RETURN_IF_ERROR(b->Init());
  auto w = DeviceWeights::Synthetic(spec, b->stream_);
  if (!w.ok()) return w.status();
  b->weights_ = std::move(*w);
  return b;
}

KvStorageFactory GpuBackend::kv_storage() {
  return [this](const KvPoolShape& shape,
                int64_t num_blocks) -> absl::StatusOr<std::unique_ptr<KvStorage>> {
    auto s = DeviceKvStorage::Create(shape, num_blocks, dtype_, stream_);
    if (!s.ok()) return s.status();
    return std::unique_ptr<KvStorage>(std::move(*s));
  };
}

int64_t GpuBackend::KvPoolBlocks(const KvPoolShape& shape, int64_t /*requested_bytes*/) {
  size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
  const int64_t budget = static_cast<int64_t>(options_.kv_memory_fraction * free_bytes);
  const int64_t blocks = budget / DeviceKvStorage::BlockBytes(shape, dtype_);
  return std::min<int64_t>(blocks, KvBlockPool::kMaxSlots / shape.block_tokens);
}

absl::Status GpuBackend::Reserve(int64_t n, int64_t rows) {
  const LlamaConfig& c = config_;
  const size_t e = kernels::DtypeBytes(dtype_);
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  DEFT_RETURN_IF_ERROR(x_.Reserve(n * c.hidden * 4));
  DEFT_RETURN_IF_ERROR(xn_.Reserve(std::max(n, rows) * c.hidden * e));
  DEFT_RETURN_IF_ERROR(qkv_.Reserve(n * (q + 2 * kv) * e));
  DEFT_RETURN_IF_ERROR(q_.Reserve(n * q * e));
  DEFT_RETURN_IF_ERROR(attn_.Reserve(n * q * e));
  DEFT_RETURN_IF_ERROR(gate_up_.Reserve(n * 2 * c.ffn_hidden * e));
  DEFT_RETURN_IF_ERROR(ffn_.Reserve(n * c.ffn_hidden * e));
  return logits_.Reserve(std::max<int64_t>(rows, 1) * c.vocab_size * 4);
}

absl::Status GpuBackend::UploadStep(const StepInput& step) {
  const size_t n = step.tokens.size(), r = step.logit_rows.size();
  const size_t off_pos = Align(n * 4), off_slots = off_pos + Align(n * 8);
  const size_t off_rows = off_slots + Align(n * 4),
               bytes = off_rows + Align(std::max<size_t>(r, 1) * 4);
  if (upload_pending_) {  // the previous copy may still read the staging buffer
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(uploaded_), "step upload"));
    upload_pending_ = false;
  }
  if (bytes > host_inputs_bytes_) {
    if (host_inputs_ != nullptr) cudaFreeHost(host_inputs_);
    host_inputs_ = nullptr;
    host_inputs_bytes_ = 0;
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaMallocHost(&host_inputs_, bytes * 2), "pinned staging"));
    host_inputs_bytes_ = bytes * 2;
  }
  DEFT_RETURN_IF_ERROR(inputs_.Reserve(host_inputs_bytes_));
  auto* h = static_cast<uint8_t*>(host_inputs_);
  std::memcpy(h, step.tokens.data(), n * 4);
  std::memcpy(h + off_pos, step.positions.data(), n * 8);
  std::memcpy(h + off_slots, step.kv_slots.data(), n * 4);
  if (r > 0) std::memcpy(h + off_rows, step.logit_rows.data(), r * 4);
  auto* d = inputs_.as<uint8_t>();
  d_tokens_ = reinterpret_cast<const int32_t*>(d);
  d_positions_ = reinterpret_cast<const int64_t*>(d + off_pos);
  d_slots_ = reinterpret_cast<const int32_t*>(d + off_slots);
  d_rows_ = reinterpret_cast<const int32_t*>(d + off_rows);
  DEFT_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream_), "step upload"));
  DEFT_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(uploaded_, stream_), "step upload"));
  upload_pending_ = true;
  return absl::OkStatus();
}

absl::Status GpuBackend::Gemm(const void* w, const void* x, void* y, int64_t m, int64_t n,
                              int64_t k, Dtype out, bool accumulate) {
  kernels::GemmParams p{m, n, k, w, x, y, dtype_, out, accumulate, options_.batch_invariant};
  const cudaError_t e = gemm_->Run(p, stream_);
  if (e == cudaErrorNotSupported) {
    return absl::InternalError(absl::StrCat("GEMM ", m, "x", n, "x", k, ": ", gemm_->last_error()));
  }
  return CudaStatus(e, absl::StrCat("GEMM ", m, "x", n, "x", k));
}

absl::Status GpuBackend::ForwardStepOnDevice(const StepInput& step, KvBlockPool& kv_pool,
                                             const PartitionPlan& plan) {
  auto* kv = dynamic_cast<DeviceKvStorage*>(&kv_pool.storage());
  if (kv == nullptr || kv->dtype() != dtype_) {
    return absl::FailedPreconditionError("the KV pool's storage is not this GPU backend's");
  }
  const LlamaConfig& c = config_;
  const int64_t n = static_cast<int64_t>(step.tokens.size());
  const int64_t rows = static_cast<int64_t>(step.logit_rows.size());
  if (n > 65535) return absl::InvalidArgumentError("a GPU step holds at most 65535 tokens");
  DEFT_RETURN_IF_ERROR(Reserve(n, rows));
  DEFT_RETURN_IF_ERROR(UploadStep(step));
  DEFT_RETURN_IF_ERROR(attention_.Upload(plan, static_cast<int32_t>(c.num_heads),
                                         static_cast<int32_t>(c.num_kv_heads),
                                         static_cast<int32_t>(c.head_dim), stream_));
  step_rows_ = rows;
  if (!options_.cuda_graphs || profile_) return EnqueueStep(*kv, n, rows);
  // Every value the step's launches take by value: equal keys replay the same graph (the
  // inputs and the plan were just uploaded to the same device addresses).
  GraphKey key;
  std::memset(static_cast<void*>(&key), 0, sizeof(key));
  key.n = n;
  key.rows = rows;
  key.mode = static_cast<int64_t>(plan.mode);
  key.plan = attention_.view();
  key.kv = kv->k(0);
  const void* buffers[] = {x_.get(),       xn_.get(),  qkv_.get(),    q_.get(),     attn_.get(),
                           gate_up_.get(), ffn_.get(), logits_.get(), inputs_.get()};
  std::memcpy(key.buffers, buffers, sizeof(buffers));
  // The attention workspace moves only when a plan needs more entries than any before it.
  if (plan.num_entries() > max_entries_) {
    max_entries_ = plan.num_entries();
    ClearGraphs();
  }
  for (Graph& g : graphs_) {
    if (std::memcmp(&g.key, &key, sizeof(key)) == 0) {
      ++graph_replays_;
      last_key_valid_ = false;
      return CudaStatus(cudaGraphLaunch(g.exec, stream_), "CUDA graph launch");
    }
  }
  // A shape seen for the first time runs directly; it is captured when the next step repeats it
  // (a capture costs milliseconds: a tree whose plan changes every step never pays for one).
  const bool repeated = last_key_valid_ && std::memcmp(&last_key_, &key, sizeof(key)) == 0;
  last_key_ = key;
  last_key_valid_ = true;
  if (!repeated) return EnqueueStep(*kv, n, rows);
  last_key_valid_ = false;
  DEFT_RETURN_IF_ERROR(CudaStatus(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                                  "CUDA graph capture"));
  const absl::Status enqueued = EnqueueStep(*kv, n, rows);
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
  if (!enqueued.ok() || ended != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    return enqueued.ok() ? CudaStatus(ended, "CUDA graph capture") : enqueued;
  }
  Graph g{key, nullptr};
  const cudaError_t made = cudaGraphInstantiate(&g.exec, graph, 0);
  cudaGraphDestroy(graph);
  DEFT_RETURN_IF_ERROR(CudaStatus(made, "CUDA graph instantiate"));
  if (graphs_.size() >= kMaxGraphs) {
    cudaGraphExecDestroy(graphs_.front().exec);
    graphs_.erase(graphs_.begin());
  }
  graphs_.push_back(g);
  ++graph_captures_;
  return CudaStatus(cudaGraphLaunch(g.exec, stream_), "CUDA graph launch");
}

void GpuBackend::ClearGraphs() {
  for (Graph& g : graphs_) cudaGraphExecDestroy(g.exec);
  graphs_.clear();
}

absl::Status GpuBackend::EnqueueStep(const DeviceKvStorage& kv_storage, int64_t n, int64_t rows) {
  const DeviceKvStorage* kv = &kv_storage;
  const LlamaConfig& c = config_;
  const int64_t H = c.hidden, q_dim = c.num_heads * c.head_dim,
                kv_dim = c.num_kv_heads * c.head_dim;
  const int64_t qkv_dim = q_dim + 2 * kv_dim, F = c.ffn_hidden;
  const GpuAttentionLayer attn_shape{
      dtype_ == Dtype::kFloat16 ? kernels::KvDtype::kFloat16 : kernels::KvDtype::kBFloat16,
      static_cast<int32_t>(c.num_heads), static_cast<int32_t>(c.num_kv_heads),
      static_cast<int32_t>(c.head_dim)};
  const int32_t n32 = static_cast<int32_t>(n);
  marks_.clear();
  DEFT_RETURN_IF_ERROR(Mark("start"));
  DEFT_RETURN_IF_ERROR(CudaStatus(
      kernels::LaunchEmbedding(
          {weights_->token_embd(), dtype_, d_tokens_, x_.as<float>(), n32, static_cast<int32_t>(H)},
          stream_),
      "embedding"));
  auto norm = [&](const float* weight, const int32_t* gather, int32_t count) {
    kernels::RmsNormParams p{x_.as<float>(),          gather,   weight, xn_.get(), dtype_, count,
                             static_cast<int32_t>(H), c.rms_eps};
    return CudaStatus(kernels::LaunchRmsNorm(p, stream_), "rms norm");
  };
  uint8_t* qkv = qkv_.as<uint8_t>();
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const DeviceLayerWeights& L = weights_->layer(l);
    DEFT_RETURN_IF_ERROR(Mark("other"));
    DEFT_RETURN_IF_ERROR(norm(L.attn_norm, nullptr, n32));
    DEFT_RETURN_IF_ERROR(Mark("rmsnorm"));
    DEFT_RETURN_IF_ERROR(Gemm(L.wqkv, xn_.get(), qkv, n, qkv_dim, H, dtype_, false));
    DEFT_RETURN_IF_ERROR(Mark("gemm qkv"));
    const kernels::RopeKvAppendParams rope{qkv,
                                           qkv_dim,
                                           q_.get(),
                                           kv->k(l),
                                           kv->v(l),
                                           d_slots_,
                                           d_positions_,
                                           inv_freq_.as<double>(),
                                           static_cast<double>(c.rope_linear_scale),
                                           dtype_,
                                           n32,
                                           static_cast<int32_t>(c.num_heads),
                                           static_cast<int32_t>(c.num_kv_heads),
                                           static_cast<int32_t>(c.head_dim),
                                           static_cast<int32_t>(c.rope_dim),
                                           c.rope_neox};
    DEFT_RETURN_IF_ERROR(
        CudaStatus(kernels::LaunchRopeKvAppend(rope, stream_), "RoPE + KV append"));
    DEFT_RETURN_IF_ERROR(Mark("rope + kv append"));
    GpuAttentionLayer a = attn_shape;
    a.q = q_.get();
    a.out = attn_.get();
    a.k = kv->k(l);
    a.v = kv->v(l);
    a.kv_slot_stride = kv->slot_stride();
    DEFT_RETURN_IF_ERROR(attention_.Run(a, stream_));
    DEFT_RETURN_IF_ERROR(Mark("attention"));
    DEFT_RETURN_IF_ERROR(Gemm(L.wo, attn_.get(), x_.get(), n, H, q_dim, Dtype::kFloat32, true));
    DEFT_RETURN_IF_ERROR(Mark("gemm o"));
    DEFT_RETURN_IF_ERROR(norm(L.ffn_norm, nullptr, n32));
    DEFT_RETURN_IF_ERROR(Mark("rmsnorm"));
    DEFT_RETURN_IF_ERROR(Gemm(L.w_gate_up, xn_.get(), gate_up_.get(), n, 2 * F, H, dtype_, false));
    DEFT_RETURN_IF_ERROR(Mark("gemm gate/up"));
    kernels::SwigluParams sw{gate_up_.get(), ffn_.get(), dtype_, n32, static_cast<int32_t>(F)};
    DEFT_RETURN_IF_ERROR(CudaStatus(kernels::LaunchSwiglu(sw, stream_), "swiglu"));
    DEFT_RETURN_IF_ERROR(Mark("swiglu"));
    DEFT_RETURN_IF_ERROR(Gemm(L.w_down, ffn_.get(), x_.get(), n, H, F, Dtype::kFloat32, true));
    DEFT_RETURN_IF_ERROR(Mark("gemm down"));
  }
  if (rows > 0) {
    DEFT_RETURN_IF_ERROR(Mark("other"));
    DEFT_RETURN_IF_ERROR(norm(weights_->output_norm(), d_rows_, static_cast<int32_t>(rows)));
    DEFT_RETURN_IF_ERROR(Gemm(weights_->output(), xn_.get(), logits_.get(), rows, c.vocab_size, H,
                              Dtype::kFloat32, false));
    DEFT_RETURN_IF_ERROR(Mark("output head"));
  }
  return absl::OkStatus();
}

absl::Status GpuBackend::Mark(const char* phase) {
  if (!profile_) return absl::OkStatus();
  if (marks_.size() == events_.size()) {
    cudaEvent_t e = nullptr;
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&e), "profiling event"));
    events_.push_back(e);
  }
  cudaEvent_t e = events_[marks_.size()];
  marks_.push_back(phase);
  return CudaStatus(cudaEventRecord(e, stream_), "profiling event");
}

absl::StatusOr<std::vector<std::pair<std::string, double>>> GpuBackend::LastStepPhases() {
  std::vector<std::pair<std::string, double>> out;
  if (marks_.empty()) return out;
  DEFT_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(events_[marks_.size() - 1]), "profile"));
  for (size_t i = 1; i < marks_.size(); ++i) {
    float ms = 0;
    DEFT_RETURN_IF_ERROR(
        CudaStatus(cudaEventElapsedTime(&ms, events_[i - 1], events_[i]), "profile"));
    auto it =
        std::find_if(out.begin(), out.end(), [&](const auto& p) { return p.first == marks_[i]; });
    if (it == out.end()) {
      out.emplace_back(marks_[i], ms * 1e-3);
    } else {
      it->second += ms * 1e-3;
    }
  }
  return out;
}

absl::Status GpuBackend::ForwardStep(const StepInput& step, KvBlockPool& kv_pool,
                                     const PartitionPlan& plan, std::vector<float>* logits,
                                     StepSampling* sampling) {
  DEFT_RETURN_IF_ERROR(ForwardStepOnDevice(step, kv_pool, plan));
  const bool here = sampling != nullptr && options_.device_sampling && !sampling->rows.empty();
  int32_t top = 0;  // alternatives per row copied back (the most any row asks for)
  std::vector<int32_t> top_ids;
  std::vector<float> top_lps;
  if (here) {
    std::vector<kernels::SampleRowParams> params(sampling->rows.size());
    std::vector<int32_t> rows(sampling->rows.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const StepSampling::Row& r = sampling->rows[i];
      params[i] = {r.temperature,        r.top_k,           r.top_p,
                   r.min_p,              r.seed,            r.step,
                   r.top_logprobs,       r.repetition_penalty, r.frequency_penalty,
                   r.presence_penalty,   r.penalty_begin,   r.penalty_count,
                   r.override_begin,     r.override_count};
      rows[i] = r.logit_row;
      top = std::max(top, std::min(r.top_logprobs, kernels::kMaxTopLogprobs));
    }
    sampling->tokens.resize(params.size());
    sampling->logprobs.resize(params.size());
    top_ids.resize(params.size() * top);
    top_lps.resize(params.size() * top);
    DEFT_RETURN_IF_ERROR(EnqueueSample(params, rows, sampling->tokens.data(),
                                       sampling->logprobs.data(), top,
                                       top > 0 ? top_ids.data() : nullptr, top_lps.data(),
                                       sampling->penalty_ids, sampling->penalty_counts));
  }
  if ((!here || sampling->need_logits) && step_rows_ > 0) {
    logits->resize(static_cast<size_t>(step_rows_ * config_.vocab_size));
    DEFT_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(logits->data(), logits_.get(), logits->size() * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream_),
                   "logits download"));
  }
  DEFT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "GPU step"));
  if (here) {
    sampling->top.assign(sampling->rows.size(), {});
    for (size_t i = 0; i < sampling->rows.size(); ++i) {
      const int32_t n = std::min({sampling->rows[i].top_logprobs, top,
                                  static_cast<int32_t>(config_.vocab_size)});
      for (int32_t k = 0; k < n; ++k) {
        sampling->top[i].push_back({top_ids[i * top + k], top_lps[i * top + k]});
      }
    }
    sampling->sampled = true;
    device_sampled_rows_ += static_cast<int64_t>(sampling->rows.size());
  }
  return absl::OkStatus();
}

absl::Status GpuBackend::EnqueueSample(const std::vector<kernels::SampleRowParams>& rows,
                                       const std::vector<int32_t>& logit_rows, int32_t* tokens,
                                       float* logprobs, int32_t max_top, int32_t* top_ids,
                                       float* top_logprobs,
                                       const std::vector<int32_t>& penalty_ids,
                                       const std::vector<int32_t>& penalty_counts) {
  const int32_t vocab = static_cast<int32_t>(config_.vocab_size);
  const int32_t n = static_cast<int32_t>(rows.size());
  for (int32_t r : logit_rows) {
    if (r < 0 || r >= step_rows_) {
      return absl::InvalidArgumentError(
          absl::StrCat("sampling logit row ", r, " of ", step_rows_));
    }
  }
  const size_t params_bytes = rows.size() * sizeof(kernels::SampleRowParams);
  const size_t rows_bytes = logit_rows.size() * sizeof(int32_t);
  if (penalty_ids.size() != penalty_counts.size()) {
    return absl::InvalidArgumentError(absl::StrCat(penalty_ids.size(), " penalty ids and ",
                                                   penalty_counts.size(), " counts"));
  }
  const size_t penalty_entries = penalty_ids.size();
  for (size_t i = 0; i < rows.size(); ++i) {
    for (auto [begin, count] : {std::pair(rows[i].penalty_begin, rows[i].penalty_count),
                                std::pair(rows[i].override_begin, rows[i].override_count)}) {
      if (count < 0 || (count > 0 && (begin < 0 || static_cast<size_t>(begin) +
                                                           static_cast<size_t>(count) >
                                                       penalty_entries))) {
        return absl::InvalidArgumentError(absl::StrCat("sampling row ", i, ": penalty entries [",
                                                       begin, ", +", count, ") outside the ",
                                                       penalty_entries, " given"));
      }
    }
  }
  const size_t penalty_bytes = penalty_entries * sizeof(int32_t);
  DEFT_RETURN_IF_ERROR(sample_params_.Reserve(params_bytes + rows_bytes + 2 * penalty_bytes));
  const size_t top_entries = top_ids != nullptr ? rows.size() * max_top : 0;
  DEFT_RETURN_IF_ERROR(sample_tokens_.Reserve(rows.size() * 8 + top_entries * 8));
  DEFT_RETURN_IF_ERROR(sample_workspace_.Reserve(kernels::SampleWorkspaceBytes(n, vocab)));
  DEFT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(sample_params_.get(), rows.data(), params_bytes,
                                                  cudaMemcpyHostToDevice, stream_),
                                  "sampling parameters"));
  const int32_t* d_rows = nullptr;
  if (!logit_rows.empty()) {
    d_rows = reinterpret_cast<const int32_t*>(sample_params_.as<uint8_t>() + params_bytes);
    DEFT_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(const_cast<int32_t*>(d_rows), logit_rows.data(), rows_bytes,
                                   cudaMemcpyHostToDevice, stream_),
                   "sampling rows"));
  }
  const int32_t* d_penalty_ids = nullptr;
  const int32_t* d_penalty_counts = nullptr;
  if (penalty_entries > 0) {
    // Pageable sources: the copies are staged before they return, so the vectors may go.
    uint8_t* at = sample_params_.as<uint8_t>() + params_bytes + rows_bytes;
    d_penalty_ids = reinterpret_cast<const int32_t*>(at);
    d_penalty_counts = reinterpret_cast<const int32_t*>(at + penalty_bytes);
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(at, penalty_ids.data(), penalty_bytes,
                                                    cudaMemcpyHostToDevice, stream_),
                                    "penalty entries"));
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(at + penalty_bytes, penalty_counts.data(),
                                                    penalty_bytes, cudaMemcpyHostToDevice, stream_),
                                    "penalty entries"));
  }
  float* d_logprobs = logprobs != nullptr ? sample_tokens_.as<float>() + rows.size() : nullptr;
  int32_t* d_top_ids = top_entries > 0 ? sample_tokens_.as<int32_t>() + 2 * rows.size() : nullptr;
  float* d_top_lps =
      top_entries > 0 ? sample_tokens_.as<float>() + 2 * rows.size() + top_entries : nullptr;
  kernels::SampleParams p{logits_.as<float>(),
                          sample_params_.as<kernels::SampleRowParams>(),
                          sample_tokens_.as<int32_t>(),
                          d_logprobs,
                          sample_workspace_.as<float>(),
                          n,
                          vocab,
                          d_rows,
                          d_top_ids,
                          d_top_lps,
                          top_entries > 0 ? max_top : 0,
                          d_penalty_ids,
                          d_penalty_counts};
  DEFT_RETURN_IF_ERROR(CudaStatus(kernels::LaunchSample(p, stream_), "sampling"));
  DEFT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(tokens, sample_tokens_.get(), rows.size() * 4,
                                                  cudaMemcpyDeviceToHost, stream_),
                                  "sampled tokens"));
  if (logprobs != nullptr) {
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(logprobs, d_logprobs, rows.size() * 4,
                                                    cudaMemcpyDeviceToHost, stream_),
                                    "sampled log-probabilities"));
  }
  if (top_entries > 0) {
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(top_ids, d_top_ids, top_entries * 4,
                                                    cudaMemcpyDeviceToHost, stream_),
                                    "top alternatives"));
    DEFT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(top_logprobs, d_top_lps, top_entries * 4,
                                                    cudaMemcpyDeviceToHost, stream_),
                                    "top alternatives"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> GpuBackend::SampleOnDevice(
    const std::vector<kernels::SampleRowParams>& rows) {
  if (static_cast<int64_t>(rows.size()) != step_rows_) {
    return absl::InvalidArgumentError(
        absl::StrCat(rows.size(), " sampling rows for ", step_rows_, " logit rows"));
  }
  std::vector<int32_t> tokens(rows.size());
  if (rows.empty()) return tokens;
  DEFT_RETURN_IF_ERROR(
      EnqueueSample(rows, {}, tokens.data(), nullptr, 0, nullptr, nullptr, {}, {}));
  DEFT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "sampling"));
  return tokens;
}

}  // namespace deft::gpu
