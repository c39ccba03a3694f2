#include "host/registry/client.h"

#include <algorithm>
#include <mutex>
#include <nlohmann/json.hpp>

#include "host/os/digest.h"
#include "host/registry/curl_api.h"

namespace cella::registry {
namespace {

constexpr int kMaxRedirects = 10;
constexpr size_t kMaxErrorBody = 4096;
constexpr size_t kMaxTokenBody = 1 << 20;

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n'))
    s.remove_suffix(1);
  return std::string(s);
}

// Receives body chunks of a 2xx response. An error aborts the transfer.
using BodySink = std::function<Status(std::string_view chunk)>;

struct Response {
  long status = 0;
  std::map<std::string, std::string> headers;  // lowercase names; of the last response
  std::string body;                            // non-2xx bodies (capped) or when no sink
  std::string redirect_url;
};

struct TransferContext {
  const CurlApi* api = nullptr;
  CURL* curl = nullptr;
  Response* response = nullptr;
  const BodySink* sink = nullptr;
  size_t max_body = 0;
  std::optional<Error> sink_error;
};

size_t HeaderCallback(char* data, size_t size, size_t count, void* user) {
  auto* ctx = static_cast<TransferContext*>(user);
  std::string_view line(data, size * count);
  if (line.starts_with("HTTP/")) {
    ctx->response->headers.clear();  // a new response (after 100-continue etc.)
  } else if (size_t colon = line.find(':'); colon != std::string_view::npos) {
    ctx->response->headers[Lower(Trim(line.substr(0, colon)))] = Trim(line.substr(colon + 1));
  }
  return size * count;
}

size_t WriteCallback(char* data, size_t size, size_t count, void* user) {
  auto* ctx = static_cast<TransferContext*>(user);
  std::string_view chunk(data, size * count);
  long status = 0;
  ctx->api->easy_getinfo(ctx->curl, CURLINFO_RESPONSE_CODE, &status);
  bool success = status >= 200 && status < 300;
  if (success && ctx->sink != nullptr && *ctx->sink) {
    Status s = (*ctx->sink)(chunk);
    if (!s) {
      ctx->sink_error = std::move(s.error());
      return 0;  // aborts with CURLE_WRITE_ERROR
    }
    return chunk.size();
  }
  size_t cap = success ? ctx->max_body : kMaxErrorBody;
  if (ctx->response->body.size() + chunk.size() > cap) {
    if (success) {
      ctx->sink_error = Error::Msg("response body larger than " + std::to_string(cap) + " bytes");
      return 0;
    }
    ctx->response->body.append(chunk.substr(0, cap - ctx->response->body.size()));
    return chunk.size();
  }
  ctx->response->body.append(chunk);
  return chunk.size();
}

bool IsTlsLevelFailure(CURLcode code) {
  return code == CURLE_SSL_CONNECT_ERROR || code == CURLE_GOT_NOTHING || code == CURLE_RECV_ERROR ||
         code == CURLE_WEIRD_SERVER_REPLY || code == CURLE_SEND_ERROR;
}

std::string HostOfUrl(const std::string& url) {
  auto origin = ParseUrlOrigin(url);
  if (!origin) return "";
  std::string host = origin->host;
  if (host.find(':') != std::string::npos) host = "[" + host + "]";
  return host + ":" + origin->port;
}

std::string DescribeHttpError(const Response& r, const std::string& what) {
  std::string msg = what + ": HTTP " + std::to_string(r.status);
  // Distribution errors: {"errors":[{"code":"MANIFEST_UNKNOWN","message":"..."}]}
  nlohmann::json doc = nlohmann::json::parse(r.body, nullptr, false);
  if (!doc.is_discarded() && doc.is_object()) {
    auto errors = doc.find("errors");
    if (errors != doc.end() && errors->is_array()) {
      for (const auto& e : *errors) {
        if (!e.is_object()) continue;
        auto code = e.find("code");
        auto message = e.find("message");
        if (code != e.end() && code->is_string()) msg += " " + code->get<std::string>();
        if (message != e.end() && message->is_string()) msg += ": " + message->get<std::string>();
        break;
      }
    }
  }
  return msg;
}

bool IsListedInsecure(std::string_view host_port, const std::vector<std::string>& insecure_hosts) {
  std::string h = Lower(host_port);
  // An entry without a port covers every port of that host.
  std::string bare = h;
  if (size_t colon = h.rfind(':');
      colon != std::string::npos && h.find(']', colon) == std::string::npos)
    bare = h.substr(0, colon);
  for (const auto& i : insecure_hosts) {
    std::string entry = Lower(i);
    if (entry == h || entry == bare) return true;
  }
  return false;
}

}  // namespace

