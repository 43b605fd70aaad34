// Safetensors reader and config.json parser; see safetensors.h for the format and guarantees.
#include "engine/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace deft {
namespace {

using OrderedJson = nlohmann::ordered_json;

// The safetensors library refuses headers above 100 MB; a header that large is corrupt or hostile.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DtypeInfo {
  std::string_view name;
  SafetensorsDtype dtype;
  size_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {"BOOL", SafetensorsDtype::kBool, 1},      {"U8", SafetensorsDtype::kU8, 1},
    {"I8", SafetensorsDtype::kI8, 1},          {"F8_E4M3", SafetensorsDtype::kF8E4M3, 1},
    {"F8_E5M2", SafetensorsDtype::kF8E5M2, 1}, {"I16", SafetensorsDtype::kI16, 2},
    {"U16", SafetensorsDtype::kU16, 2},        {"F16", SafetensorsDtype::kF16, 2},
    {"BF16", SafetensorsDtype::kBF16, 2},      {"I32", SafetensorsDtype::kI32, 4},
    {"U32", SafetensorsDtype::kU32, 4},        {"F32", SafetensorsDtype::kF32, 4},
    {"F64", SafetensorsDtype::kF64, 8},        {"I64", SafetensorsDtype::kI64, 8},
    {"U64", SafetensorsDtype::kU64, 8},
};

const DtypeInfo* FindDtype(std::string_view name) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.name == name) return &info;
  }
  return nullptr;
}

const DtypeInfo& Info(SafetensorsDtype dtype) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.dtype == dtype) return info;
  }
  return kDtypes[0];  // unreachable: every enumerator is in the table
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return text.str();
}

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

std::string_view SafetensorsDtypeName(SafetensorsDtype dtype) { return Info(dtype).name; }
size_t SafetensorsDtypeSize(SafetensorsDtype dtype) { return Info(dtype).size; }

int64_t SafetensorsTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Validates the header of a mapped file and fills a SafetensorsFile's tensor list.
class SafetensorsParser {
 public:
  explicit SafetensorsParser(SafetensorsFile& file) : file_(file) {}

  absl::Status Parse() {
    const auto* bytes = static_cast<const uint8_t*>(file_.map_);
    const uint64_t file_size = file_.map_size_;
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
    if (header_len > file_size - 8) {
      return absl::DataLossError(
          absl::StrFormat("%s: header length %u runs past the end of the file (%u bytes)",
                          file_.path_, header_len, file_size));
    }
    if (header_len > kMaxHeaderBytes) {
      return Invalid(absl::StrFormat("header length %u exceeds the %u-byte limit", header_len,
                                     kMaxHeaderBytes));
    }
    const char* header = reinterpret_cast<const char*>(bytes + 8);
    data_ = bytes + 8 + header_len;
    data_size_ = file_size - 8 - header_len;

    OrderedJson root;
    std::string duplicate;
    // Catches a tensor named twice, which the JSON library would otherwise silently collapse.
    // Top-level keys arrive at depth 1.
    absl::flat_hash_map<std::string, int> seen;
    OrderedJson::parser_callback_t on_event = [&](int depth, OrderedJson::parse_event_t event,
                                                  OrderedJson& parsed) {
      if (event == OrderedJson::parse_event_t::key && depth == 1 && parsed.is_string()) {
        if (seen[parsed.get<std::string>()]++ > 0 && duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
      }
      return true;
    };
    try {
      root = OrderedJson::parse(header, header + header_len, on_event);
    } catch (const OrderedJson::parse_error& e) {
      return Invalid(absl::StrCat("header is not valid JSON: ", e.what()));
    }
    if (!root.is_object()) return Invalid("header is not a JSON object");
    if (!duplicate.empty()) return Invalid(absl::StrCat("tensor '", duplicate, "' listed twice"));

    for (auto& [name, value] : root.items()) {
      if (name == "__metadata__") {
        if (absl::Status s = ParseMetadata(value); !s.ok()) return s;
        continue;
      }
      if (absl::Status s = ParseTensor(name, value); !s.ok()) return s;
    }
    return CheckOverlaps();
  }

 private:
  absl::Status Invalid(absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(file_.path_, ": ", problem));
  }

  absl::Status ParseMetadata(const OrderedJson& value) {
    if (!value.is_object()) return Invalid("__metadata__ is not an object");
    for (auto& [key, v] : value.items()) {
      if (!v.is_string()) return Invalid(absl::StrCat("__metadata__ '", key, "' is not a string"));
      file_.metadata_[key] = v.get<std::string>();
    }
    return absl::OkStatus();
  }

