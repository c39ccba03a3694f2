// Registry client against an in-test HTTP server on 127.0.0.1 (bearer and
// basic auth, redirects, Range resume, hostile content).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include "host/registry/image_store.h"
#include "registry_test_server.h"
#include "registry_test_support.h"

namespace cella::registry {
namespace {

using testing::HttpReply;
using testing::HttpRequest;
using testing::LayerWithFile;
using testing::MakeImage;
using testing::Sha;
using testing::TempDir;
using testing::TestHttpServer;

struct RecordingProgress : ProgressSink {
  int started = 0, fetched = 0, present = 0;
  int64_t last_done = 0;
  void BlobStarted(std::string_view, int64_t, int64_t) override { ++started; }
  void BlobProgress(std::string_view, int64_t done, int64_t) override { last_done = done; }
  void BlobFinished(std::string_view, BlobOutcome o) override {
    (o == BlobOutcome::kFetched ? fetched : present)++;
  }
};

// Serves /v2/<repo>/manifests/<ref> and /v2/<repo>/blobs/<digest>.
struct FakeRegistry {
  std::map<std::string, std::pair<std::string, std::string>> manifests;  // ref -> (type, body)
  std::map<std::string, std::string> blobs;                              // digest -> bytes
  std::map<std::string, std::string> served_instead;                     // digest -> wrong bytes
  std::string truncate_once;  // digest whose first full GET is cut short
  enum class Auth { kNone, kBearer, kBasic } auth = Auth::kNone;
  std::string basic = "Basic " + Base64Encode("alice:pw");
  bool redirect_blobs = false;
  int port = 0;

  void Add(const testing::TestImage& img, const std::string& tag) {
    manifests[tag] = {std::string(media::kOciManifest), img.manifest};
    manifests[img.manifest_digest()] = manifests[tag];
    for (const auto& [d, b] : img.Blobs()) blobs[d] = b;
  }

  HttpReply Handle(const HttpRequest& req) {
    const std::string self = "http://127.0.0.1:" + std::to_string(port);
    if (req.path.starts_with("/token")) {
      if (req.Header("authorization") != basic) return {401, {}, "{}"};
      return {200, {{"Content-Type", "application/json"}}, R"({"token":"tok-1","expires_in":300})"};
    }
    if (req.path.starts_with("/storage/")) {
      return ServeBlob(req, req.path.substr(9));
    }
    if (auth == Auth::kBearer && req.Header("authorization") != "Bearer tok-1") {
      return {401,
              {{"WWW-Authenticate", "Bearer realm=\"" + self + "/token\",service=\"fake\""}},
              R"({"errors":[{"code":"UNAUTHORIZED","message":"auth required"}]})"};
    }
    if (auth == Auth::kBasic && req.Header("authorization") != basic) {
      return {401, {{"WWW-Authenticate", "Basic realm=\"fake\""}}, ""};
    }
    size_t m = req.path.find("/manifests/");
    if (m != std::string::npos) {
      auto it = manifests.find(req.path.substr(m + 11));
      if (it == manifests.end())
        return {404, {}, R"({"errors":[{"code":"MANIFEST_UNKNOWN","message":"nope"}]})"};
      return {
          200,
          {{"Content-Type", it->second.first}, {"Docker-Content-Digest", Sha(it->second.second)}},
          it->second.second};
    }
    size_t b = req.path.find("/blobs/");
    if (b != std::string::npos) {
      std::string digest = req.path.substr(b + 7);
      if (redirect_blobs)
        return {307,
                {{"Location", "http://localhost:" + std::to_string(port) + "/storage/" + digest}},
                ""};
      return ServeBlob(req, digest);
    }
    return {404, {}, ""};
  }

  HttpReply ServeBlob(const HttpRequest& req, const std::string& digest) {
    auto it = blobs.find(digest);
    if (it == blobs.end()) return {404, {}, ""};
    std::string bytes = served_instead.contains(digest) ? served_instead[digest] : it->second;
    std::string range = req.Header("range");
    if (range.starts_with("bytes=")) {
      size_t from = std::stoul(range.substr(6));
      return {206,
              {{"Content-Range", "bytes " + std::to_string(from) + "-" +
                                     std::to_string(bytes.size() - 1) + "/" +
                                     std::to_string(bytes.size())}},
              bytes.substr(from)};
    }
    HttpReply r{200, {{"Content-Type", "application/octet-stream"}}, bytes};
    if (digest == truncate_once) {
      truncate_once.clear();
      r.truncate_at = bytes.size() * 2 / 5;
    }
    return r;
  }
};

class RegistryHttpTest : public ::testing::Test {
 protected:
  void SetUp() override { fake.port = server.port(); }