bool PlainHttpAllowed(std::string_view host_port, const std::vector<std::string>& insecure_hosts) {
  return IsLoopbackHost(host_port) || IsListedInsecure(host_port, insecure_hosts);
}

Result<UrlOrigin> ParseUrlOrigin(const std::string& url) {
  const CurlApi* api = CELLA_TRY(LoadCurl());
  CURLU* u = api->url();
  if (u == nullptr) return Fail("curl_url: out of memory");
  struct Free {
    const CurlApi* api;
    CURLU* u;
    ~Free() { api->url_cleanup(u); }
  } free_u{api, u};
  if (api->url_set(u, CURLUPART_URL, url.c_str(), 0) != CURLUE_OK)
    return Fail("invalid URL \"" + url.substr(0, 200) + "\"");
  UrlOrigin o;
  auto get = [&](CURLUPart part, unsigned flags, std::string& out) -> bool {
    char* value = nullptr;
    if (api->url_get(u, part, &value, flags) != CURLUE_OK) return false;
    out = value;
    api->free(value);
    return true;
  };
  if (!get(CURLUPART_SCHEME, 0, o.scheme) || !get(CURLUPART_HOST, 0, o.host) ||
      !get(CURLUPART_PORT, CURLU_DEFAULT_PORT, o.port))
    return Fail("URL \"" + url.substr(0, 200) + "\" has no scheme, host or port");
  o.scheme = Lower(o.scheme);
  o.host = Lower(o.host);
  if (o.host.size() > 2 && o.host.front() == '[') o.host = o.host.substr(1, o.host.size() - 2);
  return o;
}

struct RegistryClient::State {
  ClientOptions options;
  const CurlApi* api = nullptr;  // set with curl
  CURL* curl = nullptr;
  std::string init_error;                             // why curl is null
  std::map<std::string, std::string> scheme_by_host;  // "https" | "http"
  std::map<std::string, std::string> token_by_scope;  // host + " " + scope -> token
  std::map<std::string, std::optional<Credentials>> credentials_by_host;
  std::map<std::string, bool> basic_by_host;  // host asked for Basic auth

  ~State() {
    if (curl != nullptr) api->easy_cleanup(curl);
  }

  bool IsInsecure(std::string_view host_port) const {
    return IsListedInsecure(host_port, options.insecure_hosts);
  }
  bool PlainHttpAllowed(std::string_view host_port) const {
    return registry::PlainHttpAllowed(host_port, options.insecure_hosts);
  }

  Result<std::optional<Credentials>> CredentialsFor(const std::string& host) {
    auto it = credentials_by_host.find(host);
    if (it != credentials_by_host.end()) return it->second;
    std::optional<Credentials> creds;
    if (options.credentials)
      creds = CELLA_TRY_CTX(options.credentials(host), "credentials for " + host);
    credentials_by_host[host] = creds;
    return creds;
  }

