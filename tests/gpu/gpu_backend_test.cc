// The GPU step backend (engine/gpu) against the CPU reference (LlamaModel's own ForwardStep) on
// the same synthetic weights, generated independently on the host and on the device: every step
// of a prefill plus a 64-token greedy decode of three branches sharing the prompt (one tree),
// logits within 1e-2 relative L2 at every step, in modes flatten and seq, fp16 and bf16. Also:
// device-generated weights equal the host's bit for bit, and the device KV pool's block and slot
// copies (copy-on-write, kept draft tokens) are exact.
#include "engine/gpu/gpu_backend.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <span>
#include <tuple>
#include <vector>

#include "engine/gpu/device_kv_storage.h"
#include "engine/model/llama_model.h"
#include "engine/model/synthetic_model.h"
#include "tests/gpu/gpu_test_util.h"

namespace deft::gpu::testing {
namespace {

KvPoolShape ShapeOf(const LlamaConfig& c) { return {c.num_layers, c.num_kv_heads, c.head_dim, 16}; }

int32_t ArgMax(const float* v, int64_t n) {
  return static_cast<int32_t>(std::max_element(v, v + n) - v);
}

// A prefill of `len` random tokens at slots and positions 0..len-1 (query i sees i + 1 tokens of
// segment 0).
struct PromptInputs {
  std::vector<int32_t> tokens, slots;
  std::vector<int64_t> positions;
  std::vector<PlanQuery> queries;
};
PromptInputs RandomPrompt(int32_t len, int32_t vocab, std::mt19937_64& rng) {
  PromptInputs p;
  for (int32_t i = 0; i < len; ++i) {
    p.tokens.push_back(static_cast<int32_t>(rng() % vocab));
    p.slots.push_back(i);
    p.positions.push_back(i);
    p.queries.push_back({0, i + 1});
  }
  return p;
}

// One decode step of `branches` branches under a prompt of `prompt_len` tokens: branch b's token
// `s` goes to slot first_slot + stride * b + s (appended to branch_slots[b]); segments are the
// prompt's and one per branch.
struct BranchStep {
  std::vector<int32_t> tokens, slots, rows;
  std::vector<int64_t> positions;
  std::vector<PlanSegment> segments;
  std::vector<PlanQuery> queries;
};
BranchStep NextBranchStep(int32_t s, int32_t prompt_len, std::span<const int32_t> prompt_slots,
                          int32_t first_slot, int32_t stride, const std::vector<int32_t>& next,
                          std::vector<std::vector<int32_t>>& branch_slots) {
  BranchStep st;
  st.segments.push_back({-1, prompt_slots});
  const int32_t branches = static_cast<int32_t>(next.size());
  for (int32_t b = 0; b < branches; ++b) {
    branch_slots[b].push_back(first_slot + stride * b + s);
    st.tokens.push_back(next[b]);
    st.positions.push_back(prompt_len + s);
    st.slots.push_back(branch_slots[b].back());
    st.rows.push_back(b);
  }
  for (int32_t b = 0; b < branches; ++b) {
    st.segments.push_back({0, branch_slots[b]});
    st.queries.push_back({b + 1, s + 1});
  }
  return st;
}

class GpuBackendVsCpuTest
    : public ::testing::TestWithParam<std::tuple<const char*, AttentionMode>> {
 protected:
  void SetUp() override { DEFT_SKIP_WITHOUT_GPU(); }
};

// Prefill of a 48-token prompt, then `steps` greedy decode steps of three branches sharing it,
// on both backends; every logit row within 1e-2 relative L2. Returns the worst error seen.
double CompareTreeDecode(LlamaModel& cpu_model, GpuBackend& gpu_backend, AttentionMode mode,
                         int32_t steps) {
  LlamaModel* cpu = &cpu_model;
  GpuBackend* gpu = &gpu_backend;
  const LlamaConfig& c = cpu->config();
  const KvPoolShape shape = ShapeOf(c);
  auto cpu_pool = KvBlockPool::Create(shape, 32);
  auto gpu_pool = KvBlockPool::Create(shape, 32, gpu->kv_storage());
  EXPECT_TRUE(cpu_pool.ok() && gpu_pool.ok());
  if (!cpu_pool.ok() || !gpu_pool.ok()) return 1;

  PlannerOptions po;
  po.mode = mode;
  po.min_chunk_tokens = 16;  // several chunks even at this size
  PartitionPlanner planner(po);
  PartitionPlan plan;
  std::mt19937_64 rng(std::random_device{}());
  double worst = 0;
  // Runs one step on both backends and checks every logit row.
  auto step = [&](const std::vector<int32_t>& tokens, const std::vector<int64_t>& positions,
                  const std::vector<int32_t>& slots, const std::vector<PlanSegment>& segments,
                  const std::vector<PlanQuery>& queries, const std::vector<int32_t>& rows,
                  std::vector<float>* cpu_logits, const char* what) {
    ASSERT_TRUE(planner.Plan(segments, queries, &plan).ok());
    const StepInput in{tokens, positions, slots, rows};
    std::vector<float> gpu_logits;
    ASSERT_TRUE(cpu->ForwardStep(in, **cpu_pool, plan, cpu_logits).ok());
    absl::Status s = gpu->ForwardStep(in, **gpu_pool, plan, &gpu_logits);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(gpu_logits.size(), cpu_logits->size());
    for (size_t r = 0; r < rows.size(); ++r) {
      const size_t off = r * c.vocab_size;
      std::vector<float> g(gpu_logits.begin() + off, gpu_logits.begin() + off + c.vocab_size);
      std::vector<float> h(cpu_logits->begin() + off, cpu_logits->begin() + off + c.vocab_size);
      const double err = RelL2(g, h);
      worst = std::max(worst, err);
      ASSERT_LE(err, 1e-2) << what << ", row " << r;
    }
  };

  // Prefill of a 48-token prompt at slots 0..47.
  const int32_t prompt_len = 48, branches = 3;
  const PromptInputs prompt = RandomPrompt(prompt_len, c.vocab_size, rng);
  std::vector<float> logits;
  step(prompt.tokens, prompt.positions, prompt.slots, {{-1, prompt.slots}}, prompt.queries,
       {prompt_len - 1}, &logits, "prefill");
  if (::testing::Test::HasFatalFailure()) return worst;
  // Branch b starts from the prompt's b-th most likely next token, then decodes greedily (the
  // CPU's choice feeds both backends).
  std::vector<int32_t> order(c.vocab_size);
  for (int32_t i = 0; i < c.vocab_size; ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + branches, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  std::vector<int32_t> next(order.begin(), order.begin() + branches);
  std::vector<std::vector<int32_t>> branch_slots(branches);
  for (int32_t s = 0; s < steps; ++s) {
    const BranchStep st = NextBranchStep(s, prompt_len, prompt.slots, 64, 128, next, branch_slots);
    step(st.tokens, st.positions, st.slots, st.segments, st.queries, st.rows, &logits, "decode");
    if (::testing::Test::HasFatalFailure()) {
      ADD_FAILURE() << "at decode step " << s;
      return worst;
    }
    for (int32_t b = 0; b < branches; ++b)
      next[b] = ArgMax(&logits[b * c.vocab_size], c.vocab_size);
  }
  return worst;
}

TEST_P(GpuBackendVsCpuTest, LogitsWithin1e2AtEveryStepOfTreeDecode) {
  const auto [name, mode] = GetParam();
  auto spec = SyntheticSpecFromName(name);
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto host = MakeSyntheticModel(*spec);
  ASSERT_TRUE(host.ok()) << host.status();
  auto cpu = LlamaModel::Create(std::move(*host), {});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = GpuBackend::CreateSynthetic(*spec, {});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const double worst = CompareTreeDecode(**cpu, **gpu, mode, 64);
  std::printf("%s mode %s: worst logits rel L2 over 65 steps: %.3g\n", name,
              std::string(AttentionModeName(mode)).c_str(), worst);
}

// Random GGML blocks of `type` whose values have RMS `rms` (the scale fields are rescaled after a
// first draw with the same seed).
WeightMatrix QuantizedMatrix(GgmlType type, int64_t rows, int64_t cols, double rms, uint64_t seed,
                             LlamaWeights* owner) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> probe = RandomBlocks(type, rows, cols, rng, 1.f);
  const size_t row_bytes = RowBytes(type, cols);
  std::vector<float> row(cols);
  double ss = 0;
  for (int64_t r = 0; r < rows; ++r) {
    DequantizeRow(type, &probe[r * row_bytes], row.data(), cols);
    for (float v : row) ss += double{v} * v;
  }
  rng.seed(seed);
  const std::vector<uint8_t> data =
      RandomBlocks(type, rows, cols, rng, static_cast<float>(rms / std::sqrt(ss / (rows * cols))));
  std::unique_ptr<uint8_t[]> bytes(new uint8_t[data.size()]);
  std::memcpy(bytes.get(), data.data(), data.size());
  WeightMatrix m{type, rows, cols, row_bytes, bytes.get()};
  owner->owned.push_back(std::move(bytes));
  return m;
}

// The same matrix dequantized to fp32 (the CPU's exact path).
WeightMatrix Fp32Copy(const WeightMatrix& q, LlamaWeights* owner) {
  std::unique_ptr<uint8_t[]> bytes(new uint8_t[q.rows * q.cols * 4]);
  for (int64_t r = 0; r < q.rows; ++r) {
    DequantizeRow(q.type, q.row(r), reinterpret_cast<float*>(bytes.get()) + r * q.cols, q.cols);
  }
  WeightMatrix m{GgmlType::kF32, q.rows, q.cols, static_cast<size_t>(q.cols) * 4, bytes.get()};
  owner->owned.push_back(std::move(bytes));
  return m;
}

// A model as a GGUF loader hands it over (quantized matrices of many types, tied embeddings)
// goes through DeviceWeights::Upload (dequantization on the device into the fused QKV and
// gate/up layout); the CPU runs the same weights dequantized to fp32.
TEST(GpuBackendQuantizedTest, QuantizedWeightsMatchCpuOnTheirDequantizedValues) {
  DEFT_SKIP_WITHOUT_GPU();
  auto spec = SyntheticSpecFromName("synthetic:tiny");
  ASSERT_TRUE(spec.ok());
  auto base = MakeSyntheticModel(*spec);
  ASSERT_TRUE(base.ok());
  const LlamaConfig& c = spec->config;
  auto quantized = std::make_unique<LoadedModel>();
  auto exact = std::make_unique<LoadedModel>();
  quantized->config = exact->config = c;
  quantized->config.tied_embeddings = exact->config.tied_embeddings = true;
  LlamaWeights& qw = quantized->weights;
  LlamaWeights& ew = exact->weights;
  const uint64_t seed = std::random_device{}();
  qw.token_embd = QuantizedMatrix(GgmlType::kQ8_0, c.vocab_size, c.hidden, 1.0, seed, &qw);
  qw.output = qw.token_embd;
  ew.token_embd = ew.output = Fp32Copy(qw.token_embd, &ew);
  qw.output_norm = ew.output_norm = (*base)->weights.output_norm;
  const GgmlType types[7] = {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ8_0,
                             GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K};
  qw.layers.resize(c.num_layers);
  ew.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LlamaLayerWeights& b = (*base)->weights.layers[l];
    LlamaLayerWeights& q = qw.layers[l];
    LlamaLayerWeights& e = ew.layers[l];
    q.attn_norm = e.attn_norm = b.attn_norm;
    q.ffn_norm = e.ffn_norm = b.ffn_norm;
    WeightMatrix* qm[7] = {&q.wq, &q.wk, &q.wv, &q.wo, &q.w_gate, &q.w_up, &q.w_down};
    WeightMatrix* em[7] = {&e.wq, &e.wk, &e.wv, &e.wo, &e.w_gate, &e.w_up, &e.w_down};
    const WeightMatrix* shapes[7] = {&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down};
    for (int i = 0; i < 7; ++i) {
      // Rotate the types over layers and matrices so that each lands in every slot.
      const GgmlType t = types[(i + l) % 7];
      *qm[i] = QuantizedMatrix(t, shapes[i]->rows, shapes[i]->cols,
                               1.0 / std::sqrt(static_cast<double>(shapes[i]->cols)),
                               seed + 100 * l + i + 1, &qw);
      *em[i] = Fp32Copy(*qm[i], &ew);
    }
  }
  GpuBackendOptions o;
  o.dtype = kernels::Dtype::kFloat16;
  auto gpu = GpuBackend::Create(c, qw, o);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = LlamaModel::Create(std::move(exact), {});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const double worst = CompareTreeDecode(**cpu, **gpu, AttentionMode::kFlatten, 8);
  std::printf("quantized weights (7 GGML types, tied embeddings), fp16: worst rel L2 %.3g\n",
              worst);
}

INSTANTIATE_TEST_SUITE_P(
    SyntheticTiny, GpuBackendVsCpuTest,
    ::testing::Combine(::testing::Values("synthetic:tiny:f16", "synthetic:tiny"),
                       ::testing::Values(AttentionMode::kFlatten, AttentionMode::kSeq)),
    [](const auto& info) {
      return std::string(std::get<0>(info.param) == std::string("synthetic:tiny") ? "bf16"
                                                                                  : "fp16") +
             "_" + std::string(AttentionModeName(std::get<1>(info.param)));
    });

// Logits of every step of a prefill (40 tokens) and `steps` decode steps of three branches that
// grow by a token each step (flatten plans), on `gpu`; tokens drawn from a fixed seed.
std::vector<std::vector<float>> GrowingDecode(GpuBackend& gpu, const LlamaConfig& c, int32_t steps) {
  auto pool = KvBlockPool::Create(ShapeOf(c), 32, gpu.kv_storage());
  EXPECT_TRUE(pool.ok());
  if (!pool.ok()) return {};
  std::mt19937_64 rng(1234);
  PartitionPlanner planner({});
  PartitionPlan plan;
  std::vector<std::vector<float>> out;
  const int32_t prompt_len = 40, branches = 3;
  const PromptInputs prompt = RandomPrompt(prompt_len, c.vocab_size, rng);
  const std::vector<PlanSegment> prompt_segments = {{-1, prompt.slots}};
  EXPECT_TRUE(planner.Plan(prompt_segments, prompt.queries, &plan).ok());
  const std::vector<int32_t> last_row = {prompt_len - 1};
  out.emplace_back();
  EXPECT_TRUE(gpu.ForwardStep(StepInput{prompt.tokens, prompt.positions, prompt.slots, last_row},
                              **pool, plan, &out.back())
                  .ok());
  std::vector<std::vector<int32_t>> branch_slots(branches);
  std::vector<int32_t> next(branches);
  for (int32_t s = 0; s < steps; ++s) {
    for (int32_t& t : next) t = static_cast<int32_t>(rng() % c.vocab_size);
    const BranchStep st = NextBranchStep(s, prompt_len, prompt.slots, 48, 128, next, branch_slots);
    EXPECT_TRUE(planner.Plan(st.segments, st.queries, &plan).ok());
    out.emplace_back();
    const absl::Status status = gpu.ForwardStep(
        StepInput{st.tokens, st.positions, st.slots, st.rows}, **pool, plan, &out.back());
    EXPECT_TRUE(status.ok()) << status;
    if (!status.ok()) break;
  }
  return out;
}

// In a decode that grows the tree every step, the step's CUDA graph replays (the plan's arrays
// keep their device addresses while they fit their regions) and every step's logits equal those
// of direct launches, bit for bit.
TEST(GpuBackendGraphTest, GrowingDecodeReplaysGraphsWithTheSameLogits) {
  DEFT_SKIP_WITHOUT_GPU();
  auto spec = SyntheticSpecFromName("synthetic:tiny");
  ASSERT_TRUE(spec.ok());
  // One backend for both runs: its GEMM algorithms (timed at first use) stay the same.
  auto gpu = GpuBackend::CreateSynthetic(*spec, {});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  constexpr int32_t kSteps = 48;
  (*gpu)->set_cuda_graphs(false);
  const auto want = GrowingDecode(**gpu, spec->config, kSteps);
  EXPECT_EQ((*gpu)->graph_captures() + (*gpu)->graph_replays(), 0);
  (*gpu)->set_cuda_graphs(true);
  const auto got = GrowingDecode(**gpu, spec->config, kSteps);
  ASSERT_EQ(want.size(), size_t{kSteps + 1});
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "step " << i;
  // Direct: the prefill, the first decode step and the first after each change of the plan's
  // shape or addresses; the step after each of those is captured, the rest replay (H100: 31
  // replays, 8 captures in 48 steps).
  EXPECT_GE((*gpu)->graph_replays(), kSteps / 2) << (*gpu)->graph_captures() << " captures";
}

// A step replayed from a captured CUDA graph computes what launching it directly computes.
TEST(GpuBackendGraphTest, ReplayedStepEqualsDirectLaunch) {
  DEFT_SKIP_WITHOUT_GPU();
  auto spec = SyntheticSpecFromName("synthetic:tiny");
  ASSERT_TRUE(spec.ok());
  auto gpu = GpuBackend::CreateSynthetic(*spec, {});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const LlamaConfig& c = spec->config;
  auto pool = KvBlockPool::Create(ShapeOf(c), 8, (*gpu)->kv_storage());
  ASSERT_TRUE(pool.ok());
  std::mt19937_64 rng(std::random_device{}());
  const int32_t n = 40;
  std::vector<int32_t> tokens(n), slots(n), rows = {n - 1, 7};
  std::vector<int64_t> positions(n);
  std::vector<PlanQuery> queries(n);
  for (int32_t i = 0; i < n; ++i) {
    tokens[i] = static_cast<int32_t>(rng() % c.vocab_size);
    slots[i] = 3 * i + 1;
    positions[i] = i;
    queries[i] = {0, i + 1};
  }
  PartitionPlanner planner({});
  PartitionPlan plan;
  const std::vector<PlanSegment> segments = {{-1, slots}};
  ASSERT_TRUE(planner.Plan(segments, queries, &plan).ok());
  const StepInput step{tokens, positions, slots, rows};
  std::vector<float> direct, captured, replayed;
  (*gpu)->set_cuda_graphs(false);
  ASSERT_TRUE((*gpu)->ForwardStep(step, **pool, plan, &direct).ok());
  (*gpu)->set_cuda_graphs(true);
  std::vector<float> first;  // a shape seen once runs directly; its repeat is captured
  ASSERT_TRUE((*gpu)->ForwardStep(step, **pool, plan, &first).ok());
  EXPECT_EQ((*gpu)->graph_captures(), 0);
  ASSERT_TRUE((*gpu)->ForwardStep(step, **pool, plan, &captured).ok());
  ASSERT_TRUE((*gpu)->ForwardStep(step, **pool, plan, &replayed).ok());
  EXPECT_EQ((*gpu)->graph_captures(), 1);
  EXPECT_EQ((*gpu)->graph_replays(), 1);
  EXPECT_EQ(first, direct);
  ASSERT_EQ(direct.size(), rows.size() * c.vocab_size);
  EXPECT_EQ(captured, direct);
  EXPECT_EQ(replayed, direct);
}

TEST(GpuSyntheticWeightsTest, DeviceWeightsEqualTheHostCopy) {
  DEFT_SKIP_WITHOUT_GPU();
  auto spec = SyntheticSpecFromName("synthetic:tiny");
  ASSERT_TRUE(spec.ok());
  auto host = MakeSyntheticModel(*spec);
  ASSERT_TRUE(host.ok());
  auto dev = DeviceWeights::Synthetic(*spec, nullptr);
  ASSERT_TRUE(dev.ok()) << dev.status();
  const LlamaConfig& c = spec->config;
  const LlamaWeights& w = (*host)->weights;
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  // Layer 2's fused QKV: wq rows, then wk, then wv.
  const size_t qkv_elems = (q + 2 * kv) * c.hidden;
  std::vector<uint16_t> got(qkv_elems);
  ASSERT_EQ(cudaMemcpy(got.data(), (*dev)->layer(2).wqkv, qkv_elems * 2, cudaMemcpyDeviceToHost),
            cudaSuccess);
  const LlamaLayerWeights& L = w.layers[2];
  EXPECT_EQ(std::memcmp(got.data(), L.wq.data, q * c.hidden * 2), 0);
  EXPECT_EQ(std::memcmp(got.data() + q * c.hidden, L.wk.data, kv * c.hidden * 2), 0);
  EXPECT_EQ(std::memcmp(got.data() + (q + kv) * c.hidden, L.wv.data, kv * c.hidden * 2), 0);
  std::vector<float> norm(c.hidden);
  ASSERT_EQ(
      cudaMemcpy(norm.data(), (*dev)->layer(3).ffn_norm, c.hidden * 4, cudaMemcpyDeviceToHost),
      cudaSuccess);
  EXPECT_EQ(norm, w.layers[3].ffn_norm);
}

TEST(GpuKvStorageTest, CopyOnWriteAndSlotCopiesAreExact) {
  DEFT_SKIP_WITHOUT_GPU();
  const KvPoolShape shape{3, 2, 64, 16};
  const int64_t blocks = 8;
  auto storage = DeviceKvStorage::Create(shape, blocks, kernels::Dtype::kBFloat16, nullptr);
  ASSERT_TRUE(storage.ok()) << storage.status();
  DeviceKvStorage* dev = storage->get();
  auto pool = KvBlockPool::Create(shape, blocks, [&](const KvPoolShape&, int64_t) {
    return absl::StatusOr<std::unique_ptr<KvStorage>>(std::move(*storage));
  });
  ASSERT_TRUE(pool.ok()) << pool.status();
  // Random contents everywhere (2 * layers arrays of slots x kv_dim).
  const size_t elems = size_t(2 * shape.num_layers) * blocks * 16 * 128;
  std::vector<uint16_t> data(elems);
  std::mt19937 rng(std::random_device{}());
  for (auto& x : data) x = static_cast<uint16_t>(rng() & 0x7f7f);
  ASSERT_EQ(cudaMemcpy(dev->k(0), data.data(), elems * 2, cudaMemcpyHostToDevice), cudaSuccess);
  auto b = (*pool)->Allocate();
  ASSERT_TRUE(b.ok());
  (*pool)->AddRef(*b);
  auto copy = (*pool)->MakeWritable(*b);
  ASSERT_TRUE(copy.ok()) << copy.status();
  ASSERT_NE(*copy, *b);
  const std::vector<int32_t> src = {3, 17}, dst = {100, 127};
  ASSERT_TRUE((*pool)->CopySlots(src, dst).ok());
  std::vector<uint16_t> out(elems);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(out.data(), dev->k(0), elems * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<uint16_t> ref = data;
  const size_t slots = blocks * 16, kv_dim = 128, array = slots * kv_dim;
  for (int a = 0; a < 2 * shape.num_layers; ++a) {
    std::memcpy(&ref[a * array + *copy * 16 * kv_dim], &data[a * array + *b * 16 * kv_dim],
                16 * kv_dim * 2);
    for (size_t i = 0; i < src.size(); ++i) {
      std::memcpy(&ref[a * array + dst[i] * kv_dim], &ref[a * array + src[i] * kv_dim], kv_dim * 2);
    }
  }
  EXPECT_EQ(out, ref);
}

}  // namespace
}  // namespace deft::gpu::testing
