// Tests of the safetensors reader (crafted good and bad files), config.json parsing, the
// safetensors model loader on a tiny random model, and end to end: the real GGUF test model is
// converted here into Hugging Face directories (HF tensor names, q/k rows in rotate_half order,
// mixed dtypes, shards, tokenizer.json) whose logits must match the GGUF model's.
#include "engine/model/safetensors.h"

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/match.h"
#include "engine/gguf/gguf_file.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace deft {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Test helpers: temp dirs and a safetensors writer.

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "deft_safetensors_XXXXXX").string();
    char* made = mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string LittleEndian64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A raw file: length prefix, `header` verbatim, then `data`.
std::string Craft(std::string_view header, std::string_view data) {
  return LittleEndian64(header.size()) + std::string(header) + std::string(data);
}

struct Entry {
  std::string name;
  std::string dtype;  // "F32", "F16", "BF16", "I64"
  std::vector<int64_t> shape;
  std::string bytes;
};

// Encodes fp32 values in a float dtype.
std::string Encode(const std::string& dtype, const float* v, size_t n) {
  std::string out;
  if (dtype == "F32") {
    out.resize(4 * n);
    std::memcpy(out.data(), v, 4 * n);
    return out;
  }
  out.resize(2 * n);
  for (size_t i = 0; i < n; ++i) {
    uint16_t h = dtype == "F16" ? Fp32ToFp16(v[i]) : Fp32ToBf16(v[i]);
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

// Writes entries with consecutive data_offsets. The header is space-padded so that the data
// section starts at 8 + header length ≡ `data_start_mod8` (mod 8); 0 keeps every element aligned.
void WriteSafetensors(const std::string& path, const std::vector<const Entry*>& entries,
                      int data_start_mod8 = 0) {
  Json header = Json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const Entry* e : entries) {
    header[e->name] = {{"dtype", e->dtype},
                       {"shape", e->shape},
                       {"data_offsets", {offset, offset + e->bytes.size()}}};
    offset += e->bytes.size();
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != static_cast<size_t>(data_start_mod8)) text += ' ';
  std::ofstream out(path, std::ios::binary);
  std::string prefix = LittleEndian64(text.size()) + text;
  out.write(prefix.data(), static_cast<std::streamsize>(prefix.size()));
  for (const Entry* e : entries) {
    out.write(e->bytes.data(), static_cast<std::streamsize>(e->bytes.size()));
  }
  ASSERT_TRUE(out.good()) << path;
}

// Writes `entries` as model.safetensors (shards == 1) or as two shards plus the index.
void WriteCheckpoint(const std::string& dir, const std::vector<Entry>& entries, int shards,
                     int data_start_mod8 = 0) {
  std::vector<const Entry*> all;
  for (const Entry& e : entries) all.push_back(&e);
  if (shards == 1) {
    WriteSafetensors(dir + "/model.safetensors", all, data_start_mod8);
    return;
  }
  const size_t half = all.size() / 2;
  const std::string names[2] = {"model-00001-of-00002.safetensors",
                                "model-00002-of-00002.safetensors"};
  WriteSafetensors(dir + "/" + names[0], {all.begin(), all.begin() + half}, data_start_mod8);
  WriteSafetensors(dir + "/" + names[1], {all.begin() + half, all.end()}, data_start_mod8);
  Json index;
  index["metadata"] = {{"total_size", 0}};
  index["weight_map"] = Json::object();
  for (size_t i = 0; i < all.size(); ++i) index["weight_map"][all[i]->name] = names[i >= half];
  WriteFile(dir + "/model.safetensors.index.json", index.dump(2));
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> OpenCrafted(const TempDir& dir,
                                                             std::string_view bytes) {
  const std::string path = dir / "crafted.safetensors";
  WriteFile(path, bytes);
  return SafetensorsFile::Open(path);
}

void ExpectError(const absl::Status& s, absl::StatusCode code, const std::string& message) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_EQ(std::string(s.message()), message);
}

// ---------------------------------------------------------------------------------------------
// Reader.

TEST(SafetensorsFileTest, ReadsTensorsMetadataAndDataInHeaderOrder) {
  TempDir dir;
  const float a[6] = {1, 2, 3, 4, 5, 6};
  Entry ea{"b.weight", "F32", {2, 3}, Encode("F32", a, 6)};
  Entry eb{"a.bias", "BF16", {3}, Encode("BF16", a, 3)};
  Entry empty{"empty", "F16", {0, 4}, ""};
  WriteSafetensors(dir / "m.safetensors", {&ea, &eb, &empty});
  auto file = SafetensorsFile::Open(dir / "m.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const auto& tensors = (*file)->tensors();
  ASSERT_EQ(tensors.size(), 3u);
  EXPECT_EQ(tensors[0].name, "b.weight");
  EXPECT_EQ(tensors[1].name, "a.bias");
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  const SafetensorsTensor* t = (*file)->Find("b.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, SafetensorsDtype::kF32);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->elements(), 6);
  EXPECT_EQ(std::memcmp(t->data, a, sizeof(a)), 0);
  const SafetensorsTensor* b = (*file)->Find("a.bias");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, SafetensorsDtype::kBF16);
  EXPECT_EQ(b->begin, 24u);
  EXPECT_EQ(b->nbytes(), 6u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b->data), 6), eb.bytes);
  EXPECT_EQ((*file)->Find("empty")->elements(), 0);
  EXPECT_EQ((*file)->Find("missing"), nullptr);
}

TEST(SafetensorsFileTest, MissingFileIsNotFound) {
  TempDir dir;
  auto file = SafetensorsFile::Open(dir / "none.safetensors");
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsFileTest, FileShorterThanLengthPrefixIsTruncated) {
  TempDir dir;
  auto file = OpenCrafted(dir, std::string_view("\x05\x00\x00", 3));
  ExpectError(
      file.status(), absl::StatusCode::kDataLoss,
      dir / "crafted.safetensors" + ": truncated: 3 bytes, shorter than the 8-byte header length");
}

