// GGUF v2/v3 parsing over a read-only mmap. Layout (all little-endian):
//   header:  "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//   n_kv x   string key | u32 value type | value      (string = u64 length | bytes)
//   n_tensors x string name | u32 n_dims | u64 dims[n_dims] | u32 type | u64 offset
//   padding to general.alignment (default 32), then the data section; tensor offsets are
//   relative to its start.
// Every read goes through Cursor, which checks the bytes are there first; every count is checked
// against the bytes left before anything is allocated for it.
#include "engine/gguf/gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace deft {
namespace {

// This tree's Abseil has its own string_view (ABSL_OPTION_USE_STD_STRING_VIEW 0), which does not
// convert from std::string_view implicitly.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint64_t kHeaderBytes = 4 + 4 + 8 + 8;
constexpr uint32_t kMaxDims = 4;
constexpr uint64_t kDefaultAlignment = 32;
// Smallest encodings, used to bound counts by the bytes left: a tensor info with an empty name
// and one dimension, a key/value with an empty key and a one-byte value.
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;

std::string_view ValueTypeName(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
      return "uint8";
    case GgufValueType::kInt8:
      return "int8";
    case GgufValueType::kUint16:
      return "uint16";
    case GgufValueType::kInt16:
      return "int16";
    case GgufValueType::kUint32:
      return "uint32";
    case GgufValueType::kInt32:
      return "int32";
    case GgufValueType::kFloat32:
      return "float32";
    case GgufValueType::kBool:
      return "bool";
    case GgufValueType::kString:
      return "string";
    case GgufValueType::kArray:
      return "array";
    case GgufValueType::kUint64:
      return "uint64";
    case GgufValueType::kInt64:
      return "int64";
    case GgufValueType::kFloat64:
      return "float64";
  }
  return "unknown";
}

bool IsKnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kFloat64); }

bool IsSigned(GgufValueType t) {
  return t == GgufValueType::kInt8 || t == GgufValueType::kInt16 || t == GgufValueType::kInt32 ||
         t == GgufValueType::kInt64;
}
bool IsUnsigned(GgufValueType t) {
  return t == GgufValueType::kUint8 || t == GgufValueType::kUint16 || t == GgufValueType::kUint32 ||
         t == GgufValueType::kUint64;
}
bool IsFloat(GgufValueType t) {
  return t == GgufValueType::kFloat32 || t == GgufValueType::kFloat64;
}

// Encoded size of a scalar value type; strings report their minimum (the length field).
uint64_t EncodedSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    default:
      return 8;
  }
}

std::string DescribeType(const GgufValue& v) {
  if (v.type != GgufValueType::kArray) return std::string(ValueTypeName(v.type));
  return absl::StrCat("array of ", Sv(ValueTypeName(v.elem_type)));
}

absl::Status Annotate(const absl::Status& s, std::string_view prefix) {
  return absl::Status(s.code(), absl::StrCat(Sv(prefix), s.message()));
}

// Bounds-checked little-endian reader over the mapping.
class Cursor {
 public:
  Cursor(const uint8_t* base, uint64_t size) : base_(base), size_(size) {}
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  absl::Status Need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return absl::DataLossError(
          absl::StrFormat("file truncated: %s at offset %d needs %d bytes, only %d remain", what,
                          pos_, n, remaining()));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Read(std::string_view what) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (absl::Status s = Need(sizeof(T), what); !s.ok()) return s;
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  absl::StatusOr<std::string> ReadString(std::string_view what) {
    absl::StatusOr<uint64_t> len = Read<uint64_t>(what);
    if (!len.ok()) return len.status();
    if (*len > remaining()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: string length %d at offset %d exceeds the %d bytes left in the file",
                          what, *len, pos_ - 8, remaining()));
    }
    std::string s(reinterpret_cast<const char*>(base_ + pos_), *len);
    pos_ += *len;
    return s;
  }

 private:
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

}  // namespace

// Fills a GgufFile from its mapping; a friend of GgufFile.
class GgufParser {
 public:
  GgufParser(GgufFile* file, const uint8_t* base, uint64_t size)
      : file_(file), base_(base), size_(size), in_(base, size) {}

