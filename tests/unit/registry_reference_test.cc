#include <gtest/gtest.h>

#include "host/registry/reference.h"

namespace cella::registry {
namespace {

const std::string kHex = std::string(64, 'a');

struct Case {
  const char* input;
  const char* normalised;
  const char* api_host;
};

TEST(RegistryReference, NormalisesLikeDocker) {
  const Case cases[] = {
      {"alpine", "docker.io/library/alpine:latest", "registry-1.docker.io"},
      {"alpine:3.19", "docker.io/library/alpine:3.19", "registry-1.docker.io"},
      {"library/alpine", "docker.io/library/alpine:latest", "registry-1.docker.io"},
      {"user/app", "docker.io/user/app:latest", "registry-1.docker.io"},
      {"docker.io/alpine", "docker.io/library/alpine:latest", "registry-1.docker.io"},
      {"index.docker.io/library/alpine:1", "docker.io/library/alpine:1", "registry-1.docker.io"},
      {"ghcr.io/org/team/app:v1.2-rc_3", "ghcr.io/org/team/app:v1.2-rc_3", "ghcr.io"},
      {"localhost/app", "localhost/app:latest", "localhost"},
      {"localhost:5000/app:x", "localhost:5000/app:x", "localhost:5000"},
      {"127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest", "127.0.0.1:5000"},
      {"[::1]:5000/app", "[::1]:5000/app:latest", "[::1]:5000"},
      {"Registry.Example.COM/app", "Registry.Example.COM/app:latest", "Registry.Example.COM"},
      {"a__b/c-d---e.f", "docker.io/a__b/c-d---e.f:latest", "registry-1.docker.io"},
  };
  for (const Case& c : cases) {
    auto ref = ParseReference(c.input);
    ASSERT_TRUE(ref.has_value()) << c.input << ": " << ref.error().message;
    EXPECT_EQ(ref->String(), c.normalised) << c.input;
    EXPECT_EQ(ref->ApiHost(), c.api_host) << c.input;
  }
}

TEST(RegistryReference, DigestReferences) {
  auto ref = ParseReference("alpine@sha256:" + kHex);
  ASSERT_TRUE(ref.has_value()) << ref.error().message;
  EXPECT_EQ(ref->digest, "sha256:" + kHex);
  EXPECT_EQ(ref->tag, "");
  EXPECT_EQ(ref->String(), "docker.io/library/alpine@sha256:" + kHex);
  EXPECT_EQ(ref->ManifestSelector(), "sha256:" + kHex);

  auto both = ParseReference("127.0.0.1:5000/app:v1@sha256:" + kHex);
  ASSERT_TRUE(both.has_value()) << both.error().message;
  EXPECT_EQ(both->domain, "127.0.0.1:5000");
  EXPECT_EQ(both->tag, "v1");
  EXPECT_EQ(both->ManifestSelector(), "sha256:" + kHex);  // the digest wins
}

TEST(RegistryReference, RefusesInvalidFormsWithReason) {
  struct Bad {
    std::string input;
    const char* reason;
  };
  const Bad bad[] = {
      {"", "empty"},
      {"Alpine", "lowercase"},
      {"docker.io/Library/alpine", "lowercase"},
      {"alpine:", "invalid tag"},
      {"alpine:-x", "invalid tag"},
      {"alpine:" + std::string(129, 'a'), "invalid tag"},
      {"alpine@sha256:abc", "64"},
      {"alpine@sha256:" + std::string(64, 'A'), "64"},
      {"alpine@md5:" + kHex, "unsupported digest algorithm"},
      {"a b", "whitespace"},
      {"-app", "invalid repository name component"},
      {"app-", "invalid repository name component"},
      {"a//b", "invalid repository name component"},
      {"a...b", "invalid repository name component"},
      {"host:port/app", "invalid registry host"},
      {"host:5000/", "missing repository"},
      {":tag", "missing repository"},
  };
  for (const Bad& b : bad) {
    auto ref = ParseReference(b.input);
    ASSERT_FALSE(ref.has_value()) << "accepted: " << b.input;
    EXPECT_NE(ref.error().message.find(b.reason), std::string::npos)
        << b.input << " -> " << ref.error().message;
  }
}

TEST(RegistryReference, LoopbackHosts) {
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1:5000"));
  EXPECT_TRUE(IsLoopbackHost("127.1.2.3"));
  EXPECT_TRUE(IsLoopbackHost("localhost:80"));
  EXPECT_TRUE(IsLoopbackHost("LOCALHOST"));
  EXPECT_TRUE(IsLoopbackHost("[::1]:5000"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_FALSE(IsLoopbackHost("128.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("localhost.example.com"));
  EXPECT_FALSE(IsLoopbackHost("registry-1.docker.io"));
  EXPECT_FALSE(IsLoopbackHost("[::2]:5000"));
}

}  // namespace
}  // namespace cella::registry

// `cella run @builtin` names the built-in image: no registry reference may
// ever parse to that name, with or without a tag.
TEST(RegistryReference, TheBuiltinImageNameIsNeverAReference) {
  for (const char* text : {"@builtin", "@builtin:latest", "@builtin/x"})
    EXPECT_FALSE(cella::registry::ParseReference(text)) << text;
}