TEST(SafetensorsFileTest, HeaderLengthPastEndOfFile) {
  TempDir dir;
  auto file = OpenCrafted(dir, LittleEndian64(1000) + "{}");
  ExpectError(file.status(), absl::StatusCode::kDataLoss,
              dir / "crafted.safetensors" +
                  ": header length 1000 runs past the end of the file (10 bytes)");
}

TEST(SafetensorsFileTest, HeaderThatIsNotJson) {
  TempDir dir;
  auto file = OpenCrafted(dir, Craft("{\"a\": [1, 2", ""));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(file.status().message(),
                                "crafted.safetensors: header is not "
                                "valid JSON"))
      << file.status();
  auto array = OpenCrafted(dir, Craft("[1, 2]", ""));
  ExpectError(array.status(), absl::StatusCode::kInvalidArgument,
              dir / "crafted.safetensors" + ": header is not a JSON object");
}

TEST(SafetensorsFileTest, OffsetsPastDataSection) {
  TempDir dir;
  auto file =
      OpenCrafted(dir, Craft(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                             std::string(8, '\0')));
  ExpectError(file.status(), absl::StatusCode::kDataLoss,
              dir / "crafted.safetensors" +
                  ": tensor 'w': data_offsets [0, 16] run past the data section (8 bytes)");
}

TEST(SafetensorsFileTest, ValidFileCutShortIsDataLoss) {
  TempDir dir;
  std::vector<float> v(64, 1.f);
  Entry e{"w", "F32", {8, 8}, Encode("F32", v.data(), v.size())};
  WriteSafetensors(dir / "whole.safetensors", {&e});
  std::ifstream in(dir / "whole.safetensors", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto file = OpenCrafted(dir, std::string_view(bytes).substr(0, bytes.size() - 1));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss) << file.status();
  EXPECT_TRUE(absl::StrContains(file.status().message(),
                                "tensor 'w': data_offsets [0, 256] run past the data section "
                                "(255 bytes)"))
      << file.status();
}

TEST(SafetensorsFileTest, OffsetsDisagreeWithDtypeTimesShape) {
  TempDir dir;
  auto file =
      OpenCrafted(dir, Craft(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})",
                             std::string(24, '\0')));
  ExpectError(file.status(), absl::StatusCode::kInvalidArgument,
              dir / "crafted.safetensors" +
                  ": tensor 'w': data_offsets [0, 20] hold 20 bytes but dtype F32 x shape "
                  "[2, 3] needs 24");
  auto reversed =
      OpenCrafted(dir, Craft(R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}})",
                             std::string(8, '\0')));
  ExpectError(reversed.status(), absl::StatusCode::kInvalidArgument,
              dir / "crafted.safetensors" +
                  ": tensor 'w': data_offsets [4, 2] end before they "
                  "begin");
}

TEST(SafetensorsFileTest, OverlappingTensors) {
  TempDir dir;
  auto file =
      OpenCrafted(dir, Craft(R"({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
                                         "b": {"dtype": "F16", "shape": [4], "data_offsets": [6, 14]}})",
                             std::string(16, '\0')));
  ExpectError(file.status(), absl::StatusCode::kInvalidArgument,
              dir / "crafted.safetensors" + ": tensors 'a' [0, 8] and 'b' [6, 14] overlap");
}

TEST(SafetensorsFileTest, UnknownDtype) {
  TempDir dir;
  auto file =
      OpenCrafted(dir, Craft(R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}})",
                             std::string(1, '\0')));
  ExpectError(file.status(), absl::StatusCode::kInvalidArgument,
              dir / "crafted.safetensors" + ": tensor 'w': unknown dtype 'Q4'");
}

TEST(SafetensorsFileTest, MalformedEntries) {
  TempDir dir;
  const std::string prefix = dir / "crafted.safetensors" + ": ";
  auto negative = OpenCrafted(
      dir, Craft(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})", ""));
  ExpectError(negative.status(), absl::StatusCode::kInvalidArgument,
              prefix + "tensor 'w': 'shape' is not an array of non-negative integers");
  auto three =
      OpenCrafted(dir, Craft(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})",
                             std::string(8, '\0')));
  ExpectError(three.status(), absl::StatusCode::kInvalidArgument,
              prefix + "tensor 'w': 'data_offsets' is not a pair of non-negative integers");
  auto twice =
      OpenCrafted(dir, Craft(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                     "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})",
                             std::string(2, '\0')));
  ExpectError(twice.status(), absl::StatusCode::kInvalidArgument,
              prefix + "tensor 'w' listed twice");
  auto metadata = OpenCrafted(dir, Craft(R"({"__metadata__": {"n": 3}})", ""));
  ExpectError(metadata.status(), absl::StatusCode::kInvalidArgument,
              prefix + "__metadata__ 'n' is not a string");
  auto overflow =
      OpenCrafted(dir, Craft(R"({"w": {"dtype": "F64", "shape": [4294967296, 4294967296],
                     "data_offsets": [0, 0]}})",
                             ""));
  ExpectError(overflow.status(), absl::StatusCode::kInvalidArgument,
              prefix + "tensor 'w': shape overflows");
}

