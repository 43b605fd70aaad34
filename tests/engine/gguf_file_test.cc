// GgufFile: the real model's metadata and tensor table, value decoding of every metadata type,
// and one test per loader error, each on crafted GGUF bytes written to a temp file and each
// asserting its status code and the message that names the problem.
#include "engine/gguf/gguf_file.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace deft {
namespace {

using VT = GgufValueType;

// Little-endian byte string writer.
class Bytes {
 public:
  template <typename T>
  Bytes& Put(T v) {
    char buf[sizeof(T)];
    std::memcpy(buf, &v, sizeof(T));
    s_.append(buf, sizeof(T));
    return *this;
  }
  Bytes& U32(uint32_t v) { return Put(v); }
  Bytes& U64(uint64_t v) { return Put(v); }
  Bytes& Str(std::string_view v) {
    U64(v.size());
    s_.append(v);
    return *this;
  }
  Bytes& Raw(std::string_view v) {
    s_.append(v);
    return *this;
  }
  const std::string& str() const { return s_; }
  size_t size() const { return s_.size(); }

 private:
  std::string s_;
};

// Builds a GGUF file: header, key/values, tensor infos, padding, data section. The knobs let a
// test corrupt exactly one thing.
class GgufBuilder {
 public:
  uint32_t magic = 0x46554747;
  uint32_t version = 3;
  std::optional<uint64_t> n_tensors_override, n_kv_override;
  uint64_t pad_to = 32;  // alignment of the data section; match general.alignment when set
  bool pad = true;

  GgufBuilder& Kv(std::string_view key, VT type, const Bytes& payload) {
    kv_.Str(key).U32(static_cast<uint32_t>(type)).Raw(payload.str());
    ++n_kv_;
    return *this;
  }
  GgufBuilder& KvString(std::string_view key, std::string_view v) {
    return Kv(key, VT::kString, Bytes().Str(v));
  }
  GgufBuilder& KvU32(std::string_view key, uint32_t v) {
    return Kv(key, VT::kUint32, Bytes().U32(v));
  }

  // Adds a tensor info. Without `offset` the tensor goes after the previous one, aligned.
  GgufBuilder& Tensor(std::string_view name, std::vector<uint64_t> dims, uint32_t type,
                      std::optional<uint64_t> offset = std::nullopt) {
    const uint64_t nbytes = PlausibleBytes(dims, type);
    const uint64_t off = offset.value_or((data_size_ + pad_to - 1) / pad_to * pad_to);
    infos_.Str(name).U32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) infos_.U64(d);
    infos_.U32(type).U64(off);
    ++n_tensors_;
    if (off + nbytes > data_size_ && off < (1ull << 40)) data_size_ = off + nbytes;
    return *this;
  }

