#include <gtest/gtest.h>

#include "host/registry/manifest.h"

namespace cella::registry {
namespace {

std::string D(char c) { return "sha256:" + std::string(64, c); }

std::string DockerManifest() {
  return R"({"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
    "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7,"digest":")" +
         D('c') + R"("},
    "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":10,"digest":")" +
         D('1') + R"("},
              {"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","size":20,"digest":")" +
         D('2') + R"("}]})";
}

std::string Index() {
  auto entry = [](const char* arch, const char* variant, char d) {
    std::string v = variant ? std::string(R"(,"variant":")") + variant + "\"" : "";
    return std::string(
               R"({"mediaType":"application/vnd.oci.image.manifest.v1+json","size":100,"digest":")") +
           D(d) + R"(","platform":{"os":"linux","architecture":")" + arch + "\"" + v + "}}";
  };
  return R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[)" +
         entry("arm", "v7", 'a') + "," + entry("arm64", nullptr, 'b') + "," +
         entry("amd64", nullptr, 'd') +
         R"(,{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":5,"digest":")" +
         D('e') + R"(","platform":{"os":"unknown","architecture":"unknown"}}]})";
}

TEST(RegistryManifest, ParsesDockerSchema2) {
  auto m = ParseManifest(DockerManifest(), "application/vnd.docker.distribution.manifest.v2+json");
  ASSERT_TRUE(m.has_value()) << m.error().message;
  ASSERT_EQ(m->kind, ManifestKind::kImage);
  EXPECT_EQ(m->image.config.digest, D('c'));
  EXPECT_EQ(m->image.config.size, 7);
  ASSERT_EQ(m->image.layers.size(), 2u);
  EXPECT_EQ(m->image.layers[0].digest, D('1'));
  EXPECT_EQ(m->image.layers[1].media_type, media::kOciLayerZstd);
}

TEST(RegistryManifest, OciManifestWithoutMediaTypeUsesContentType) {
  std::string body =
      R"({"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json",
     "size":1,"digest":")" +
      D('c') + R"("},"layers":[]})";
  auto m = ParseManifest(body, "application/vnd.oci.image.manifest.v1+json; charset=utf-8");
  ASSERT_TRUE(m.has_value()) << m.error().message;
  EXPECT_EQ(m->image.media_type, media::kOciManifest);
  EXPECT_TRUE(m->image.layers.empty());
}

TEST(RegistryManifest, RefusesBadInputWithReason) {
  struct Bad {
    std::string body;
    const char* reason;
  };
  std::string good = DockerManifest();
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  const Bad bad[] = {
      {"", "not valid JSON"},
      {"[1,2]", "not a JSON object"},
      {"{\"schemaVersion\":1}", "schemaVersion"},
      {replace("\"size\":7", "\"size\":-7"), "negative"},
      {replace("\"size\":7", "\"size\":\"7\""), "integer"},
      {replace("\"size\":7", "\"size\":7.5"), "integer"},
      {replace(D('c'), "sha256:zz"), "64"},
      {replace("rootfs.diff.tar.gzip", "rootfs.diff.tar.foo"), "unsupported layer media type"},
      {replace("\"layers\":[", "\"layers\":{\"x\":[") + "}", "layers"},
      {replace("manifest.v2+json\"", "manifest.v9+json\""), "unsupported media type"},
      {R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":{}})",
       "must be an array"},
      {R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[7]})",
       "not an object"},
  };
  for (const Bad& b : bad) {
    auto m = ParseManifest(b.body);
    ASSERT_FALSE(m.has_value()) << "accepted: " << b.body;
    EXPECT_NE(m.error().message.find(b.reason), std::string::npos)
        << b.body << " -> " << m.error().message;
  }
  auto contradict = ParseManifest(good, "application/vnd.oci.image.index.v1+json");
  ASSERT_FALSE(contradict.has_value());
  EXPECT_NE(contradict.error().message.find("contradicts"), std::string::npos);
}

