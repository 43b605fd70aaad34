// deftctl's connection flags, argument parsing helpers and gRPC subcommand dispatch; see remote.h.
#include "clients/deftctl/remote.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

ABSL_FLAG(std::string, server, "localhost:50051", "deft-server address (host:port)");
ABSL_FLAG(std::string, api_key, "",
          "API key, sent as 'authorization: Bearer <key>' (default: $DEFT_API_KEY)");
ABSL_FLAG(std::string, api_key_file, "", "File whose first line is the API key");
ABSL_FLAG(bool, tls, false, "Connect with TLS, trusting the system's root certificates");
ABSL_FLAG(std::string, tls_ca, "", "PEM file of root certificates to trust (implies --tls)");
ABSL_FLAG(std::string, tls_server_name, "", "Name to check in the server's certificate");
ABSL_FLAG(double, timeout, 0, "Deadline of each call in seconds (0: none)");

namespace deft::cli {

namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

bool IsRemoteCommand(const std::string& command) {
  return command == "tree" || command == "model" || command == "tokenize" ||
         command == "detokenize";
}

absl::StatusOr<std::unique_ptr<client::DeftClient>> ConnectFromFlags() {
  client::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_server);
  options.api_key = absl::GetFlag(FLAGS_api_key);
  const std::string key_file = absl::GetFlag(FLAGS_api_key_file);
  if (!options.api_key.empty() && !key_file.empty()) {
    return absl::InvalidArgumentError("--api_key and --api_key_file are exclusive");
  }
  if (!key_file.empty()) {
    auto text = ReadFile(key_file, "--api_key_file");
    if (!text.ok()) return text.status();
    std::vector<std::string> lines = absl::StrSplit(*text, '\n');
    options.api_key = std::string(absl::StripAsciiWhitespace(lines.front()));
    if (options.api_key.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--api_key_file: ", key_file, " is empty"));
    }
  } else if (options.api_key.empty()) {
    if (const char* env = std::getenv("DEFT_API_KEY"); env != nullptr) options.api_key = env;
  }
  options.use_tls = absl::GetFlag(FLAGS_tls);
  if (const std::string ca = absl::GetFlag(FLAGS_tls_ca); !ca.empty()) {
    auto pem = ReadFile(ca, "--tls_ca");
    if (!pem.ok()) return pem.status();
    options.tls_root_certs = std::move(*pem);
    options.use_tls = true;
  }
  options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  if (absl::GetFlag(FLAGS_timeout) < 0) return absl::InvalidArgumentError("--timeout: negative");
  return client::DeftClient::Connect(options);
}

client::CallOptions CallFromFlags() {
  client::CallOptions call;
  call.timeout =
      std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_timeout) * 1000.0));
  return call;
}

int UsageError(absl::string_view message) {
  std::fprintf(stderr, "deftctl: %s\n", std::string(message).c_str());
  return 2;
}

int Failed(absl::string_view what, const absl::Status& status) {
  std::fprintf(stderr, "deftctl: %s: %s\n", std::string(what).c_str(),
               client::StatusText(status).c_str());
  return 1;
}

absl::StatusOr<int32_t> ParseInt32(absl::string_view text, absl::string_view what) {
  int32_t v = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &v)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not an integer: \"", text, "\""));
  }
  return v;
}

absl::StatusOr<std::vector<int32_t>> ParseIntList(absl::string_view text, absl::string_view what) {
  std::vector<int32_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    auto v = ParseInt32(part, what);
    if (!v.ok()) return v.status();
    out.push_back(*v);
  }
  return out;
}

int RunRemoteCommand(const std::vector<std::string>& args) {
  auto client = ConnectFromFlags();
  if (!client.ok()) {
    if (client.status().code() == absl::StatusCode::kInvalidArgument) {
      return UsageError(client.status().message());
    }
    return Failed("connect", client.status());
  }
  const std::string& group = args[0];
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (group == "tree") return RunTreeCommand(**client, rest);
  return RunModelCommand(**client, group, rest);
}

}  // namespace deft::cli