TEST(SafetensorsCheckpointTest, ShardedIndexAndItsErrors) {
  TempDir dir;
  const float v[4] = {1, 2, 3, 4};
  std::vector<Entry> entries = {{"x", "F32", {4}, Encode("F32", v, 4)},
                                {"y", "F16", {4}, Encode("F16", v, 4)},
                                {"z", "BF16", {2}, Encode("BF16", v, 2)}};
  WriteCheckpoint(dir.path(), entries, 2);
  auto ckpt = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->files().size(), 2u);
  ASSERT_NE((*ckpt)->Find("z"), nullptr);
  EXPECT_EQ((*ckpt)->FileOf(*(*ckpt)->Find("x")), dir / "model-00001-of-00002.safetensors");
  EXPECT_EQ((*ckpt)->FileOf(*(*ckpt)->Find("z")), dir / "model-00002-of-00002.safetensors");
  ExpectError((*ckpt)->Get("w").status(), absl::StatusCode::kNotFound,
              dir / "model.safetensors.index.json" + ": missing tensor 'w'");

  const std::string index = dir / "model.safetensors.index.json";
  WriteFile(index, R"({"weight_map": {"x": "model-00002-of-00002.safetensors"}})");
  ExpectError(SafetensorsCheckpoint::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
              index + ": weight_map puts 'x' in model-00002-of-00002.safetensors, which lacks it");
  WriteFile(index, R"({"weight_map": {"x": "../model-00001-of-00002.safetensors"}})");
  ExpectError(SafetensorsCheckpoint::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
              index +
                  ": shard name '../model-00001-of-00002.safetensors' of 'x' is not a file "
                  "name in the model directory");
  WriteFile(index, R"({"metadata": {}})");
  ExpectError(SafetensorsCheckpoint::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
              index + ": missing object 'weight_map'");
  WriteFile(index, R"({"weight_map": {"x": "model-00003-of-00002.safetensors"}})");
  EXPECT_EQ(SafetensorsCheckpoint::Open(dir.path()).status().code(), absl::StatusCode::kNotFound);

  TempDir empty;
  ExpectError(SafetensorsCheckpoint::Open(empty.path()).status(), absl::StatusCode::kNotFound,
              empty.path() + ": no model.safetensors or model.safetensors.index.json");
}

// ---------------------------------------------------------------------------------------------
// config.json.

Json SmallConfigJson() {
  return Json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 256, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "max_position_embeddings": 64, "tie_word_embeddings": false,
    "rope_scaling": null, "torch_dtype": "bfloat16"})");
}

absl::StatusOr<LlamaConfig> ParseConfig(const Json& j) {
  return LlamaConfigFromHfJson(j.dump(), "config.json");
}

TEST(HfConfigTest, ReadsFieldsAndDefaults) {
  auto c = ParseConfig(SmallConfigJson());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 256);
  EXPECT_EQ(c->hidden, 8);
  EXPECT_EQ(c->ffn_hidden, 16);
  EXPECT_EQ(c->num_layers, 2);
  EXPECT_EQ(c->num_heads, 2);
  EXPECT_EQ(c->num_kv_heads, 1);
  EXPECT_EQ(c->head_dim, 4);
  EXPECT_EQ(c->rope_dim, 4);
  EXPECT_EQ(c->context_length, 64);
  EXPECT_EQ(c->rms_eps, 1e-5f);
  EXPECT_EQ(c->rope_theta, 500000.f);
  EXPECT_TRUE(c->rope_neox);
  EXPECT_FALSE(c->tied_embeddings);
  EXPECT_TRUE(c->rope_freq_factors.empty());
  EXPECT_EQ(c->rope_linear_scale, 1.f);

  Json j = SmallConfigJson();
  j.erase("num_key_value_heads");
  j["head_dim"] = 6;
  j["tie_word_embeddings"] = true;
  c = ParseConfig(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->head_dim, 6);
  EXPECT_TRUE(c->tied_embeddings);
}

TEST(HfConfigTest, RopeScalingLlama3AndLinear) {
  Json j = SmallConfigJson();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  auto c = ParseConfig(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_freq_factors, Llama3RopeFreqFactors(4, 500000.f, 8.f, 1.f, 4.f, 8192));
  EXPECT_EQ(c->rope_freq_factors.size(), 2u);

  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.5}};
  c = ParseConfig(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_linear_scale, 2.5f);
  EXPECT_TRUE(c->rope_freq_factors.empty());

  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kUnimplemented,
              "config.json: rope_scaling type 'yarn' not supported (llama3, linear)");
  j["rope_scaling"] = {{"factor", 4.0}};
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kInvalidArgument,
              "config.json: 'rope_scaling' has no string 'rope_type' or 'type'");
}

TEST(HfConfigTest, ArchitectureChecks) {
  Json j = SmallConfigJson();
  j["architectures"] = {"Qwen2ForCausalLM"};
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kUnimplemented,
              "config.json: architectures [\"Qwen2ForCausalLM\"] not supported "
              "(LlamaForCausalLM, MistralForCausalLM)");
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = nullptr;
  EXPECT_TRUE(ParseConfig(j).ok());
  j["sliding_window"] = 32;
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kUnimplemented,
              "config.json: sliding_window 32 (sliding-window attention) not supported");
  j["sliding_window"] = 64;  // as long as the context: no window in effect
  EXPECT_TRUE(ParseConfig(j).ok());
  j = SmallConfigJson();
  j["attention_bias"] = true;
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kUnimplemented,
              "config.json: attention_bias true not supported");
  j = SmallConfigJson();
  j["hidden_act"] = "gelu";
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kUnimplemented,
              "config.json: hidden_act \"gelu\" not supported (silu)");
}

