// ApiKeys: parsing of the key file (each error names its line), bearer authentication (each
// error path's exact code and message), read-only keys and quotas.
#include "server/auth.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

namespace deft {
namespace {

constexpr char kAliceSecret[] = "alice-secret-0123456789";
constexpr char kBobSecret[] = "bob-secret-abcdefghijkl";

constexpr char kKeyFile[] =
    "# deft-serve API keys\n"
    "\n"
    "alice alice-secret-0123456789 trees=2 nodes=100 kv_blocks=50  # quotas\n"
    "  bob\tbob-secret-abcdefghijkl readonly\n";

ApiKeys MustParse(std::string_view text) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse(text, "keys.txt");
  EXPECT_TRUE(keys.ok()) << keys.status();
  return keys.ok() ? *std::move(keys) : ApiKeys();
}

std::string ParseError(std::string_view text) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse(text, "keys.txt");
  if (keys.ok()) return "OK";
  EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument) << keys.status();
  return std::string(keys.status().message());
}

grpc::Status Auth(const ApiKeys& keys, const std::multimap<grpc::string_ref, grpc::string_ref>& md,
                  const ApiKey** key) {
  return keys.Authenticate(md, key);
}

void ExpectStatus(const grpc::Status& s, grpc::StatusCode code, const std::string& message) {
  EXPECT_EQ(s.error_code(), code) << s.error_message();
  EXPECT_EQ(s.error_message(), message);
}

TEST(ApiKeysParseTest, ParsesKeysQuotasFlagsAndComments) {
  const ApiKeys keys = MustParse(kKeyFile);
  ASSERT_EQ(keys.keys().size(), 2u);
  const ApiKey* alice = keys.Find("alice");
  ASSERT_NE(alice, nullptr);
  EXPECT_EQ(alice->secret, kAliceSecret);
  EXPECT_EQ(alice->max_trees, 2);
  EXPECT_EQ(alice->max_nodes, 100);
  EXPECT_EQ(alice->max_kv_blocks, 50);
  EXPECT_FALSE(alice->readonly);
  const ApiKey* bob = keys.Find("bob");
  ASSERT_NE(bob, nullptr);
  EXPECT_EQ(bob->secret, kBobSecret);
  EXPECT_FALSE(bob->max_trees.has_value());
  EXPECT_FALSE(bob->max_nodes.has_value());
  EXPECT_FALSE(bob->max_kv_blocks.has_value());
  EXPECT_TRUE(bob->readonly);
  EXPECT_EQ(keys.Find("carol"), nullptr);
}

TEST(ApiKeysParseTest, EachMalformedLineIsNamed) {
  EXPECT_EQ(ParseError("# only comments\n\n   \n"), "keys.txt: no API keys");
  EXPECT_EQ(ParseError(""), "keys.txt: no API keys");
  EXPECT_EQ(ParseError("# c\nalice\n"), "keys.txt:2: expected \"<key-id> <secret> [options]\"");
  EXPECT_EQ(ParseError("al/ice alice-secret-0123456789\n"),
            "keys.txt:1: invalid key id \"al/ice\" (allowed: A-Z a-z 0-9 _ . -)");
  EXPECT_EQ(ParseError("alice short\n"),
            "keys.txt:1: secret of key \"alice\" is shorter than 16 characters");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789\xc3\xa9\n"),
            "keys.txt:1: secret has characters other than printable non-space ASCII");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789 tree=2\n"),
            "keys.txt:1: unknown option \"tree=2\" (expected trees=N, nodes=N, kv_blocks=N or "
            "readonly)");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789 trees\n"),
            "keys.txt:1: option \"trees\" needs a value: trees=N");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789 nodes=-1\n"),
            "keys.txt:1: option \"nodes\": \"-1\" is not a non-negative integer");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789 kv_blocks=12x\n"),
            "keys.txt:1: option \"kv_blocks\": \"12x\" is not a non-negative integer");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789 trees=99999999999999999999\n"),
            "keys.txt:1: option \"trees\": \"99999999999999999999\" is not a non-negative "
            "integer");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789 trees=1 trees=2\n"),
            "keys.txt:1: option \"trees\" given twice");
  EXPECT_EQ(ParseError("alice alice-secret-0123456789 readonly readonly\n"),
            "keys.txt:1: option \"readonly\" given twice");
}

