// Single-sequence generation on the reference engine: prefill a prompt, then sample token by
// token with stop tokens, stop strings and max_tokens, streaming text that never ends in half a
// UTF-8 character and never shows a stop string (or a prefix of one that may still complete).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/llama_model.h"
#include "engine/sampler/sampler.h"

namespace deft {

enum class FinishReason {
  kLength,
  kStopToken,
  kStopString,
  kContextFull,
  kCancelled,
  kDeadlineExceeded,
};
std::string_view FinishReasonName(FinishReason r);

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids (a stop token is included)
  std::string text;             // streamed text, stop string excluded
  FinishReason reason = FinishReason::kLength;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;  // from the first sampled token to the end
};

// Called once per generated token with the text it completed (may be empty); return false to
// stop (FinishReason::kCancelled).
using TokenCallback = std::function<bool(const SampledToken& token, std::string_view text)>;

// Holds back streamed text that could be the start of a stop string.
class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Adds `piece`; returns the text that is now safe to emit. Sets *stopped when a stop string
  // completed (the returned text then ends right before it).
  std::string Push(std::string_view piece, bool* stopped);
  // The held text, at the end of generation.
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  std::string held_;
};

// REQUIRES: params.Validate() is ok. Errors: those of LlamaModel::Forward (prompt too long ...).
absl::StatusOr<GenerateResult> Generate(LlamaModel& model, std::span<const int32_t> prompt,
                                        const SamplingParams& params,
                                        const TokenCallback& on_token);

}  // namespace deft