  // The file's bytes; the data section (filled with DataByte) loses its last `cut` bytes.
  std::string Build(uint64_t cut = 0) {
    Bytes out;
    out.U32(magic).U32(version);
    out.U64(n_tensors_override.value_or(n_tensors_)).U64(n_kv_override.value_or(n_kv_));
    out.Raw(kv_.str()).Raw(infos_.str());
    while (pad && out.size() % pad_to != 0) out.Put<uint8_t>(0);
    data_start_ = out.size();
    std::string data(data_size_ - cut, '\0');
    for (uint64_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(DataByte(i));
    out.Raw(data);
    return out.str();
  }
  static uint8_t DataByte(uint64_t data_offset) {
    return static_cast<uint8_t>(data_offset * 7 + 1);
  }
  uint64_t data_start() const { return data_start_; }
  uint64_t data_size() const { return data_size_; }

 private:
  // Byte size of a well-formed tensor; 0 when the info is deliberately broken.
  static uint64_t PlausibleBytes(const std::vector<uint64_t>& dims, uint32_t type) {
    const GgmlTypeTraits* t = GetTypeTraits(type);
    if (t == nullptr || dims.empty()) return 0;
    uint64_t n = 1;
    for (uint64_t d : dims) {
      if (d == 0 || d > (1u << 20) || n * d > (1u << 20)) return 0;
      n *= d;
    }
    if (dims[0] % t->block_elems != 0) return 0;
    return n / t->block_elems * t->block_bytes;
  }

  Bytes kv_, infos_;
  uint64_t n_kv_ = 0, n_tensors_ = 0, data_size_ = 0, data_start_ = 0;
};

// A file under the test temp dir, removed at scope exit (an open GgufFile keeps its mapping).
class TempFile {
 public:
  explicit TempFile(const std::string& bytes) {
    static std::atomic<int> counter{0};
    path_ = absl::StrCat(testing::TempDir(), "/gguf_file_test_", getpid(), "_", counter++, ".gguf");
    std::ofstream(path_, std::ios::binary).write(bytes.data(), bytes.size());
  }
  ~TempFile() { unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

absl::StatusOr<std::unique_ptr<GgufFile>> OpenBytes(const std::string& bytes) {
  TempFile f(bytes);
  return GgufFile::Open(f.path());
}

testing::AssertionResult IsError(const absl::Status& s, absl::StatusCode code,
                                 std::string_view substr) {
  const std::string_view message(s.message().data(), s.message().size());
  if (s.code() == code && message.find(substr) != std::string_view::npos) {
    return testing::AssertionSuccess();
  }
  return testing::AssertionFailure()
         << "got " << s << "; want code " << absl::StatusCodeToString(code)
         << " and message with \"" << substr << "\"";
}

template <typename T>
testing::AssertionResult IsError(const absl::StatusOr<T>& s, absl::StatusCode code,
                                 std::string_view substr) {
  if (s.ok()) return testing::AssertionFailure() << "unexpectedly OK; want \"" << substr << "\"";
  return IsError(s.status(), code, substr);
}

constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;
constexpr auto kDataLoss = absl::StatusCode::kDataLoss;
constexpr auto kNotFound = absl::StatusCode::kNotFound;
constexpr uint32_t kF32 = 0, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;

// ---- The real model -------------------------------------------------------------------------

TEST(GgufFileRealModel, OpensWithExpectedMetadata) {
  auto f = GgufFile::Open(DEFT_TEST_MODEL);
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(g.keys().size(), 33u);
  EXPECT_EQ(g.keys().front(), "general.architecture");
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetInt("llama.block_count"), 30);
  EXPECT_EQ(*g.GetInt("llama.embedding_length"), 576);
  EXPECT_EQ(*g.GetInt("llama.feed_forward_length"), 1536);
  EXPECT_EQ(*g.GetInt("llama.attention.head_count"), 9);
  EXPECT_EQ(*g.GetInt("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(*g.GetInt("llama.context_length"), 8192);
  EXPECT_EQ(*g.GetInt("llama.rope.dimension_count"), 64);
  EXPECT_EQ(*g.GetInt("llama.vocab_size"), 49152);
  EXPECT_EQ(*g.GetInt("general.file_type"), 3);  // LLAMA_FTYPE_MOSTLY_Q4_1
  EXPECT_EQ(*g.GetFloat("llama.rope.freq_base"), 100000.0);
  EXPECT_EQ(*g.GetFloat("llama.attention.layer_norm_rms_epsilon"), static_cast<double>(1e-5f));
  EXPECT_EQ(g.Find("llama.block_count")->type, VT::kUint32);
  EXPECT_EQ(*g.GetInt("tokenizer.ggml.add_bos_token"), 0);  // a bool
  EXPECT_EQ(*g.GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(*g.GetString("tokenizer.ggml.pre"), "smollm");
  EXPECT_EQ(*g.GetInt("tokenizer.ggml.bos_token_id"), 1);
  EXPECT_EQ(*g.GetInt("tokenizer.ggml.eos_token_id"), 2);
  EXPECT_EQ(*g.GetStringArray("general.languages"), std::vector<std::string>{"en"});

  auto tokens = g.GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_EQ(tokens->size(), 49152u);
  EXPECT_EQ((*tokens)[0], "<|endoftext|>");
  EXPECT_EQ((*tokens)[1], "<|im_start|>");
  EXPECT_EQ((*tokens)[2], "<|im_end|>");
  auto merges = g.GetStringArray("tokenizer.ggml.merges");
  ASSERT_TRUE(merges.ok()) << merges.status();
  ASSERT_EQ(merges->size(), 48900u);
  EXPECT_EQ((*merges)[0], "\xC4\xA0 t");  // "Ġ t"
  auto token_type = g.GetIntArray("tokenizer.ggml.token_type");
  ASSERT_TRUE(token_type.ok()) << token_type.status();
  ASSERT_EQ(token_type->size(), 49152u);
  EXPECT_EQ((*token_type)[0], 3);  // control token
  EXPECT_EQ(g.Find("tokenizer.ggml.token_type")->elem_type, VT::kInt32);
}

TEST(GgufFileRealModel, TensorTableHasExpectedShapesAndTypes) {
  auto f = GgufFile::Open(DEFT_TEST_MODEL);
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  ASSERT_EQ(g.tensors().size(), 272u);  // 30 layers x 9 + token_embd + output_norm

  struct Expect {
    const char* name;
    std::vector<int64_t> dims;
    GgmlType type;
  };
  const Expect expected[] = {
      {"token_embd.weight", {576, 49152}, GgmlType::kQ8_0},
      {"output_norm.weight", {576}, GgmlType::kF32},
      {"blk.0.attn_norm.weight", {576}, GgmlType::kF32},
      {"blk.0.attn_q.weight", {576, 576}, GgmlType::kQ4_1},
      {"blk.0.attn_k.weight", {576, 192}, GgmlType::kQ4_1},
      {"blk.0.attn_v.weight", {576, 192}, GgmlType::kQ4_1},
      {"blk.0.attn_output.weight", {576, 576}, GgmlType::kQ4_1},
      {"blk.0.ffn_gate.weight", {576, 1536}, GgmlType::kQ4_1},
      {"blk.0.ffn_up.weight", {576, 1536}, GgmlType::kQ4_1},
      {"blk.0.ffn_down.weight", {1536, 576}, GgmlType::kQ4_1},
      {"blk.0.ffn_norm.weight", {576}, GgmlType::kF32},
      {"blk.29.ffn_down.weight", {1536, 576}, GgmlType::kQ4_1},
  };
  for (const Expect& e : expected) {
    auto t = g.GetTensor(e.name);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ((*t)->name, e.name);
    EXPECT_EQ((*t)->dims, e.dims) << e.name;
    EXPECT_EQ((*t)->type, e.type) << e.name;
    EXPECT_EQ((*t)->nbytes, RowBytes(e.type, e.dims[0]) * (*t)->rows()) << e.name;
  }
  // Tied embeddings: there is no separate output matrix.
  EXPECT_EQ(g.FindTensor("output.weight"), nullptr);

  std::map<GgmlType, int> by_type;
  const GgufTensor& first = g.tensors().front();
  for (const GgufTensor& t : g.tensors()) {
    ++by_type[t.type];
    EXPECT_EQ(t.offset % g.alignment(), 0u) << t.name;
    EXPECT_EQ(static_cast<uint64_t>(t.data - first.data), t.offset - first.offset) << t.name;
  }
  EXPECT_EQ(by_type[GgmlType::kQ4_1], 210);
  EXPECT_EQ(by_type[GgmlType::kF32], 61);
  EXPECT_EQ(by_type[GgmlType::kQ8_0], 1);
  // Absolute file offsets as gguf-python's GGUFReader reports them (data_offset).
  EXPECT_EQ(g.FindTensor("blk.0.attn_q.weight")->data - g.FindTensor("token_embd.weight")->data,
            33806656 - 1785664);
}

// ---- Well-formed crafted files ----------------------------------------------------------------

TEST(GgufFileParse, DecodesEveryMetadataValueType) {
  GgufBuilder b;
  b.Kv("u8", VT::kUint8, Bytes().Put<uint8_t>(200))
      .Kv("i8", VT::kInt8, Bytes().Put<int8_t>(-5))
      .Kv("u16", VT::kUint16, Bytes().Put<uint16_t>(65000))
      .Kv("i16", VT::kInt16, Bytes().Put<int16_t>(-30000))
      .Kv("u32", VT::kUint32, Bytes().U32(4000000000u))
      .Kv("i32", VT::kInt32, Bytes().Put<int32_t>(-7))
      .Kv("f32", VT::kFloat32, Bytes().Put<float>(1.5f))
      .Kv("bool", VT::kBool, Bytes().Put<uint8_t>(1))
      .KvString("str", "h\xC3\xA9llo")
      .Kv("u64", VT::kUint64, Bytes().U64(1ull << 63))
      .Kv("i64", VT::kInt64, Bytes().Put<int64_t>(-(1ll << 40)))
      .Kv("f64", VT::kFloat64, Bytes().Put<double>(-0.125))
      .Kv("arr_i32", VT::kArray,
          Bytes()
              .U32(static_cast<uint32_t>(VT::kInt32))
              .U64(3)
              .Put<int32_t>(-1)
              .Put<int32_t>(0)
              .Put<int32_t>(7))
      .Kv("arr_f32", VT::kArray,
          Bytes().U32(static_cast<uint32_t>(VT::kFloat32)).U64(2).Put<float>(0.5f).Put<float>(-2))
      .Kv("arr_str", VT::kArray,
          Bytes().U32(static_cast<uint32_t>(VT::kString)).U64(3).Str("a").Str("").Str("ccc"))
      .Kv("arr_bool", VT::kArray,
          Bytes().U32(static_cast<uint32_t>(VT::kBool)).U64(2).Put<uint8_t>(1).Put<uint8_t>(0))
      .Kv("arr_empty", VT::kArray, Bytes().U32(static_cast<uint32_t>(VT::kUint8)).U64(0));
  auto f = OpenBytes(b.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.keys().size(), 17u);
  EXPECT_EQ(g.keys()[3], "i16");
  EXPECT_EQ(*g.GetInt("u8"), 200);
  EXPECT_EQ(*g.GetInt("i8"), -5);
  EXPECT_EQ(*g.GetInt("u16"), 65000);
  EXPECT_EQ(*g.GetInt("i16"), -30000);
  EXPECT_EQ(*g.GetInt("u32"), 4000000000);
  EXPECT_EQ(*g.GetInt("i32"), -7);
  EXPECT_EQ(*g.GetFloat("f32"), 1.5);
  EXPECT_EQ(*g.GetInt("bool"), 1);
  EXPECT_EQ(std::get<bool>(g.Find("bool")->value), true);
  EXPECT_EQ(*g.GetString("str"), "h\xC3\xA9llo");
  EXPECT_EQ(std::get<uint64_t>(g.Find("u64")->value), 1ull << 63);
  EXPECT_TRUE(
      IsError(g.GetInt("u64"), kInvalid, "value 9223372036854775808 does not fit in int64"));
  EXPECT_EQ(*g.GetFloat("u64"), 9223372036854775808.0);
  EXPECT_EQ(*g.GetInt("i64"), -(1ll << 40));
  EXPECT_EQ(*g.GetFloat("f64"), -0.125);
  EXPECT_EQ(*g.GetFloat("i32"), -7.0);
  EXPECT_EQ(*g.GetIntArray("arr_i32"), (std::vector<int64_t>{-1, 0, 7}));
  EXPECT_EQ(*g.GetFloatArray("arr_i32"), (std::vector<double>{-1, 0, 7}));
  EXPECT_EQ(*g.GetFloatArray("arr_f32"), (std::vector<double>{0.5, -2}));
  EXPECT_EQ(*g.GetStringArray("arr_str"), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(*g.GetIntArray("arr_bool"), (std::vector<int64_t>{1, 0}));
  EXPECT_TRUE(g.GetIntArray("arr_empty")->empty());
  EXPECT_EQ(g.Find("arr_empty")->elem_type, VT::kUint8);
  EXPECT_EQ(g.Find("nope"), nullptr);
  EXPECT_TRUE(g.tensors().empty());
}

TEST(GgufFileParse, PlacesTensorDataAtAlignedOffsets) {
  GgufBuilder b;
  b.pad_to = 64;
  b.Kv("general.alignment", VT::kUint32, Bytes().U32(64));
  b.Tensor("a", {5}, kF32).Tensor("q", {64, 3}, kQ4_0).Tensor("e", {32, 2, 2}, kQ8_0);
  const std::string bytes = b.Build();
  auto f = OpenBytes(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.alignment(), 64u);
  ASSERT_EQ(g.tensors().size(), 3u);
  const GgufTensor* q = g.FindTensor("q");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->offset, 64u);  // "a" takes 20 bytes, then the next multiple of 64
  EXPECT_EQ(q->nbytes, 3u * 2 * 18);
  EXPECT_EQ(q->elements(), 192);
  EXPECT_EQ(q->rows(), 3);
  EXPECT_EQ(g.FindTensor("e")->offset, 192u);
  EXPECT_EQ(g.FindTensor("e")->rows(), 4);
  for (const GgufTensor& t : g.tensors()) {
    for (uint64_t i = 0; i < t.nbytes; ++i) {
      ASSERT_EQ(t.data[i], GgufBuilder::DataByte(t.offset + i)) << t.name << " byte " << i;
    }
  }
}

TEST(GgufFileParse, AcceptsVersion2AndMetadataOnlyFiles) {
  GgufBuilder b;
  b.version = 2;
  b.pad = false;  // no tensors: the file may end right after the metadata
  b.KvString("general.architecture", "llama");
  auto f = OpenBytes(b.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->version(), 2u);
  EXPECT_EQ(*(*f)->GetString("general.architecture"), "llama");
}

// ---- Lookup errors ----------------------------------------------------------------------------

TEST(GgufFileLookup, GetTensorReportsMissingTensor) {
  GgufBuilder b;
  b.Tensor("present", {4}, kF32);
  auto f = OpenBytes(b.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->GetTensor("present").ok());
  EXPECT_EQ((*f)->FindTensor("blk.0.attn_q.weight"), nullptr);
  EXPECT_TRUE(IsError((*f)->GetTensor("blk.0.attn_q.weight"), kNotFound,
                      "missing tensor 'blk.0.attn_q.weight'"));
}

TEST(GgufFileLookup, TypedGettersReportMismatchAndMissingKeys) {
  GgufBuilder b;
  b.KvString("general.architecture", "llama").KvU32("llama.block_count", 30);
  b.Kv("ids", VT::kArray, Bytes().U32(static_cast<uint32_t>(VT::kInt32)).U64(1).U32(5));
  auto f = OpenBytes(b.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_TRUE(IsError(g.GetInt("general.architecture"), kInvalid,
                      "metadata key 'general.architecture' has type string, expected an integer"));
  EXPECT_TRUE(IsError(g.GetFloat("general.architecture"), kInvalid, "expected a number"));
  EXPECT_TRUE(IsError(g.GetString("llama.block_count"), kInvalid,
                      "metadata key 'llama.block_count' has type uint32, expected string"));
  EXPECT_TRUE(IsError(g.GetStringArray("ids"), kInvalid,
                      "metadata key 'ids' has type array of int32, expected array of string"));
  EXPECT_TRUE(IsError(g.GetInt("ids"), kInvalid, "has type array of int32"));
  EXPECT_TRUE(IsError(g.GetIntArray("llama.block_count"), kInvalid, "expected array of integers"));
  EXPECT_TRUE(IsError(g.GetString("llama.head_count"), kNotFound,
                      "missing metadata key 'llama.head_count'"));
}

// ---- Loader errors ----------------------------------------------------------------------------

TEST(GgufFileErrors, MissingFileIsNotFound) {
  EXPECT_TRUE(IsError(GgufFile::Open(testing::TempDir() + "/does_not_exist.gguf"), kNotFound,
                      "does_not_exist.gguf"));
}

TEST(GgufFileErrors, EmptyFile) {
  EXPECT_TRUE(IsError(OpenBytes(""), kInvalid, "empty file (0 bytes)"));
}

TEST(GgufFileErrors, FileShorterThanMagic) {
  EXPECT_TRUE(IsError(OpenBytes("GG"), kDataLoss, "file is 2 bytes, too small"));
}

TEST(GgufFileErrors, TruncatedHeader) {
  const std::string full = GgufBuilder().Build();
  EXPECT_TRUE(IsError(OpenBytes(full.substr(0, 12)), kDataLoss,
                      "truncated header: a GGUF header needs 24 bytes, the file has 12"));
  EXPECT_TRUE(IsError(OpenBytes(full.substr(0, 6)), kDataLoss, "the file has 6"));
}

TEST(GgufFileErrors, BadMagic) {
  GgufBuilder b;
  b.magic = 0x4c4d4747;  // "GGML"
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "bad magic 0x4c4d4747 (not a GGUF file)"));
}

TEST(GgufFileErrors, Version1IsUnsupported) {
  GgufBuilder b;
  b.version = 1;
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "unsupported GGUF version 1"));
}

TEST(GgufFileErrors, FutureVersionIsUnsupported) {
  GgufBuilder b;
  b.version = 4;
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "unsupported GGUF version 4"));
}