  absl::Status Parse() {
    uint64_t n_tensors = 0, n_kv = 0;
    if (absl::Status s = ParseHeader(&n_tensors, &n_kv); !s.ok()) return s;
    file_->key_order_.reserve(n_kv);
    for (uint64_t i = 0; i < n_kv; ++i) {
      if (absl::Status s = ParseKeyValue(i); !s.ok()) return s;
    }
    if (absl::Status s = ReadAlignment(); !s.ok()) return s;
    file_->tensors_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; ++i) {
      if (absl::Status s = ParseTensorInfo(i); !s.ok()) return s;
    }
    return PlaceTensorData();
  }

 private:
  absl::Status ParseHeader(uint64_t* n_tensors, uint64_t* n_kv) {
    if (size_ < 4) {
      return absl::DataLossError(absl::StrFormat(
          "file is %d bytes, too small to hold a GGUF header (%d bytes)", size_, kHeaderBytes));
    }
    const uint32_t magic = *in_.Read<uint32_t>("magic");
    if (magic != kGgufMagic) {
      return absl::InvalidArgumentError(
          absl::StrFormat("bad magic 0x%08x (not a GGUF file)", magic));
    }
    absl::StatusOr<uint32_t> version = in_.Read<uint32_t>("header version");
    if (!version.ok()) return Truncated();
    if (*version == 1) {
      return absl::InvalidArgumentError(
          "unsupported GGUF version 1 (only versions 2 and 3 are supported)");
    }
    if ((*version & 0xffffu) == 0 && *version != 0) {
      // A small version number written big-endian reads as N << 24.
      return absl::InvalidArgumentError(absl::StrFormat(
          "version field 0x%08x looks byte-swapped: big-endian GGUF files are not supported",
          *version));
    }
    if (*version != 2 && *version != 3) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "unsupported GGUF version %d (only versions 2 and 3 are supported)", *version));
    }
    file_->version_ = *version;
    if (size_ < kHeaderBytes) return Truncated();
    *n_tensors = *in_.Read<uint64_t>("tensor count");
    *n_kv = *in_.Read<uint64_t>("metadata key count");
    const uint64_t left = in_.remaining();
    if (*n_tensors > left / kMinTensorInfoBytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor count %d exceeds what the file can hold (%d bytes left, at least %d per tensor)",
          *n_tensors, left, kMinTensorInfoBytes));
    }
    const uint64_t left_for_kv = left - *n_tensors * kMinTensorInfoBytes;
    if (*n_kv > left_for_kv / kMinKvBytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "metadata key count %d exceeds what the file can hold (%d bytes left, at least %d per "
          "key)",
          *n_kv, left_for_kv, kMinKvBytes));
    }
    return absl::OkStatus();
  }

  absl::Status Truncated() const {
    return absl::DataLossError(absl::StrFormat(
        "truncated header: a GGUF header needs %d bytes, the file has %d", kHeaderBytes, size_));
  }

  absl::Status ParseKeyValue(uint64_t index) {
    absl::StatusOr<std::string> key = in_.ReadString(absl::StrCat("metadata key #", index));
    if (!key.ok()) return key.status();
    if (file_->kv_.contains(*key)) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate metadata key '", *key, "'"));
    }
    const std::string prefix = absl::StrCat("metadata key '", *key, "': ");
    absl::StatusOr<uint32_t> type = in_.Read<uint32_t>("value type");
    if (!type.ok()) return Annotate(type.status(), prefix);
    absl::StatusOr<GgufValue> value = ReadValue(*type);
    if (!value.ok()) return Annotate(value.status(), prefix);
    file_->key_order_.push_back(*key);
    file_->kv_.emplace(*std::move(key), *std::move(value));
    return absl::OkStatus();
  }

  // Reads one scalar of a known non-array type into the widest matching variant alternative.
  template <typename Sink>
  absl::Status ReadScalar(GgufValueType t, Sink&& sink) {
    switch (t) {
      case GgufValueType::kUint8:
        return Emit<uint8_t, uint64_t>(sink);
      case GgufValueType::kInt8:
        return Emit<int8_t, int64_t>(sink);
      case GgufValueType::kUint16:
        return Emit<uint16_t, uint64_t>(sink);
      case GgufValueType::kInt16:
        return Emit<int16_t, int64_t>(sink);
      case GgufValueType::kUint32:
        return Emit<uint32_t, uint64_t>(sink);
      case GgufValueType::kInt32:
        return Emit<int32_t, int64_t>(sink);
      case GgufValueType::kUint64:
        return Emit<uint64_t, uint64_t>(sink);
      case GgufValueType::kInt64:
        return Emit<int64_t, int64_t>(sink);
      case GgufValueType::kFloat32:
        return Emit<float, double>(sink);
      case GgufValueType::kFloat64:
        return Emit<double, double>(sink);
      case GgufValueType::kBool: {
        absl::StatusOr<uint8_t> b = in_.Read<uint8_t>("bool value");
        if (!b.ok()) return b.status();
        sink(*b != 0);
        return absl::OkStatus();
      }
      case GgufValueType::kString: {
        absl::StatusOr<std::string> s = in_.ReadString("string value");
        if (!s.ok()) return s.status();
        sink(*std::move(s));
        return absl::OkStatus();
      }
      case GgufValueType::kArray:
        break;
    }
    return absl::InternalError("ReadScalar called with an array type");
  }

  template <typename Wire, typename Wide, typename Sink>
  absl::Status Emit(Sink& sink) {
    absl::StatusOr<Wire> v = in_.Read<Wire>(ValueTypeName(ValueTypeOf<Wire>()));
    if (!v.ok()) return v.status();
    sink(static_cast<Wide>(*v));
    return absl::OkStatus();
  }

  template <typename Wire>
  static constexpr GgufValueType ValueTypeOf() {
    if constexpr (std::is_same_v<Wire, uint8_t>) return GgufValueType::kUint8;
    if constexpr (std::is_same_v<Wire, int8_t>) return GgufValueType::kInt8;
    if constexpr (std::is_same_v<Wire, uint16_t>) return GgufValueType::kUint16;
    if constexpr (std::is_same_v<Wire, int16_t>) return GgufValueType::kInt16;
    if constexpr (std::is_same_v<Wire, uint32_t>) return GgufValueType::kUint32;
    if constexpr (std::is_same_v<Wire, int32_t>) return GgufValueType::kInt32;
    if constexpr (std::is_same_v<Wire, uint64_t>) return GgufValueType::kUint64;
    if constexpr (std::is_same_v<Wire, int64_t>) return GgufValueType::kInt64;
    if constexpr (std::is_same_v<Wire, float>) return GgufValueType::kFloat32;
    return GgufValueType::kFloat64;
  }

  absl::StatusOr<GgufValue> ReadValue(uint32_t raw_type) {
    if (!IsKnownValueType(raw_type)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown value type ", raw_type));
    }
    GgufValue v;
    v.type = static_cast<GgufValueType>(raw_type);
    if (v.type != GgufValueType::kArray) {
      absl::Status s = ReadScalar(v.type, [&v](auto x) { v.value = std::move(x); });
      if (!s.ok()) return s;
      return v;
    }
    absl::StatusOr<uint32_t> raw_elem = in_.Read<uint32_t>("array element type");
    if (!raw_elem.ok()) return raw_elem.status();
    if (*raw_elem == static_cast<uint32_t>(GgufValueType::kArray)) {
      return absl::InvalidArgumentError("nested arrays (array of array) are not supported");
    }
    if (!IsKnownValueType(*raw_elem)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown array element type ", *raw_elem));
    }
    v.elem_type = static_cast<GgufValueType>(*raw_elem);
    absl::StatusOr<uint64_t> count = in_.Read<uint64_t>("array length");
    if (!count.ok()) return count.status();
    const uint64_t elem_size = EncodedSize(v.elem_type);
    if (*count > in_.remaining() / elem_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("array of %d %s elements exceeds what the file can hold (%d bytes left)",
                          *count, ValueTypeName(v.elem_type), in_.remaining()));
    }
    absl::Status s;
    if (v.elem_type == GgufValueType::kString) {
      s = ReadArray<std::string>(v, *count);
    } else if (IsFloat(v.elem_type)) {
      s = ReadArray<double>(v, *count);
    } else {
      s = ReadArray<int64_t>(v, *count);  // integers and bools
    }
    if (!s.ok()) return s;
    return v;
  }

  // Reads `count` elements of v.elem_type into a std::vector<Stored> in v.value. Integer scalars
  // arrive widened to int64_t or uint64_t; uint64 ones keep their bit pattern (see GgufValue).
  // REQUIRES: the count was checked against the bytes left.
  template <typename Stored>
  absl::Status ReadArray(GgufValue& v, uint64_t count) {
    std::vector<Stored> out;
    out.reserve(count);
    for (uint64_t i = 0; i < count; ++i) {
      absl::Status s = ReadScalar(v.elem_type, [&out](auto x) {
        using X = decltype(x);
        if constexpr (std::is_same_v<Stored, int64_t> && std::is_integral_v<X>) {
          out.push_back(static_cast<int64_t>(x));
        } else if constexpr (std::is_same_v<Stored, X>) {
          out.push_back(std::move(x));
        }
      });
      if (!s.ok()) return Annotate(s, absl::StrCat("array element ", i, ": "));
    }
    v.value = std::move(out);
    return absl::OkStatus();
  }

  absl::Status ReadAlignment() {
    const GgufValue* v = file_->Find("general.alignment");
    if (v == nullptr) {
      file_->alignment_ = kDefaultAlignment;
      return absl::OkStatus();
    }
    uint64_t a = 0;
    if (IsUnsigned(v->type)) {
      a = std::get<uint64_t>(v->value);
    } else if (IsSigned(v->type) && std::get<int64_t>(v->value) > 0) {
      a = static_cast<uint64_t>(std::get<int64_t>(v->value));
    } else if (!IsSigned(v->type)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "general.alignment has type ", DescribeType(*v), ", expected an unsigned integer"));
    }
    if (a == 0 || (a & (a - 1)) != 0) {
      const std::string shown =
          IsSigned(v->type) ? absl::StrCat(std::get<int64_t>(v->value)) : absl::StrCat(a);
      return absl::InvalidArgumentError(
          absl::StrCat("general.alignment ", shown, " is not a nonzero power of two"));
    }
    file_->alignment_ = a;
    return absl::OkStatus();
  }

  absl::Status ParseTensorInfo(uint64_t index) {
    absl::StatusOr<std::string> name = in_.ReadString(absl::StrCat("tensor #", index, " name"));
    if (!name.ok()) return name.status();
    if (file_->tensor_index_.contains(*name)) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name '", *name, "'"));
    }
    const std::string prefix = absl::StrCat("tensor '", *name, "': ");
    GgufTensor t;
    t.name = *name;
    absl::StatusOr<uint32_t> n_dims = in_.Read<uint32_t>("dimension count");
    if (!n_dims.ok()) return Annotate(n_dims.status(), prefix);
    if (*n_dims < 1 || *n_dims > kMaxDims) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, *n_dims, " dimensions (must be 1 to ", kMaxDims, ")"));
    }
    int64_t elements = 1;
    bool overflow = false;
    for (uint32_t d = 0; d < *n_dims; ++d) {
      absl::StatusOr<uint64_t> dim = in_.Read<uint64_t>("dimension");
      if (!dim.ok()) return Annotate(dim.status(), prefix);
      if (*dim == 0 || *dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrCat(prefix, "dimension ", d, " is ", *dim, " (must be in [1, 2^63))"));
      }
      t.dims.push_back(static_cast<int64_t>(*dim));
      overflow = overflow || __builtin_mul_overflow(elements, t.dims.back(), &elements);
    }
    if (overflow) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, "element count of dims [", absl::StrJoin(t.dims, ", "), "] overflows int64"));
    }
    absl::StatusOr<uint32_t> type_id = in_.Read<uint32_t>("type");
    if (!type_id.ok()) return Annotate(type_id.status(), prefix);
    const GgmlTypeTraits* traits = GetTypeTraits(*type_id);
    if (traits == nullptr) {
      const std::string_view known = GgmlTypeName(*type_id);
      if (known.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(prefix, "unknown type id ", *type_id));
      }
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "type ", Sv(known), " (id ", *type_id, ") is not supported"));
    }
    t.type = static_cast<GgmlType>(*type_id);
    if (t.dims[0] % traits->block_elems != 0) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "row length ", t.dims[0],
                                                     " is not a multiple of the ", Sv(traits->name),
                                                     " block size ", traits->block_elems));
    }
    int64_t nbytes = 0;
    if (__builtin_mul_overflow(elements / traits->block_elems, traits->block_bytes, &nbytes)) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "byte size overflows int64"));
    }
    t.nbytes = static_cast<uint64_t>(nbytes);
    absl::StatusOr<uint64_t> offset = in_.Read<uint64_t>("data offset");
    if (!offset.ok()) return Annotate(offset.status(), prefix);
    if (*offset % file_->alignment_ != 0) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "data offset ", *offset,
                                                     " is not a multiple of the alignment ",
                                                     file_->alignment_));
    }
    t.offset = *offset;
    file_->tensor_index_.emplace(t.name, file_->tensors_.size());
    file_->tensors_.push_back(std::move(t));
    return absl::OkStatus();
  }

  // Finds the data section (the first aligned offset after the tensor infos) and points each
  // tensor into it, checking that its bytes lie inside the file.
  absl::Status PlaceTensorData() {
    if (file_->tensors_.empty()) return absl::OkStatus();
    const uint64_t a = file_->alignment_;
    const uint64_t pos = in_.pos();
    uint64_t data_start = pos;
    if (pos % a != 0 && __builtin_add_overflow(pos, a - pos % a, &data_start)) {
      data_start = std::numeric_limits<uint64_t>::max();
    }
    if (data_start > size_) {
      return absl::DataLossError(
          absl::StrFormat("data section would start at %d (tensor infos end at %d, alignment %d), "
                          "past end of file (size %d)",
                          data_start, pos, a, size_));
    }
    for (GgufTensor& t : file_->tensors_) {
      uint64_t begin = 0, end = 0;
      const bool overflow = __builtin_add_overflow(data_start, t.offset, &begin) ||
                            __builtin_add_overflow(begin, t.nbytes, &end);
      if (overflow || end > size_) {
        return absl::DataLossError(
            absl::StrFormat("tensor '%s': data [%d, %d) runs past end of file (size %d)", t.name,
                            begin, overflow ? std::numeric_limits<uint64_t>::max() : end, size_));
      }
      t.data = base_ + begin;
    }
    return absl::OkStatus();
  }

  GgufFile* file_;
  const uint8_t* base_;
  uint64_t size_;
  Cursor in_;
};

