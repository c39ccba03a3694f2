// Pulls from Debian's real `docker-registry` (distribution 2.8) serving plain
// HTTP on 127.0.0.1, after pushing test content through the distribution
// push API with libcurl. A missing binary is a failure, not a skip.
#include <arpa/inet.h>
#include <curl/curl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include <optional>

#include "host/os/process.h"
#include "host/registry/image_store.h"
#include "registry_test_support.h"

namespace cella::registry {
namespace {

using testing::LayerWithFile;
using testing::MakeImage;
using testing::Sha;
using testing::TempDir;

struct HttpResult {
  long status = 0;
  std::string location;
  std::string error;
};

size_t CaptureHeader(char* data, size_t size, size_t count, void* user) {
  std::string line(data, size * count);
  if (line.size() > 9 && strncasecmp(line.c_str(), "location:", 9) == 0) {
    std::string v = line.substr(9);
    while (!v.empty() && (v.front() == ' ')) v.erase(0, 1);
    while (!v.empty() && (v.back() == '\r' || v.back() == '\n')) v.pop_back();
    static_cast<HttpResult*>(user)->location = v;
  }
  return size * count;
}
size_t Discard(char*, size_t size, size_t count, void*) { return size * count; }

std::string g_ca_file;  // CA bundle for the TLS registry's push requests

HttpResult Http(const std::string& method, const std::string& url, const std::string& body = "",
                const std::string& content_type = "application/octet-stream") {
  HttpResult result;
  CURL* curl = curl_easy_init();
  if (!g_ca_file.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, g_ca_file.c_str());
  curl_slist* headers = curl_slist_append(nullptr, ("Content-Type: " + content_type).c_str());
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 20L);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, &CaptureHeader);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &result);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Discard);
  if (method == "PUT" || method == "POST") {
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  }
  CURLcode rc = curl_easy_perform(curl);
  if (rc != CURLE_OK) result.error = curl_easy_strerror(rc);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &result.status);
  curl_slist_free_all(headers);
  curl_easy_cleanup(curl);
  return result;
}

int FreeLoopbackPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  int port = 0;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0)
    port = ntohs(addr.sin_port);
  if (fd >= 0) ::close(fd);
  return port;
}

class DistributionRegistry {
 public:
  struct Tls {
    std::string certificate;
    std::string key;
  };
  explicit DistributionRegistry(const TempDir& dir, std::optional<Tls> tls = std::nullopt)
      : tls_(tls) {
    const std::string binary = "/usr/bin/docker-registry";
    if (::access(binary.c_str(), X_OK) != 0) {
      ADD_FAILURE() << binary
                    << " is missing: install Debian's docker-registry (scripts/install-deps.sh)";
      return;
    }
    port_ = FreeLoopbackPort();
    std::string config = dir / "registry.yml";
    EXPECT_TRUE(WriteStringToFile(
        config,
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: " +
            dir / "data" + "\nhttp:\n  addr: 127.0.0.1:" + std::to_string(port_) + "\n" +
            (tls ? "  tls:\n    certificate: " + tls->certificate + "\n    key: " + tls->key + "\n"
                 : ""),
        0644));
    auto spawned = host::SpawnWithOutputFile({binary, "serve", config}, dir / "registry.log");
    if (!spawned) {
      ADD_FAILURE() << spawned.error().message;
      return;
    }
    process_ = std::move(*spawned);
    for (int i = 0; i < 150; ++i) {  // bounded: 15 s
      if (Http("GET", base() + "/v2/").status == 200) {
        ready_ = true;
        return;
      }
      if (auto exited = host::HasExited(process_); exited && *exited) break;
      ::usleep(100'000);
    }
    ADD_FAILURE() << "docker-registry did not answer on " << host() << "; log:\n"
                  << testing::ReadAll(dir / "registry.log");
  }
  ~DistributionRegistry() {
    if (process_.pid <= 0) return;
    ::kill(process_.pid, SIGTERM);
    auto status = host::WaitForExit(process_, std::chrono::seconds(5));
    if (!status) {
      ::kill(process_.pid, SIGKILL);
      (void)host::WaitForExit(process_, std::chrono::seconds(5));
    }
  }
  bool ready() const { return ready_; }
  std::string host() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string base() const { return (tls_ ? "https://" : "http://") + host(); }

  void PushBlob(const std::string& repo, const std::string& bytes) {
    HttpResult start = Http("POST", base() + "/v2/" + repo + "/blobs/uploads/");
    ASSERT_EQ(start.status, 202) << start.error;
    std::string url = start.location.starts_with("/") ? base() + start.location : start.location;
    url += (url.find('?') == std::string::npos ? "?" : "&") + std::string("digest=") + Sha(bytes);
    HttpResult put = Http("PUT", url, bytes);
    ASSERT_EQ(put.status, 201) << put.error;
  }
  void PushManifest(const std::string& repo, const std::string& ref, std::string_view type,
                    const std::string& body) {
    HttpResult put =
        Http("PUT", base() + "/v2/" + repo + "/manifests/" + ref, body, std::string(type));
    ASSERT_EQ(put.status, 201) << put.error;
  }
  void Push(const std::string& repo, const testing::TestImage& img, const std::string& tag) {
    PushBlob(repo, img.config);
    for (const auto& l : img.layers) PushBlob(repo, l);
    PushManifest(repo, tag, media::kOciManifest, img.manifest);
  }

 private:
  std::optional<Tls> tls_;
  int port_ = 0;
  bool ready_ = false;
  host::SpawnedProcess process_;
};

TEST(RegistryDistribution, PullsFromDockerRegistry) {
  TempDir dir, home, work;
  DistributionRegistry registry(dir);
  ASSERT_TRUE(registry.ready());

  std::string shared = LayerWithFile(work, "etc/os-release", "ID=test\n");
  auto amd = MakeImage({shared, LayerWithFile(work, "bin/app", "amd64")}, "amd64");
  auto arm = MakeImage({shared, LayerWithFile(work, "bin/app", "arm64")}, "arm64");
  ASSERT_NO_FATAL_FAILURE(registry.Push("team/app", amd, "amd"));
  ASSERT_NO_FATAL_FAILURE(registry.Push("team/app", arm, "arm"));
  auto entry = [](const testing::TestImage& img, const char* arch) {
    std::string d = testing::DescriptorJson(media::kOciManifest, img.manifest);
    d.pop_back();
    return d + R"(,"platform":{"os":"linux","architecture":")" + arch + "\"}}";
  };
  ASSERT_NO_FATAL_FAILURE(registry.PushManifest(
      "team/app", "multi", media::kOciIndex,
      R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[)" +
          entry(arm, "arm64") + "," + entry(amd, "amd64") + "]}"));

