// ModelService over the gRPC callback API: the served model's description and its tokenizer.
// Answers UNAVAILABLE until the model has loaded.
//
// Thread safety: handlers run concurrently; the tokenizer is immutable.
#pragma once

#include <memory>

#include "deft/v1/model_service.grpc.pb.h"
#include "server/serving_state.h"

namespace deft::server {

class ModelServiceImpl final : public deft::v1::ModelService::CallbackService {
 public:
  explicit ModelServiceImpl(std::shared_ptr<ServingState> state) : state_(std::move(state)) {}

  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const deft::v1::GetModelInfoRequest* request,
                                         deft::v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const deft::v1::TokenizeRequest* request,
                                     deft::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const deft::v1::DetokenizeRequest* request,
                                       deft::v1::DetokenizeResponse* response) override;

 private:
  std::shared_ptr<ServingState> state_;
};

}  // namespace deft::server
