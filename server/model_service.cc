#include "server/model_service.h"

namespace deft::server {
namespace {

// Finishes a unary call and counts it under `method`.
grpc::ServerUnaryReactor* Answer(const ServingState& state, const char* method,
                                 grpc::CallbackServerContext* context, const absl::Status& s) {
  grpc::ServerUnaryReactor* r = context->DefaultReactor();
  grpc::Status status = ToGrpcStatus(s);
  state.RecordRequest(method, status.error_code());
  r->Finish(status);
  return r;
}

}  // namespace

grpc::ServerUnaryReactor* ModelServiceImpl::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const deft::v1::GetModelInfoRequest*,
                                                         deft::v1::ModelInfo* response) {
  auto ready = state_->Begin(*context, "GetModelInfo");
  if (!ready.ok()) return Answer(*state_, "GetModelInfo", context, ready.status());
  TreeEngine& engine = *ready->engine;
  const LlamaConfig& c = engine.model().config();
  response->set_name(c.name);
  response->set_architecture(c.architecture);
  response->set_vocab_size(c.vocab_size);
  response->set_context_length(c.context_length);
  response->set_num_layers(c.num_layers);
  response->set_hidden_size(c.hidden);
  response->set_num_heads(c.num_heads);
  response->set_num_kv_heads(c.num_kv_heads);
  response->set_attention_mode(state_->attention_mode());
  response->set_backend("cpu");
  response->set_kv_pool_blocks(engine.total_blocks());
  response->set_kv_block_tokens(engine.options().block_tokens);
  for (int32_t id : engine.model().tokenizer().end_of_generation_ids()) {
    response->add_end_of_generation_token_ids(id);
  }
  return Answer(*state_, "GetModelInfo", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* ModelServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                     const deft::v1::TokenizeRequest* request,
                                                     deft::v1::TokenizeResponse* response) {
  auto ready = state_->Begin(*context, "Tokenize");
  if (!ready.ok()) return Answer(*state_, "Tokenize", context, ready.status());
  absl::Status s = CheckUtf8("text", request->text());
  if (!s.ok()) return Answer(*state_, "Tokenize", context, s);
  const Tokenizer& tok = ready->engine->model().tokenizer();
  for (int32_t id : tok.Encode(request->text(), request->add_bos(), request->parse_special())) {
    response->add_token_ids(id);
  }
  return Answer(*state_, "Tokenize", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* ModelServiceImpl::Detokenize(grpc::CallbackServerContext* context,
                                                       const deft::v1::DetokenizeRequest* request,
                                                       deft::v1::DetokenizeResponse* response) {
  auto ready = state_->Begin(*context, "Detokenize");
  if (!ready.ok()) return Answer(*state_, "Detokenize", context, ready.status());
  absl::Status s =
      CheckTokenIds("token_ids", AsSpan(request->token_ids()), ready->limits.vocab_size);
  if (!s.ok()) return Answer(*state_, "Detokenize", context, s);
  const Tokenizer& tok = ready->engine->model().tokenizer();
  std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  response->set_text(RepairUtf8(tok.Decode(ids, request->skip_special())));
  return Answer(*state_, "Detokenize", context, absl::OkStatus());
}

}  // namespace deft::server
