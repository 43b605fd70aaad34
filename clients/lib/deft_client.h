// DeftClient: a C++ client of deft-serve's gRPC API (deft.v1.TreeService and deft.v1.ModelService,
// documented field by field in proto/deft/v1/*.proto). Depends only on the generated protos and
// gRPC.
//
// Every RPC returns absl::Status / absl::StatusOr carrying the server's status code and message
// unchanged (gRPC and absl codes share their numbering), so a caller can tell NOT_FOUND from
// INVALID_ARGUMENT and print the message naming the bad field. Errors found before a call is
// sent (a malformed option) are INVALID_ARGUMENT with a message saying which.
//
// Authentication: with ClientOptions::api_key set, every call carries the metadata
// "authorization: Bearer <api_key>" that deft-server --api_keys checks (server/auth.h).
// Deadlines: each call runs under CallOptions::timeout, else ClientOptions::default_timeout, else
// none; a call past it returns DEADLINE_EXCEEDED.
// Cancellation: a Generate callback returning false cancels the stream; any call can be cancelled
// from another thread through a Cancellation passed in CallOptions. Cancelled calls return
// CANCELLED.
//
// Thread safety: a DeftClient is immutable after Connect; all methods may be called concurrently
// from any number of threads (each call gets its own gRPC context). Callbacks run on the calling
// thread. A Cancellation may be triggered from any thread.
#pragma once

#include <grpcpp/channel.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "deft/v1/model_service.grpc.pb.h"
#include "deft/v1/tree_service.grpc.pb.h"

namespace grpc {
class ClientContext;
}

namespace deft::client {

namespace pb = ::deft::v1;

struct ClientOptions {
  std::string address = "localhost:50051";  // host:port, or any gRPC target URI
  // TLS: with use_tls (or tls_root_certs non-empty) the channel is secure. tls_root_certs is a PEM
  // bundle of trusted roots; empty: the system's roots.
  bool use_tls = false;
  std::string tls_root_certs;
  // Overrides the name checked against the server certificate (tests with self-signed certs).
  std::string tls_server_name;
  // Sent as "authorization: Bearer <api_key>"; empty: no authorization metadata. Printable ASCII
  // without spaces.
  std::string api_key;
  // Deadline of each call without its own CallOptions::timeout; zero: none.
  std::chrono::milliseconds default_timeout{0};
};

// Lets another thread cancel calls in flight. Cancel() cancels the calls running with this object
// now and every later call that is given it (it stays cancelled).
class Cancellation {
 public:
  void Cancel();
  bool cancelled() const;

 private:
  friend class CallScope;
  // Returns false when already cancelled (the call must not start).
  bool Register(grpc::ClientContext* context);
  void Unregister(grpc::ClientContext* context);

  mutable std::mutex mu_;
  bool cancelled_ = false;
  std::vector<grpc::ClientContext*> contexts_;
};

struct CallOptions {
  // This call's deadline, measured from when it starts; nullopt: the client's default_timeout.
  // Zero: no deadline even if the client has a default.
  std::optional<std::chrono::milliseconds> timeout;
  std::shared_ptr<Cancellation> cancellation;  // null: not cancellable from outside
  // Wait for the channel to connect (up to the deadline) instead of failing UNAVAILABLE at once.
  bool wait_for_ready = false;
};

// One branch's output from Generate, gathered from its events.
struct BranchOutput {
  std::vector<int32_t> tokens;         // the token events' ids (text-only events add none)
  std::vector<float> logprobs;         // one per token
  std::string text;                    // concatenated text of every event
  std::vector<pb::TokenEvent> events;  // only when GenerateCollected keeps them (top_logprobs)
  std::optional<pb::FinishEvent> finish;
};

// Called once per streamed event, in order; return false to cancel the stream.
using GenerateCallback = std::function<bool(const pb::GenerateEvent&)>;

class DeftClient {
 public:
  // Creates the channel (connecting lazily: an unreachable server shows on the first call as
  // UNAVAILABLE). INVALID_ARGUMENT for an empty address or an api_key that cannot be sent.
  static absl::StatusOr<std::unique_ptr<DeftClient>> Connect(const ClientOptions& options);

  // Polls GetModelInfo until the server answers (deft-server answers UNAVAILABLE while its model
  // loads) or `timeout` passes: OK, the first error other than UNAVAILABLE, or DEADLINE_EXCEEDED.
  absl::Status WaitUntilServing(std::chrono::milliseconds timeout) const;