  // Reads a JSON array of non-negative integers.
  static bool ReadUints(const OrderedJson& value, std::vector<uint64_t>* out) {
    if (!value.is_array()) return false;
    for (const OrderedJson& v : value) {
      if (!v.is_number_unsigned()) return false;
      out->push_back(v.get<uint64_t>());
    }
    return true;
  }

  absl::Status ParseTensor(const std::string& name, const OrderedJson& value) {
    const std::string where = absl::StrCat("tensor '", name, "': ");
    if (!value.is_object()) return Invalid(where + "entry is not an object");
    auto dtype_it = value.find("dtype");
    auto shape_it = value.find("shape");
    auto offsets_it = value.find("data_offsets");
    if (dtype_it == value.end() || !dtype_it->is_string()) {
      return Invalid(where + "missing string 'dtype'");
    }
    std::vector<uint64_t> dims, offsets;
    if (shape_it == value.end() || !ReadUints(*shape_it, &dims)) {
      return Invalid(where + "'shape' is not an array of non-negative integers");
    }
    if (offsets_it == value.end() || !ReadUints(*offsets_it, &offsets) || offsets.size() != 2) {
      return Invalid(where + "'data_offsets' is not a pair of non-negative integers");
    }
    const std::string dtype_name = dtype_it->get<std::string>();
    const DtypeInfo* dtype = FindDtype(dtype_name);
    if (dtype == nullptr) return Invalid(absl::StrCat(where, "unknown dtype '", dtype_name, "'"));

    SafetensorsTensor tensor;
    tensor.name = name;
    tensor.dtype = dtype->dtype;
    uint64_t elements = 1;
    for (uint64_t d : dims) {
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          __builtin_mul_overflow(elements, d, &elements)) {
        return Invalid(where + "shape overflows");
      }
      tensor.shape.push_back(static_cast<int64_t>(d));
    }
    uint64_t needed = 0;
    if (__builtin_mul_overflow(elements, dtype->size, &needed) ||
        elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Invalid(where + "shape overflows");
    }
    tensor.begin = offsets[0];
    tensor.end = offsets[1];
    if (tensor.end < tensor.begin) {
      return Invalid(absl::StrFormat("%sdata_offsets [%u, %u] end before they begin", where,
                                     tensor.begin, tensor.end));
    }
    if (tensor.end > data_size_) {
      return absl::DataLossError(
          absl::StrFormat("%s: %sdata_offsets [%u, %u] run past the data section (%u bytes)",
                          file_.path_, where, tensor.begin, tensor.end, data_size_));
    }
    if (tensor.end - tensor.begin != needed) {
      return Invalid(
          absl::StrFormat("%sdata_offsets [%u, %u] hold %u bytes but dtype %s x shape %s needs %u",
                          where, tensor.begin, tensor.end, tensor.end - tensor.begin,
                          std::string(dtype->name), ShapeString(tensor.shape), needed));
    }
    tensor.data = data_ + tensor.begin;
    file_.index_[name] = file_.tensors_.size();
    file_.tensors_.push_back(std::move(tensor));
    return absl::OkStatus();
  }

  // Two tensors with bytes in common would alias each other's data. Empty tensors own no bytes.
  absl::Status CheckOverlaps() const {
    std::vector<const SafetensorsTensor*> by_begin;
    for (const SafetensorsTensor& t : file_.tensors_) {
      if (t.nbytes() > 0) by_begin.push_back(&t);
    }
    std::sort(
        by_begin.begin(), by_begin.end(),
        [](const SafetensorsTensor* a, const SafetensorsTensor* b) { return a->begin < b->begin; });
    for (size_t i = 1; i < by_begin.size(); ++i) {
      const SafetensorsTensor& a = *by_begin[i - 1];
      const SafetensorsTensor& b = *by_begin[i];
      if (b.begin < a.end) {
        return Invalid(absl::StrFormat("tensors '%s' [%u, %u] and '%s' [%u, %u] overlap", a.name,
                                       a.begin, a.end, b.name, b.begin, b.end));
      }
    }
    return absl::OkStatus();
  }

  SafetensorsFile& file_;
  const uint8_t* data_ = nullptr;
  uint64_t data_size_ = 0;
};

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    std::string message = absl::StrCat(path, ": cannot open: ", strerror(err));
    if (err == ENOENT) return absl::NotFoundError(message);
    return absl::InvalidArgumentError(message);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    close(fd);
    return absl::DataLossError(absl::StrFormat(
        "%s: truncated: %u bytes, shorter than the 8-byte header length", path, size));
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat(path, ": mmap failed: ", strerror(errno)));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = size;
  SafetensorsParser parser(*file);
  if (absl::Status s = parser.Parse(); !s.ok()) return s;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(absl::string_view(name.data(), name.size()));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir) {
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint());
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  if (!FileExists(index_path)) {
    if (!FileExists(single_path)) {
      return absl::NotFoundError(
          absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
    }
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(single_path);
    if (!file.ok()) return file.status();
    ckpt->source_ = single_path;
    ckpt->files_.push_back(std::move(*file));
    for (const SafetensorsTensor& t : ckpt->files_[0]->tensors()) {
      ckpt->tensors_[t.name] = {0, &t};
    }
    return ckpt;
  }

  ckpt->source_ = index_path;
  absl::StatusOr<std::string> text = ReadTextFile(index_path);
  if (!text.ok()) return text.status();
  auto invalid = [&](absl::string_view problem) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", problem));
  };
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(*text);
  } catch (const nlohmann::json::parse_error& e) {
    return invalid(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!index.is_object()) return invalid("not a JSON object");
  auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object()) return invalid("missing object 'weight_map'");

  absl::flat_hash_map<std::string, size_t> shard_index;
  for (auto& [name, shard] : map_it->items()) {
    if (!shard.is_string()) return invalid(absl::StrCat("shard of '", name, "' is not a string"));
    const std::string shard_name = shard.get<std::string>();
    // Shards live beside the index; a name with a path component could read any file.
    if (shard_name.empty() || shard_name == "." || shard_name == ".." ||
        shard_name.find('/') != std::string::npos || shard_name.find('\\') != std::string::npos) {
      return invalid(absl::StrCat("shard name '", shard_name, "' of '", name,
                                  "' is not a file name in the model directory"));
    }
    auto [it, inserted] = shard_index.try_emplace(shard_name, ckpt->files_.size());
    if (inserted) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
          SafetensorsFile::Open(dir + "/" + shard_name);
      if (!file.ok()) return file.status();
      ckpt->files_.push_back(std::move(*file));
    }
    const SafetensorsTensor* tensor = ckpt->files_[it->second]->Find(name);
    if (tensor == nullptr) {
      return invalid(
          absl::StrCat("weight_map puts '", name, "' in ", shard_name, ", which lacks it"));
    }
    ckpt->tensors_[name] = {it->second, tensor};
  }
  return ckpt;
}