TEST(HfConfigTest, MissingAndMalformedFields) {
  Json j = SmallConfigJson();
  j.erase("hidden_size");
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kInvalidArgument,
              "config.json: missing 'hidden_size'");
  j = SmallConfigJson();
  j["num_hidden_layers"] = "2";
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kInvalidArgument,
              "config.json: 'num_hidden_layers' must be a positive integer, not \"2\"");
  j = SmallConfigJson();
  j["num_key_value_heads"] = 3;
  ExpectError(ParseConfig(j).status(), absl::StatusCode::kInvalidArgument,
              "config.json: num_attention_heads 2 is not a multiple of num_key_value_heads 3");
  EXPECT_EQ(LlamaConfigFromHfJson("{", "config.json").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Converting f32 weights to a HF checkpoint.

// Which dtype each group of tensors is written in.
struct DtypePlan {
  std::string embed = "F32", attn = "F32", mlp = "F32", attn_norm = "F32", norm = "F32",
              head = "F32";
};

std::vector<float> Rows(const WeightMatrix& m) {
  EXPECT_EQ(m.type, GgmlType::kF32);
  std::vector<float> v(static_cast<size_t>(m.rows * m.cols));
  for (int64_t r = 0; r < m.rows; ++r) std::memcpy(&v[r * m.cols], m.row(r), m.cols * 4);
  return v;
}

// GGUF q/k rows are llama.cpp's permutation of HF's: viewing HF rows of one head as
// (2, head_dim/2) halves, llama.cpp stores them as (head_dim/2, 2), interleaving the halves. HF
// row h*hd + s*hd/2 + i is therefore GGUF row h*hd + 2*i + s; this undoes that.
std::vector<float> UnpermuteRows(const std::vector<float>& gguf, int64_t n_head, int64_t head_dim,
                                 int64_t cols) {
  std::vector<float> hf(gguf.size());
  for (int64_t h = 0; h < n_head; ++h) {
    for (int64_t s = 0; s < 2; ++s) {
      for (int64_t i = 0; i < head_dim / 2; ++i) {
        const int64_t hf_row = h * head_dim + s * head_dim / 2 + i;
        const int64_t gguf_row = h * head_dim + 2 * i + s;
        std::memcpy(&hf[hf_row * cols], &gguf[gguf_row * cols], cols * 4);
      }
    }
  }
  return hf;
}

Entry MatrixEntry(const std::string& name, const std::string& dtype, const std::vector<float>& v,
                  int64_t rows, int64_t cols) {
  return {name, dtype, {rows, cols}, Encode(dtype, v.data(), v.size())};
}

Entry VectorEntry(const std::string& name, const std::string& dtype, const std::vector<float>& v) {
  return {name, dtype, {static_cast<int64_t>(v.size())}, Encode(dtype, v.data(), v.size())};
}

// HF-named tensors of fp32 weights `w`. `unpermute_qk`: w holds GGUF-order q/k rows.
std::vector<Entry> HfEntries(const LlamaConfig& c, const LlamaWeights& w, const DtypePlan& plan,
                             bool unpermute_qk, bool write_lm_head) {
  std::vector<Entry> out;
  out.push_back(MatrixEntry("model.embed_tokens.weight", plan.embed, Rows(w.token_embd),
                            c.vocab_size, c.hidden));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LlamaLayerWeights& L = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    std::vector<float> q = Rows(L.wq), k = Rows(L.wk);
    if (unpermute_qk) {
      q = UnpermuteRows(q, c.num_heads, c.head_dim, c.hidden);
      k = UnpermuteRows(k, c.num_kv_heads, c.head_dim, c.hidden);
    }
    out.push_back(VectorEntry(p + "input_layernorm.weight", plan.attn_norm, L.attn_norm));
    out.push_back(MatrixEntry(p + "self_attn.q_proj.weight", plan.attn, q, L.wq.rows, c.hidden));
    out.push_back(MatrixEntry(p + "self_attn.k_proj.weight", plan.attn, k, L.wk.rows, c.hidden));
    out.push_back(
        MatrixEntry(p + "self_attn.v_proj.weight", plan.attn, Rows(L.wv), L.wv.rows, c.hidden));
    out.push_back(
        MatrixEntry(p + "self_attn.o_proj.weight", plan.attn, Rows(L.wo), c.hidden, L.wo.cols));
    out.push_back(VectorEntry(p + "post_attention_layernorm.weight", plan.norm, L.ffn_norm));
    out.push_back(
        MatrixEntry(p + "mlp.gate_proj.weight", plan.mlp, Rows(L.w_gate), c.ffn_hidden, c.hidden));
    out.push_back(
        MatrixEntry(p + "mlp.up_proj.weight", plan.mlp, Rows(L.w_up), c.ffn_hidden, c.hidden));
    out.push_back(
        MatrixEntry(p + "mlp.down_proj.weight", plan.mlp, Rows(L.w_down), c.hidden, c.ffn_hidden));
  }
  out.push_back(VectorEntry("model.norm.weight", plan.norm, w.output_norm));
  if (write_lm_head) {
    out.push_back(MatrixEntry("lm_head.weight", plan.head, Rows(w.output), c.vocab_size, c.hidden));
  }
  return out;
}

Json HfConfigJson(const LlamaConfig& c, bool tied) {
  Json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["hidden_act"] = "silu";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden;
  j["intermediate_size"] = c.ffn_hidden;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.context_length;
  j["rms_norm_eps"] = static_cast<double>(c.rms_eps);
  j["rope_theta"] = static_cast<double>(c.rope_theta);
  j["rope_scaling"] = nullptr;
  j["tie_word_embeddings"] = tied;
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["torch_dtype"] = "bfloat16";
  return j;
}

// ---------------------------------------------------------------------------------------------
// A tiny random model: loader paths and errors.

// GPT-2's byte -> printable code point mapping, as UTF-8: printable Latin-1 bytes map to
// themselves, the rest to U+0100 onwards in byte order.
std::vector<std::string> ByteLevelAlphabet() {
  std::vector<std::string> out(256);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int cp = printable ? b : next++;
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    out[b] = s;
  }
  return out;
}

void WriteByteTokenizer(const std::string& dir) {
  Json vocab = Json::object();
  std::vector<std::string> alphabet = ByteLevelAlphabet();
  for (int b = 0; b < 256; ++b) vocab[alphabet[b]] = b;
  Json tok;
  tok["version"] = "1.0";
  tok["added_tokens"] = Json::array();
  tok["normalizer"] = nullptr;
  tok["pre_tokenizer"] = {{"type", "ByteLevel"},
                          {"add_prefix_space", false},
                          {"trim_offsets", true},
                          {"use_regex", true}};
  tok["decoder"] = {{"type", "ByteLevel"},
                    {"add_prefix_space", true},
                    {"trim_offsets", true},
                    {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},          {"dropout", nullptr},     {"unk_token", nullptr},
                  {"fuse_unk", false},      {"byte_fallback", false}, {"vocab", vocab},
                  {"merges", Json::array()}};
  WriteFile(dir + "/tokenizer.json", tok.dump());
}

class TinyModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = ParseConfig(SmallConfigJson());
    ASSERT_TRUE(c.ok()) << c.status();
    config_ = *c;
    const unsigned seed = std::random_device{}();
    SCOPED_TRACE(seed);
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.f, 1.f);
    auto matrix = [&](int64_t rows, int64_t cols) {
      std::vector<float> v(rows * cols);
      for (float& x : v) x = dist(rng);
      return v;
    };
    const LlamaConfig& k = config_;
    embed_ = matrix(k.vocab_size, k.hidden);
    down_ = matrix(k.hidden, k.ffn_hidden);
    norm_ = matrix(1, k.hidden);
    std::vector<Entry> e;
    e.push_back(MatrixEntry("model.embed_tokens.weight", "F16", embed_, k.vocab_size, k.hidden));
    for (int l = 0; l < k.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      e.push_back(VectorEntry(p + "input_layernorm.weight", "BF16", norm_));
      e.push_back(MatrixEntry(p + "self_attn.q_proj.weight", "F32", matrix(8, 8), 8, 8));
      e.push_back(MatrixEntry(p + "self_attn.k_proj.weight", "F32", matrix(4, 8), 4, 8));
      e.push_back(MatrixEntry(p + "self_attn.v_proj.weight", "F32", matrix(4, 8), 4, 8));
      e.push_back(MatrixEntry(p + "self_attn.o_proj.weight", "F32", matrix(8, 8), 8, 8));
      e.push_back(VectorEntry(p + "post_attention_layernorm.weight", "F16", norm_));
      e.push_back(MatrixEntry(p + "mlp.gate_proj.weight", "BF16", matrix(16, 8), 16, 8));
      e.push_back(MatrixEntry(p + "mlp.up_proj.weight", "BF16", matrix(16, 8), 16, 8));
      e.push_back(MatrixEntry(p + "mlp.down_proj.weight", "BF16", down_, 8, 16));
    }
    e.push_back(VectorEntry("model.norm.weight", "F32", norm_));
    e.push_back(MatrixEntry("lm_head.weight", "F32", matrix(k.vocab_size, k.hidden), k.vocab_size,
                            k.hidden));
    entries_ = std::move(e);
    WriteFile(dir_ / "config.json", SmallConfigJson().dump(2));
    WriteByteTokenizer(dir_.path());
  }

  Entry& Find(const std::string& name) {
    for (Entry& e : entries_) {
      if (e.name == name) return e;
    }
    ADD_FAILURE() << name;
    return entries_[0];
  }

  TempDir dir_;
  LlamaConfig config_;
  std::vector<Entry> entries_;
  std::vector<float> embed_, down_, norm_;
};

TEST_F(TinyModelTest, MatricesViewTheMappingInTheirDtypeAndNormsBecomeF32) {
  WriteCheckpoint(dir_.path(), entries_, 1);
  auto model = LoadSafetensorsModel(dir_.path(), {});
  ASSERT_TRUE(model.ok()) << model.status();
  const LlamaWeights& w = (*model)->weights;
  EXPECT_EQ((*model)->source, dir_.path());
  EXPECT_TRUE((*model)->config.rope_neox);
  EXPECT_EQ(w.keep_alive.size(), 1u);
  EXPECT_TRUE(w.owned.empty());  // every matrix is an aligned view
  EXPECT_EQ(w.token_embd.type, GgmlType::kF16);
  EXPECT_EQ(w.token_embd.row_bytes, 16u);
  const std::string& embed_bytes = Find("model.embed_tokens.weight").bytes;
  EXPECT_EQ(std::memcmp(w.token_embd.data, embed_bytes.data(), embed_bytes.size()), 0);
  EXPECT_EQ(w.layers[1].w_down.type, GgmlType::kBF16);
  EXPECT_EQ(w.layers[1].w_down.rows, 8);
  EXPECT_EQ(w.layers[1].w_down.cols, 16);
  const std::string& down_bytes = Find("model.layers.1.mlp.down_proj.weight").bytes;
  EXPECT_EQ(std::memcmp(w.layers[1].w_down.data, down_bytes.data(), down_bytes.size()), 0);
  EXPECT_EQ(w.layers[0].wq.type, GgmlType::kF32);
  EXPECT_EQ(w.output.type, GgmlType::kF32);
  EXPECT_NE(w.output.data, w.token_embd.data);  // untied: lm_head.weight
  for (int64_t i = 0; i < config_.hidden; ++i) {
    EXPECT_EQ(w.output_norm[i], norm_[i]);
    EXPECT_EQ(w.layers[0].attn_norm[i], Bf16ToFp32(Fp32ToBf16(norm_[i])));
    EXPECT_EQ(w.layers[0].ffn_norm[i], Fp16ToFp32(Fp32ToFp16(norm_[i])));
  }
}

TEST_F(TinyModelTest, DequantizeToF32ConvertsEveryMatrix) {
  WriteCheckpoint(dir_.path(), entries_, 2);
  auto model = LoadSafetensorsModel(dir_.path(), {.dequantize_to_f32 = true});
  ASSERT_TRUE(model.ok()) << model.status();
  const LlamaWeights& w = (*model)->weights;
  EXPECT_EQ(w.keep_alive.size(), 2u);
  const WeightMatrix& e = w.token_embd;
  ASSERT_EQ(e.type, GgmlType::kF32);
  EXPECT_EQ(e.row_bytes, static_cast<size_t>(config_.hidden) * 4);
  for (int64_t r = 0; r < e.rows; ++r) {
    const float* row = reinterpret_cast<const float*>(e.row(r));
    for (int64_t i = 0; i < e.cols; ++i) {
      ASSERT_EQ(row[i], Fp16ToFp32(Fp32ToFp16(embed_[r * e.cols + i]))) << r << "," << i;
    }
  }
  const WeightMatrix& d = w.layers[0].w_down;
  ASSERT_EQ(d.type, GgmlType::kF32);
  for (int64_t i = 0; i < d.rows * d.cols; ++i) {
    ASSERT_EQ(reinterpret_cast<const float*>(d.data)[i], Bf16ToFp32(Fp32ToBf16(down_[i])));
  }
  for (const LlamaLayerWeights& L : w.layers) {
    for (const WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
      EXPECT_EQ(m->type, GgmlType::kF32);
    }
  }
}