  StoreOptions options;
  options.client.connect_timeout = std::chrono::seconds(5);
  options.client.stall_timeout = std::chrono::seconds(20);
  options.client.credentials = [](std::string_view) -> Result<std::optional<Credentials>> {
    return std::optional<Credentials>();
  };
  auto store = ImageStore::Open(home.path(), options);
  ASSERT_TRUE(store.has_value()) << store.error().message;

  auto pulled = store->Pull(*ParseReference(registry.host() + "/team/app:multi"));
  ASSERT_TRUE(pulled.has_value()) << pulled.error().message;
  EXPECT_EQ(pulled->manifest_digest, amd.manifest_digest());
  EXPECT_EQ(pulled->platform.String(), "linux/amd64");

  auto arm_pulled = store->Pull(*ParseReference(registry.host() + "/team/app:arm"));
  ASSERT_TRUE(arm_pulled.has_value()) << arm_pulled.error().message;
  EXPECT_EQ(arm_pulled->platform.architecture, "arm64");
  // 2 manifests + 2 configs + 3 layers (one shared).
  size_t stored = 0;
  for (const auto& d : {amd.manifest_digest(), arm.manifest_digest(), Sha(amd.config),
                        Sha(arm.config), Sha(shared), Sha(amd.layers[1]), Sha(arm.layers[1])})
    stored += *store->blobs().Has(d) ? 1 : 0;
  EXPECT_EQ(stored, 7u);

  auto rootfs = store->EnsureRootfs(*pulled);
  ASSERT_TRUE(rootfs.has_value()) << rootfs.error().message;

  auto missing = store->Pull(*ParseReference(registry.host() + "/team/app:absent"));
  ASSERT_FALSE(missing.has_value());
  EXPECT_NE(missing.error().message.find("not found"), std::string::npos)
      << missing.error().message;
}

}  // namespace
}  // namespace cella::registry

namespace cella::registry {
namespace {

TEST(RegistryDistribution, TlsRegistryNeedsTheRightCa) {
  TempDir dir, home, work;
  const std::string cert = dir / "cert.pem", key = dir / "key.pem";
  auto made = host::CheckCommand(
      {"openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
       "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"},
      std::chrono::seconds(60));
  ASSERT_TRUE(made.has_value()) << made.error().message;
  g_ca_file = cert;
  DistributionRegistry registry(dir, DistributionRegistry::Tls{cert, key});
  ASSERT_TRUE(registry.ready());
  auto img = MakeImage({LayerWithFile(work, "tls", "secure")});
  ASSERT_NO_FATAL_FAILURE(registry.Push("secure/app", img, "v1"));
  g_ca_file.clear();

  auto open = [&](const std::string& ca_file) {
    StoreOptions options;
    options.client.ca_file = ca_file;
    options.client.connect_timeout = std::chrono::seconds(5);
    options.client.credentials = [](std::string_view) -> Result<std::optional<Credentials>> {
      return std::optional<Credentials>();
    };
    return ImageStore::Open(home.path(), options);
  };
  const Reference ref = *ParseReference(registry.host() + "/secure/app:v1");
  {
    // Without the CA the certificate is refused, and there is no silent
    // fallback to plain HTTP (that is only for a server that does not speak TLS).
    auto store = open("");
    ASSERT_TRUE(store.has_value()) << store.error().message;
    auto r = store->Pull(ref);
    ASSERT_FALSE(r.has_value());
    EXPECT_NE(r.error().message.find("certificate"), std::string::npos) << r.error().message;
  }
  auto store = open(cert);
  ASSERT_TRUE(store.has_value()) << store.error().message;
  auto r = store->Pull(ref);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->manifest_digest, img.manifest_digest());
}

}  // namespace
}  // namespace cella::registry