TEST(RegistryManifest, PlatformSelection) {
  auto m = ParseManifest(Index(), "");
  ASSERT_TRUE(m.has_value()) << m.error().message;
  ASSERT_EQ(m->kind, ManifestKind::kIndex);
  ASSERT_EQ(m->index.manifests.size(), 4u);

  auto amd64 = SelectPlatform(m->index, Platform{});
  ASSERT_TRUE(amd64.has_value()) << amd64.error().message;
  EXPECT_EQ(amd64->digest, D('d'));

  auto arm64v8 = SelectPlatform(m->index, *ParsePlatform("linux/arm64/v8"));
  ASSERT_TRUE(arm64v8.has_value()) << arm64v8.error().message;
  EXPECT_EQ(arm64v8->digest, D('b'));

  auto armv7 = SelectPlatform(m->index, *ParsePlatform("linux/arm/v7"));
  ASSERT_TRUE(armv7.has_value());
  EXPECT_EQ(armv7->digest, D('a'));

  auto armv6 = SelectPlatform(m->index, *ParsePlatform("linux/arm/v6"));
  ASSERT_FALSE(armv6.has_value());
  EXPECT_NE(armv6.error().message.find("linux/arm/v6"), std::string::npos);
  EXPECT_NE(armv6.error().message.find("linux/arm/v7, linux/arm64, linux/amd64"), std::string::npos)
      << armv6.error().message;
  EXPECT_EQ(armv6.error().message.find("unknown"),
            std::string::npos);  // attestations are not platforms

  EXPECT_FALSE(ParsePlatform("linux").has_value());
  EXPECT_FALSE(ParsePlatform("linux//v7").has_value());
  EXPECT_FALSE(ParsePlatform("a/b/c/d").has_value());
}

TEST(RegistryManifest, ParsesImageConfig) {
  auto c =
      ParseImageConfig(R"({"architecture":"amd64","os":"linux","created":"2024-01-02T03:04:05Z",
    "config":{"Entrypoint":["/docker-entrypoint.sh"],"Cmd":["nginx","-g","daemon off;"],
      "Env":["PATH=/usr/bin","A=b=c"],"WorkingDir":"/srv","User":"101:101",
      "ExposedPorts":{"80/tcp":{},"443/tcp":{}},"Labels":{"maintainer":"x"}},
    "rootfs":{"type":"layers","diff_ids":[")" +
                       D('1') + R"("]}})");
  ASSERT_TRUE(c.has_value()) << c.error().message;
  EXPECT_EQ(c->os, "linux");
  EXPECT_EQ(c->architecture, "amd64");
  EXPECT_EQ(c->created, "2024-01-02T03:04:05Z");
  EXPECT_EQ(c->EffectiveCommand(),
            (std::vector<std::string>{"/docker-entrypoint.sh", "nginx", "-g", "daemon off;"}));
  EXPECT_EQ(c->env, (std::vector<std::string>{"PATH=/usr/bin", "A=b=c"}));
  EXPECT_EQ(c->working_dir, "/srv");
  EXPECT_EQ(c->user, "101:101");
  EXPECT_EQ(c->exposed_ports, (std::vector<std::string>{"443/tcp", "80/tcp"}));
  EXPECT_EQ(c->labels.at("maintainer"), "x");
  EXPECT_EQ(c->diff_ids, (std::vector<std::string>{D('1')}));
  EXPECT_FALSE(c->IsSystemdInit());

  // Null fields are absent fields (docker writes "Cmd": null).
  auto nulls = ParseImageConfig(R"({"config":{"Cmd":null,"Entrypoint":null,"Env":null}})");
  ASSERT_TRUE(nulls.has_value()) << nulls.error().message;
  EXPECT_TRUE(nulls->EffectiveCommand().empty());

  for (const char* bad : {R"({"config":{"Cmd":"sh"}})", R"({"config":{"Env":[1]}})",
                          R"({"config":{"Labels":{"a":1}}})", R"({"config":[]})",
                          R"({"rootfs":{"diff_ids":["md5:x"]}})", "{", "null"}) {
    EXPECT_FALSE(ParseImageConfig(bad).has_value()) << bad;
  }
}

TEST(RegistryManifest, SystemdInitDetection) {
  for (const char* init : {"/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd"}) {
    auto c = ParseImageConfig(std::string(R"({"config":{"Cmd":[")") + init +
                              R"(","--log-level=info"]}})");
    ASSERT_TRUE(c.has_value());
    EXPECT_TRUE(c->IsSystemdInit()) << init;
  }
  auto entry =
      ParseImageConfig(R"({"config":{"Entrypoint":["/lib/systemd/systemd"],"Cmd":["x"]}})");
  ASSERT_TRUE(entry.has_value());
  EXPECT_TRUE(entry->IsSystemdInit());
  auto shell = ParseImageConfig(R"({"config":{"Entrypoint":["/bin/sh"],"Cmd":["/sbin/init"]}})");
  ASSERT_TRUE(shell.has_value());
  EXPECT_FALSE(shell->IsSystemdInit());
}

}  // namespace
}  // namespace cella::registry