TEST(GgufFileErrors, BigEndianFileIsRejected) {
  GgufBuilder b;
  b.version = 0x03000000;  // version 3 as a big-endian writer stores it
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "version field 0x03000000 looks byte-swapped: big-endian GGUF files are not "
                      "supported"));
}

TEST(GgufFileErrors, HugeTensorCount) {
  GgufBuilder b;
  b.n_tensors_override = 1ull << 60;
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "tensor count 1152921504606846976 exceeds what the file can hold"));
}

TEST(GgufFileErrors, HugeMetadataKeyCount) {
  GgufBuilder b;
  b.KvString("general.architecture", "llama");
  b.n_kv_override = 1000000000000000000ull;
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "metadata key count 1000000000000000000 exceeds what the file can hold"));
}

TEST(GgufFileErrors, HugeKeyStringLength) {
  GgufBuilder b;
  b.n_kv_override = 1;
  b.pad = false;
  std::string bytes = b.Build();
  bytes += Bytes().U64(1ull << 62).Raw("general.architecture").U32(8).str();
  EXPECT_TRUE(IsError(OpenBytes(bytes), kInvalid,
                      "metadata key #0: string length 4611686018427387904 at offset 24 exceeds the "
                      "24 bytes left in the file"));
}

TEST(GgufFileErrors, HugeValueStringLength) {
  GgufBuilder b;
  b.Kv("general.name", VT::kString, Bytes().U64(~0ull).Raw("abc"));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "metadata key 'general.name': string value: string length "
                      "18446744073709551615"));
}

