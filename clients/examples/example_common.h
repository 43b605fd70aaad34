// What the example clients share: the connection flags (--server, --api_key, --tls_ca,
// --wait_seconds) and a connect that waits for the server to serve.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "clients/lib/deft_client.h"

namespace deft::examples {

// Connects as the flags say and waits (up to --wait_seconds) until the server serves.
absl::StatusOr<std::unique_ptr<client::DeftClient>> ConnectFromFlags();

// Prints "<program>: <what>: <CODE>: <message>" to stderr and returns 1 (an exit code).
int Fail(const char* program, const std::string& what, const absl::Status& status);

// Plain sampling parameters: temperature, seed, max_tokens.
deft::v1::SamplingParams Sampling(float temperature, uint64_t seed, int32_t max_tokens);

}  // namespace deft::examples