TEST_F(TinyModelTest, MisalignedTensorsAreCopiedAligned) {
  WriteCheckpoint(dir_.path(), entries_, 1, /*data_start_mod8=*/2);
  auto model = LoadSafetensorsModel(dir_.path(), {});
  ASSERT_TRUE(model.ok()) << model.status();
  const LlamaWeights& w = (*model)->weights;
  EXPECT_FALSE(w.owned.empty());
  const WeightMatrix& q = w.layers[1].wq;
  EXPECT_EQ(q.type, GgmlType::kF32);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(q.data) % 4, 0u);
  const std::string& q_bytes = Find("model.layers.1.self_attn.q_proj.weight").bytes;
  EXPECT_EQ(std::memcmp(q.data, q_bytes.data(), q_bytes.size()), 0);
}

TEST_F(TinyModelTest, TiedEmbeddingsReuseTheEmbedding) {
  Json j = SmallConfigJson();
  j["tie_word_embeddings"] = true;
  WriteFile(dir_ / "config.json", j.dump());
  entries_.pop_back();  // lm_head.weight
  WriteCheckpoint(dir_.path(), entries_, 1);
  auto model = LoadSafetensorsModel(dir_.path(), {});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_TRUE((*model)->config.tied_embeddings);
  EXPECT_EQ((*model)->weights.output.data, (*model)->weights.token_embd.data);
}

TEST_F(TinyModelTest, MissingConfigJson) {
  WriteCheckpoint(dir_.path(), entries_, 1);
  fs::remove(dir_ / "config.json");
  ExpectError(LoadSafetensorsModel(dir_.path(), {}).status(), absl::StatusCode::kNotFound,
              dir_ / "config.json" + ": missing (not a Hugging Face model directory?)");
}

TEST_F(TinyModelTest, MissingTensor) {
  entries_.erase(std::find_if(entries_.begin(), entries_.end(), [](const Entry& e) {
    return e.name == "model.layers.1.mlp.up_proj.weight";
  }));
  WriteCheckpoint(dir_.path(), entries_, 1);
  ExpectError(LoadSafetensorsModel(dir_.path(), {}).status(), absl::StatusCode::kNotFound,
              dir_ / "model.safetensors" + ": missing tensor 'model.layers.1.mlp.up_proj.weight'");
}

TEST_F(TinyModelTest, MissingLmHeadWhenUntied) {
  entries_.pop_back();
  WriteCheckpoint(dir_.path(), entries_, 1);
  ExpectError(LoadSafetensorsModel(dir_.path(), {}).status(), absl::StatusCode::kNotFound,
              dir_ / "model.safetensors" + ": missing tensor 'lm_head.weight'");
}

TEST_F(TinyModelTest, WrongShape) {
  Entry& k = Find("model.layers.0.self_attn.k_proj.weight");
  k.shape = {8, 4};
  WriteCheckpoint(dir_.path(), entries_, 1);
  ExpectError(LoadSafetensorsModel(dir_.path(), {}).status(), absl::StatusCode::kInvalidArgument,
              dir_ / "model.safetensors" +
                  ": tensor 'model.layers.0.self_attn.k_proj.weight': shape [8, 4] where [4, 8] "
                  "expected");
}

TEST_F(TinyModelTest, UnsupportedDtype) {
  Entry& norm = Find("model.norm.weight");
  norm.dtype = "I64";
  norm.bytes = std::string(8 * 8, '\0');
  WriteCheckpoint(dir_.path(), entries_, 2);
  ExpectError(LoadSafetensorsModel(dir_.path(), {}).status(), absl::StatusCode::kInvalidArgument,
              dir_ / "model-00002-of-00002.safetensors" +
                  ": tensor 'model.norm.weight': dtype I64 unsupported (F32, F16 or BF16)");
}

TEST_F(TinyModelTest, MissingTokenizerJson) {
  WriteCheckpoint(dir_.path(), entries_, 1);
  fs::remove(dir_ / "tokenizer.json");
  ExpectError(LoadSafetensorsModel(dir_.path(), {}).status(), absl::StatusCode::kNotFound,
              dir_ / "tokenizer.json" + ": missing");
}

TEST_F(TinyModelTest, LoadModelDispatchesOnPathKind) {
  WriteCheckpoint(dir_.path(), entries_, 1);
  auto model = LoadModel(dir_.path(), {});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_TRUE((*model)->config.rope_neox);
  ExpectError(LoadModel(dir_ / "nothing", {}).status(), absl::StatusCode::kNotFound,
              dir_ / "nothing" + ": no such file or directory");
}

// ---------------------------------------------------------------------------------------------
// End to end against the real model.