TEST(GgufFileErrors, HugeArrayLength) {
  GgufBuilder b;
  b.Kv("tokenizer.ggml.token_type", VT::kArray,
       Bytes().U32(static_cast<uint32_t>(VT::kInt32)).U64(1ull << 61).U32(1).U32(2));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "metadata key 'tokenizer.ggml.token_type': array of 2305843009213693952 "
                      "int32 elements exceeds what the file can hold"));
}

TEST(GgufFileErrors, HugeStringArrayLength) {
  // Each string takes at least its 8-byte length field, so 10^6 strings need 8 MB.
  GgufBuilder b;
  b.Kv("tokenizer.ggml.tokens", VT::kArray,
       Bytes().U32(static_cast<uint32_t>(VT::kString)).U64(1000000).Str("a").Str("b"));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "array of 1000000 string elements exceeds what the file can hold"));
}

TEST(GgufFileErrors, ArrayElementStringLengthPastEnd) {
  GgufBuilder b;
  b.Kv("tokenizer.ggml.tokens", VT::kArray,
       Bytes().U32(static_cast<uint32_t>(VT::kString)).U64(2).Str("a").U64(1000).Raw("bc"));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "metadata key 'tokenizer.ggml.tokens': array element 1: string value: "
                      "string length 1000"));
}