  // One HTTP exchange, no redirects, no auth logic.
  Result<Response> Perform(const std::string& url, std::string_view method,
                           const std::vector<std::string>& headers, const BodySink* sink,
                           size_t max_body, bool verify_tls) {
    api->easy_reset(curl);
    Response response;
    TransferContext ctx{api, curl, &response, sink, max_body, std::nullopt};
    curl_slist* list = nullptr;
    for (const auto& h : headers) {
      curl_slist* next = api->slist_append(list, h.c_str());
      if (next == nullptr) {
        api->slist_free_all(list);
        return Fail("curl_slist_append: out of memory");
      }
      list = next;
    }
    struct FreeList {
      const CurlApi* api;
      curl_slist* l;
      ~FreeList() { api->slist_free_all(l); }
    } free_list{api, list};
    auto set = [&](CURLoption opt, auto value) -> Status {
      CURLcode rc = api->easy_setopt(curl, opt, value);
      if (rc != CURLE_OK) return Fail(std::string("curl_easy_setopt: ") + api->easy_strerror(rc));
      return {};
    };
    CELLA_TRY(set(CURLOPT_URL, url.c_str()));
    CELLA_TRY(set(CURLOPT_NOSIGNAL, 1L));
    CELLA_TRY(set(CURLOPT_FOLLOWLOCATION, 0L));
    CELLA_TRY(set(CURLOPT_PROTOCOLS_STR, "http,https"));
    CELLA_TRY(set(CURLOPT_HTTPHEADER, list));
    CELLA_TRY(set(CURLOPT_USERAGENT, options.user_agent.c_str()));
    CELLA_TRY(set(CURLOPT_CONNECTTIMEOUT, static_cast<long>(options.connect_timeout.count())));
    CELLA_TRY(set(CURLOPT_LOW_SPEED_LIMIT, 1L));
    CELLA_TRY(set(CURLOPT_LOW_SPEED_TIME, static_cast<long>(options.stall_timeout.count())));
    CELLA_TRY(set(CURLOPT_HEADERFUNCTION, &HeaderCallback));
    CELLA_TRY(set(CURLOPT_HEADERDATA, &ctx));
    CELLA_TRY(set(CURLOPT_WRITEFUNCTION, &WriteCallback));
    CELLA_TRY(set(CURLOPT_WRITEDATA, &ctx));
    if (method == "HEAD") CELLA_TRY(set(CURLOPT_NOBODY, 1L));
    if (!options.ca_file.empty()) CELLA_TRY(set(CURLOPT_CAINFO, options.ca_file.c_str()));
    if (!verify_tls) {
      CELLA_TRY(set(CURLOPT_SSL_VERIFYPEER, 0L));
      CELLA_TRY(set(CURLOPT_SSL_VERIFYHOST, 0L));
    }
    CURLcode rc = api->easy_perform(curl);
    if (ctx.sink_error) return std::unexpected(std::move(*ctx.sink_error));
    if (rc != CURLE_OK) {
      Error e = Error::Msg(std::string(method) + " " + url + ": " + api->easy_strerror(rc));
      e.errno_value = -static_cast<int>(rc);  // lets the caller see the curl code
      return std::unexpected(std::move(e));
    }
    api->easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
    char* redirect = nullptr;
    if (api->easy_getinfo(curl, CURLINFO_REDIRECT_URL, &redirect) == CURLE_OK &&
        redirect != nullptr)
      response.redirect_url = redirect;
    return response;
  }

  // Perform + redirects. The Authorization header goes only to `url`'s origin.
  Result<Response> PerformFollowing(std::string url, std::string_view method,
                                    const std::vector<std::string>& headers,
                                    const std::string& authorization, const BodySink* sink,
                                    size_t max_body) {
    const std::string first_origin = HostOfUrl(url);
    for (int hop = 0; hop <= kMaxRedirects; ++hop) {
      std::string host = HostOfUrl(url);
      std::vector<std::string> all = headers;
      if (!authorization.empty() && host == first_origin)
        all.push_back("Authorization: " + authorization);
      auto origin = CELLA_TRY(ParseUrlOrigin(url));
      std::string host_port = origin.host.find(':') != std::string::npos
                                  ? "[" + origin.host + "]:" + origin.port
                                  : origin.host + ":" + origin.port;
      if (origin.scheme == "http" && !PlainHttpAllowed(host_port) && !PlainHttpAllowed(origin.host))
        return Fail("refusing plain HTTP to " + host_port +
                    " (only loopback hosts or hosts listed as insecure may use HTTP)");
      bool verify = !(IsInsecure(host_port) || IsInsecure(origin.host));
      Response r = CELLA_TRY(Perform(url, method, all, sink, max_body, verify));
      bool redirect = r.status == 301 || r.status == 302 || r.status == 303 || r.status == 307 ||
                      r.status == 308;
      if (!redirect) return r;
      if (r.redirect_url.empty())
        return Fail(std::string(method) + " " + url + ": redirect without Location");
      url = r.redirect_url;
    }
    return Fail(std::string(method) + ": more than " + std::to_string(kMaxRedirects) +
                " redirects");
  }