int64_t GgufTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open '", path, "'"));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("cannot stat '", path, "'"));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  if (st.st_size == 0) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": empty file (0 bytes), not GGUF"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  close(fd);
  if (map == MAP_FAILED)
    return absl::ErrnoToStatus(map_err, absl::StrCat("cannot mmap '", path, "'"));

  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = size;
  GgufParser parser(file.get(), static_cast<const uint8_t*>(map), size);
  if (absl::Status s = parser.Parse(); !s.ok()) return Annotate(s, absl::StrCat(path, ": "));
  return file;
}

GgufFile::~GgufFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_.find(Sv(key));
  return it == kv_.end() ? nullptr : &it->second;
}

namespace {

absl::Status MissingKey(std::string_view key) {
  return absl::NotFoundError(absl::StrCat("missing metadata key '", Sv(key), "'"));
}

absl::Status Mismatch(std::string_view key, const GgufValue& v, std::string_view wanted) {
  return absl::InvalidArgumentError(absl::StrCat("metadata key '", Sv(key), "' has type ",
                                                 DescribeType(v), ", expected ", Sv(wanted)));
}

}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(key);
  if (v->type != GgufValueType::kString) return Mismatch(key, *v, "string");
  return std::get<std::string>(v->value);
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(key);
  if (IsSigned(v->type)) return std::get<int64_t>(v->value);
  if (v->type == GgufValueType::kBool) return std::get<bool>(v->value) ? 1 : 0;
  if (IsUnsigned(v->type)) {
    const uint64_t u = std::get<uint64_t>(v->value);
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat("metadata key '", Sv(key), "' value ", u, " does not fit in int64"));
    }
    return static_cast<int64_t>(u);
  }
  return Mismatch(key, *v, "an integer");
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(key);
  if (IsFloat(v->type)) return std::get<double>(v->value);
  if (IsSigned(v->type)) return static_cast<double>(std::get<int64_t>(v->value));
  if (IsUnsigned(v->type)) return static_cast<double>(std::get<uint64_t>(v->value));
  return Mismatch(key, *v, "a number");
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(key);
  if (v->type != GgufValueType::kArray || v->elem_type != GgufValueType::kString) {
    return Mismatch(key, *v, "array of string");
  }
  return std::get<std::vector<std::string>>(v->value);
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(key);
  if (v->type != GgufValueType::kArray || !(IsSigned(v->elem_type) || IsUnsigned(v->elem_type) ||
                                            v->elem_type == GgufValueType::kBool)) {
    return Mismatch(key, *v, "array of integers");
  }
  return std::get<std::vector<int64_t>>(v->value);
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return MissingKey(key);
  if (v->type == GgufValueType::kArray && IsFloat(v->elem_type)) {
    return std::get<std::vector<double>>(v->value);
  }
  if (v->type == GgufValueType::kArray && (IsSigned(v->elem_type) || IsUnsigned(v->elem_type))) {
    const auto& ints = std::get<std::vector<int64_t>>(v->value);
    std::vector<double> out(ints.size());
    for (size_t i = 0; i < ints.size(); ++i) {
      out[i] = IsUnsigned(v->elem_type) ? static_cast<double>(static_cast<uint64_t>(ints[i]))
                                        : static_cast<double>(ints[i]);
    }
    return out;
  }
  return Mismatch(key, *v, "array of numbers");
}

const GgufTensor* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(Sv(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<const GgufTensor*> GgufFile::GetTensor(std::string_view name) const {
  const GgufTensor* t = FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("missing tensor '", Sv(name), "'"));
  return t;
}

}  // namespace deft
