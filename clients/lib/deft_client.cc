// DeftClient; see deft_client.h.
#include "clients/lib/deft_client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"

namespace deft::client {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::string StatusText(const absl::Status& status) {
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message());
}

void Cancellation::Cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = true;
  for (grpc::ClientContext* c : contexts_) c->TryCancel();
}

bool Cancellation::cancelled() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cancelled_;
}

bool Cancellation::Register(grpc::ClientContext* context) {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_) return false;
  contexts_.push_back(context);
  return true;
}

void Cancellation::Unregister(grpc::ClientContext* context) {
  std::lock_guard<std::mutex> lock(mu_);
  contexts_.erase(std::remove(contexts_.begin(), contexts_.end(), context), contexts_.end());
}

// Registers a call's context with its Cancellation for the call's lifetime.
class CallScope {
 public:
  CallScope(grpc::ClientContext* context, const std::shared_ptr<Cancellation>& cancellation)
      : context_(context), cancellation_(cancellation) {
    if (cancellation_ != nullptr) registered_ = cancellation_->Register(context_);
  }
  ~CallScope() {
    if (registered_) cancellation_->Unregister(context_);
  }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

  // CANCELLED when the call must not start.
  absl::Status status() const {
    if (cancellation_ != nullptr && !registered_) {
      return absl::CancelledError("cancelled before the call started");
    }
    return absl::OkStatus();
  }

 private:
  grpc::ClientContext* context_;
  std::shared_ptr<Cancellation> cancellation_;
  bool registered_ = false;
};