TEST(GgufFileErrors, NestedArray) {
  GgufBuilder b;
  b.Kv("nested", VT::kArray,
       Bytes().U32(static_cast<uint32_t>(VT::kArray)).U64(1).U32(4).U64(1).U32(1));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "metadata key 'nested': nested arrays"));
}

TEST(GgufFileErrors, UnknownValueType) {
  GgufBuilder b;
  b.Kv("k", static_cast<VT>(13), Bytes().U64(0));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "metadata key 'k': unknown value type 13"));
}

TEST(GgufFileErrors, UnknownArrayElementType) {
  GgufBuilder b;
  b.Kv("k", VT::kArray, Bytes().U32(77).U64(0));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "unknown array element type 77"));
}

TEST(GgufFileErrors, TruncatedMetadataValue) {
  GgufBuilder b;
  b.KvU32("llama.block_count", 30);
  b.pad = false;
  const std::string bytes = b.Build();
  EXPECT_TRUE(IsError(OpenBytes(bytes.substr(0, bytes.size() - 2)), kDataLoss,
                      "metadata key 'llama.block_count': file truncated: uint32 at offset"));
}

TEST(GgufFileErrors, DuplicateMetadataKey) {
  GgufBuilder b;
  b.KvString("general.name", "a").KvString("general.name", "b");
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "duplicate metadata key 'general.name'"));
}

