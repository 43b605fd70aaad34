// deftctl's gRPC subcommands (tree ..., model info, tokenize, detokenize) against a deft-server.
// Each returns the process exit code: 0 on success, 1 when the server (or the connection) answered
// an error (printed as "deftctl: <what>: <CODE>: <server message>"), 2 for bad usage.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "clients/lib/deft_client.h"

namespace deft::cli {

// True for the first positional words the gRPC subcommands own.
bool IsRemoteCommand(const std::string& command);
// `args`: the positional arguments after the program name, e.g. {"tree", "show", "<id>"}.
int RunRemoteCommand(const std::vector<std::string>& args);

// --- shared by the subcommand files ---

// The client from --server, --api_key / --api_key_file, --tls / --tls_ca, --timeout.
absl::StatusOr<std::unique_ptr<client::DeftClient>> ConnectFromFlags();
// Per-call options from --timeout.
client::CallOptions CallFromFlags();

// Prints "deftctl: <message>" and returns 2.
int UsageError(absl::string_view message);
// Prints "deftctl: <what>: <CODE>: <message>" and returns 1.
int Failed(absl::string_view what, const absl::Status& status);

// "1,2,3" (spaces allowed) -> ids. INVALID_ARGUMENT naming `what` on a bad entry.
absl::StatusOr<std::vector<int32_t>> ParseIntList(absl::string_view text, absl::string_view what);
absl::StatusOr<int32_t> ParseInt32(absl::string_view text, absl::string_view what);

// Subcommand groups (remote_tree.cc, remote_model.cc). `args` start after the group's word.
int RunTreeCommand(const client::DeftClient& client, const std::vector<std::string>& args);
int RunGenerateCommand(const client::DeftClient& client, const std::vector<std::string>& args);
int RunModelCommand(const client::DeftClient& client, const std::string& command,
                    const std::vector<std::string>& args);

}  // namespace deft::cli
