// Helpers shared by the tokenizer tests: reading the reference JSON files under
// tests/data/tokenizer and printing strings readably in failure messages.
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace deft::test {

inline nlohmann::json ReadReference(const std::string& name) {
  std::ifstream in(std::string(DEFT_TEST_DATA_DIR) + "/tokenizer/" + name);
  std::stringstream buf;
  buf << in.rdbuf();
  return nlohmann::json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
}

inline std::vector<int32_t> Ids(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

// `s` with control characters and non-ASCII bytes escaped, for failure messages.
inline std::string Printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", c);
      out += buf;
    }
  }
  return out;
}

}  // namespace deft::test