  ImageStore OpenStore(bool with_credentials) {
    StoreOptions options;
    options.client.connect_timeout = std::chrono::seconds(5);
    options.client.stall_timeout = std::chrono::seconds(10);
    options.client.credentials =
        [with_credentials](std::string_view) -> Result<std::optional<Credentials>> {
      if (!with_credentials) return std::optional<Credentials>();
      return std::optional<Credentials>(Credentials{"alice", "pw"});
    };
    auto s = ImageStore::Open(home.path(), options);
    EXPECT_TRUE(s.has_value()) << s.error().message;
    return std::move(*s);
  }
  Reference Ref(const std::string& rest) { return *ParseReference(server.host() + "/" + rest); }

  TempDir home, work;
  FakeRegistry fake;
  TestHttpServer server{[this](const HttpRequest& r) { return fake.Handle(r); }};
};

TEST_F(RegistryHttpTest, BearerTokenFlowAndCrossHostRedirectDropsAuthorization) {
  auto img = MakeImage({LayerWithFile(work, "a", "1"), LayerWithFile(work, "b", "2")});
  fake.Add(img, "v1");
  fake.auth = FakeRegistry::Auth::kBearer;
  fake.redirect_blobs = true;
  ImageStore store = OpenStore(true);
  RecordingProgress progress;
  auto r = store.Pull(Ref("team/app:v1"), {}, &progress);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->reference, server.host() + "/team/app:v1");
  EXPECT_EQ(r->manifest_digest, img.manifest_digest());
  EXPECT_EQ(progress.fetched, 3);  // config + 2 layers
  for (const auto& l : img.layers) EXPECT_TRUE(*store.blobs().Has(Sha(l), l.size()));

  int token_requests = 0, storage_requests = 0;
  for (const HttpRequest& req : server.requests()) {
    if (req.path.starts_with("/token")) {
      ++token_requests;
      EXPECT_EQ(req.Header("authorization"), fake.basic);
      EXPECT_NE(req.path.find("service=fake"), std::string::npos) << req.path;
      EXPECT_NE(req.path.find("scope=repository%3Ateam%2Fapp%3Apull"), std::string::npos)
          << req.path;
    } else if (req.path.starts_with("/storage/")) {
      ++storage_requests;
      EXPECT_EQ(req.Header("authorization"), "") << "Authorization leaked to another host";
      EXPECT_EQ(req.Header("host"), "localhost:" + std::to_string(server.port()));
    } else if (req.path.find("/manifests/") != std::string::npos) {
      EXPECT_NE(req.Header("accept").find(media::kDockerManifest), std::string::npos);
      EXPECT_NE(req.Header("accept").find(media::kOciIndex), std::string::npos);
    }
  }
  EXPECT_EQ(token_requests, 1);  // cached for the scope
  EXPECT_EQ(storage_requests, 3);

  // A second pull finds everything stored.
  RecordingProgress again;
  ASSERT_TRUE(store.Pull(Ref("team/app:v1"), {}, &again).has_value());
  EXPECT_EQ(again.present, 3);
  EXPECT_EQ(again.fetched, 0);
}

TEST_F(RegistryHttpTest, BearerWithoutCredentialsSaysToLogin) {
  fake.Add(MakeImage({LayerWithFile(work, "a", "1")}), "v1");
  fake.auth = FakeRegistry::Auth::kBearer;
  ImageStore store = OpenStore(false);
  auto r = store.Pull(Ref("app:v1"));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("cella login"), std::string::npos) << r.error().message;
}