// tokenizer.json + tokenizer_config.json in HF's format from the GGUF's byte-level BPE vocabulary.
void WriteHfTokenizer(const GgufFile& gguf, const std::string& dir) {
  auto tokens = gguf.GetStringArray("tokenizer.ggml.tokens");
  auto merges = gguf.GetStringArray("tokenizer.ggml.merges");
  auto types = gguf.GetIntArray("tokenizer.ggml.token_type");
  ASSERT_TRUE(tokens.ok() && merges.ok() && types.ok());
  ASSERT_EQ(tokens->size(), types->size());
  Json vocab = Json::object();
  Json added = Json::array();
  for (size_t id = 0; id < tokens->size(); ++id) {
    vocab[(*tokens)[id]] = id;
    // ggml token types: 3 control, 4 user-defined; both are HF added tokens.
    if ((*types)[id] == 3 || (*types)[id] == 4) {
      added.push_back({{"id", id},
                       {"content", (*tokens)[id]},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", (*types)[id] == 3}});
    }
  }
  Json byte_level = {{"type", "ByteLevel"},
                     {"add_prefix_space", false},
                     {"trim_offsets", true},
                     {"use_regex", true}};
  Json tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = added;
  tok["normalizer"] = nullptr;
  // SmolLM2's own: digits split one by one, then GPT-2's byte-level regex split.
  tok["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level}}};
  tok["post_processor"] = {{"type", "ByteLevel"},
                           {"add_prefix_space", true},
                           {"trim_offsets", false},
                           {"use_regex", true}};
  tok["decoder"] = {{"type", "ByteLevel"},
                    {"add_prefix_space", true},
                    {"trim_offsets", true},
                    {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},
                  {"dropout", nullptr},
                  {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr},
                  {"fuse_unk", false},
                  {"byte_fallback", false},
                  {"vocab", vocab},
                  {"merges", *merges}};
  WriteFile(dir + "/tokenizer.json", tok.dump());

  Json cfg;
  auto token_of = [&](const char* key) -> Json {
    auto id = gguf.GetInt(key);
    if (!id.ok() || *id < 0 || *id >= static_cast<int64_t>(tokens->size())) return nullptr;
    return (*tokens)[*id];
  };
  auto add_bos = gguf.GetInt("tokenizer.ggml.add_bos_token");
  cfg["add_bos_token"] = add_bos.ok() && *add_bos != 0;
  cfg["add_eos_token"] = false;
  cfg["bos_token"] = token_of("tokenizer.ggml.bos_token_id");
  cfg["eos_token"] = token_of("tokenizer.ggml.eos_token_id");
  cfg["pad_token"] = token_of("tokenizer.ggml.padding_token_id");
  cfg["unk_token"] = token_of("tokenizer.ggml.unknown_token_id");
  if (auto tmpl = gguf.GetString("tokenizer.chat_template"); tmpl.ok()) {
    cfg["chat_template"] = *tmpl;
  }
  cfg["clean_up_tokenization_spaces"] = false;
  cfg["model_max_length"] = 8192;
  cfg["tokenizer_class"] = "GPT2Tokenizer";
  WriteFile(dir + "/tokenizer_config.json", cfg.dump(2));
}

double RelativeL2(const std::vector<float>& ref, const std::vector<float>& got) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff += (double(ref[i]) - got[i]) * (double(ref[i]) - got[i]);
    norm += double(ref[i]) * ref[i];
  }
  return std::sqrt(diff / norm);
}

struct ModelRun {
  std::vector<float> prompt_logits;  // [prompt, vocab]
  std::vector<int32_t> greedy;       // next tokens, argmax each step
};

constexpr int kPromptTokens = 20;
constexpr int kGreedyTokens = 8;

void RunModel(LlamaModel& model, const std::vector<int32_t>& prompt, ModelRun* run) {
  KvCache cache = model.NewCache(kPromptTokens + kGreedyTokens);
  ASSERT_TRUE(model.Forward(prompt, cache, /*all_logits=*/true, &run->prompt_logits).ok());
  const int64_t vocab = model.config().vocab_size;
  ASSERT_EQ(run->prompt_logits.size(), static_cast<size_t>(prompt.size() * vocab));
  std::vector<float> last(run->prompt_logits.end() - vocab, run->prompt_logits.end());
  for (int i = 0; i < kGreedyTokens; ++i) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
    run->greedy.push_back(next);
    const int32_t input[1] = {next};
    ASSERT_TRUE(model.Forward(input, cache, /*all_logits=*/false, &last).ok());
  }
}

// One GGUF load (dequantized to fp32) and two HF conversions of it, shared by the tests:
//  - "mixed": F16 embeddings (tied), F32 attention, BF16 MLP, F16/BF16 norms, two shards;
//  - "f32": everything F32, untied with an explicit lm_head.weight, one file.
class ConvertedModelTest : public ::testing::Test {
 protected:
  struct Shared {
    TempDir mixed_dir, f32_dir;
    LlamaConfig gguf_config;
    std::unique_ptr<LlamaModel> gguf_model;
    std::vector<int32_t> prompt;
    ModelRun reference;
  };

  static void SetUpTestSuite() {
    if (!fs::exists(DEFT_TEST_MODEL)) return;
    shared_ = new Shared();
    auto loaded = LoadGgufModel(DEFT_TEST_MODEL, {.dequantize_to_f32 = true});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto gguf = GgufFile::Open(DEFT_TEST_MODEL);
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    const LlamaConfig& c = (*loaded)->config;
    shared_->gguf_config = c;
    ASSERT_FALSE(c.rope_neox);

    DtypePlan mixed{
        .embed = "F16", .attn = "F32", .mlp = "BF16", .attn_norm = "BF16", .norm = "F16"};
    std::vector<Entry> entries = HfEntries(c, (*loaded)->weights, mixed, true, false);
    WriteCheckpoint(shared_->mixed_dir.path(), entries, 2);
    WriteFile(shared_->mixed_dir / "config.json", HfConfigJson(c, c.tied_embeddings).dump(2));
    WriteHfTokenizer(**gguf, shared_->mixed_dir.path());
    entries = HfEntries(c, (*loaded)->weights, DtypePlan{}, true, true);
    WriteCheckpoint(shared_->f32_dir.path(), entries, 1);
    entries.clear();
    WriteFile(shared_->f32_dir / "config.json", HfConfigJson(c, false).dump(2));
    WriteHfTokenizer(**gguf, shared_->f32_dir.path());

    auto model = LlamaModel::Create(std::move(*loaded), {});
    ASSERT_TRUE(model.ok()) << model.status();
    shared_->gguf_model = std::move(*model);
    std::vector<int32_t> ids = shared_->gguf_model->tokenizer().Encode(
        "The capital of France is Paris. The capital of Germany is Berlin. The capital of "
        "Spain is Madrid. The capital of Italy is",
        /*add_bos=*/false, /*parse_special=*/false);
    ASSERT_GE(ids.size(), static_cast<size_t>(kPromptTokens));
    ids.resize(kPromptTokens);
    shared_->prompt = ids;
    RunModel(*shared_->gguf_model, ids, &shared_->reference);
  }
  static void TearDownTestSuite() {
    delete shared_;
    shared_ = nullptr;
  }
  void SetUp() override {
    if (!fs::exists(DEFT_TEST_MODEL)) GTEST_SKIP() << "no test model at " << DEFT_TEST_MODEL;
    ASSERT_NE(shared_, nullptr);
    ASSERT_NE(shared_->gguf_model, nullptr) << "suite setup failed";
  }

