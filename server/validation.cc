#include "server/validation.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/tokenizer/tokenizer.h"

namespace deft::server {

absl::Status CheckUtf8(const std::string& field, std::string_view text) {
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError(field + " is not valid UTF-8");
  return absl::OkStatus();
}

absl::Status CheckTokenIds(const std::string& field, std::span<const int32_t> ids,
                           int64_t vocab_size) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s[%d]: %d is outside the vocabulary [0, %d)", field, i, ids[i], vocab_size));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckPromptLength(int64_t num_tokens, int64_t context_length) {
  if (num_tokens >= context_length) {
    return absl::OutOfRangeError(absl::StrFormat(
        "the prompt has %d tokens; the model's context holds %d", num_tokens, context_length));
  }
  return absl::OkStatus();
}

absl::StatusOr<SamplingParams> ToSamplingParams(const deft::v1::SamplingParams& p,
                                                const std::string& field,
                                                const RequestLimits& limits, bool for_generation) {
  SamplingParams s;
  s.temperature = p.temperature();
  s.top_k = p.top_k();
  s.top_p = p.has_top_p() ? p.top_p() : 1.f;
  s.min_p = p.min_p();
  s.repetition_penalty = p.has_repetition_penalty() ? p.repetition_penalty() : 1.f;
  s.frequency_penalty = p.frequency_penalty();
  s.presence_penalty = p.presence_penalty();
  s.seed = p.seed();
  s.ignore_eos = p.ignore_eos();
  s.top_logprobs = p.top_logprobs();
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  for (int i = 0; i < p.stop_size(); ++i) {
    absl::Status u = CheckUtf8(absl::StrFormat("%s.stop[%d]", field, i), p.stop(i));
    if (!u.ok()) return u;
    s.stop_strings.push_back(p.stop(i));
  }
  if (for_generation) {
    if (p.max_tokens() < 1 || p.max_tokens() > limits.max_tokens_limit) {
      return absl::InvalidArgumentError(absl::StrFormat("%s.max_tokens must be in [1, %d], got %d",
                                                        field, limits.max_tokens_limit,
                                                        p.max_tokens()));
    }
    s.max_tokens = p.max_tokens();
  } else {
    s.max_tokens = 1;
  }
  // The engine's own checks name the field relative to the params ("top_p must be ...").
  absl::Status v = s.Validate(limits.vocab_size);
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat(field, ".", v.message()));
  return s;
}

absl::StatusOr<std::vector<BranchRequest>> ToBranches(const deft::v1::GenerateRequest& request,
                                                      const RequestLimits& limits) {
  const int n = request.branches_size();
  if (n == 0) return absl::InvalidArgumentError("branches: at least one is required");
  if (n > limits.max_branches) {
    return absl::InvalidArgumentError(
        absl::StrFormat("branches: %d requested, at most %d per call", n, limits.max_branches));
  }
  std::vector<BranchRequest> out;
  absl::flat_hash_set<int32_t> seen;
  for (int i = 0; i < n; ++i) {
    const deft::v1::Branch& b = request.branches(i);
    if (!seen.insert(b.node_id()).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("branches[%d].node_id: node %d is listed twice", i, b.node_id()));
    }
    auto params =
        ToSamplingParams(b.sampling(), absl::StrFormat("branches[%d].sampling", i), limits, true);
    if (!params.ok()) return params.status();
    out.push_back(BranchRequest{b.node_id(), std::move(*params)});
  }
  return out;
}

absl::Status CheckDraft(const deft::v1::VerifyRequest& request, const RequestLimits& limits) {
  const int n = request.draft_tokens_size();
  if (n == 0) return absl::InvalidArgumentError("draft_tokens: at least one token is required");
  if (n > TreeEngine::kMaxDraftTokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("draft_tokens: %d tokens, at most %d", n, TreeEngine::kMaxDraftTokens));
  }
  if (request.draft_parents_size() != n) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "draft_parents has %d entries; draft_tokens has %d", request.draft_parents_size(), n));
  }
  absl::Status ids =
      CheckTokenIds("draft_tokens", AsSpan(request.draft_tokens()), limits.vocab_size);
  if (!ids.ok()) return ids;
  for (int i = 0; i < n; ++i) {
    const int32_t p = request.draft_parents(i);
    if (p < -1 || p >= i) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "draft_parents[%d] must be -1 or an earlier index (< %d), got %d", i, i, p));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckBeamSearch(const deft::v1::BeamSearchRequest& request,
                             const RequestLimits& limits) {
  if (request.width() < 1 || request.width() > 64) {
    return absl::InvalidArgumentError(
        absl::StrFormat("width must be in [1, 64], got %d", request.width()));
  }
  if (request.max_tokens() < 1 || request.max_tokens() > limits.max_tokens_limit) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "max_tokens must be in [1, %d], got %d", limits.max_tokens_limit, request.max_tokens()));
  }
  return absl::OkStatus();
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

std::string RepairUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xE  ? 3
                 : (c >> 3) == 0x1E ? 4
                                    : 0;
    if (len > 0 && i + len <= s.size() && IsValidUtf8(s.substr(i, len))) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      ++i;
    }
  }
  return out;
}

}  // namespace deft::server