TEST_F(RegistryHttpTest, BasicAuth) {
  fake.Add(MakeImage({LayerWithFile(work, "a", "1")}), "v1");
  fake.auth = FakeRegistry::Auth::kBasic;
  {
    ImageStore anonymous = OpenStore(false);
    auto r = anonymous.Pull(Ref("app:v1"));
    ASSERT_FALSE(r.has_value());
    EXPECT_NE(r.error().message.find("cella login"), std::string::npos) << r.error().message;
  }
  ImageStore store = OpenStore(true);
  auto r = store.Pull(Ref("app:v1"));
  ASSERT_TRUE(r.has_value()) << r.error().message;
}

TEST_F(RegistryHttpTest, IndexPlatformSelection) {
  auto amd = MakeImage({LayerWithFile(work, "amd", "x")}, "amd64");
  auto arm = MakeImage({LayerWithFile(work, "arm", "y")}, "arm64");
  fake.Add(amd, "amd-only");
  fake.Add(arm, "arm-only");
  auto entry = [](const testing::TestImage& img, const char* arch) {
    std::string d = testing::DescriptorJson(media::kOciManifest, img.manifest);
    d.pop_back();
    return d + R"(,"platform":{"os":"linux","architecture":")" + arch + "\"}}";
  };
  fake.manifests["multi"] = {
      std::string(media::kOciIndex),
      R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[)" +
          entry(arm, "arm64") + "," + entry(amd, "amd64") + "]}"};
  ImageStore store = OpenStore(false);
  auto def = store.Pull(Ref("app:multi"));
  ASSERT_TRUE(def.has_value()) << def.error().message;
  EXPECT_EQ(def->manifest_digest, amd.manifest_digest());
  EXPECT_EQ(def->platform.architecture, "amd64");
  auto a64 = store.Pull(Ref("app:multi"), *ParsePlatform("linux/arm64"));
  ASSERT_TRUE(a64.has_value()) << a64.error().message;
  EXPECT_EQ(a64->manifest_digest, arm.manifest_digest());
  auto none = store.Pull(Ref("app:multi"), *ParsePlatform("linux/s390x"));
  ASSERT_FALSE(none.has_value());
  EXPECT_NE(none.error().message.find("available: linux/arm64, linux/amd64"), std::string::npos)
      << none.error().message;
}

TEST_F(RegistryHttpTest, InterruptedBlobResumesWithRange) {
  std::string big = rootfs::testing::TarBuilder::Pattern(3, 300000);
  auto img = MakeImage({big});  // not a real tar: the store keeps layers as fetched
  fake.Add(img, "v1");
  fake.truncate_once = Sha(big);
  ImageStore store = OpenStore(false);
  auto first = store.Pull(Ref("app:v1"));
  ASSERT_FALSE(first.has_value());
  std::string partial = store.blobs().PathFor(Sha(big)) + ".partial";
  struct stat st {};
  ASSERT_EQ(::stat(partial.c_str(), &st), 0) << "the partial download must be kept";
  ASSERT_GT(st.st_size, 0);
  ASSERT_LT(st.st_size, static_cast<off_t>(big.size()));

  auto second = store.Pull(Ref("app:v1"));
  ASSERT_TRUE(second.has_value()) << second.error().message;
  EXPECT_EQ(testing::ReadAll(store.blobs().PathFor(Sha(big))), big);
  int ranged = 0;
  for (const auto& req : server.requests()) {
    if (!req.Header("range").empty()) {
      ++ranged;
      EXPECT_EQ(req.Header("range"), "bytes=" + std::to_string(st.st_size) + "-");
    }
  }
  EXPECT_EQ(ranged, 1);
}

TEST_F(RegistryHttpTest, DigestMismatchRefusedAndNothingStored) {
  std::string layer = LayerWithFile(work, "a", "good");
  auto img = MakeImage({layer});
  fake.Add(img, "v1");
  std::string evil = layer;
  evil[100] ^= 0x20;
  fake.served_instead[Sha(layer)] = evil;
  ImageStore store = OpenStore(false);
  auto r = store.Pull(Ref("app:v1"));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("digest mismatch"), std::string::npos) << r.error().message;
  EXPECT_FALSE(*store.blobs().Has(Sha(layer)));
  EXPECT_FALSE(*store.blobs().Has(Sha(evil)));
  struct stat st {};
  EXPECT_NE(::stat((store.blobs().PathFor(Sha(layer)) + ".partial").c_str(), &st), 0);
  auto find = store.Find(Ref("app:v1"));
  ASSERT_FALSE(find.has_value());
  EXPECT_EQ(find.error().errno_value, ENOENT);
}