TEST(GgufFileErrors, AlignmentNotPowerOfTwo) {
  GgufBuilder b;
  b.KvU32("general.alignment", 24);
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "general.alignment 24 is not a nonzero power of two"));
}

TEST(GgufFileErrors, AlignmentZero) {
  GgufBuilder b;
  b.KvU32("general.alignment", 0);
  EXPECT_TRUE(
      IsError(OpenBytes(b.Build()), kInvalid, "general.alignment 0 is not a nonzero power of two"));
}

TEST(GgufFileErrors, AlignmentOfWrongType) {
  GgufBuilder b;
  b.KvString("general.alignment", "32");
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "general.alignment has type string, expected an unsigned integer"));
}

TEST(GgufFileErrors, TensorDataPastEndOfFile) {
  GgufBuilder b;
  b.Tensor("token_embd.weight", {64, 2}, kQ8_0).Tensor("blk.0.attn_q.weight", {64, 4}, kQ4_1);
  const std::string bytes = b.Build(/*cut=*/1);
  // q starts at the first multiple of 32 after 4 * 34 bytes of token_embd: 160; 8 blocks of 20.
  const uint64_t begin = b.data_start() + 160, end = begin + 160;
  EXPECT_TRUE(IsError(OpenBytes(bytes), kDataLoss,
                      absl::StrCat("tensor 'blk.0.attn_q.weight': data [", begin, ", ", end,
                                   ") runs past end of file (size ", bytes.size(), ")")));
}