  static std::unique_ptr<LlamaModel> Load(const std::string& dir, const LoadOptions& options) {
    auto loaded = LoadSafetensorsModel(dir, options);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    if (!loaded.ok()) return nullptr;
    auto model = LlamaModel::Create(std::move(*loaded), {});
    EXPECT_TRUE(model.ok()) << model.status();
    return model.ok() ? std::move(*model) : nullptr;
  }

  static void ExpectSameConfig(const LlamaConfig& hf, const LlamaConfig& gguf) {
    EXPECT_EQ(hf.vocab_size, gguf.vocab_size);
    EXPECT_EQ(hf.hidden, gguf.hidden);
    EXPECT_EQ(hf.num_layers, gguf.num_layers);
    EXPECT_EQ(hf.num_heads, gguf.num_heads);
    EXPECT_EQ(hf.num_kv_heads, gguf.num_kv_heads);
    EXPECT_EQ(hf.head_dim, gguf.head_dim);
    EXPECT_EQ(hf.ffn_hidden, gguf.ffn_hidden);
    EXPECT_EQ(hf.context_length, gguf.context_length);
    EXPECT_EQ(hf.rms_eps, gguf.rms_eps);
    EXPECT_EQ(hf.rope_theta, gguf.rope_theta);
    EXPECT_EQ(hf.rope_dim, gguf.rope_dim);
    EXPECT_EQ(hf.rope_freq_factors, gguf.rope_freq_factors);
    EXPECT_EQ(hf.rope_linear_scale, gguf.rope_linear_scale);
    EXPECT_TRUE(hf.rope_neox);
  }

  static Shared* shared_;
};

ConvertedModelTest::Shared* ConvertedModelTest::shared_ = nullptr;

TEST_F(ConvertedModelTest, F32CheckpointMatchesGgufLogitsAndGreedyTokens) {
  auto model = Load(shared_->f32_dir.path(), {});
  ASSERT_NE(model, nullptr);
  ExpectSameConfig(model->config(), shared_->gguf_config);
  EXPECT_FALSE(model->config().tied_embeddings);
  EXPECT_EQ(model->loaded().weights.layers[0].wq.type, GgmlType::kF32);
  ModelRun run;
  RunModel(*model, shared_->prompt, &run);
  // Same fp32 weights, only q/k row order and rope style differ: summation order only.
  constexpr double kSameWeightsRelL2 = 1e-4;
  EXPECT_LT(RelativeL2(shared_->reference.prompt_logits, run.prompt_logits), kSameWeightsRelL2);
  EXPECT_EQ(run.greedy, shared_->reference.greedy);
}

TEST_F(ConvertedModelTest, MixedDtypeShardedCheckpointMatchesGgufLogits) {
  auto model = Load(shared_->mixed_dir.path(), {});
  ASSERT_NE(model, nullptr);
  ExpectSameConfig(model->config(), shared_->gguf_config);
  EXPECT_EQ(model->config().tied_embeddings, shared_->gguf_config.tied_embeddings);
  const LlamaWeights& w = model->loaded().weights;
  EXPECT_EQ(w.token_embd.type, GgmlType::kF16);
  EXPECT_EQ(w.layers[3].wk.type, GgmlType::kF32);
  EXPECT_EQ(w.layers[3].w_up.type, GgmlType::kBF16);
  EXPECT_EQ(w.keep_alive.size(), 2u);
  ModelRun run;
  RunModel(*model, shared_->prompt, &run);
  // BF16 keeps 8 mantissa bits: the MLP weights move by up to 2^-9 relative.
  constexpr double kBf16WeightsRelL2 = 1e-2;
  EXPECT_LT(RelativeL2(shared_->reference.prompt_logits, run.prompt_logits), kBf16WeightsRelL2);
}

TEST_F(ConvertedModelTest, MixedCheckpointDequantizedToF32MatchesViewedOne) {
  auto viewed = Load(shared_->mixed_dir.path(), {});
  auto dequantized = Load(shared_->mixed_dir.path(), {.dequantize_to_f32 = true});
  ASSERT_NE(viewed, nullptr);
  ASSERT_NE(dequantized, nullptr);
  EXPECT_EQ(dequantized->loaded().weights.layers[3].w_up.type, GgmlType::kF32);
  EXPECT_EQ(dequantized->loaded().weights.token_embd.type, GgmlType::kF32);
  ModelRun a, b;
  RunModel(*viewed, shared_->prompt, &a);
  RunModel(*dequantized, shared_->prompt, &b);
  // Identical values, only the kernels' input dtype differs.
  constexpr double kSameValuesRelL2 = 1e-4;
  EXPECT_LT(RelativeL2(a.prompt_logits, b.prompt_logits), kSameValuesRelL2);
}

TEST_F(ConvertedModelTest, TokenizerJsonEncodesLikeGgufVocabulary) {
  auto loaded = LoadModel(shared_->mixed_dir.path(), {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Tokenizer& hf = *(*loaded)->tokenizer;
  const Tokenizer& gguf = shared_->gguf_model->tokenizer();
  EXPECT_EQ(hf.vocab_size(), gguf.vocab_size());
  EXPECT_EQ(hf.bos_id(), gguf.bos_id());
  EXPECT_EQ(hf.eos_id(), gguf.eos_id());
  for (const char* text :
       {"Hello, world!", "The year 2024 had 366 days.", "  leading spaces,\ttabs\n\nand newlines  ",
        "naïve café, 日本語, emoji 🙂", "<|im_start|>user\nHi<|im_end|>\n"}) {
    for (bool parse_special : {false, true}) {
      SCOPED_TRACE(testing::Message() << text << " parse_special=" << parse_special);
      EXPECT_EQ(hf.Encode(text, false, parse_special), gguf.Encode(text, false, parse_special));
    }
  }
}

TEST_F(ConvertedModelTest, LoadModelOnGgufFileKeepsGgmlRope) {
  auto loaded = LoadModel(DEFT_TEST_MODEL, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_FALSE((*loaded)->config.rope_neox);
  EXPECT_EQ((*loaded)->source, DEFT_TEST_MODEL);
}

}  // namespace
}  // namespace deft
