#include "engine/model/generate.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_format.h"

namespace deft {

std::string_view FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStopToken:
      return "stop_token";
    case FinishReason::kStopString:
      return "stop_string";
    case FinishReason::kContextFull:
      return "context_full";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadlineExceeded:
      return "deadline_exceeded";
  }
  return "unknown";
}

std::string StopStringMatcher::Push(std::string_view piece, bool* stopped) {
  *stopped = false;
  held_.append(piece);
  if (stops_.empty()) return std::exchange(held_, {});
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) cut = std::min(cut, held_.find(s));
  if (cut != std::string::npos) {
    *stopped = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Keep the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_) {
    for (size_t len = std::min(s.size() - 1, held_.size()); len > keep; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStringMatcher::Flush() { return std::exchange(held_, {}); }

absl::StatusOr<GenerateResult> Generate(LlamaModel& model, std::span<const int32_t> prompt,
                                        const SamplingParams& params,
                                        const TokenCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  const LlamaConfig& c = model.config();
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (static_cast<int64_t>(prompt.size()) >= c.context_length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the prompt has %d tokens; the model's context holds %d", prompt.size(), c.context_length));
  }
  const int64_t capacity =
      std::min<int64_t>(c.context_length, static_cast<int64_t>(prompt.size()) + params.max_tokens);
  KvCache cache = model.NewCache(capacity);
  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt.size());

  std::vector<float> logits;
  auto t0 = Clock::now();
  if (absl::Status s = model.Forward(prompt, cache, false, &logits); !s.ok()) return s;
  auto t1 = Clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  const Tokenizer& tok = model.tokenizer();
  const std::vector<int32_t>& eog = tok.end_of_generation_ids();
  Sampler sampler(params, prompt);
  StreamingDetokenizer detok(tok);
  StopStringMatcher stops(params.stop_strings);
  result.reason = FinishReason::kLength;
  while (true) {
    SampledToken next = sampler.Sample(logits);
    result.tokens.push_back(next.id);
    bool stop_token =
        std::find(params.stop_token_ids.begin(), params.stop_token_ids.end(), next.id) !=
            params.stop_token_ids.end() ||
        (!params.ignore_eos && std::find(eog.begin(), eog.end(), next.id) != eog.end());
    std::string piece;
    bool stop_string = false;
    if (!stop_token) piece = stops.Push(detok.Push(next.id), &stop_string);
    const bool last = stop_token || stop_string ||
                      static_cast<int32_t>(result.tokens.size()) >= params.max_tokens ||
                      cache.size() >= capacity;
    if (last && !stop_string) {
      bool ignored;
      piece += stops.Push(detok.Flush(), &ignored);
      piece += stops.Flush();
    }
    result.text += piece;
    if (on_token && !on_token(next, piece)) {
      result.reason = FinishReason::kCancelled;
      break;
    }
    if (stop_token) {
      result.reason = FinishReason::kStopToken;
      break;
    }
    if (stop_string) {
      result.reason = FinishReason::kStopString;
      break;
    }
    if (static_cast<int32_t>(result.tokens.size()) >= params.max_tokens) break;
    if (cache.size() >= capacity) {
      result.reason = FinishReason::kContextFull;
      break;
    }
    const int32_t id = next.id;
    if (absl::Status s = model.Forward({&id, 1}, cache, false, &logits); !s.ok()) return s;
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return result;
}

}  // namespace deft