TEST(GgufFileErrors, TensorOffsetOverflowsFileCoordinates) {
  GgufBuilder b;
  b.Tensor("x", {8}, kF32, /*offset=*/~0ull - 31);  // aligned, but data_start + offset wraps
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kDataLoss, "tensor 'x': data ["));
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kDataLoss, "runs past end of file"));
}

TEST(GgufFileErrors, DataSectionStartsPastEndOfFile) {
  GgufBuilder b;
  b.pad = false;
  b.Tensor("x", {8}, kF32, /*offset=*/0);
  std::string bytes = b.Build();
  bytes.resize(b.data_start());  // tensor infos end at 24 + 33 = 57, not a multiple of 32
  EXPECT_TRUE(IsError(OpenBytes(bytes), kDataLoss,
                      "data section would start at 64 (tensor infos end at 57, alignment 32), "
                      "past end of file (size 57)"));
}

TEST(GgufFileErrors, MisalignedTensorOffset) {
  GgufBuilder b;
  b.Tensor("blk.0.ffn_up.weight", {8}, kF32, /*offset=*/16);
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "tensor 'blk.0.ffn_up.weight': data offset 16 is not a multiple of the "
                      "alignment 32"));
}

TEST(GgufFileErrors, UnknownTensorType) {
  GgufBuilder b;
  b.Tensor("x", {32}, 99);
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "tensor 'x': unknown type id 99"));
}