  Result<std::string> SchemeFor(const std::string& host) {
    auto it = scheme_by_host.find(host);
    if (it != scheme_by_host.end()) return it->second;
    return std::string("https");
  }

  Result<std::string> FetchToken(const std::string& host, const AuthChallenge& challenge,
                                 const std::string& scope) {
    auto realm = challenge.params.find("realm");
    if (realm == challenge.params.end() || realm->second.empty())
      return Fail(host + ": Bearer challenge without realm");
    std::string url = realm->second;
    auto realm_origin = CELLA_TRY_CTX(ParseUrlOrigin(url), host + ": token realm");
    if (realm_origin.scheme != "https" && realm_origin.scheme != "http")
      return Fail(host + ": token realm must be http(s): " + url);
    std::string query;
    auto add = [&](const char* key, const std::string& value) -> Status {
      char* escaped = api->easy_escape(curl, value.c_str(), static_cast<int>(value.size()));
      if (escaped == nullptr) return Fail("curl_easy_escape failed");
      query += std::string(query.empty() ? "" : "&") + key + "=" + escaped;
      api->free(escaped);
      return {};
    };
    if (auto s = challenge.params.find("service"); s != challenge.params.end())
      CELLA_TRY(add("service", s->second));
    auto cs = challenge.params.find("scope");
    CELLA_TRY(
        add("scope", cs != challenge.params.end() && !cs->second.empty() ? cs->second : scope));
    url += (url.find('?') == std::string::npos ? "?" : "&") + query;
    auto creds = CELLA_TRY(CredentialsFor(host));
    std::string authorization;
    if (creds) authorization = "Basic " + Base64Encode(creds->username + ":" + creds->password);
    std::string body;
    BodySink sink = [&](std::string_view chunk) -> Status {
      if (body.size() + chunk.size() > kMaxTokenBody) return Fail("token response too large");
      body.append(chunk);
      return {};
    };
    Response r = CELLA_TRY_CTX(PerformFollowing(url, "GET", {"Accept: application/json"},
                                                authorization, &sink, kMaxTokenBody),
                               host + ": token request");
    if (r.status == 401 || r.status == 403)
      return Fail(host + ": token server refused " +
                  (creds ? "the stored credentials" : std::string("anonymous access")) + " (HTTP " +
                  std::to_string(r.status) + ")" +
                  (creds ? "" : "; run `cella login " + host + "`"));
    if (r.status != 200) return Fail(DescribeHttpError(r, host + ": token request"));
    nlohmann::json doc = nlohmann::json::parse(body, nullptr, false);
    if (doc.is_discarded() || !doc.is_object())
      return Fail(host + ": token response is not a JSON object");
    for (const char* key : {"token", "access_token"}) {
      auto t = doc.find(key);
      if (t != doc.end() && t->is_string() && !t->get<std::string>().empty())
        return t->get<std::string>();
    }
    return Fail(host + ": token response has no \"token\"");
  }

