// Docker registry HTTP API v2 client over libcurl: manifests and blobs,
// anonymous / bearer-token / basic auth, TLS (system CAs or a CA file),
// plain HTTP only for loopback hosts and hosts listed as insecure, redirects
// followed by hand so Authorization never crosses to another host.
//
// Thread rules: a RegistryClient owns one curl handle and its token cache:
// use it from one thread at a time (make one per thread).
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/registry/auth.h"
#include "host/registry/blob_store.h"
#include "host/registry/manifest.h"
#include "host/registry/progress.h"
#include "host/registry/reference.h"

namespace cella::registry {

using CredentialsLookup = std::function<Result<std::optional<Credentials>>(std::string_view host)>;

struct ClientOptions {
  // "host[:port]" reachable over plain HTTP, and over TLS without
  // certificate checks (like docker's insecure-registries).
  std::vector<std::string> insecure_hosts;
  // PEM bundle used instead of the system CAs when set.
  std::string ca_file;
  // Credentials per registry host; unset means anonymous only.
  CredentialsLookup credentials;
  std::chrono::seconds connect_timeout{20};
  // A transfer that moves no byte for this long is aborted.
  std::chrono::seconds stall_timeout{60};
  std::string user_agent = "cella/0.1";
};

struct FetchedManifest {
  std::string body;
  std::string media_type;  // Content-Type without parameters
  std::string digest;      // sha256 of body (computed, never trusted from headers)
};

class RegistryClient {
 public:
  explicit RegistryClient(ClientOptions options);
  ~RegistryClient();
  RegistryClient(RegistryClient&&) noexcept;
  RegistryClient& operator=(RegistryClient&&) noexcept;

  // GET /v2/<repo>/manifests/<selector>. When selector is a digest the body
  // must hash to it.
  Result<FetchedManifest> GetManifest(const Reference& ref, std::string_view selector);
  // HEAD; returns the Docker-Content-Digest header (nullopt when absent).
  Result<std::optional<std::string>> HeadManifest(const Reference& ref, std::string_view selector);
  // Streams the blob into writer from writer.Offset() (Range request when
  // resuming), then commits it (size and digest verified). progress may be null.
  Status FetchBlob(const Reference& ref, const Descriptor& blob, BlobWriter& writer,
                   ProgressSink* progress);

  struct State;

 private:
  std::unique_ptr<State> state_;
};

// The plain-HTTP rule: loopback hosts (127.0.0.0/8, ::1, localhost) and
// hosts listed as insecure ("host:port", or "host" for every port).
bool PlainHttpAllowed(std::string_view host_port, const std::vector<std::string>& insecure_hosts);

// Splits "scheme://host:port/..." into its origin parts; used for redirects.
struct UrlOrigin {
  std::string scheme;
  std::string host;  // lowercase, IPv6 without brackets
  std::string port;  // always set (default port filled in)
  bool operator==(const UrlOrigin&) const = default;
};
Result<UrlOrigin> ParseUrlOrigin(const std::string& url);

}  // namespace cella::registry