TEST(GgufFileErrors, KnownButUnsupportedTensorType) {
  GgufBuilder b;
  b.Tensor("x", {256}, 16);
  EXPECT_TRUE(
      IsError(OpenBytes(b.Build()), kInvalid, "tensor 'x': type IQ2_XXS (id 16) is not supported"));
}

TEST(GgufFileErrors, RowLengthNotMultipleOfBlockSize) {
  GgufBuilder b;
  b.Tensor("x", {33, 2}, kQ4_0);
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid,
                      "tensor 'x': row length 33 is not a multiple of the Q4_0 block size 32"));
}

TEST(GgufFileErrors, ZeroDimension) {
  GgufBuilder b;
  b.Tensor("x", {4, 0}, kF32);
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "tensor 'x': dimension 1 is 0"));
}

TEST(GgufFileErrors, TooManyDimensions) {
  GgufBuilder b;
  b.Tensor("x", {1, 1, 1, 1, 1}, kF32);
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "tensor 'x': 5 dimensions (must be 1 to 4)"));
}

TEST(GgufFileErrors, ElementCountOverflow) {
  GgufBuilder b;
  b.Tensor("x", {1ull << 32, 1ull << 32}, kF32);
  EXPECT_TRUE(
      IsError(OpenBytes(b.Build()), kInvalid,
              "tensor 'x': element count of dims [4294967296, 4294967296] overflows int64"));
}

TEST(GgufFileErrors, ByteSizeOverflow) {
  GgufBuilder b;
  b.Tensor("x", {1ull << 62}, kF32);  // 2^62 elements fit in int64, 2^64 bytes do not
  EXPECT_TRUE(IsError(OpenBytes(b.Build()), kInvalid, "tensor 'x': byte size overflows int64"));
}

TEST(GgufFileErrors, DuplicateTensorName) {
  GgufBuilder b;
  b.Tensor("blk.0.attn_k.weight", {32}, kF32).Tensor("blk.0.attn_k.weight", {32}, kF32);
  EXPECT_TRUE(
      IsError(OpenBytes(b.Build()), kInvalid, "duplicate tensor name 'blk.0.attn_k.weight'"));
}

TEST(GgufFileErrors, TruncatedTensorInfo) {
  GgufBuilder b;
  b.pad = false;
  // Metadata long enough that the tensor count alone does not already exceed the file.
  b.KvString("general.name", std::string(64, 'n'));
  b.Tensor("x", {8, 8}, kF32, /*offset=*/0);
  const std::string bytes = b.Build();
  // The info is: name (8 + 1), n_dims (4), dims (8 + 8), type (4), offset (8) = 41 bytes.
  const uint64_t dim1_at = b.data_start() - 41 + 9 + 4 + 8;
  EXPECT_TRUE(IsError(OpenBytes(bytes.substr(0, dim1_at + 3)), kDataLoss,
                      absl::StrCat("tensor 'x': file truncated: dimension at offset ", dim1_at,
                                   " needs 8 bytes, only 3 remain")));
}

TEST(GgufFileErrors, MessagesNameThePath) {
  TempFile f(GgufBuilder().Build().substr(0, 10));
  EXPECT_TRUE(IsError(GgufFile::Open(f.path()), kDataLoss, f.path() + ": truncated header"));
}

}  // namespace
}  // namespace deft
