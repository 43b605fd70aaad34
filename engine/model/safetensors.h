// Reader for Hugging Face checkpoints: safetensors files (one, or shards listed by
// model.safetensors.index.json) and the Llama hyper-parameters of config.json.
//
// A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F16", "shape": [r, c], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {"key": "value"}}, then the data section, to which the offsets are relative.
// The file is mapped read-only and checked whole before any tensor is handed out: the header
// length against the file size, the JSON, every dtype, shape and offset pair (within the data
// section, end - begin == elements x dtype size) and that no two tensors share bytes. A bad file
// yields an error Status naming the file and the problem, never a crash.
//
// Thread safety: SafetensorsFile and SafetensorsCheckpoint are immutable after Open() and safe to
// read from many threads.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/model/llama_config.h"

namespace deft {

// The dtypes of the safetensors format whose elements are whole bytes. Sub-byte and exotic
// dtypes (F4, F6_*, F8_E8M0, ...) are rejected as unknown.
enum class SafetensorsDtype {
  kBool,
  kU8,
  kI8,
  kF8E4M3,
  kF8E5M2,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
};

// "BF16", as the header spells it.
std::string_view SafetensorsDtypeName(SafetensorsDtype dtype);
size_t SafetensorsDtypeSize(SafetensorsDtype dtype);

struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;  // outermost first (row-major); [] is a scalar
  uint64_t begin = 0;          // data_offsets, relative to the data section
  uint64_t end = 0;
  const uint8_t* data = nullptr;  // points into the mapping
  uint64_t nbytes() const { return end - begin; }
  int64_t elements() const;
};

class SafetensorsFile {
 public:
  // Maps and validates `path`. Errors: NOT_FOUND (no file); DATA_LOSS when the file is shorter
  // than its header says or a tensor lies outside the data section; INVALID_ARGUMENT for a
  // malformed header (bad JSON, bad dtype/shape/offsets, size mismatch, overlapping tensors).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when absent.
  const SafetensorsTensor* Find(std::string_view name) const;
  // In header order.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // The optional "__metadata__" string map.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  absl::flat_hash_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  friend class SafetensorsParser;
};

// The tensors of one model directory: model.safetensors, or the shards that
// model.safetensors.index.json's "weight_map" names (each shard is opened and validated once).
class SafetensorsCheckpoint {
 public:
  // Errors: NOT_FOUND when the directory has neither file; INVALID_ARGUMENT for a malformed
  // index (bad JSON, no weight_map, a shard name that leaves the directory, a tensor that its
  // shard lacks); any SafetensorsFile::Open error of a shard.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& dir);

  // NOT_FOUND "<file>: missing tensor 'name'" when absent.
  absl::StatusOr<const SafetensorsTensor*> Get(std::string_view name) const;
  // nullptr when absent.
  const SafetensorsTensor* Find(std::string_view name) const;
  // The file that holds `tensor` (REQUIRES: tensor came from this checkpoint).
  const std::string& FileOf(const SafetensorsTensor& tensor) const;
  // Where the tensor list came from: the index file, or model.safetensors.
  const std::string& source() const { return source_; }
  const std::vector<std::shared_ptr<const SafetensorsFile>>& files() const { return files_; }

 private:
  SafetensorsCheckpoint() = default;
  std::string source_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  // name -> (file index, tensor)
  absl::flat_hash_map<std::string, std::pair<size_t, const SafetensorsTensor*>> tensors_;
};

// Parses a Hugging Face config.json (text `json`, read from `path`, which errors name) of a
// Llama-family model into a LlamaConfig with rope_neox = true (HF checkpoints keep q/k rows in
// rotate_half order). Accepts architectures LlamaForCausalLM and MistralForCausalLM without a
// sliding window. Errors: INVALID_ARGUMENT for malformed or missing fields, UNIMPLEMENTED for
// a valid config this engine cannot run (other architectures, rope_scaling types other than
// "llama3" and "linear", attention/MLP biases, activations other than silu).
absl::StatusOr<LlamaConfig> LlamaConfigFromHfJson(std::string_view json, const std::string& path);

}  // namespace deft