  // --- TreeService ---
  absl::StatusOr<pb::CreateTreeResponse> CreateTree(const pb::CreateTreeRequest& request,
                                                    const CallOptions& call = {}) const;
  // Raw prompt text (special tokens parsed by the server).
  absl::StatusOr<pb::CreateTreeResponse> CreateTreeFromText(const std::string& text,
                                                            const CallOptions& call = {}) const;
  // Chat messages as {role, content} pairs, rendered with the model's chat template.
  absl::StatusOr<pb::CreateTreeResponse> CreateTreeFromChat(
      const std::vector<std::pair<std::string, std::string>>& messages,
      bool add_generation_prompt = true, const CallOptions& call = {}) const;
  absl::StatusOr<pb::CreateTreeResponse> CreateTreeFromTokens(const std::vector<int32_t>& ids,
                                                              const CallOptions& call = {}) const;

  absl::StatusOr<pb::ForkResponse> Fork(const std::string& tree_id, int32_t node_id, int64_t offset,
                                        int32_t count, const CallOptions& call = {}) const;
  // Returns the leaf's length in tokens afterwards.
  absl::StatusOr<int32_t> ExtendText(const std::string& tree_id, int32_t node_id,
                                     const std::string& text, const CallOptions& call = {}) const;
  absl::StatusOr<int32_t> ExtendTokens(const std::string& tree_id, int32_t node_id,
                                       const std::vector<int32_t>& ids,
                                       const CallOptions& call = {}) const;

  // Streams the events to `on_event` (on this thread) until the stream ends. Returns the finish
  // events by node id, or the stream's error (CANCELLED when on_event returned false, with the
  // events already delivered kept by the caller).
  absl::StatusOr<std::map<int32_t, pb::FinishEvent>> Generate(const pb::GenerateRequest& request,
                                                              const GenerateCallback& on_event,
                                                              const CallOptions& call = {}) const;
  // Generate, gathering each branch's output by node id. keep_events: also keep every TokenEvent
  // (for their top_logprobs).
  absl::StatusOr<std::map<int32_t, BranchOutput>> GenerateCollected(
      const pb::GenerateRequest& request, bool keep_events = false,
      const CallOptions& call = {}) const;

  // Verifies a draft token tree under leaf `node_id`: parents[i] is -1 for a child of the leaf,
  // else an earlier index. `sampling` null: greedy acceptance.
  absl::StatusOr<pb::VerifyResponse> Verify(const std::string& tree_id, int32_t node_id,
                                            const std::vector<int32_t>& draft_tokens,
                                            const std::vector<int32_t>& draft_parents,
                                            const pb::SamplingParams* sampling = nullptr,
                                            const CallOptions& call = {}) const;
  absl::StatusOr<pb::BeamSearchResponse> BeamSearch(const pb::BeamSearchRequest& request,
                                                    const CallOptions& call = {}) const;
  absl::Status Prune(const std::string& tree_id, int32_t node_id,
                     const CallOptions& call = {}) const;
  absl::StatusOr<pb::Tree> GetTree(const std::string& tree_id, bool include_text,
                                   bool include_tokens, const CallOptions& call = {}) const;
  absl::Status DeleteTree(const std::string& tree_id, const CallOptions& call = {}) const;
  absl::StatusOr<std::vector<pb::TreeSummary>> ListTrees(const CallOptions& call = {}) const;

  // --- ModelService ---
  absl::StatusOr<pb::ModelInfo> GetModelInfo(const CallOptions& call = {}) const;
  absl::StatusOr<std::vector<int32_t>> Tokenize(const std::string& text, bool parse_special,
                                                bool add_bos, const CallOptions& call = {}) const;
  absl::StatusOr<std::string> Detokenize(const std::vector<int32_t>& ids, bool skip_special,
                                         const CallOptions& call = {}) const;

  const ClientOptions& options() const { return options_; }

 private:
  explicit DeftClient(ClientOptions options, std::shared_ptr<grpc::Channel> channel);

  // Runs one unary call on a fresh context set up from `call`.
  template <typename Request, typename Response, typename Stub>
  absl::StatusOr<Response> Unary(grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&,
                                                              Response*),
                                 Stub* stub, const Request& request, const CallOptions& call) const;
  void Prepare(grpc::ClientContext* context, const CallOptions& call) const;

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::TreeService::Stub> trees_;
  std::unique_ptr<pb::ModelService::Stub> models_;
};

// gRPC status -> absl::Status with the same code and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

// "NOT_FOUND: tree \"ab\" not found": the code's name and the message, for error output.
std::string StatusText(const absl::Status& status);

}  // namespace deft::client
