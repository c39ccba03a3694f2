#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>

#include "base/io.h"
#include "host/registry/auth.h"

namespace cella::registry {
namespace {

TEST(RegistryAuth, ParsesBearerChallenge) {
  auto c = ParseWwwAuthenticate(
      R"(Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull")");
  ASSERT_TRUE(c.has_value()) << c.error().message;
  EXPECT_EQ(c->scheme, "bearer");
  EXPECT_EQ(c->params.at("realm"), "https://auth.docker.io/token");
  EXPECT_EQ(c->params.at("service"), "registry.docker.io");
  EXPECT_EQ(c->params.at("scope"), "repository:library/alpine:pull");

  auto spaced =
      ParseWwwAuthenticate(R"(bearer  realm="http://127.0.0.1:1/t" , error="invalid_token",x=y)");
  ASSERT_TRUE(spaced.has_value()) << spaced.error().message;
  EXPECT_EQ(spaced->params.at("realm"), "http://127.0.0.1:1/t");
  EXPECT_EQ(spaced->params.at("error"), "invalid_token");
  EXPECT_EQ(spaced->params.at("x"), "y");

  auto basic = ParseWwwAuthenticate(R"(Basic realm="Registry Realm")");
  ASSERT_TRUE(basic.has_value());
  EXPECT_EQ(basic->scheme, "basic");
  EXPECT_EQ(basic->params.at("realm"), "Registry Realm");

  auto escaped = ParseWwwAuthenticate(R"(Bearer realm="a\"b")");
  ASSERT_TRUE(escaped.has_value());
  EXPECT_EQ(escaped->params.at("realm"), "a\"b");

  for (const char* bad : {"", "Bearer realm", R"(Bearer realm="unterminated)", "Bearer a=b c=d"}) {
    EXPECT_FALSE(ParseWwwAuthenticate(bad).has_value()) << bad;
  }
}

TEST(RegistryAuth, Base64RoundTrip) {
  for (const std::string& s :
       std::vector<std::string>{"", "a", "ab", "abc", "user:pa:ss", std::string("\0\xff\x10", 3)}) {
    auto back = Base64Decode(Base64Encode(s));
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(*back, s);
  }
  EXPECT_EQ(Base64Encode("user:pass"), "dXNlcjpwYXNz");
  EXPECT_FALSE(Base64Decode("a").has_value());
  EXPECT_FALSE(Base64Decode("ab$d").has_value());
}

TEST(RegistryAuth, DockerConfigCredentials) {
  const std::string config = R"({"auths":{
      "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},
      "127.0.0.1:5000":{"auth":")" +
                             Base64Encode("alice:p:w") + R"("},
      "https://reg.example.com/v2/":{"username":"bob","password":"pw"},
      "empty.example.com":{}}})";
  auto hub = CredentialsFromDockerConfig(config, "docker.io");
  ASSERT_TRUE(hub.has_value()) << hub.error().message;
  ASSERT_TRUE(hub->has_value());
  EXPECT_EQ((*hub)->username, "hub");
  EXPECT_EQ((*hub)->password, "secret");
  auto hub_api = CredentialsFromDockerConfig(config, "registry-1.docker.io");
  ASSERT_TRUE(hub_api.has_value() && hub_api->has_value());
  EXPECT_EQ((*hub_api)->username, "hub");

  auto local = CredentialsFromDockerConfig(config, "127.0.0.1:5000");
  ASSERT_TRUE(local.has_value() && local->has_value());
  EXPECT_EQ((*local)->username, "alice");
  EXPECT_EQ((*local)->password, "p:w");  // only the first ':' separates

  auto plain = CredentialsFromDockerConfig(config, "reg.example.com");
  ASSERT_TRUE(plain.has_value() && plain->has_value());
  EXPECT_EQ((*plain)->username, "bob");

  auto other_port = CredentialsFromDockerConfig(config, "127.0.0.1:5001");
  ASSERT_TRUE(other_port.has_value());
  EXPECT_FALSE(other_port->has_value());
  auto none = CredentialsFromDockerConfig(config, "empty.example.com");
  ASSERT_TRUE(none.has_value());
  EXPECT_FALSE(none->has_value());

  EXPECT_FALSE(CredentialsFromDockerConfig("{", "x").has_value());
  EXPECT_FALSE(CredentialsFromDockerConfig(R"({"auths":[]})", "x").has_value());
  EXPECT_FALSE(
      CredentialsFromDockerConfig(R"({"auths":{"x":{"auth":"bm9jb2xvbg=="}}})", "x").has_value());
}

TEST(RegistryAuth, LoginWritesPrivateFileAndLookupPrefersIt) {
  char tmpl[] = "/tmp/cella-auth-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string home = tmpl;
  const std::string docker_config = home + "/docker.json";
  ASSERT_TRUE(WriteStringToFile(docker_config,
                                R"({"auths":{"127.0.0.1:5000":{"auth":")" +
                                    Base64Encode("docker:1") + R"("},"other:1":{"auth":")" +
                                    Base64Encode("o:2") + R"("}}})",
                                0600));

  auto before = LookupCredentials(home, "127.0.0.1:5000", docker_config);
  ASSERT_TRUE(before.has_value() && before->has_value()) << (before ? "" : before.error().message);
  EXPECT_EQ((*before)->username, "docker");

  ASSERT_TRUE(Login(home, "127.0.0.1:5000", "cella-user", "pw1"));
  ASSERT_TRUE(Login(home, "127.0.0.1:5000", "cella-user", "pw2"));  // replaces
  struct stat st {};
  ASSERT_EQ(::stat(CellaCredentialsPath(home).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  auto after = LookupCredentials(home, "127.0.0.1:5000", docker_config);
  ASSERT_TRUE(after.has_value() && after->has_value());
  EXPECT_EQ((*after)->username, "cella-user");
  EXPECT_EQ((*after)->password, "pw2");
  auto fallback = LookupCredentials(home, "other:1", docker_config);
  ASSERT_TRUE(fallback.has_value() && fallback->has_value());
  EXPECT_EQ((*fallback)->username, "o");

  ASSERT_TRUE(Logout(home, "127.0.0.1:5000"));
  auto logged_out = LookupCredentials(home, "127.0.0.1:5000", docker_config);
  ASSERT_TRUE(logged_out.has_value() && logged_out->has_value());
  EXPECT_EQ((*logged_out)->username, "docker");

  EXPECT_FALSE(Login(home, "h", "a:b", "x").has_value());
  std::filesystem::remove_all(home);
}

}  // namespace
}  // namespace cella::registry