TEST(ApiKeysParseTest, DuplicateIdsAndSecretsNameBothLinesNotTheSecret) {
  EXPECT_EQ(ParseError("alice alice-secret-0123456789\n# x\nalice other-secret-0123456789\n"),
            "keys.txt:3: duplicate key id \"alice\" (first on line 1)");
  const std::string message =
      ParseError("alice alice-secret-0123456789\nbob alice-secret-0123456789\n");
  EXPECT_EQ(message, "keys.txt:2: key \"bob\" reuses the secret of line 1");
}

TEST(ApiKeysParseTest, LoadFileReadsTheFileAndNamesItInErrors) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path();
  const std::string good = (dir / ("deft_keys_good_" + std::to_string(getpid()))).string();
  const std::string bad = (dir / ("deft_keys_bad_" + std::to_string(getpid()))).string();
  std::ofstream(good) << kKeyFile;
  std::ofstream(bad) << "alice\n";
  absl::StatusOr<ApiKeys> keys = ApiKeys::LoadFile(good);
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(keys->keys().size(), 2u);
  absl::StatusOr<ApiKeys> broken = ApiKeys::LoadFile(bad);
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(broken.status().message(), bad + ":1: expected \"<key-id> <secret> [options]\"");
  std::filesystem::remove(good);
  std::filesystem::remove(bad);
  absl::StatusOr<ApiKeys> missing = ApiKeys::LoadFile(good);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(missing.status().message(), "cannot read API key file " + good);
}

TEST(ApiKeysAuthTest, BearerSecretYieldsItsKey) {
  const ApiKeys keys = MustParse(kKeyFile);
  const std::string alice = std::string("Bearer ") + kAliceSecret;
  const std::string bob = std::string("bearer ") + kBobSecret;  // scheme is case-insensitive
  const ApiKey* key = nullptr;
  ASSERT_TRUE(Auth(keys, {{"authorization", alice}, {"x-other", "1"}}, &key).ok());
  ASSERT_NE(key, nullptr);
  EXPECT_EQ(key->id, "alice");
  ASSERT_TRUE(Auth(keys, {{"authorization", bob}}, &key).ok());
  EXPECT_EQ(key->id, "bob");
}

TEST(ApiKeysAuthTest, EachRejectionIsUnauthenticatedWithItsMessage) {
  const ApiKeys keys = MustParse(kKeyFile);
  const ApiKey* key = nullptr;
  const std::string alice = std::string("Bearer ") + kAliceSecret;
  ExpectStatus(Auth(keys, {{"x-other", "1"}}, &key), grpc::StatusCode::UNAUTHENTICATED,
               "missing authorization metadata (expected \"authorization: Bearer <api key>\")");
  ExpectStatus(Auth(keys, {{"authorization", alice}, {"authorization", alice}}, &key),
               grpc::StatusCode::UNAUTHENTICATED, "more than one authorization metadata entry");
  const std::string malformed = "malformed authorization metadata (expected \"Bearer <api key>\")";
  for (const std::string& value :
       {std::string("Basic ") + kAliceSecret, std::string(kAliceSecret), std::string("Bearer"),
        std::string("Bearer    "), std::string("Bearer") + kAliceSecret, std::string("")}) {
    SCOPED_TRACE(value);
    ExpectStatus(Auth(keys, {{"authorization", value}}, &key), grpc::StatusCode::UNAUTHENTICATED,
                 malformed);
  }
  const std::string unknown[] = {
      "Bearer not-a-known-secret-at-all", std::string("Bearer ") + kAliceSecret + "x",
      std::string("Bearer ") + std::string(kAliceSecret).substr(0, 20),  // a prefix
      "Bearer alice"};                                                   // the id, not the secret
  for (const std::string& value : unknown) {
    SCOPED_TRACE(value);
    ExpectStatus(Auth(keys, {{"authorization", value}}, &key), grpc::StatusCode::UNAUTHENTICATED,
                 "invalid API key");
  }
  EXPECT_EQ(key, nullptr);  // never set on failure
}