  // A registry API request with scheme choice and the 401 dance.
  Result<Response> Send(const Reference& ref, std::string_view method, const std::string& path,
                        const std::vector<std::string>& headers, const BodySink* sink,
                        size_t max_body) {
    const std::string host = ref.ApiHost();
    const std::string scope = "repository:" + ref.repository + ":pull";
    const std::string token_key = host + " " + scope;
    int auth_rounds = 0;
    while (true) {
      std::string scheme = CELLA_TRY(SchemeFor(host));
      std::string authorization;
      if (auto t = token_by_scope.find(token_key); t != token_by_scope.end()) {
        authorization = "Bearer " + t->second;
      } else if (basic_by_host[host]) {
        auto creds = CELLA_TRY(CredentialsFor(host));
        if (creds) authorization = "Basic " + Base64Encode(creds->username + ":" + creds->password);
      }
      auto r = PerformFollowing(scheme + "://" + host + path, method, headers, authorization, sink,
                                max_body);
      if (!r) {
        bool tls_failed = r.error().errno_value < 0 &&
                          IsTlsLevelFailure(static_cast<CURLcode>(-r.error().errno_value));
        if (scheme == "https" && tls_failed && PlainHttpAllowed(host) &&
            !scheme_by_host.contains(host)) {
          scheme_by_host[host] = "http";  // a plain-HTTP registry on loopback / insecure host
          continue;
        }
        return std::unexpected(std::move(r.error()));
      }
      scheme_by_host.emplace(host, scheme);
      if (r->status != 401) return r;
      if (++auth_rounds > 2)
        return Fail(host +
                    ": authentication failed (HTTP 401 after authenticating); check `cella login " +
                    host + "`");
      auto header = r->headers.find("www-authenticate");
      if (header == r->headers.end())
        return Fail(host + ": HTTP 401 without a WWW-Authenticate challenge");
      AuthChallenge challenge = CELLA_TRY_CTX(ParseWwwAuthenticate(header->second), host);
      token_by_scope.erase(token_key);
      if (challenge.scheme == "bearer") {
        token_by_scope[token_key] = CELLA_TRY(FetchToken(host, challenge, scope));
      } else if (challenge.scheme == "basic") {
        auto creds = CELLA_TRY(CredentialsFor(host));
        if (!creds)
          return Fail(host + ": registry requires a login; run `cella login " + host + "`");
        if (basic_by_host[host] && auth_rounds > 1)
          return Fail(host + ": registry rejected the stored credentials (HTTP 401)");
        basic_by_host[host] = true;
      } else {
        return Fail(host + ": unsupported auth scheme \"" + challenge.scheme + "\"");
      }
    }
  }
};

RegistryClient::RegistryClient(ClientOptions options) : state_(std::make_unique<State>()) {
  state_->options = std::move(options);
  // A failed load or init leaves curl null; every request then reports it.
  auto api = LoadCurl();
  if (!api) {
    state_->init_error = api.error().message;
    return;
  }
  state_->api = *api;
  state_->curl = state_->api->easy_init();
  if (state_->curl == nullptr) state_->init_error = "curl_easy_init failed";
}
RegistryClient::~RegistryClient() = default;
RegistryClient::RegistryClient(RegistryClient&&) noexcept = default;
RegistryClient& RegistryClient::operator=(RegistryClient&&) noexcept = default;

Result<FetchedManifest> RegistryClient::GetManifest(const Reference& ref,
                                                    std::string_view selector) {
  if (state_->curl == nullptr) return Fail("libcurl initialisation failed: " + state_->init_error);
  const std::string what = "manifest " + ref.Name() + ":" + std::string(selector);
  std::string body;
  BodySink sink = [&](std::string_view chunk) -> Status {
    if (body.size() + chunk.size() > kMaxManifestBytes) return Fail(what + ": larger than 4 MiB");
    body.append(chunk);
    return {};
  };
  Response r = CELLA_TRY_CTX(
      state_->Send(ref, "GET", "/v2/" + ref.repository + "/manifests/" + std::string(selector),
                   {"Accept: " + std::string(media::kManifestAccept)}, &sink, kMaxManifestBytes),
      what);
  if (r.status == 404) return Fail(what + ": not found in " + ref.domain);
  if (r.status != 200) return Fail(DescribeHttpError(r, what));
  FetchedManifest m;
  m.body = std::move(body);
  m.digest = "sha256:" + host::Sha256Hex(m.body);
  std::string ct = r.headers["content-type"];
  m.media_type = Trim(ct.substr(0, ct.find(';')));
  if (selector.starts_with("sha256:") && m.digest != selector)
    return Fail(what + ": digest mismatch: the registry sent content hashing to " + m.digest);
  return m;
}

