// Connection flags shared by the example clients; see example_common.h.
#include "clients/examples/example_common.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, server, "localhost:50051", "deft-server address (host:port)");
ABSL_FLAG(std::string, api_key, "", "API key (sent as 'authorization: Bearer <key>')");
ABSL_FLAG(std::string, tls_ca, "", "PEM root certificates: connect with TLS");
ABSL_FLAG(double, wait_seconds, 30, "How long to wait for the server to serve");

namespace deft::examples {

absl::StatusOr<std::unique_ptr<client::DeftClient>> ConnectFromFlags() {
  client::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_server);
  options.api_key = absl::GetFlag(FLAGS_api_key);
  if (const std::string ca = absl::GetFlag(FLAGS_tls_ca); !ca.empty()) {
    std::ifstream in(ca, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("--tls_ca: cannot read ", ca));
    std::stringstream ss;
    ss << in.rdbuf();
    options.tls_root_certs = ss.str();
  }
  auto c = client::DeftClient::Connect(options);
  if (!c.ok()) return c.status();
  const auto wait =
      std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_wait_seconds) * 1000));
  if (absl::Status s = (*c)->WaitUntilServing(wait); !s.ok()) return s;
  return c;
}

int Fail(const char* program, const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s: %s\n", program, what.c_str(), client::StatusText(status).c_str());
  return 1;
}

deft::v1::SamplingParams Sampling(float temperature, uint64_t seed, int32_t max_tokens) {
  deft::v1::SamplingParams p;
  p.set_temperature(temperature);
  p.set_seed(seed);
  p.set_max_tokens(max_tokens);
  return p;
}

}  // namespace deft::examples
