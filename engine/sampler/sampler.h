// Next-token selection from logits: penalties, temperature, top-k, top-p, min-p, seeded random
// draws, and log-probabilities of the chosen token and its top-n alternatives.
//
// Order of operations (as HF transformers and vLLM): repetition penalty (HF rule: divide positive
// logits, multiply negative ones, for every token seen in prompt or output), frequency and
// presence penalties (OpenAI rule, output tokens only), then temperature; temperature 0 is greedy
// (lowest id among equal maxima). Then top-k, top-p (smallest set whose probability reaches
// top_p), min-p (drop tokens below min_p x the top probability), and one uniform draw by inverse
// CDF over the survivors ordered by (probability desc, id asc).
//
// Reproducibility: the draw of step i is a pure function of (seed, i) (counter-based, splitmix64),
// so the same seed gives the same tokens on every backend and thread count.
// Log-probabilities are those of the model's raw distribution (log-softmax of the unmodified
// logits), as OpenAI and vLLM report them.
//
// Thread safety: a Sampler is used by one generation at a time.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"

namespace deft {

struct SamplingParams {
  float temperature = 1.f;         // 0: greedy
  int32_t top_k = 0;               // 0: off
  float top_p = 1.f;               // in (0, 1]
  float min_p = 0.f;               // in [0, 1)
  float repetition_penalty = 1.f;  // > 0; 1: off
  float frequency_penalty = 0.f;   // in [-2, 2]
  float presence_penalty = 0.f;    // in [-2, 2]
  uint64_t seed = 0;
  int32_t max_tokens = 256;  // >= 1
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;  // besides the model's end-of-generation tokens
  bool ignore_eos = false;              // keep going past end-of-generation tokens
  int32_t top_logprobs = 0;             // alternatives to report, 0..20

  // INVALID_ARGUMENT naming the field for out-of-range values. `vocab_size` checks token ids.
  absl::Status Validate(int64_t vocab_size) const;
};

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.f;
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.f;            // of the raw distribution
  std::vector<TokenLogprob> top;  // top_logprobs best alternatives, best first
};

class Sampler {
 public:
  // `prompt` seeds the repetition penalty's set of seen tokens.
  Sampler(const SamplingParams& params, std::span<const int32_t> prompt);

  // Chooses the next token from `logits` [vocab] and records it (penalties, step counter).
  SampledToken Sample(std::span<const float> logits);

  int64_t steps() const { return step_; }
  const SamplingParams& params() const { return params_; }

  // Whether the next draw depends only on the logits, params() and steps(): no penalties (they
  // need the sampler's history). Such a draw (and its top_logprobs alternatives) may be made by
  // a backend next to the logits (kernels/model/sampling.h reproduces Sample) and handed to
  // Record.
  bool Plain() const;
  // The state the penalties read, for a backend that applies them itself
  // (kernels/model/sampling.h): appends every token the next draw penalizes once to `ids`, and
  // to `counts` its count among this sampler's outputs (0: a prompt token). Nothing when
  // Plain(). The repetition penalty applies to every entry, frequency and presence to those
  // with a count.
  void AppendPenaltyEntries(std::vector<int32_t>* ids, std::vector<int32_t>* counts) const;
  // Records `id`, chosen for this sampler's next step elsewhere (a backend's draw, as Sample would
  // have made it), exactly as Sample records its own choice; returns it with `logprob`.
  SampledToken Record(int32_t id, float logprob);

  // The uniform number in [0, 1) drawn at `step` for `seed` (exposed for backends and tests).
  static double Uniform(uint64_t seed, uint64_t step);

 private:
  SamplingParams params_;
  // The penalties' state (none when Plain): every token the next draw penalizes, once (the
  // prompt's when the repetition penalty is on, and every output), in first-seen order, with its
  // count among the outputs; kept as arrays so that AppendPenaltyEntries is two copies.
  int32_t& EntryCount(int32_t id);  // inserts the id with count 0 when new
  absl::flat_hash_map<int32_t, int32_t> entry_of_;  // id -> index in the arrays
  std::vector<int32_t> entry_ids_, entry_counts_;
  int64_t step_ = 0;
  std::vector<float> work_;
  std::vector<int32_t> order_;
};

// Log-softmax of `logits` at `id`, and the best `n` alternatives (ties: lower id first).
float LogSoftmaxAt(std::span<const float> logits, int32_t id);
std::vector<TokenLogprob> TopLogprobs(std::span<const float> logits, int32_t n);

}  // namespace deft
