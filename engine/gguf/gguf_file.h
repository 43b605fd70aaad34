// GGUF (v2/v3) reader: header, metadata key/values, tensor infos and tensor data through mmap.
// Every count, length and offset read from the file is checked against the file's size before it
// is used, so a truncated, corrupt or hostile file yields an error Status naming the problem,
// never a crash or an allocation out of proportion to the file's size (at most a small multiple
// of it: metadata arrays are stored widened to 8-byte elements).
//
// Thread safety: a GgufFile is immutable after Open() and safe to read from many threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/gguf/ggml_types.h"

namespace deft {

// GGUF metadata value types (gguf_type in ggml's gguf.h).
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// One metadata value. Scalars of any integer width are stored widened (unsigned types as uint64_t,
// signed as int64_t, float32/64 as double); `type` keeps the type the file used. Arrays keep their
// element type in `elem_type`: integer and bool arrays are stored as std::vector<int64_t> (uint64
// elements keep their bit pattern), float arrays as std::vector<double>, string arrays as
// std::vector<std::string>. Arrays of arrays are rejected at parse time (no model needs them).
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  GgufValueType elem_type = GgufValueType::kUint8;  // for kArray
  std::variant<int64_t, uint64_t, double, bool, std::string, std::vector<int64_t>,
               std::vector<double>, std::vector<std::string>>
      value;
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the innermost (contiguous) dimension
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;  // from the start of the data section
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;  // points into the mapping
  int64_t elements() const;
  int64_t rows() const { return elements() / (dims.empty() ? 1 : dims[0]); }
};

class GgufFile {
 public:
  // Maps and parses `path`. Errors: NOT_FOUND (no file); DATA_LOSS when the file ends too early
  // (truncated header or metadata, tensor data past the end); INVALID_ARGUMENT for everything
  // else (bad magic, unsupported version, overflowing counts, unknown tensor type, misaligned
  // data, duplicate names ...). Messages start with the path and name the key or tensor.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& path() const { return path_; }

  // Metadata lookup; nullptr when absent.
  const GgufValue* Find(std::string_view key) const;
  // Typed getters: NOT_FOUND when absent, INVALID_ARGUMENT naming the key on a type mismatch.
  // GetInt accepts any integer type (and bool); GetFloat accepts float and integer types.
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(std::string_view key) const;
  const std::vector<std::string>& keys() const { return key_order_; }

  // Tensor lookup; nullptr when absent.
  const GgufTensor* FindTensor(std::string_view name) const;
  // NOT_FOUND "missing tensor 'name'" when absent.
  absl::StatusOr<const GgufTensor*> GetTensor(std::string_view name) const;
  const std::vector<GgufTensor>& tensors() const { return tensors_; }

 private:
  GgufFile() = default;
  std::string path_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<std::string> key_order_;
  absl::flat_hash_map<std::string, GgufValue> kv_;
  std::vector<GgufTensor> tensors_;
  absl::flat_hash_map<std::string, size_t> tensor_index_;
  friend class GgufParser;
};

}  // namespace deft