Result<std::optional<std::string>> RegistryClient::HeadManifest(const Reference& ref,
                                                                std::string_view selector) {
  if (state_->curl == nullptr) return Fail("libcurl initialisation failed: " + state_->init_error);
  const std::string what = "manifest " + ref.Name() + ":" + std::string(selector);
  Response r = CELLA_TRY_CTX(
      state_->Send(ref, "HEAD", "/v2/" + ref.repository + "/manifests/" + std::string(selector),
                   {"Accept: " + std::string(media::kManifestAccept)}, nullptr, 0),
      what);
  if (r.status == 404) return Fail(what + ": not found in " + ref.domain);
  if (r.status != 200) return Fail(what + ": HTTP " + std::to_string(r.status));
  auto d = r.headers.find("docker-content-digest");
  if (d == r.headers.end()) return std::optional<std::string>();
  CELLA_TRY_CTX(DigestHex(d->second), what + ": Docker-Content-Digest");
  return std::optional<std::string>(d->second);
}

Status RegistryClient::FetchBlob(const Reference& ref, const Descriptor& blob, BlobWriter& writer,
                                 ProgressSink* progress) {
  if (state_->curl == nullptr) return Fail("libcurl initialisation failed: " + state_->init_error);
  const std::string what = "blob " + blob.digest + " of " + ref.Name();
  if (progress) progress->BlobStarted(blob.digest, blob.size, writer.Offset());
  if (writer.Offset() < blob.size) {
    std::vector<std::string> headers;
    const int64_t resume_from = writer.Offset();
    if (resume_from > 0) headers.push_back("Range: bytes=" + std::to_string(resume_from) + "-");
    bool first_chunk = true;
    BodySink sink = [&](std::string_view chunk) -> Status {
      if (first_chunk) {
        first_chunk = false;
        long status = 0;
        state_->api->easy_getinfo(state_->curl, CURLINFO_RESPONSE_CODE, &status);
        if (resume_from > 0 && status != 206) CELLA_TRY(writer.Restart());  // Range ignored
        if (status == 206) {
          // Appending anything but the continuation would poison the partial file.
          curl_header* h = nullptr;
          std::string range;
          if (state_->api->easy_header(state_->curl, "Content-Range", 0, CURLH_HEADER, -1, &h) ==
              CURLHE_OK)
            range = h->value;
          if (!range.starts_with("bytes " + std::to_string(resume_from) + "-"))
            return Fail(what + ": server answered the Range request with Content-Range \"" + range +
                        "\"");
        }
      }
      CELLA_TRY_CTX(writer.Write(chunk), what);
      if (progress) progress->BlobProgress(blob.digest, writer.Offset(), blob.size);
      return {};
    };
    Response r =
        CELLA_TRY_CTX(state_->Send(ref, "GET", "/v2/" + ref.repository + "/blobs/" + blob.digest,
                                   headers, &sink, 0),
                      what);
    if (r.status == 404) return Fail(what + ": not found in " + ref.domain);
    if (r.status == 416 && resume_from > 0) {
      // Our partial file is bogus for this server; start over once.
      CELLA_TRY(writer.Restart());
      return FetchBlob(ref, blob, writer, progress);
    }
    if (r.status != 200 && r.status != 206) return Fail(DescribeHttpError(r, what));
  }
  CELLA_TRY(writer.Commit());
  if (progress) progress->BlobFinished(blob.digest, BlobOutcome::kFetched);
  return {};
}

}  // namespace cella::registry
