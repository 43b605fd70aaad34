// Next-token selection on the GPU from fp32 logits, a cluster of 1-4 CTAs per row (as many as
// the SMs hold for the step's rows), reproducing the CPU
// Sampler (engine/sampler/sampler.cc) for repetition / frequency / presence penalties and
// temperature / top-k / top-p / min-p:
//  - penalties: the row is copied into the workspace and its seen tokens rewritten there, as
//    the CPU does (a division / product / fma each, rounded the same way); the draw then reads
//    that copy, the log-probabilities the raw row;
//  - temperature 0: greedy, the lowest id among equal maxima;
//  - else p_i = expf((logit_i - max) / T) (fp32, as the CPU), total = sum in fp64; candidates in
//    the order (p desc, id asc); keep the first min(top_k, ...) and the shortest prefix whose sum
//    reaches top_p * total; min-p keeps those with p >= min_p * p_max; then u = Uniform(seed,
//    step) * kept picks the first candidate whose running sum exceeds u (else the last).
// The order is never materialised: each prefix boundary is found by an 8-ary search over the
// key (p's fp32 bits, then id) with row-wide (count, fp64 sum) reductions of 7 prefixes per
// pass over the row, ~17 passes per boundary (top_p = 1 needs none). Same seed + logits give the CPU's token; the two can differ only when a draw or
// the top-p target lands within a few ulps of a boundary (expf vs glibc's expf, fp64 sums in
// another order).
// logprob: log-softmax of the raw logits at the chosen id (the CPU's SampledToken::logprob);
// top_logprobs: the best raw logits and their log-softmax (the CPU's TopLogprobs), one more
// search of the same kind over the row.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace deft::kernels {

struct SampleRowParams {
  float temperature = 1.f;  // 0: greedy
  int32_t top_k = 0;        // 0: off
  float top_p = 1.f;
  float min_p = 0.f;
  uint64_t seed = 0;
  uint64_t step = 0;  // the Sampler's step counter (which draw of the seed's stream)
  int32_t top_logprobs = 0;  // alternatives to report (TopLogprobs), 0..kMaxTopLogprobs
  // Penalties (the CPU Sampler's, sampler.h), over entries [penalty_begin, + penalty_count) of
  // SampleParams::penalty_ids / penalty_counts: the sampler's seen tokens, each once, with its
  // count among the sampler's outputs (0: seen in the prompt only). The repetition penalty
  // rewrites every entry, frequency and presence those with a count.
  float repetition_penalty = 1.f;
  float frequency_penalty = 0.f;
  float presence_penalty = 0.f;
  int32_t penalty_begin = 0;
  int32_t penalty_count = 0;
  // More entries, applied after those (an id here replaces its entry there): rows that share
  // their first entries (a verification's draft rows: the prompt's tokens) and differ in a few
  // (each row's draft path).
  int32_t override_begin = 0;
  int32_t override_count = 0;
};

constexpr int32_t kMaxTopLogprobs = 32;

struct SampleParams {
  const float* logits = nullptr;                // [*, vocab], row stride `vocab`
  const SampleRowParams* row_params = nullptr;  // [rows], device
  int32_t* out_tokens = nullptr;                // [rows]
  float* out_logprobs = nullptr;                // [rows], may be null
  float* workspace = nullptr;                   // SampleWorkspaceBytes(rows, vocab)
  int32_t rows = 0;
  int32_t vocab = 0;
  // Optional [rows], device: output r samples logits row logit_rows[r] (else row r).
  const int32_t* logit_rows = nullptr;
  // Optional [rows, max_top_logprobs]: row r's first min(top_logprobs, max_top_logprobs, vocab)
  // entries get the CPU's TopLogprobs (best raw logits, ties to the lower id, with their
  // log-softmax); the rest are left as they were.
  int32_t* out_top_ids = nullptr;
  float* out_top_logprobs = nullptr;
  int32_t max_top_logprobs = 0;
  // Device arrays of the rows' penalty entries (SampleRowParams); may be null when no row has any.
  // REQUIRES: each row's ranges lie inside them and hold an id at most once each (the launch
  // cannot check device memory; GpuBackend checks the ranges).
  const int32_t* penalty_ids = nullptr;
  const int32_t* penalty_counts = nullptr;
};

size_t SampleWorkspaceBytes(int32_t rows, int32_t vocab);
cudaError_t LaunchSample(const SampleParams& p, cudaStream_t stream);

// The CPU Sampler's uniform draw, Sampler::Uniform(seed, step), on host or device.
double SampleUniformHost(uint64_t seed, uint64_t step);

}  // namespace deft::kernels
