// Request validation at the gRPC boundary: every check the server makes before calling the engine,
// each failing with INVALID_ARGUMENT (or OUT_OF_RANGE for the context length) and a message that
// names the field by its path in the request, e.g.
//   "branches[2].sampling.top_p must be in (0, 1], got 1.5".
// Also the absl::Status -> grpc::Status conversion and the UTF-8 repair used for output text.
//
// Thread safety: pure functions.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "deft/v1/tree_service.pb.h"
#include "engine/sampler/sampler.h"
#include "engine/scheduler/tree_engine.h"

namespace deft::server {

// The server's limits and the model's sizes that requests are checked against.
struct RequestLimits {
  int32_t max_branches = 64;        // branches per Generate
  int32_t max_tokens_limit = 4096;  // SamplingParams.max_tokens upper bound
  int64_t vocab_size = 0;
  int64_t context_length = 0;
};

// INVALID_ARGUMENT "<field> is not valid UTF-8" when `text` is malformed.
absl::Status CheckUtf8(const std::string& field, std::string_view text);
// INVALID_ARGUMENT "<field>[i]: <id> is outside the vocabulary [0, V)" for the first bad id.
absl::Status CheckTokenIds(const std::string& field, std::span<const int32_t> ids,
                           int64_t vocab_size);
// OUT_OF_RANGE when a prompt of `num_tokens` leaves no room to generate in the model's context.
absl::Status CheckPromptLength(int64_t num_tokens, int64_t context_length);

// The engine's SamplingParams for the proto's, validated; `field` is the path of `p` in the
// request ("branches[2].sampling"). With `for_generation`, max_tokens must be in
// [1, max_tokens_limit]; otherwise (Verify) it is ignored.
absl::StatusOr<SamplingParams> ToSamplingParams(const deft::v1::SamplingParams& p,
                                                const std::string& field,
                                                const RequestLimits& limits, bool for_generation);

// The engine branches of a GenerateRequest: 1..max_branches, valid sampling, distinct nodes.
absl::StatusOr<std::vector<BranchRequest>> ToBranches(const deft::v1::GenerateRequest& request,
                                                      const RequestLimits& limits);

// Draft token tree of a VerifyRequest: equal lengths, ids in the vocabulary, each parent -1 or an
// earlier index.
absl::Status CheckDraft(const deft::v1::VerifyRequest& request, const RequestLimits& limits);

// BeamSearchRequest width in [1, 64], max_tokens in [1, max_tokens_limit].
absl::Status CheckBeamSearch(const deft::v1::BeamSearchRequest& request,
                             const RequestLimits& limits);

// A repeated int32 field as a span.
inline std::span<const int32_t> AsSpan(const google::protobuf::RepeatedField<int32_t>& f) {
  return {f.data(), static_cast<size_t>(f.size())};
}

// Same code, same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// `bytes` with every malformed UTF-8 sequence replaced by U+FFFD.
std::string RepairUtf8(std::string_view bytes);

}  // namespace deft::server