const SafetensorsTensor* SafetensorsCheckpoint::Find(std::string_view name) const {
  auto it = tensors_.find(absl::string_view(name.data(), name.size()));
  return it == tensors_.end() ? nullptr : it->second.second;
}

absl::StatusOr<const SafetensorsTensor*> SafetensorsCheckpoint::Get(std::string_view name) const {
  const SafetensorsTensor* tensor = Find(name);
  if (tensor == nullptr) {
    return absl::NotFoundError(absl::StrCat(source_, ": missing tensor '", std::string(name), "'"));
  }
  return tensor;
}

const std::string& SafetensorsCheckpoint::FileOf(const SafetensorsTensor& tensor) const {
  return files_[tensors_.at(tensor.name).first]->path();
}

// ---------------------------------------------------------------------------------------------
// config.json

namespace {

using nlohmann::json;

// Typed access to config.json fields; every error names the file and the key.
class ConfigReader {
 public:
  ConfigReader(const json& root, const std::string& path) : root_(root), path_(path) {}

  absl::Status Invalid(absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", problem));
  }
  absl::Status Unimplemented(absl::string_view problem) const {
    return absl::UnimplementedError(absl::StrCat(path_, ": ", problem));
  }
  // Absent and null both mean "not given".
  const json* Find(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  const json* Find(const char* key) const { return Find(root_, key); }

  // A positive integer; `fallback` < 0 means required.
  absl::StatusOr<int64_t> PositiveInt(const json& obj, const char* key,
                                      int64_t fallback = -1) const {
    const json* v = Find(obj, key);
    if (v == nullptr) {
      if (fallback >= 0) return fallback;
      return Invalid(absl::StrCat("missing '", key, "'"));
    }
    if (!v->is_number_integer() || v->get<int64_t>() <= 0) {
      return Invalid(absl::StrCat("'", key, "' must be a positive integer, not ", v->dump()));
    }
    return v->get<int64_t>();
  }
  absl::StatusOr<int64_t> PositiveInt(const char* key, int64_t fallback = -1) const {
    return PositiveInt(root_, key, fallback);
  }
  // A positive number; `fallback` < 0 means required.
  absl::StatusOr<double> PositiveNumber(const json& obj, const char* key,
                                        double fallback = -1) const {
    const json* v = Find(obj, key);
    if (v == nullptr) {
      if (fallback >= 0) return fallback;
      return Invalid(absl::StrCat("missing '", key, "'"));
    }
    if (!v->is_number() || v->get<double>() <= 0) {
      return Invalid(absl::StrCat("'", key, "' must be a positive number, not ", v->dump()));
    }
    return v->get<double>();
  }
  absl::StatusOr<double> PositiveNumber(const char* key, double fallback = -1) const {
    return PositiveNumber(root_, key, fallback);
  }
  absl::StatusOr<bool> Bool(const char* key, bool fallback) const {
    const json* v = Find(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) {
      return Invalid(absl::StrCat("'", key, "' must be true or false, not ", v->dump()));
    }
    return v->get<bool>();
  }

 private:
  const json& root_;
  const std::string& path_;
};

#define CONFIG_CONCAT_INNER(a, b) a##b
#define CONFIG_CONCAT(a, b) CONFIG_CONCAT_INNER(a, b)
#define CONFIG_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(*tmp)
// `lhs` may declare a variable: CONFIG_ASSIGN_OR_RETURN(double x, ReadX());
#define CONFIG_ASSIGN_OR_RETURN(lhs, expr) \
  CONFIG_ASSIGN_OR_RETURN_IMPL(CONFIG_CONCAT(status_or_, __LINE__), lhs, expr)

absl::Status CheckArchitecture(const ConfigReader& r, int64_t context_length) {
  static constexpr const char* kSupported[] = {"LlamaForCausalLM", "MistralForCausalLM"};
  bool supported = false;
  if (const json* archs = r.Find("architectures")) {
    if (!archs->is_array()) return r.Invalid("'architectures' is not an array");
    for (const json& a : *archs) {
      if (!a.is_string()) return r.Invalid("'architectures' holds a non-string");
      for (const char* s : kSupported) supported |= a.get<std::string>() == s;
    }
    if (!supported) {
      return r.Unimplemented(absl::StrCat("architectures ", archs->dump(),
                                          " not supported (LlamaForCausalLM, MistralForCausalLM)"));
    }
  } else {
    const json* type = r.Find("model_type");
    if (type == nullptr || !type->is_string() || (*type != "llama" && *type != "mistral")) {
      return r.Unimplemented(absl::StrCat("no 'architectures', and model_type ",
                                          type ? type->dump() : "(none)",
                                          " is not llama or mistral"));
    }
  }
  // Mistral's sliding-window attention only matters when the window is shorter than the context.
  if (const json* window = r.Find("sliding_window")) {
    if (!window->is_number_integer() || window->get<int64_t>() < context_length) {
      return r.Unimplemented(absl::StrCat("sliding_window ", window->dump(),
                                          " (sliding-window attention) not supported"));
    }
  }
  if (const json* act = r.Find("hidden_act"); act != nullptr && *act != "silu") {
    return r.Unimplemented(absl::StrCat("hidden_act ", act->dump(), " not supported (silu)"));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    absl::StatusOr<bool> bias = r.Bool(key, false);
    if (!bias.ok()) return bias.status();
    if (*bias) return r.Unimplemented(absl::StrCat(key, " true not supported"));
  }
  if (const json* partial = r.Find("partial_rotary_factor");
      partial != nullptr && !(partial->is_number() && partial->get<double>() == 1.0)) {
    return r.Unimplemented(
        absl::StrCat("partial_rotary_factor ", partial->dump(), " not supported"));
  }
  return absl::OkStatus();
}

// rope_scaling (or transformers v5's rope_parameters) -> frequency factors / linear scale.
absl::Status ParseRopeScaling(const ConfigReader& r, const json& scaling, LlamaConfig& config) {
  if (!scaling.is_object()) return r.Invalid("'rope_scaling' is not an object");
  const json* type = r.Find(scaling, "rope_type");
  if (type == nullptr) type = r.Find(scaling, "type");
  if (type == nullptr || !type->is_string()) {
    return r.Invalid("'rope_scaling' has no string 'rope_type' or 'type'");
  }
  const std::string kind = type->get<std::string>();
  if (kind == "default") return absl::OkStatus();
  if (kind == "linear") {
    CONFIG_ASSIGN_OR_RETURN(double factor, r.PositiveNumber(scaling, "factor"));
    config.rope_linear_scale = static_cast<float>(factor);
    return absl::OkStatus();
  }
  if (kind == "llama3") {
    CONFIG_ASSIGN_OR_RETURN(double factor, r.PositiveNumber(scaling, "factor"));
    CONFIG_ASSIGN_OR_RETURN(double low, r.PositiveNumber(scaling, "low_freq_factor"));
    CONFIG_ASSIGN_OR_RETURN(double high, r.PositiveNumber(scaling, "high_freq_factor"));
    CONFIG_ASSIGN_OR_RETURN(int64_t original,
                            r.PositiveInt(scaling, "original_max_position_embeddings"));
    if (high <= low) {
      return r.Invalid("rope_scaling: high_freq_factor must exceed low_freq_factor");
    }
    config.rope_freq_factors =
        Llama3RopeFreqFactors(config.rope_dim, config.rope_theta, static_cast<float>(factor),
                              static_cast<float>(low), static_cast<float>(high), original);
    return absl::OkStatus();
  }
  return r.Unimplemented(
      absl::StrCat("rope_scaling type '", kind, "' not supported (llama3, linear)"));
}

}  // namespace

absl::StatusOr<LlamaConfig> LlamaConfigFromHfJson(std::string_view text, const std::string& path) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
  if (!root.is_object()) return absl::InvalidArgumentError(path + ": not a JSON object");
  ConfigReader r(root, path);