namespace {

// Metadata values must be printable ASCII; a space would make the Bearer value ambiguous.
absl::Status CheckApiKey(const std::string& key) {
  for (char c : key) {
    if (c <= ' ' || c > '~') {
      return absl::InvalidArgumentError(
          "api_key: must be printable ASCII without spaces or line breaks");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeftClient>> DeftClient::Connect(const ClientOptions& options) {
  if (options.address.empty()) return absl::InvalidArgumentError("address: empty");
  if (absl::Status s = CheckApiKey(options.api_key); !s.ok()) return s;
  if (options.default_timeout.count() < 0) {
    return absl::InvalidArgumentError("default_timeout: negative");
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  grpc::ChannelArguments args;
  if (options.use_tls || !options.tls_root_certs.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs;
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  auto channel = grpc::CreateCustomChannel(options.address, credentials, args);
  if (channel == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("address: cannot use \"", options.address, "\""));
  }
  return std::unique_ptr<DeftClient>(new DeftClient(options, std::move(channel)));
}

DeftClient::DeftClient(ClientOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      trees_(pb::TreeService::NewStub(channel_)),
      models_(pb::ModelService::NewStub(channel_)) {}

void DeftClient::Prepare(grpc::ClientContext* context, const CallOptions& call) const {
  const std::chrono::milliseconds timeout = call.timeout.value_or(options_.default_timeout);
  if (timeout.count() > 0) context->set_deadline(std::chrono::system_clock::now() + timeout);
  if (!options_.api_key.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", options_.api_key));
  }
  context->set_wait_for_ready(call.wait_for_ready);
}

template <typename Request, typename Response, typename Stub>
absl::StatusOr<Response> DeftClient::Unary(grpc::Status (Stub::*method)(grpc::ClientContext*,
                                                                        const Request&, Response*),
                                           Stub* stub, const Request& request,
                                           const CallOptions& call) const {
  grpc::ClientContext context;
  Prepare(&context, call);
  CallScope scope(&context, call.cancellation);
  if (absl::Status s = scope.status(); !s.ok()) return s;
  Response response;
  grpc::Status status = (stub->*method)(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status DeftClient::WaitUntilServing(std::chrono::milliseconds timeout) const {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return absl::DeadlineExceededError(absl::StrCat(
          "server at ", options_.address, " not serving after ", timeout.count(), " ms"));
    }
    CallOptions call;
    call.timeout = left;
    call.wait_for_ready = true;  // the channel may still be connecting
    absl::StatusOr<pb::ModelInfo> info = GetModelInfo(call);
    if (info.ok()) return absl::OkStatus();
    // UNAVAILABLE: still loading; DEADLINE_EXCEEDED: still connecting when `left` ran out.
    const absl::StatusCode code = info.status().code();
    if (code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kDeadlineExceeded) {
      return info.status();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

absl::StatusOr<pb::CreateTreeResponse> DeftClient::CreateTree(const pb::CreateTreeRequest& request,
                                                              const CallOptions& call) const {
  return Unary(&pb::TreeService::Stub::CreateTree, trees_.get(), request, call);
}

absl::StatusOr<pb::CreateTreeResponse> DeftClient::CreateTreeFromText(
    const std::string& text, const CallOptions& call) const {
  pb::CreateTreeRequest request;
  request.set_text(text);
  return CreateTree(request, call);
}

absl::StatusOr<pb::CreateTreeResponse> DeftClient::CreateTreeFromChat(
    const std::vector<std::pair<std::string, std::string>>& messages, bool add_generation_prompt,
    const CallOptions& call) const {
  pb::CreateTreeRequest request;
  for (const auto& [role, content] : messages) {
    pb::ChatMessage* m = request.mutable_messages()->add_messages();
    m->set_role(role);
    m->set_content(content);
  }
  if (messages.empty()) request.mutable_messages();  // an empty chat is still a chat prompt
  request.set_add_generation_prompt(add_generation_prompt);
  return CreateTree(request, call);
}

absl::StatusOr<pb::CreateTreeResponse> DeftClient::CreateTreeFromTokens(
    const std::vector<int32_t>& ids, const CallOptions& call) const {
  pb::CreateTreeRequest request;
  request.mutable_tokens()->mutable_ids()->Assign(ids.begin(), ids.end());
  return CreateTree(request, call);
}

absl::StatusOr<pb::ForkResponse> DeftClient::Fork(const std::string& tree_id, int32_t node_id,
                                                  int64_t offset, int32_t count,
                                                  const CallOptions& call) const {
  pb::ForkRequest request;
  request.set_tree_id(tree_id);
  request.set_node_id(node_id);
  request.set_offset(offset);
  request.set_count(count);
  return Unary(&pb::TreeService::Stub::Fork, trees_.get(), request, call);
}

absl::StatusOr<int32_t> DeftClient::ExtendText(const std::string& tree_id, int32_t node_id,
                                               const std::string& text,
                                               const CallOptions& call) const {
  pb::ExtendRequest request;
  request.set_tree_id(tree_id);
  request.set_node_id(node_id);
  request.set_text(text);
  auto response = Unary(&pb::TreeService::Stub::Extend, trees_.get(), request, call);
  if (!response.ok()) return response.status();
  return response->node_tokens();
}

absl::StatusOr<int32_t> DeftClient::ExtendTokens(const std::string& tree_id, int32_t node_id,
                                                 const std::vector<int32_t>& ids,
                                                 const CallOptions& call) const {
  pb::ExtendRequest request;
  request.set_tree_id(tree_id);
  request.set_node_id(node_id);
  request.mutable_tokens()->mutable_ids()->Assign(ids.begin(), ids.end());
  auto response = Unary(&pb::TreeService::Stub::Extend, trees_.get(), request, call);
  if (!response.ok()) return response.status();
  return response->node_tokens();
}

absl::StatusOr<std::map<int32_t, pb::FinishEvent>> DeftClient::Generate(
    const pb::GenerateRequest& request, const GenerateCallback& on_event,
    const CallOptions& call) const {
  grpc::ClientContext context;
  Prepare(&context, call);
  CallScope scope(&context, call.cancellation);
  if (absl::Status s = scope.status(); !s.ok()) return s;
  std::unique_ptr<grpc::ClientReader<pb::GenerateEvent>> reader =
      trees_->Generate(&context, request);
  std::map<int32_t, pb::FinishEvent> finished;
  bool stopped_by_caller = false;
  pb::GenerateEvent event;
  while (reader->Read(&event)) {
    if (event.has_finish()) finished[event.finish().node_id()] = event.finish();
    if (on_event && !on_event(event)) {
      stopped_by_caller = true;
      context.TryCancel();
      break;
    }
  }
  if (stopped_by_caller) {
    // Drain what is already in flight so Finish returns promptly with CANCELLED.
    while (reader->Read(&event)) {
    }
    reader->Finish();
    return absl::CancelledError("Generate cancelled by the caller");
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return FromGrpcStatus(status);
  return finished;
}

absl::StatusOr<std::map<int32_t, BranchOutput>> DeftClient::GenerateCollected(
    const pb::GenerateRequest& request, bool keep_events, const CallOptions& call) const {
  std::map<int32_t, BranchOutput> out;
  auto finished = Generate(
      request,
      [&](const pb::GenerateEvent& e) {
        if (e.has_token()) {
          BranchOutput& b = out[e.token().node_id()];
          if (e.token().token_id() >= 0) {
            b.tokens.push_back(e.token().token_id());
            b.logprobs.push_back(e.token().logprob());
          }
          b.text += e.token().text();
          if (keep_events) b.events.push_back(e.token());
        }
        return true;
      },
      call);
  if (!finished.ok()) return finished.status();
  for (auto& [node, finish] : *finished) out[node].finish = finish;
  return out;
}

absl::StatusOr<pb::VerifyResponse> DeftClient::Verify(const std::string& tree_id, int32_t node_id,
                                                      const std::vector<int32_t>& draft_tokens,
                                                      const std::vector<int32_t>& draft_parents,
                                                      const pb::SamplingParams* sampling,
                                                      const CallOptions& call) const {
  pb::VerifyRequest request;
  request.set_tree_id(tree_id);
  request.set_node_id(node_id);
  request.mutable_draft_tokens()->Assign(draft_tokens.begin(), draft_tokens.end());
  request.mutable_draft_parents()->Assign(draft_parents.begin(), draft_parents.end());
  if (sampling != nullptr) *request.mutable_sampling() = *sampling;
  return Unary(&pb::TreeService::Stub::Verify, trees_.get(), request, call);
}

absl::StatusOr<pb::BeamSearchResponse> DeftClient::BeamSearch(const pb::BeamSearchRequest& request,
                                                              const CallOptions& call) const {
  return Unary(&pb::TreeService::Stub::BeamSearch, trees_.get(), request, call);
}

absl::Status DeftClient::Prune(const std::string& tree_id, int32_t node_id,
                               const CallOptions& call) const {
  pb::PruneRequest request;
  request.set_tree_id(tree_id);
  request.set_node_id(node_id);
  return Unary(&pb::TreeService::Stub::Prune, trees_.get(), request, call).status();
}

absl::StatusOr<pb::Tree> DeftClient::GetTree(const std::string& tree_id, bool include_text,
                                             bool include_tokens, const CallOptions& call) const {
  pb::GetTreeRequest request;
  request.set_tree_id(tree_id);
  request.set_include_text(include_text);
  request.set_include_tokens(include_tokens);
  return Unary(&pb::TreeService::Stub::GetTree, trees_.get(), request, call);
}

absl::Status DeftClient::DeleteTree(const std::string& tree_id, const CallOptions& call) const {
  pb::DeleteTreeRequest request;
  request.set_tree_id(tree_id);
  return Unary(&pb::TreeService::Stub::DeleteTree, trees_.get(), request, call).status();
}

absl::StatusOr<std::vector<pb::TreeSummary>> DeftClient::ListTrees(const CallOptions& call) const {
  auto response =
      Unary(&pb::TreeService::Stub::ListTrees, trees_.get(), pb::ListTreesRequest(), call);
  if (!response.ok()) return response.status();
  return std::vector<pb::TreeSummary>(response->trees().begin(), response->trees().end());
}

absl::StatusOr<pb::ModelInfo> DeftClient::GetModelInfo(const CallOptions& call) const {
  return Unary(&pb::ModelService::Stub::GetModelInfo, models_.get(), pb::GetModelInfoRequest(),
               call);
}

absl::StatusOr<std::vector<int32_t>> DeftClient::Tokenize(const std::string& text,
                                                          bool parse_special, bool add_bos,
                                                          const CallOptions& call) const {
  pb::TokenizeRequest request;
  request.set_text(text);
  request.set_parse_special(parse_special);
  request.set_add_bos(add_bos);
  auto response = Unary(&pb::ModelService::Stub::Tokenize, models_.get(), request, call);
  if (!response.ok()) return response.status();
  return std::vector<int32_t>(response->token_ids().begin(), response->token_ids().end());
}

absl::StatusOr<std::string> DeftClient::Detokenize(const std::vector<int32_t>& ids,
                                                   bool skip_special,
                                                   const CallOptions& call) const {
  pb::DetokenizeRequest request;
  request.mutable_token_ids()->Assign(ids.begin(), ids.end());
  request.set_skip_special(skip_special);
  auto response = Unary(&pb::ModelService::Stub::Detokenize, models_.get(), request, call);
  if (!response.ok()) return response.status();
  return std::move(*response->mutable_text());
}

}  // namespace deft::client