TEST(ApiKeysAuthTest, SecretEqualsComparesWholeStrings) {
  EXPECT_TRUE(SecretEquals("abcdefgh", "abcdefgh"));
  EXPECT_FALSE(SecretEquals("abcdefgX", "abcdefgh"));
  EXPECT_FALSE(SecretEquals("Xbcdefgh", "abcdefgh"));
  EXPECT_FALSE(SecretEquals("abcd", "abcdabcd"));  // cycled bytes match, length differs
  EXPECT_FALSE(SecretEquals("abcdabcd", "abcd"));
  EXPECT_FALSE(SecretEquals("", "abcd"));
}

TEST(ApiKeysPermissionTest, ReadonlyKeyMayNotMutate) {
  const ApiKeys keys = MustParse(kKeyFile);
  EXPECT_TRUE(ApiKeys::CheckMayMutate(*keys.Find("alice"), "Fork").ok());
  ExpectStatus(ApiKeys::CheckMayMutate(*keys.Find("bob"), "Fork"),
               grpc::StatusCode::PERMISSION_DENIED,
               "API key \"bob\" is read-only and may not call Fork");
}

TEST(ApiKeysQuotaTest, TreeQuotaAllowsUpToItsLimit) {
  const ApiKeys keys = MustParse(kKeyFile);
  const ApiKey& alice = *keys.Find("alice");
  EXPECT_TRUE(ApiKeys::CheckTreeQuota(alice, 0).ok());
  EXPECT_TRUE(ApiKeys::CheckTreeQuota(alice, 1).ok());
  ExpectStatus(ApiKeys::CheckTreeQuota(alice, 2), grpc::StatusCode::RESOURCE_EXHAUSTED,
               "API key \"alice\" is at its trees quota (2 of 2)");
  EXPECT_TRUE(ApiKeys::CheckTreeQuota(*keys.Find("bob"), 1000000).ok());  // unlimited
}

TEST(ApiKeysQuotaTest, NodeAndKvBlockQuotasCountTheAddition) {
  const ApiKeys keys = MustParse(kKeyFile);
  const ApiKey& alice = *keys.Find("alice");
  EXPECT_TRUE(ApiKeys::CheckNodeQuota(alice, 90, 10).ok());
  ExpectStatus(ApiKeys::CheckNodeQuota(alice, 90, 11), grpc::StatusCode::RESOURCE_EXHAUSTED,
               "API key \"alice\" would exceed its nodes quota (90 + 11 > 100)");
  EXPECT_TRUE(ApiKeys::CheckKvBlockQuota(alice, 0, 50).ok());
  ExpectStatus(ApiKeys::CheckKvBlockQuota(alice, 49, 2), grpc::StatusCode::RESOURCE_EXHAUSTED,
               "API key \"alice\" would exceed its kv_blocks quota (49 + 2 > 50)");
  // A huge addition must not overflow into a pass.
  EXPECT_EQ(ApiKeys::CheckNodeQuota(alice, 90, INT64_MAX).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  const ApiKey& bob = *keys.Find("bob");
  EXPECT_TRUE(ApiKeys::CheckNodeQuota(bob, 1 << 30, 1 << 30).ok());
  EXPECT_TRUE(ApiKeys::CheckKvBlockQuota(bob, 1 << 30, 1 << 30).ok());
}

TEST(ApiKeysQuotaTest, ZeroQuotaAllowsNothing) {
  const ApiKeys keys = MustParse("z zero-quota-key-000000 trees=0 nodes=0 kv_blocks=0\n");
  const ApiKey& z = *keys.Find("z");
  EXPECT_EQ(ApiKeys::CheckTreeQuota(z, 0).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ApiKeys::CheckNodeQuota(z, 0, 1).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ApiKeys::CheckKvBlockQuota(z, 0, 1).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(ApiKeys::CheckNodeQuota(z, 0, 0).ok());
}

}  // namespace
}  // namespace deft