  LlamaConfig c;
  c.architecture = "llama";
  if (const json* name = r.Find("_name_or_path"); name != nullptr && name->is_string()) {
    c.name = name->get<std::string>();
  }
  CONFIG_ASSIGN_OR_RETURN(c.vocab_size, r.PositiveInt("vocab_size"));
  CONFIG_ASSIGN_OR_RETURN(c.hidden, r.PositiveInt("hidden_size"));
  CONFIG_ASSIGN_OR_RETURN(c.ffn_hidden, r.PositiveInt("intermediate_size"));
  CONFIG_ASSIGN_OR_RETURN(c.num_layers, r.PositiveInt("num_hidden_layers"));
  CONFIG_ASSIGN_OR_RETURN(c.num_heads, r.PositiveInt("num_attention_heads"));
  CONFIG_ASSIGN_OR_RETURN(c.num_kv_heads, r.PositiveInt("num_key_value_heads", c.num_heads));
  // HF's LlamaConfig defaults: max_position_embeddings 2048, rms_norm_eps 1e-6, theta 10000.
  CONFIG_ASSIGN_OR_RETURN(c.context_length, r.PositiveInt("max_position_embeddings", 2048));
  if (r.Find("head_dim") == nullptr && c.hidden % c.num_heads != 0) {
    return r.Invalid(absl::StrCat("hidden_size ", c.hidden, " is not a multiple of ",
                                  "num_attention_heads ", c.num_heads, " and head_dim is absent"));
  }
  CONFIG_ASSIGN_OR_RETURN(c.head_dim, r.PositiveInt("head_dim", c.hidden / c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0) {
    return r.Invalid(absl::StrCat("num_attention_heads ", c.num_heads,
                                  " is not a multiple of num_key_value_heads ", c.num_kv_heads));
  }
  if (c.head_dim % 2 != 0) return r.Invalid(absl::StrCat("head_dim ", c.head_dim, " is odd"));
  c.rope_dim = c.head_dim;
  c.rope_neox = true;
  CONFIG_ASSIGN_OR_RETURN(double eps, r.PositiveNumber("rms_norm_eps", 1e-6));
  c.rms_eps = static_cast<float>(eps);
  CONFIG_ASSIGN_OR_RETURN(c.tied_embeddings, r.Bool("tie_word_embeddings", false));
  if (absl::Status s = CheckArchitecture(r, c.context_length); !s.ok()) return s;

  const json* scaling = r.Find("rope_scaling");
  const json* parameters = r.Find("rope_parameters");
  const json* theta_from = &root;
  if (scaling == nullptr && parameters != nullptr && parameters->is_object() &&
      parameters->contains("rope_theta")) {
    theta_from = parameters;
  }
  CONFIG_ASSIGN_OR_RETURN(double theta, r.PositiveNumber(*theta_from, "rope_theta", 10000.0));
  c.rope_theta = static_cast<float>(theta);
  if (scaling == nullptr) scaling = parameters;
  if (scaling != nullptr) {
    if (absl::Status s = ParseRopeScaling(r, *scaling, c); !s.ok()) return s;
  }
  return c;
}

}  // namespace deft