TEST_F(RegistryHttpTest, OversizedBlobRefused) {
  std::string layer = LayerWithFile(work, "a", "good");
  auto img = MakeImage({layer});
  fake.Add(img, "v1");
  fake.served_instead[Sha(layer)] = layer + "trailing";
  ImageStore store = OpenStore(false);
  auto r = store.Pull(Ref("app:v1"));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("size mismatch"), std::string::npos) << r.error().message;
  EXPECT_FALSE(*store.blobs().Has(Sha(layer)));
}

TEST_F(RegistryHttpTest, ManifestPulledByDigestIsVerified) {
  auto img = MakeImage({LayerWithFile(work, "a", "1")});
  auto other = MakeImage({LayerWithFile(work, "b", "2")});
  fake.Add(img, "v1");
  fake.manifests[img.manifest_digest()] = {std::string(media::kOciManifest), other.manifest};
  ImageStore store = OpenStore(false);
  auto r = store.Pull(Ref("app@" + img.manifest_digest()));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("digest mismatch"), std::string::npos) << r.error().message;

  fake.manifests[img.manifest_digest()] = {std::string(media::kOciManifest), img.manifest};
  auto ok = store.Pull(Ref("app@" + img.manifest_digest()));
  ASSERT_TRUE(ok.has_value()) << ok.error().message;
  EXPECT_EQ(ok->reference, server.host() + "/app@" + img.manifest_digest());
}

TEST_F(RegistryHttpTest, HeadManifestReturnsDigest) {
  auto img = MakeImage({LayerWithFile(work, "a", "1")});
  fake.Add(img, "v1");
  RegistryClient client(ClientOptions{});
  auto digest = client.HeadManifest(Ref("app:v1"), "v1");
  ASSERT_TRUE(digest.has_value()) << digest.error().message;
  ASSERT_TRUE(digest->has_value());
  EXPECT_EQ(**digest, img.manifest_digest());
  EXPECT_EQ(server.requests().back().method, "HEAD");
}

TEST(RegistryClientRules, PlainHttpOnlyForLoopbackOrInsecureHosts) {
  const std::vector<std::string> insecure{"reg.lan:5000", "build.lan"};
  EXPECT_TRUE(PlainHttpAllowed("127.0.0.1:5000", {}));
  EXPECT_TRUE(PlainHttpAllowed("localhost", {}));
  EXPECT_TRUE(PlainHttpAllowed("[::1]:443", {}));
  EXPECT_FALSE(PlainHttpAllowed("registry-1.docker.io", {}));
  EXPECT_FALSE(PlainHttpAllowed("10.0.0.1:5000", {}));
  EXPECT_TRUE(PlainHttpAllowed("reg.lan:5000", insecure));
  EXPECT_TRUE(PlainHttpAllowed("REG.lan:5000", insecure));
  EXPECT_FALSE(PlainHttpAllowed("reg.lan:5001", insecure));   // listed with another port
  EXPECT_TRUE(PlainHttpAllowed("build.lan:1234", insecure));  // listed without port: any port
  EXPECT_FALSE(PlainHttpAllowed("other.lan", insecure));

  auto o = ParseUrlOrigin("https://Storage.Example.com/blob?sig=1");
  ASSERT_TRUE(o.has_value()) << o.error().message;
  EXPECT_EQ(o->scheme, "https");
  EXPECT_EQ(o->host, "storage.example.com");
  EXPECT_EQ(o->port, "443");
  auto v6 = ParseUrlOrigin("http://[::1]:5000/v2/");
  ASSERT_TRUE(v6.has_value());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->port, "5000");
  EXPECT_FALSE(ParseUrlOrigin("not a url").has_value());
}

TEST_F(RegistryHttpTest, MissingImageReportsRegistryError) {
  ImageStore store = OpenStore(false);
  auto r = store.Pull(Ref("app:nope"));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("not found"), std::string::npos) << r.error().message;
}

}  // namespace
}  // namespace cella::registry
