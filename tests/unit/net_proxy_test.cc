// The transparent proxy end to end on 127.0.0.1: a test client connects to
// the proxy's listener pretending to be the guest (the original destination
// comes from a fake mapping keyed by the client's source port), and the
// proxy talks to origin servers this test runs. Every socket read is bounded
// by SO_RCVTIMEO, so a proxy that buffers or stalls fails instead of hanging.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "host/net/proxy.h"
#include "host/net/tls.h"
#include "support/echo_server.h"

// The tests spell each PolicyConfig with designated initializers naming only
// the fields that matter to them; the rest keep their defaults on purpose.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace cella::net {
namespace {

constexpr int kTimeoutSeconds = 10;

void SetTimeouts(int fd) {
  timeval timeout{kTimeoutSeconds, 0};
  ASSERT_EQ(::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)), 0);
  ASSERT_EQ(::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout)), 0);
}

UniqueFd ListenLoopback(uint16_t& port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(fd.Valid());
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(fd.Get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  EXPECT_EQ(::listen(fd.Get(), 64), 0);
  socklen_t length = sizeof(address);
  EXPECT_EQ(::getsockname(fd.Get(), reinterpret_cast<sockaddr*>(&address), &length), 0);
  port = ntohs(address.sin_port);
  return fd;
}

IpAddress Loopback() { return *IpAddress::Parse("127.0.0.1"); }

// Buffered reads over any ByteStream, for both the test client and origins.
class Reader {
 public:
  explicit Reader(ByteStream& stream) : stream_(stream) {}
  // Reads until `delimiter` arrives; returns everything up to and including
  // it, or "" on EOF/error first.
  std::string Until(std::string_view delimiter) {
    for (;;) {
      if (size_t at = buffer_.find(delimiter); at != std::string::npos) {
        std::string out = buffer_.substr(0, at + delimiter.size());
        buffer_.erase(0, at + delimiter.size());
        return out;
      }
      if (!Fill()) return "";
    }
  }
  std::string Exactly(size_t n) {
    while (buffer_.size() < n) {
      if (!Fill()) return "";
    }
    std::string out = buffer_.substr(0, n);
    buffer_.erase(0, n);
    return out;
  }
  std::string ToEof() {
    while (Fill()) {
    }
    return std::exchange(buffer_, "");
  }
  // A chunked body, decoded (independent of the proxy's tracker).
  std::string Chunked() {
    std::string body;
    for (;;) {
      std::string line = Until("\r\n");
      if (line.empty()) return body + "<eof>";
      size_t size = std::stoul(line, nullptr, 16);
      if (size == 0) {
        Until("\r\n");  // no trailers in these tests
        return body;
      }
      body += Exactly(size);
      Until("\r\n");
    }
  }
  bool Fill() {
    char chunk[4096];
    auto n = stream_.Read(std::as_writable_bytes(std::span(chunk)));
    if (!n || *n == 0) return false;
    buffer_.append(chunk, *n);
    return true;
  }

 private:
  ByteStream& stream_;
  std::string buffer_;
};

std::string HeaderValue(const std::string& head, const std::string& lower_name) {
  std::string lower = head;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  size_t at = lower.find("\r\n" + lower_name + ":");
  if (at == std::string::npos) return "";
  size_t start = at + 2 + lower_name.size() + 1;
  size_t end = head.find("\r\n", start);
  std::string value = head.substr(start, end - start);
  while (!value.empty() && value.front() == ' ') value.erase(0, 1);
  return value;
}

struct Response {
  int status = 0;
  std::string head;
  std::string body;
};

Response ReadResponse(Reader& reader) {
  Response response;
  response.head = reader.Until("\r\n\r\n");
  if (response.head.size() < 12) return response;
  response.status = std::stoi(response.head.substr(9, 3));
  std::string length = HeaderValue(response.head, "content-length");
  if (HeaderValue(response.head, "transfer-encoding") == "chunked") {
    response.body = reader.Chunked();
  } else if (!length.empty()) {
    response.body = reader.Exactly(std::stoul(length));
  } else if (response.status != 101) {
    response.body = reader.ToEof();
  }
  return response;
}

// An HTTP/1.1 origin: keep-alive, Content-Length and chunked request bodies,
// and a few behaviours chosen by path. Serves plain TCP, or TLS when given a
// CA (then it presents a leaf for `tls_name`).
class Origin {
 public:
  explicit Origin(std::shared_ptr<CertificateAuthority> ca = nullptr, std::string tls_name = "")
      : ca_(std::move(ca)), tls_name_(std::move(tls_name)) {
    listener_ = ListenLoopback(port_);
    thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~Origin() {
    stopping_ = true;
    ::shutdown(listener_.Get(), SHUT_RDWR);
    thread_.join();
    {
      std::lock_guard lock(mutex_);
      for (int fd : open_) ::shutdown(fd, SHUT_RDWR);
      sse_release_ = true;
      changed_.notify_all();
    }
    for (auto& worker : workers_) worker.join();
  }
  uint16_t port() const { return port_; }
  int accepts() const { return accepts_.load(); }
  std::vector<std::string> heads() {
    std::lock_guard lock(mutex_);
    return heads_;
  }
  void ReleaseSse() {
    std::lock_guard lock(mutex_);
    sse_release_ = true;
    changed_.notify_all();
  }

 private:
  void AcceptLoop() {
    for (;;) {
      int fd = ::accept4(listener_.Get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (stopping_) return;
        continue;
      }
      ++accepts_;
      SetTimeouts(fd);
      std::lock_guard lock(mutex_);
      open_.push_back(fd);
      workers_.emplace_back([this, fd] { Serve(UniqueFd(fd)); });
    }
  }

  void Serve(UniqueFd fd) {
    std::unique_ptr<ByteStream> stream = std::make_unique<FdStream>(std::move(fd));
    if (ca_) {
      auto tls = AcceptTls(std::move(stream), "", *ca_, tls_name_);
      if (!tls) {
        ADD_FAILURE() << "origin TLS accept: " << tls.error().message;
        return;
      }
      stream = std::move(*tls);
    }
    Reader reader(*stream);
    for (;;) {
      std::string head = reader.Until("\r\n\r\n");
      if (head.empty()) return;
      {
        std::lock_guard lock(mutex_);
        heads_.push_back(head);
      }
      std::string request_line = head.substr(0, head.find("\r\n"));
      std::string target = request_line.substr(request_line.find(' ') + 1);
      target = target.substr(0, target.find(' '));
      std::string body;
      if (HeaderValue(head, "transfer-encoding") == "chunked") {
        body = reader.Chunked();
      } else if (std::string length = HeaderValue(head, "content-length"); !length.empty()) {
        body = reader.Exactly(std::stoul(length));
      }
      if (target.starts_with("/chunked")) {
        std::string reply = "decoded:" + body;
        std::string out = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (size_t i = 0; i < reply.size(); i += 5) {
          std::string piece = reply.substr(i, 5);
          char size[16];
          std::snprintf(size, sizeof(size), "%zx\r\n", piece.size());
          out += size + piece + "\r\n";
        }
        out += "0\r\n\r\n";
        if (!stream->Write(out)) return;
      } else if (target.starts_with("/sse")) {
        if (!stream->Write("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                           "data: one\n\n")) {
          return;
        }
        std::unique_lock lock(mutex_);
        changed_.wait_for(lock, std::chrono::seconds(kTimeoutSeconds),
                          [&] { return sse_release_; });
        lock.unlock();
        (void)stream->Write("data: two\n\n");
        (void)stream->ShutdownWrite();
        return;
      } else if (target.starts_with("/ws")) {
        if (!stream->Write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\n\r\nhello-from-origin|")) {
          return;
        }
        for (;;) {
          std::string frame = reader.Until("|");
          if (frame.empty()) return;
          if (!stream->Write("echo:" + frame)) return;
        }
      } else {
        std::string reply = request_line + "\n" + head + "body:" + body;
        if (!stream->Write("HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(reply.size()) +
                           "\r\n\r\n" + reply)) {
          return;
        }
      }
    }
  }

  std::shared_ptr<CertificateAuthority> ca_;
  std::string tls_name_;
  UniqueFd listener_;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<int> accepts_{0};
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<int> open_;
  std::vector<std::thread> workers_;
  std::vector<std::string> heads_;
  bool sse_release_ = false;
};

using ::cella::testing::EchoServer;

// The fake ClientHello used where real TLS is not the point:
// 0x16 "SNI=<name>\n". Its parser stands in for ParseClientHelloSni.
std::string FakeHello(const std::string& name) { return "\x16SNI=" + name + "\n"; }

Result<std::optional<std::string>> ParseFakeHello(std::span<const std::byte> bytes) {
  std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  size_t end = text.find('\n');
  if (end == std::string_view::npos) return std::optional<std::string>();
  if (!text.starts_with("\x16SNI=")) return Fail("not a fake hello");
  return std::optional<std::string>(std::string(text.substr(5, end - 5)));
}

// A stream that first yields `prefix`, then reads `inner`.
class PrefixedStream final : public ByteStream {
 public:
  PrefixedStream(std::unique_ptr<ByteStream> inner, std::string prefix)
      : inner_(std::move(inner)), prefix_(std::move(prefix)) {}
  Result<size_t> Read(std::span<std::byte> buffer) override {
    if (prefix_.empty()) return inner_->Read(buffer);
    size_t n = std::min(buffer.size(), prefix_.size());
    std::memcpy(buffer.data(), prefix_.data(), n);
    prefix_.erase(0, n);
    return n;
  }
  Status Write(std::span<const std::byte> bytes) override { return inner_->Write(bytes); }
  using ByteStream::Write;
  Status ShutdownWrite() override { return inner_->ShutdownWrite(); }
  void Abort() override { inner_->Abort(); }

 private:
  std::unique_ptr<ByteStream> inner_;
  std::string prefix_;
};

// "Interception" without cryptography: the guest side drops the fake hello,
// the upstream side is the raw connection. Exercises the proxy's HTTPS path.
class PlainTextTls final : public TlsProvider {
 public:
  Result<std::unique_ptr<ByteStream>> AcceptFromGuest(std::unique_ptr<ByteStream> raw,
                                                      std::string_view client_hello,
                                                      const std::string& name) override {
    names.push_back(name);
    std::string rest(client_hello.substr(client_hello.find('\n') + 1));
    return std::unique_ptr<ByteStream>(std::make_unique<PrefixedStream>(std::move(raw), rest));
  }
  Result<std::unique_ptr<ByteStream>> ConnectUpstream(std::unique_ptr<ByteStream> raw,
                                                      const std::string&) override {
    return raw;
  }
  std::vector<std::string> names;
};

class ProxyTest : public ::testing::Test {
 protected:
  // The proxy's threads call back into this fixture (on_event at a
  // connection's end): stop them before the members they use go.
  void TearDown() override {
    if (proxy_) proxy_->Stop();
  }

  void StartProxy(PolicyConfig config, std::shared_ptr<TlsProvider> tls = nullptr,
                  SniParser sni_parser = ParseFakeHello) {
    auto policy = Policy::Create(std::move(config));
    ASSERT_TRUE(policy.has_value()) << policy.error().message;
    policy_ = *policy;
    uint16_t port = 0;
    UniqueFd listener = ListenLoopback(port);
    proxy_port_ = port;
    ProxyOptions options;
    options.policy = policy_;
    options.fake_ips = table_;
    options.original_destination = [this](int fd) -> Result<Endpoint> {
      sockaddr_in peer{};
      socklen_t length = sizeof(peer);
      if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) != 0) {
        return FailErrno("getpeername");
      }
      std::lock_guard lock(mutex_);
      auto it = destinations_.find(ntohs(peer.sin_port));
      if (it == destinations_.end()) return Fail("test: unknown client port");
      return it->second;
    };
    options.resolver = [this](const std::string& name) -> Result<std::vector<IpAddress>> {
      ++resolver_calls_;
      return Fail("test resolver: no host lookups expected, asked for " + name);
    };
    options.sni_parser = std::move(sni_parser);
    options.tls = std::move(tls);
    options.host_gateway = host_gateway_;
    options.on_event = [this](EgressEvent event) {
      std::lock_guard lock(mutex_);
      events_.push_back(std::move(event));
      events_cv_.notify_all();
    };
    auto proxy = TransparentProxy::Start(std::move(listener), std::move(options));
    ASSERT_TRUE(proxy.has_value()) << proxy.error().message;
    proxy_ = std::move(*proxy);
  }

  static Pin PinTo(const std::string& name, uint16_t port, uint16_t target_port) {
    return Pin{name, port, Endpoint{Loopback(), target_port}};
  }

  Endpoint Virtual(const std::string& name, uint16_t port) {
    auto address = table_->AddressFor(name);
    EXPECT_TRUE(address.has_value());
    return Endpoint{IpAddress::V4(*address), port};
  }

  // Connects to the proxy as the guest would to `destination`.
  std::unique_ptr<FdStream> Connect(const Endpoint& destination) {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    EXPECT_TRUE(fd.Valid());
    SetTimeouts(fd.Get());
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(fd.Get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    socklen_t length = sizeof(address);
    EXPECT_EQ(::getsockname(fd.Get(), reinterpret_cast<sockaddr*>(&address), &length), 0);
    {
      std::lock_guard lock(mutex_);
      destinations_[ntohs(address.sin_port)] = destination;
    }
    address.sin_port = htons(proxy_port_);
    EXPECT_EQ(::connect(fd.Get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0)
        << std::strerror(errno);
    return std::make_unique<FdStream>(std::move(fd));
  }

  Response Get(const Endpoint& destination, const std::string& host, const std::string& target,
               const std::string& extra_headers = "") {
    auto client = Connect(destination);
    EXPECT_TRUE(client->Write("GET " + target + " HTTP/1.1\r\nHost: " + host + "\r\n" +
                              extra_headers + "\r\n"));
    Reader reader(*client);
    return ReadResponse(reader);
  }

  std::shared_ptr<FakeIpTable> table_ = std::make_shared<FakeIpTable>();
  std::shared_ptr<Policy> policy_;
  std::unique_ptr<TransparentProxy> proxy_;
  uint16_t proxy_port_ = 0;
  std::mutex mutex_;
  std::map<uint16_t, Endpoint> destinations_;
  std::vector<EgressEvent> events_;  // guarded by mutex_
  std::condition_variable events_cv_;
  // Waits (bounded) until `count` events arrived; returns them.
  std::vector<EgressEvent> EventsWhenAtLeast(size_t count) {
    std::unique_lock lock(mutex_);
    events_cv_.wait_for(lock, std::chrono::seconds(10), [&] { return events_.size() >= count; });
    return events_;
  }
  std::atomic<int> resolver_calls_{0};
  std::optional<IpAddress> host_gateway_;
};

TEST_F(ProxyTest, AllowedHostPassesWithKeepAlive) {
  Origin origin;
  StartProxy({.allow = {"api.test"}, .pins = {PinTo("api.test", 80, origin.port())}});
  auto client = Connect(Virtual("api.test", 80));
  Reader reader(*client);
  ASSERT_TRUE(client->Write("GET /echo?n=1 HTTP/1.1\r\nHost: api.test\r\n\r\n"));
  Response first = ReadResponse(reader);
  EXPECT_EQ(first.status, 200);
  EXPECT_NE(first.body.find("GET /echo?n=1 HTTP/1.1"), std::string::npos) << first.body;
  ASSERT_TRUE(
      client->Write("POST /echo?n=2 HTTP/1.1\r\nHost: API.test:80\r\n"
                    "Content-Length: 5\r\n\r\nhello"));
  Response second = ReadResponse(reader);
  EXPECT_EQ(second.status, 200);
  EXPECT_NE(second.body.find("POST /echo?n=2"), std::string::npos);
  EXPECT_NE(second.body.find("body:hello"), std::string::npos);
  EXPECT_EQ(origin.accepts(), 1);
  EXPECT_EQ(resolver_calls_.load(), 0);
}

TEST_F(ProxyTest, ConnectionCloseEndsTheGuestConnectionAfterTheResponse) {
  Origin origin;
  StartProxy({.allow = {"api.test"}, .pins = {PinTo("api.test", 80, origin.port())}});
  auto client = Connect(Virtual("api.test", 80));
  ASSERT_TRUE(client->Write("GET /echo HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"));
  // A client that reads until the close, ignoring Content-Length, gets the
  // whole response and then EOF.
  Reader reader(*client);
  std::string all = reader.ToEof();
  EXPECT_TRUE(all.starts_with("HTTP/1.1 200 OK")) << all;
  EXPECT_TRUE(all.ends_with("body:")) << all;
}

TEST_F(ProxyTest, BlockedHostGets403AndOriginIsNeverContacted) {
  Origin origin;
  StartProxy(
      {.allow = {"api.test"},
       .pins = {PinTo("api.test", 80, origin.port()), PinTo("old.test", 80, origin.port())}});
  // Host header naming another host than the address stands for.
  Response mismatch = Get(Virtual("api.test", 80), "evil.test", "/");
  EXPECT_EQ(mismatch.status, 403);
  EXPECT_NE(mismatch.body.find("evil.test"), std::string::npos) << mismatch.body;
  // A virtual address of a name that is not (or no longer) allowed.
  Response not_allowed = Get(Virtual("old.test", 80), "old.test", "/");
  EXPECT_EQ(not_allowed.status, 403);
  EXPECT_NE(not_allowed.body.find("allow list"), std::string::npos) << not_allowed.body;
  // A public address literal the guest picked itself.
  Response literal = Get(Endpoint{*IpAddress::Parse("203.0.113.9"), 80}, "evil.test", "/");
  EXPECT_EQ(literal.status, 403);
  // An address in the virtual block the DNS never handed out.
  Response unknown = Get(Endpoint{*IpAddress::Parse("198.19.200.1"), 80}, "api.test", "/");
  EXPECT_EQ(unknown.status, 403);
  EXPECT_EQ(origin.accepts(), 0);
}

TEST_F(ProxyTest, GlobEntriesMatchSubdomains) {
  Origin origin;
  StartProxy(
      {.allow = {"*.glob.test"},
       .pins = {PinTo("a.b.glob.test", 80, origin.port()), PinTo("glob.test", 80, origin.port())}});
  EXPECT_EQ(Get(Virtual("a.b.glob.test", 80), "a.b.glob.test", "/echo").status, 200);
  EXPECT_EQ(Get(Virtual("glob.test", 80), "glob.test", "/echo").status, 403);
  EXPECT_EQ(origin.accepts(), 1);
}

TEST_F(ProxyTest, RuntimeAllowListChangesApplyToNewConnections) {
  Origin origin;
  StartProxy({.allow = {"other.test"}, .pins = {PinTo("late.test", 80, origin.port())}});
  Endpoint late = Virtual("late.test", 80);
  EXPECT_EQ(Get(late, "late.test", "/echo").status, 403);
  ASSERT_TRUE(policy_->AddAllowed("late.test"));
  EXPECT_EQ(Get(late, "late.test", "/echo").status, 200);
  ASSERT_TRUE(policy_->RemoveAllowed("late.test").value_or(false));
  EXPECT_EQ(Get(late, "late.test", "/echo").status, 403);
  EXPECT_EQ(origin.accepts(), 1);
}

Secret TestSecret(const std::string& value, const std::string& host) {
  Secret secret;
  secret.name = "API_TOKEN";
  secret.value = value;
  secret.hosts.push_back(*HostPattern::Parse(host));
  return secret;
}

TEST_F(ProxyTest, SecretIsSubstitutedInHeaderAndQueryForItsHost) {
  Origin origin;
  StartProxy({.allow = {"api.test"},
              .secrets = {TestSecret("real value&x", "api.test")},
              .pins = {PinTo("api.test", 80, origin.port())}});
  const std::string placeholder = policy_->secrets()[0].placeholder;
  Response response = Get(Virtual("api.test", 80), "api.test", "/echo?key=" + placeholder + "&a=b",
                          "Authorization: Bearer " + placeholder + "\r\n");
  EXPECT_EQ(response.status, 200);
  EXPECT_NE(response.body.find("Authorization: Bearer real value&x\r\n"), std::string::npos)
      << response.body;
  EXPECT_NE(response.body.find("GET /echo?key=real%20value%26x&a=b HTTP/1.1"), std::string::npos)
      << response.body;
  for (const std::string& head : origin.heads()) {
    EXPECT_EQ(head.find(placeholder), std::string::npos);
  }
}

TEST_F(ProxyTest, PlaceholderSentToAnotherHostIsRefused) {
  Origin origin;
  StartProxy({.allow = {"api.test", "other.test"},
              .secrets = {TestSecret("hunter2-value", "api.test")},
              .pins = {PinTo("other.test", 80, origin.port())}});
  const std::string placeholder = policy_->secrets()[0].placeholder;
  Response header =
      Get(Virtual("other.test", 80), "other.test", "/echo", "X-Token: " + placeholder + "\r\n");
  EXPECT_EQ(header.status, 403);
  EXPECT_NE(header.body.find("API_TOKEN"), std::string::npos) << header.body;
  EXPECT_EQ(header.body.find("hunter2"), std::string::npos);
  Response path = Get(Virtual("other.test", 80), "other.test", "/x/" + placeholder);
  EXPECT_EQ(path.status, 403);
  EXPECT_EQ(origin.accepts(), 0);
}

// The guest can learn a value from an allowed upstream that echoes it; the
// value itself must then not travel to a host that is not the secret's.
TEST_F(ProxyTest, RealSecretValueSentToAnotherHostIsRefused) {
  Origin origin;
  StartProxy(
      {.allow = {"api.test", "other.test"},
       .secrets = {TestSecret("hunter2 value", "api.test")},
       .pins = {PinTo("api.test", 80, origin.port()), PinTo("other.test", 80, origin.port())}});
  Response header =
      Get(Virtual("other.test", 80), "other.test", "/echo", "X-Token: hunter2 value\r\n");
  EXPECT_EQ(header.status, 403);
  EXPECT_NE(header.body.find("API_TOKEN"), std::string::npos) << header.body;
  EXPECT_EQ(header.body.find("hunter2"), std::string::npos);
  Response query = Get(Virtual("other.test", 80), "other.test", "/echo?k=hunter2%20value");
  EXPECT_EQ(query.status, 403);
  EXPECT_EQ(origin.accepts(), 0);
  // Toward the secret's own host the value may travel as it is.
  Response own = Get(Virtual("api.test", 80), "api.test", "/echo", "X-Token: hunter2 value\r\n");
  EXPECT_EQ(own.status, 200);
}

// A guest that dials an address itself and claims the secret's host in the
// Host header must not get the secret substituted: the proxy would send it
// to whatever listens at that address.
TEST_F(ProxyTest, SecretIsNeverSubstitutedTowardsAnAddressTheGuestChose) {
  Origin origin;
  const Endpoint literal{Loopback(), origin.port()};
  StartProxy({.allow = {"api.test"},
              .allow_private = true,
              .allow_host_loopback = true,
              .secrets = {TestSecret("hunter2-value", "api.test")}});
  const std::string placeholder = policy_->secrets()[0].placeholder;
  Response spoofed = Get(literal, "api.test", "/echo", "X-Token: " + placeholder + "\r\n");
  EXPECT_EQ(spoofed.status, 403);
  EXPECT_EQ(spoofed.body.find("hunter2"), std::string::npos);
  EXPECT_EQ(origin.accepts(), 0);
}

// The decisions reach on_event in matchlock's NetworkEvent shape: the
// allowed request with its status, URL (as the guest sent it, before any
// secret was substituted) and byte counts; the blocked one with its reason.
TEST_F(ProxyTest, DecisionsAreReportedAsEvents) {
  Origin origin;
  StartProxy({.allow = {"api.test"},
              .secrets = {TestSecret("real-value", "api.test")},
              .pins = {PinTo("api.test", 80, origin.port())}});
  const std::string placeholder = policy_->secrets()[0].placeholder;
  Response ok = Get(Virtual("api.test", 80), "api.test:80", "/echo?k=" + placeholder);
  EXPECT_NE(ok.body.find("real-value"), std::string::npos) << ok.body;  // it was substituted
  ASSERT_EQ(ok.status, 200);
  Response refused = Get(Endpoint{*IpAddress::Parse("203.0.113.9"), 80}, "evil.test", "/x");
  ASSERT_EQ(refused.status, 403);
  auto events = EventsWhenAtLeast(2);
  ASSERT_EQ(events.size(), 2u);
  const EgressEvent* allowed = events[0].blocked ? &events[1] : &events[0];
  const EgressEvent* blocked = events[0].blocked ? &events[0] : &events[1];
  EXPECT_FALSE(allowed->blocked);
  EXPECT_EQ(allowed->method, "GET");
  EXPECT_EQ(allowed->host, "api.test");
  EXPECT_EQ(allowed->url, "http://api.test:80/echo?k=" + placeholder);
  EXPECT_EQ(allowed->status_code, 200);
  EXPECT_GT(allowed->request_bytes, 0u);
  EXPECT_GT(allowed->response_bytes, 0u);
  EXPECT_TRUE(allowed->block_reason.empty());
  EXPECT_TRUE(blocked->blocked);
  EXPECT_EQ(blocked->host, "evil.test");
  EXPECT_EQ(blocked->status_code, 403);
  EXPECT_EQ(blocked->url, "http://evil.test/x");
  EXPECT_FALSE(blocked->block_reason.empty());
}

TEST_F(ProxyTest, ChunkedBodiesPassBothWaysAndKeepAliveContinues) {
  Origin origin;
  StartProxy({.allow = {"api.test"}, .pins = {PinTo("api.test", 80, origin.port())}});
  auto client = Connect(Virtual("api.test", 80));
  Reader reader(*client);
  ASSERT_TRUE(
      client->Write("POST /chunked HTTP/1.1\r\nHost: api.test\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"));
  ASSERT_TRUE(client->Write("6;ext=1\r\nefghij\r\n"));
  ASSERT_TRUE(client->Write("0\r\n\r\n"));
  Response response = ReadResponse(reader);
  EXPECT_EQ(response.status, 200);
  EXPECT_EQ(response.body, "decoded:abcdefghij");
  // The framing was tracked exactly: the next request on the same
  // connection is parsed from the right byte.
  ASSERT_TRUE(client->Write("GET /echo HTTP/1.1\r\nHost: api.test\r\n\r\n"));
  EXPECT_EQ(ReadResponse(reader).status, 200);
  EXPECT_EQ(origin.accepts(), 1);
}

TEST_F(ProxyTest, StreamedResponseReachesTheGuestBeforeItEnds) {
  Origin origin;
  StartProxy({.allow = {"api.test"}, .pins = {PinTo("api.test", 80, origin.port())}});
  auto client = Connect(Virtual("api.test", 80));
  Reader reader(*client);
  ASSERT_TRUE(client->Write("GET /sse HTTP/1.1\r\nHost: api.test\r\n\r\n"));
  std::string head = reader.Until("\r\n\r\n");
  ASSERT_NE(head.find("200"), std::string::npos);
  // The origin holds the second event back until this first one arrived;
  // a buffering proxy would time out here.
  EXPECT_EQ(reader.Until("\n\n"), "data: one\n\n");
  origin.ReleaseSse();
  EXPECT_EQ(reader.Until("\n\n"), "data: two\n\n");
  EXPECT_EQ(reader.ToEof(), "");
}

TEST_F(ProxyTest, WebSocketUpgradeBecomesASplice) {
  Origin origin;
  StartProxy({.allow = {"api.test"}, .pins = {PinTo("api.test", 80, origin.port())}});
  auto client = Connect(Virtual("api.test", 80));
  Reader reader(*client);
  ASSERT_TRUE(
      client->Write("GET /ws HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"));
  std::string head = reader.Until("\r\n\r\n");
  EXPECT_TRUE(head.starts_with("HTTP/1.1 101")) << head;
  EXPECT_EQ(reader.Until("|"), "hello-from-origin|");
  // Not HTTP any more: these bytes must pass untouched both ways.
  ASSERT_TRUE(client->Write(std::string("\x81\x05raw\x00\xff|", 8)));
  EXPECT_EQ(reader.Until("|"), std::string("echo:\x81\x05raw\x00\xff|", 13));
  ASSERT_TRUE(client->Write("GET / HTTP/1.1|"));
  EXPECT_EQ(reader.Until("|"), "echo:GET / HTTP/1.1|");
}

TEST_F(ProxyTest, RawTcpOnlyToAllowedVirtualAddresses) {
  EchoServer echo;
  StartProxy({.allow = {"raw.test"}, .pins = {PinTo("raw.test", 9000, echo.port())}});
  {
    auto client = Connect(Virtual("raw.test", 9000));
    Reader reader(*client);
    const std::string payload("\x01\x02 binary\x00 protocol\n", 21);
    ASSERT_TRUE(client->Write(payload));
    EXPECT_EQ(reader.Exactly(payload.size()), payload);
    ASSERT_TRUE(client->ShutdownWrite());
    EXPECT_EQ(reader.ToEof(), "");
  }
  EXPECT_EQ(echo.accepts(), 1);
  auto refused = Connect(Endpoint{*IpAddress::Parse("203.0.113.7"), 9000});
  ASSERT_TRUE(refused->Write(std::string("\x01\x02 binary\n", 10)));
  Reader reader(*refused);
  EXPECT_EQ(reader.ToEof(), "");
  EXPECT_EQ(echo.accepts(), 1);
}

TEST_F(ProxyTest, PrivateLiteralBlockedUnlessAllowPrivate) {
  Origin origin;
  const Endpoint literal{Loopback(), origin.port()};
  const std::string host = "127.0.0.1:" + std::to_string(origin.port());
  StartProxy({.allow = {"api.test"}});
  Response blocked = Get(literal, host, "/echo");
  EXPECT_EQ(blocked.status, 403);
  EXPECT_NE(blocked.body.find("private"), std::string::npos) << blocked.body;
  EXPECT_EQ(origin.accepts(), 0);
  proxy_.reset();

  // 127.0.0.1 is the only origin a test can bind: it is the host's
  // loopback, which --allow-private alone does not open.
  StartProxy({.allow = {"api.test"}, .allow_private = true});
  EXPECT_EQ(Get(literal, host, "/echo").status, 403);
  EXPECT_EQ(origin.accepts(), 0);
  proxy_.reset();

  StartProxy({.allow = {"api.test"}, .allow_private = true, .allow_host_loopback = true});
  EXPECT_EQ(Get(literal, host, "/echo").status, 200);
  EXPECT_EQ(origin.accepts(), 1);
}

TEST_F(ProxyTest, GatewayReachesHostLoopbackOnlyWhenNamed) {
  Origin origin;
  const IpAddress gateway = *IpAddress::Parse("10.0.2.2");
  const Endpoint destination{gateway, origin.port()};
  const std::string host = "10.0.2.2:" + std::to_string(origin.port());
  host_gateway_ = gateway;
  StartProxy({.allow = {"api.test"}, .allow_private = true});
  EXPECT_EQ(Get(destination, host, "/echo").status, 403);
  EXPECT_EQ(origin.accepts(), 0);
  proxy_.reset();
  StartProxy({.allow = {"10.0.2.2"}});
  EXPECT_EQ(Get(destination, host, "/echo").status, 200);
  EXPECT_EQ(origin.accepts(), 1);
}

// A network entry that happens to cover the gateway does not name the host.
TEST_F(ProxyTest, GatewayIsNotOpenedByACoveringNetwork) {
  Origin origin;
  const IpAddress gateway = *IpAddress::Parse("10.0.2.2");
  const Endpoint destination{gateway, origin.port()};
  const std::string host = "10.0.2.2:" + std::to_string(origin.port());
  host_gateway_ = gateway;
  StartProxy({.allow = {"10.0.0.0/8"}});
  EXPECT_EQ(Get(destination, host, "/echo").status, 403);
  proxy_.reset();
  StartProxy({.allow = {"10.0.2.2/32"}});
  EXPECT_EQ(Get(destination, host, "/echo").status, 200);
  EXPECT_EQ(origin.accepts(), 1);
}

// The default network: the gateway (the host's loopback) is closed, even
// though every public host is open; --allow-host-loopback opens it.
TEST_F(ProxyTest, DefaultNetworkClosesTheGatewayUnlessHostLoopbackIsAllowed) {
  Origin origin;
  const IpAddress gateway = *IpAddress::Parse("10.0.2.2");
  const Endpoint destination{gateway, origin.port()};
  const std::string host = "10.0.2.2:" + std::to_string(origin.port());
  host_gateway_ = gateway;
  StartProxy({.allow_private = true, .allow_all_public = true});
  Response closed = Get(destination, host, "/echo");
  EXPECT_EQ(closed.status, 403);
  EXPECT_NE(closed.body.find("--allow-host-loopback"), std::string::npos) << closed.body;
  EXPECT_EQ(origin.accepts(), 0);
  proxy_.reset();
  StartProxy({.allow_all_public = true, .allow_host_loopback = true});
  EXPECT_EQ(Get(destination, host, "/echo").status, 200);
  EXPECT_EQ(origin.accepts(), 1);
}

// Without a list or interception, TLS to any public name is spliced as is.
TEST_F(ProxyTest, DefaultNetworkSplicesTlsToAnyNameWithoutInterception) {
  EchoServer echo;
  StartProxy({.allow_all_public = true, .pins = {PinTo("any.test", 443, echo.port())}});
  auto client = Connect(Virtual("any.test", 443));
  const std::string hello = FakeHello("any.test") + "encrypted-bytes";
  ASSERT_TRUE(client->Write(hello));
  Reader reader(*client);
  EXPECT_EQ(reader.Exactly(hello.size()), hello);
  EXPECT_EQ(echo.accepts(), 1);
}

TEST_F(ProxyTest, TlsWithoutInterceptionIsSplicedBySni) {
  EchoServer echo;
  StartProxy({.allow = {"tls.test"}, .pins = {PinTo("tls.test", 443, echo.port())}});
  {
    auto client = Connect(Virtual("tls.test", 443));
    const std::string hello = FakeHello("tls.test") + "encrypted-bytes";
    ASSERT_TRUE(client->Write(hello));
    Reader reader(*client);
    EXPECT_EQ(reader.Exactly(hello.size()), hello);
  }
  EXPECT_EQ(echo.accepts(), 1);
  // SNI naming something else than the resolved name: closed, never forwarded.
  auto client = Connect(Virtual("tls.test", 443));
  ASSERT_TRUE(client->Write(FakeHello("evil.test")));
  Reader reader(*client);
  EXPECT_EQ(reader.ToEof(), "");
  EXPECT_EQ(echo.accepts(), 1);
}

TEST_F(ProxyTest, InterceptedTlsIsHandledAsHttpWithSecrets) {
  Origin origin;
  auto tls = std::make_shared<PlainTextTls>();
  StartProxy({.allow = {"tls.test"},
              .intercept = true,
              .secrets = {TestSecret("sekret", "tls.test")},
              .pins = {PinTo("tls.test", 443, origin.port())}},
             tls);
  const std::string placeholder = policy_->secrets()[0].placeholder;
  auto client = Connect(Virtual("tls.test", 443));
  ASSERT_TRUE(client->Write(FakeHello("tls.test") +
                            "GET /echo HTTP/1.1\r\nHost: tls.test\r\n"
                            "Authorization: " +
                            placeholder + "\r\n\r\n"));
  Reader reader(*client);
  Response response = ReadResponse(reader);
  EXPECT_EQ(response.status, 200);
  EXPECT_NE(response.body.find("Authorization: sekret\r\n"), std::string::npos) << response.body;
  // Inside the tunnel the Host must agree with the SNI.
  ASSERT_TRUE(client->Write("GET /echo HTTP/1.1\r\nHost: other.test\r\n\r\n"));
  EXPECT_EQ(ReadResponse(reader).status, 403);
  EXPECT_EQ(tls->names, std::vector<std::string>{"tls.test"});
}

TEST_F(ProxyTest, InterceptionWithoutTlsProviderIsAnError) {
  auto policy = Policy::Create({.allow = {"a.test"}, .intercept = true});
  ASSERT_TRUE(policy.has_value());
  uint16_t port = 0;
  ProxyOptions options;
  options.policy = *policy;
  auto proxy = TransparentProxy::Start(ListenLoopback(port), options);
  EXPECT_FALSE(proxy.has_value());
}

TEST_F(ProxyTest, StopEndsIdleKeptAliveConnections) {
  Origin origin;
  StartProxy({.allow = {"api.test"}, .pins = {PinTo("api.test", 80, origin.port())}});
  auto client = Connect(Virtual("api.test", 80));
  Reader reader(*client);
  ASSERT_TRUE(client->Write("GET /echo HTTP/1.1\r\nHost: api.test\r\n\r\n"));
  EXPECT_EQ(ReadResponse(reader).status, 200);
  proxy_->Stop();  // would hang if the idle connection's threads were not woken
  EXPECT_EQ(reader.ToEof(), "");
}

// Real TLS on both sides: the guest verifies the proxy's minted leaf with
// the installation CA, the proxy verifies the origin against a CA file.
TEST_F(ProxyTest, RealTlsInterceptionEndToEnd) {
  std::string dir_template = (std::filesystem::temp_directory_path() / "cella-proxy-ca-XXXXXX");
  ASSERT_NE(::mkdtemp(dir_template.data()), nullptr);
  const std::filesystem::path dir = dir_template;
  auto ca = CertificateAuthority::LoadOrCreate(dir / "ca");
  ASSERT_TRUE(ca.has_value()) << ca.error().message;
  const std::string ca_file = (*ca)->CaCertificatePath();
  {
    Origin origin(*ca, "secure.test");
    StartProxy({.allow = {"secure.test"},
                .intercept = true,
                .secrets = {TestSecret("tls-secret", "secure.test")},
                .pins = {PinTo("secure.test", 443, origin.port())}},
               MakeTlsProvider(*ca, ca_file), ParseClientHelloSni);
    const std::string placeholder = policy_->secrets()[0].placeholder;
    auto tls = ConnectTls(Connect(Virtual("secure.test", 443)), "secure.test", ca_file);
    ASSERT_TRUE(tls.has_value()) << tls.error().message;
    ASSERT_TRUE(
        (*tls)->Write("GET /echo?k=" + placeholder + " HTTP/1.1\r\nHost: secure.test\r\n\r\n"));
    Reader reader(**tls);
    Response response = ReadResponse(reader);
    EXPECT_EQ(response.status, 200);
    EXPECT_NE(response.body.find("GET /echo?k=tls-secret HTTP/1.1"), std::string::npos)
        << response.body;
    proxy_.reset();
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace cella::net
