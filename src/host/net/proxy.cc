#include "host/net/proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <condition_variable>
#include <cstring>
#include <deque>

#include "base/log.h"
#include "host/net/netns.h"
#include "host/net/tls.h"

namespace cella::net {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kBufferBytes = 16 * 1024;
constexpr size_t kMaxMethodBytes = 16;

std::string_view AsText(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

std::span<const std::byte> AsBytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

void LogBlocked(std::string_view host, std::string_view reason, const Endpoint& destination,
                std::string_view protocol) {
  log::Notice(
      "egress blocked",
      {{"host", host}, {"reason", reason}, {"dst", destination.ToString()}, {"proto", protocol}});
}

std::string BlockedBody(std::string_view reason) {
  return "cella egress proxy: request blocked: " + std::string(reason) + "\n";
}

// Waits until `fd` is readable or `deadline` passes. false on timeout.
Result<bool> WaitReadable(int fd, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd pfd{fd, POLLIN, 0};
    int ready = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 60000)));
    if (ready < 0) {
      if (errno == EINTR) continue;
      return FailErrno("poll on guest connection");
    }
    if (ready > 0) return true;
  }
}

Status SetReceiveTimeout(int fd, std::chrono::milliseconds timeout) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0) {
    return FailErrno("setsockopt SO_RCVTIMEO");
  }
  return {};
}

// Small writes (an SSE event, a request head before its body) must leave
// at once; Nagle plus delayed ACKs would hold them ~40 ms.
void DisableNagle(int fd) {
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    log::Debug("egress proxy: TCP_NODELAY not set", {{"error", std::strerror(errno)}});
  }
}

Result<UniqueFd> ConnectWithTimeout(const Endpoint& endpoint, std::chrono::milliseconds timeout) {
  const std::string where = "connect " + endpoint.ToString();
  sockaddr_storage address{};
  socklen_t length;
  int family;
  if (endpoint.address.family == IpAddress::Family::kV4) {
    auto* v4 = reinterpret_cast<sockaddr_in*>(&address);
    v4->sin_family = AF_INET;
    v4->sin_port = htons(endpoint.port);
    v4->sin_addr = endpoint.address.ToInAddr();
    length = sizeof(sockaddr_in);
    family = AF_INET;
  } else {
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&address);
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(endpoint.port);
    v6->sin6_addr = endpoint.address.ToIn6Addr();
    length = sizeof(sockaddr_in6);
    family = AF_INET6;
  }
  UniqueFd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return FailErrno(where + ": socket");
  if (::connect(fd.Get(), reinterpret_cast<sockaddr*>(&address), length) != 0) {
    if (errno != EINPROGRESS) return FailErrno(where);
    auto deadline = Clock::now() + timeout;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return Fail(where + ": timed out");
      pollfd pfd{fd.Get(), POLLOUT, 0};
      int ready = ::poll(&pfd, 1, static_cast<int>(left.count()));
      if (ready < 0) {
        if (errno == EINTR) continue;
        return FailErrno(where + ": poll");
      }
      if (ready > 0) break;
    }
    int error = 0;
    socklen_t error_length = sizeof(error);
    if (::getsockopt(fd.Get(), SOL_SOCKET, SO_ERROR, &error, &error_length) != 0) {
      return FailErrno(where + ": getsockopt SO_ERROR");
    }
    if (error != 0) return FailErrno(where, error);
  }
  DisableNagle(fd.Get());
  int flags = ::fcntl(fd.Get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.Get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return FailErrno(where + ": fcntl");
  }
  return fd;
}

// Reads one message head from `stream`, starting with the bytes in
// `pending`; what follows the head stays in `pending`. nullopt: the peer
// closed cleanly before a new message began.
Result<std::optional<std::string>> ReadHead(ByteStream& stream, std::string& pending,
                                            bool skip_leading_blank_lines) {
  std::vector<std::byte> buffer(kBufferBytes);
  for (;;) {
    if (skip_leading_blank_lines) {
      // RFC 9112 2.2: a server should ignore empty lines before a request.
      while (pending.starts_with("\r\n")) pending.erase(0, 2);
    }
    if (auto end = http::FindHeadEnd(pending)) {
      std::string head = pending.substr(0, *end);
      pending.erase(0, *end);
      return head;
    }
    if (pending.size() > http::kMaxHeadBytes) return Fail("http: head larger than 64 KiB");
    size_t n = CELLA_TRY(stream.Read(buffer));
    if (n == 0) {
      if (pending.empty()) return std::optional<std::string>();
      return Fail("http: connection closed inside a message head");
    }
    pending.append(AsText(std::span(buffer.data(), n)));
  }
}

// Passes one message body from `from` to `to`, following `framing`; bytes
// already read from `from` come first out of `pending`, and bytes read past
// the end of the body are left there.
Status CopyBody(ByteStream& from, std::string& pending, ByteStream& to, http::BodyFraming framing) {
  std::vector<std::byte> buffer(kBufferBytes);
  switch (framing.kind) {
    case http::BodyKind::kNone:
      return {};
    case http::BodyKind::kLength: {
      uint64_t remaining = framing.length;
      size_t from_pending = static_cast<size_t>(std::min<uint64_t>(remaining, pending.size()));
      if (from_pending > 0) {
        CELLA_TRY(to.Write(std::string_view(pending).substr(0, from_pending)));
        pending.erase(0, from_pending);
        remaining -= from_pending;
      }
      while (remaining > 0) {
        size_t want = static_cast<size_t>(std::min<uint64_t>(remaining, buffer.size()));
        size_t n = CELLA_TRY(from.Read(std::span(buffer.data(), want)));
        if (n == 0) return Fail("http: peer closed before the end of the body");
        CELLA_TRY(to.Write(std::span<const std::byte>(buffer.data(), n)));
        remaining -= n;
      }
      return {};
    }
    case http::BodyKind::kChunked: {
      http::ChunkedTracker tracker;
      if (!pending.empty()) {
        size_t used = CELLA_TRY(tracker.Feed(pending));
        CELLA_TRY(to.Write(std::string_view(pending).substr(0, used)));
        pending.erase(0, used);
      }
      while (!tracker.Done()) {
        size_t n = CELLA_TRY(from.Read(buffer));
        if (n == 0) return Fail("http: peer closed inside a chunked body");
        std::string_view got = AsText(std::span(buffer.data(), n));
        size_t used = CELLA_TRY(tracker.Feed(got));
        CELLA_TRY(to.Write(got.substr(0, used)));
        pending.append(got.substr(used));
      }
      return {};
    }
    case http::BodyKind::kUntilClose: {
      if (!pending.empty()) {
        CELLA_TRY(to.Write(pending));
        pending.clear();
      }
      for (;;) {
        size_t n = CELLA_TRY(from.Read(buffer));
        if (n == 0) return {};
        CELLA_TRY(to.Write(std::span<const std::byte>(buffer.data(), n)));
      }
    }
  }
  return {};
}

// Copies until EOF, then half-closes `to`.
Status Pump(ByteStream& from, ByteStream& to) {
  std::vector<std::byte> buffer(kBufferBytes);
  for (;;) {
    size_t n = CELLA_TRY(from.Read(buffer));
    if (n == 0) return to.ShutdownWrite();
    CELLA_TRY(to.Write(std::span<const std::byte>(buffer.data(), n)));
  }
}

// Both directions until both ended; an error in one aborts both.
void Splice(ByteStream& a, ByteStream& b) {
  std::thread other([&] {
    if (!Pump(b, a)) {
      a.Abort();
      b.Abort();
    }
  });
  if (!Pump(a, b)) {
    a.Abort();
    b.Abort();
  }
  other.join();
}

std::string PercentEncode(std::string_view value) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (char c : value) {
    auto u = static_cast<unsigned char>(c);
    if ((u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || (u >= '0' && u <= '9') || u == '-' ||
        u == '.' || u == '_' || u == '~') {
      out += c;
    } else {
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 0xf];
    }
  }
  return out;
}

void ReplaceAll(std::string& text, std::string_view from, std::string_view to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
}

// HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes it
// unless told otherwise.
bool WantsClose(std::string_view version, const std::vector<http::Header>& headers) {
  if (http::HeaderHasToken(headers, "connection", "close")) return true;
  return version == "HTTP/1.0" && !http::HeaderHasToken(headers, "connection", "keep-alive");
}

bool IsHttpMethodChar(char c) { return c >= 'A' && c <= 'Z'; }

enum class Shape { kNeedMore, kTls, kHttp, kRaw };

class CaTlsProvider final : public TlsProvider {
 public:
  CaTlsProvider(std::shared_ptr<CertificateAuthority> ca, std::string ca_file)
      : ca_(std::move(ca)), ca_file_(std::move(ca_file)) {}
  Result<std::unique_ptr<ByteStream>> AcceptFromGuest(std::unique_ptr<ByteStream> raw,
                                                      std::string_view client_hello,
                                                      const std::string& name) override {
    return AcceptTls(std::move(raw), client_hello, *ca_, name);
  }
  Result<std::unique_ptr<ByteStream>> ConnectUpstream(std::unique_ptr<ByteStream> raw,
                                                      const std::string& name) override {
    return ConnectTls(std::move(raw), name, ca_file_);
  }

 private:
  std::shared_ptr<CertificateAuthority> ca_;
  std::string ca_file_;
};

}  // namespace

std::shared_ptr<TlsProvider> MakeTlsProvider(std::shared_ptr<CertificateAuthority> ca,
                                             std::string ca_file) {
  return std::make_shared<CaTlsProvider>(std::move(ca), std::move(ca_file));
}

std::optional<std::string> SubstituteSecrets(const Policy& policy, std::string_view host,
                                             http::RequestHead& head) {
  constexpr size_t kMinScannedSecret = 6;
  auto head_contains = [&](std::string_view needle) {
    if (head.method.find(needle) != std::string::npos) return true;
    if (head.target.find(needle) != std::string::npos) return true;
    for (const http::Header& header : head.headers) {
      if (header.name.find(needle) != std::string::npos) return true;
      if (header.value.find(needle) != std::string::npos) return true;
    }
    return false;
  };
  // Refusal is decided before anything is replaced, so a refused head is
  // never half-substituted.
  for (const Secret& secret : policy.secrets()) {
    if (Policy::SecretAppliesTo(secret, host)) continue;
    if (head_contains(secret.placeholder))
      return "secret " + secret.name + " may not be sent to " + std::string(host);
    // The real value too: an allowed upstream that echoes its request hands
    // the guest the value, which must not then walk to another host. Values
    // shorter than kMinScannedSecret would match ordinary text.
    if (secret.value.size() >= kMinScannedSecret &&
        (head_contains(secret.value) || head_contains(PercentEncode(secret.value))))
      return "the value of secret " + secret.name + " may not be sent to " + std::string(host);
  }
  for (const Secret& secret : policy.secrets()) {
    if (!Policy::SecretAppliesTo(secret, host)) continue;
    for (http::Header& header : head.headers)
      ReplaceAll(header.value, secret.placeholder, secret.value);
    size_t query = head.target.find('?');
    if (query != std::string::npos) {
      size_t fragment = head.target.find('#', query);
      std::string part = head.target.substr(
          query, fragment == std::string::npos ? std::string::npos : fragment - query);
      ReplaceAll(part, secret.placeholder, PercentEncode(secret.value));
      head.target.replace(
          query, fragment == std::string::npos ? std::string::npos : fragment - query, part);
    }
  }
  return std::nullopt;
}

struct TransparentProxy::Connection {
  std::mutex mutex;
  bool aborted = false;                 // guarded by mutex
  std::vector<UniqueFd> abort_handles;  // guarded by mutex: dups of this flow's sockets
  std::atomic<bool> finished{false};
  std::thread thread;

  // A dup keeps the socket itself alive, so shutdown() on it from Stop()
  // can never hit a descriptor number the process has since reused.
  void Watch(int fd) {
    UniqueFd handle(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!handle) {
      log::Warn("egress proxy: cannot watch connection for shutdown",
                {{"error", std::strerror(errno)}});
      return;
    }
    std::lock_guard lock(mutex);
    if (aborted) (void)::shutdown(handle.Get(), SHUT_RDWR);
    abort_handles.push_back(std::move(handle));
  }
  // Called when the flow is over: the dups would otherwise keep its sockets
  // open (the peers would not see the close) until the thread is reaped.
  void Release() {
    std::lock_guard lock(mutex);
    aborted = true;
    abort_handles.clear();
  }
  void Abort() {
    std::lock_guard lock(mutex);
    aborted = true;
    // shutdown on a socket another thread is blocked on wakes it; failure
    // (ENOTCONN: already closed) leaves nothing to wake.
    for (const UniqueFd& handle : abort_handles) (void)::shutdown(handle.Get(), SHUT_RDWR);
  }
};

// One HTTP/1.x conversation between the guest and one upstream: requests
// are handled on the calling thread, responses on a second thread.
class HttpSession {
 public:
  using Connector = std::function<Result<std::unique_ptr<ByteStream>>()>;
  HttpSession(const ProxyOptions& options, ByteStream& guest, std::string pending,
              Endpoint destination, Decision destination_decision,
              std::optional<std::string> required_host, Connector connect, std::string protocol)
      : options_(options),
        guest_(guest),
        guest_pending_(std::move(pending)),
        destination_(destination),
        destination_decision_(std::move(destination_decision)),
        required_host_(std::move(required_host)),
        upstream_by_name_(required_host_.has_value()),
        connect_(std::move(connect)),
        protocol_(std::move(protocol)) {}

  void Run();

 private:
  enum class ItemKind { kRequest, kLocalResponse, kEnd };
  struct Item {
    ItemKind kind = ItemKind::kRequest;
    std::string method;
    bool upgrade = false;
    bool close_after = false;  // the guest asked to close after this response
    std::string local_response;
  };
  enum class UpgradeState { kPending, kAccepted, kRejected, kGone };

  // Returns false when the conversation is over.
  bool HandleOneRequest();
  void Refuse(int status, std::string_view reason_phrase, std::string_view why);
  void Push(Item item);
  void ResponseLoop();
  bool ForwardOneResponse(const Item& request);
  void AbortBoth();
  void SetUpgrade(UpgradeState state);

  const ProxyOptions& options_;
  ByteStream& guest_;
  std::string guest_pending_;
  const Endpoint destination_;
  const Decision destination_decision_;
  std::optional<std::string> required_host_;  // normalized; set by the first request if empty
  const bool upstream_by_name_;  // the upstream was chosen by name, not by the guest's address
  Connector connect_;
  const std::string protocol_;
  std::unique_ptr<ByteStream> upstream_;
  std::string upstream_pending_;  // response thread only
  std::thread response_thread_;

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Item> queue_;                         // guarded by mutex_
  UpgradeState upgrade_ = UpgradeState::kPending;  // guarded by mutex_
};

void HttpSession::Run() {
  while (HandleOneRequest()) {
  }
  // Lets the response thread finish: after the answers still owed (guest
  // sent its last request), or at once when the streams were aborted.
  Push(Item{ItemKind::kEnd, "", false, false, ""});
  if (response_thread_.joinable()) {
    response_thread_.join();
  } else {
    // Nothing was ever sent upstream; anything queued is a local answer.
    std::lock_guard lock(mutex_);
    for (const Item& item : queue_) {
      if (item.kind == ItemKind::kLocalResponse) {
        if (guest_.Write(item.local_response)) (void)guest_.ShutdownWrite();
      }
    }
  }
  guest_.Abort();
  if (upstream_) upstream_->Abort();
}

void HttpSession::Push(Item item) {
  std::lock_guard lock(mutex_);
  queue_.push_back(std::move(item));
  changed_.notify_all();
}

void HttpSession::AbortBoth() {
  guest_.Abort();
  if (upstream_) upstream_->Abort();
}

void HttpSession::SetUpgrade(UpgradeState state) {
  std::lock_guard lock(mutex_);
  if (upgrade_ == UpgradeState::kPending) upgrade_ = state;
  changed_.notify_all();
}

void HttpSession::Refuse(int status, std::string_view reason_phrase, std::string_view why) {
  Item item;
  item.kind = ItemKind::kLocalResponse;
  item.local_response = http::PlainResponse(status, reason_phrase, BlockedBody(why));
  Push(std::move(item));
}

bool HttpSession::HandleOneRequest() {
  auto raw_head = ReadHead(guest_, guest_pending_, /*skip_leading_blank_lines=*/true);
  if (!raw_head) {
    log::Info("egress proxy: bad request from guest", {{"error", raw_head.error().message}});
    bool too_large = guest_pending_.size() > http::kMaxHeadBytes;
    Refuse(too_large ? 431 : 400, too_large ? "Request Header Fields Too Large" : "Bad Request",
           raw_head.error().message);
    return false;
  }
  if (!*raw_head) return false;
  auto head = http::ParseRequestHead(**raw_head);
  if (!head) {
    log::Info("egress proxy: bad request from guest", {{"error", head.error().message}});
    Refuse(400, "Bad Request", head.error().message);
    return false;
  }
  auto host_port = http::RequestHost(*head);
  if (!host_port) {
    Refuse(400, "Bad Request", host_port.error().message);
    return false;
  }
  auto host = NormalizeHost(host_port->host);
  std::string shown_host = host.value_or(host_port->host.substr(0, 255));
  auto block = [&](std::string_view why) {
    LogBlocked(shown_host, why, destination_, protocol_);
    Refuse(403, "Forbidden", why);
    return false;
  };
  if (!host) return block("invalid Host header");
  if (!destination_decision_) return block(destination_decision_.reason);
  if (required_host_ && *required_host_ != *host) {
    return block("Host header " + *host + " does not match the connection's host " +
                 *required_host_);
  }
  Decision decision = options_.policy->Check(*host);
  if (!decision) return block(decision.reason);
  if (head->method == "CONNECT") return block("CONNECT is not supported through the egress proxy");
  // A secret may only travel to an upstream the proxy reached by that name
  // (a virtual address's name, or TLS verified for the SNI name). On a
  // literal address the guest chose, the Host header is the guest's word
  // only: any placeholder there is refused, never substituted.
  std::string_view secret_host = upstream_by_name_ ? std::string_view(*host) : std::string_view();
  if (auto refusal = SubstituteSecrets(*options_.policy, secret_host, *head))
    return block(*refusal);
  auto framing = http::RequestFraming(*head);
  if (!framing) {
    Refuse(400, "Bad Request", framing.error().message);
    return false;
  }
  required_host_ = *host;

  bool upgrade = http::HeaderHasToken(head->headers, "upgrade", "websocket") &&
                 http::HeaderHasToken(head->headers, "connection", "upgrade");
  if (!upgrade && http::FindHeader(head->headers, "upgrade") != nullptr) {
    // Only WebSocket may leave HTTP/1.1 (h2c would carry requests this
    // proxy cannot see): the origin is asked without the upgrade.
    http::RemoveHeaders(head->headers, "upgrade");
    http::RemoveHeaders(head->headers, "http2-settings");
  }

  if (!upstream_) {
    auto connected = connect_();
    if (!connected) {
      log::Warn("egress proxy: upstream connection failed",
                {{"host", *host}, {"error", connected.error().message}});
      Refuse(502, "Bad Gateway", "could not connect to " + *host);
      return false;
    }
    upstream_ = std::move(*connected);
    response_thread_ = std::thread([this] { ResponseLoop(); });
  }
  log::Debug("egress allowed", {{"host", *host}, {"method", head->method}, {"proto", protocol_}});
  Push(Item{ItemKind::kRequest, head->method, upgrade, WantsClose(head->version, head->headers),
            ""});
  if (auto sent = upstream_->Write(http::SerializeRequestHead(*head)); !sent) {
    AbortBoth();
    return false;
  }
  if (auto body = CopyBody(guest_, guest_pending_, *upstream_, *framing); !body) {
    log::Info("egress proxy: request body failed",
              {{"host", *host}, {"error", body.error().message}});
    AbortBoth();
    return false;
  }
  if (!upgrade) return true;

  UpgradeState state;
  {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return upgrade_ != UpgradeState::kPending; });
    state = upgrade_;
    if (state == UpgradeState::kRejected) upgrade_ = UpgradeState::kPending;
  }
  if (state == UpgradeState::kRejected) return true;
  if (state == UpgradeState::kAccepted) {
    if (!guest_pending_.empty()) {
      if (!upstream_->Write(guest_pending_)) {
        AbortBoth();
        return false;
      }
      guest_pending_.clear();
    }
    if (!Pump(guest_, *upstream_)) AbortBoth();
  }
  return false;
}

void HttpSession::ResponseLoop() {
  for (;;) {
    Item item;
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return !queue_.empty(); });
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    if (item.kind == ItemKind::kEnd) {
      (void)guest_.ShutdownWrite();
      return;
    }
    if (item.kind == ItemKind::kLocalResponse) {
      if (guest_.Write(item.local_response)) (void)guest_.ShutdownWrite();
      AbortBoth();
      return;
    }
    if (!ForwardOneResponse(item)) {
      SetUpgrade(UpgradeState::kGone);
      AbortBoth();
      return;
    }
  }
}

bool HttpSession::ForwardOneResponse(const Item& request) {
  for (;;) {
    auto raw_head = ReadHead(*upstream_, upstream_pending_, /*skip_leading_blank_lines=*/false);
    if (!raw_head || !*raw_head) {
      log::Info("egress proxy: upstream ended without a response",
                {{"host", required_host_.value_or("")},
                 {"error", raw_head ? "connection closed" : raw_head.error().message}});
      return false;
    }
    auto head = http::ParseResponseHead(**raw_head);
    if (!head) {
      log::Warn("egress proxy: malformed response from upstream",
                {{"host", required_host_.value_or("")}, {"error", head.error().message}});
      return false;
    }
    if (head->status == 101) {
      if (!request.upgrade) return false;  // a switch nobody asked for
      if (!guest_.Write(**raw_head)) return false;
      if (!upstream_pending_.empty() && !guest_.Write(upstream_pending_)) return false;
      upstream_pending_.clear();
      SetUpgrade(UpgradeState::kAccepted);
      if (!Pump(*upstream_, guest_)) return false;
      // The other direction ends the conversation when it sees EOF.
      return true;
    }
    if (head->status < 200) {
      if (!guest_.Write(**raw_head)) return false;
      continue;
    }
    auto framing = http::ResponseFraming(*head, request.method);
    if (!framing) {
      log::Warn("egress proxy: malformed response from upstream",
                {{"host", required_host_.value_or("")}, {"error", framing.error().message}});
      return false;
    }
    if (!guest_.Write(**raw_head)) return false;
    if (auto body = CopyBody(*upstream_, upstream_pending_, guest_, *framing); !body) {
      log::Info("egress proxy: response body failed",
                {{"host", required_host_.value_or("")}, {"error", body.error().message}});
      return false;
    }
    if (request.upgrade) SetUpgrade(UpgradeState::kRejected);
    if (framing->kind == http::BodyKind::kUntilClose || request.close_after ||
        WantsClose(head->version, head->headers)) {
      // The body ended with the upstream connection, or either side said
      // this was the last exchange: the guest sees the close too.
      (void)guest_.ShutdownWrite();
      return false;
    }
    return true;
  }
}

// Handles one accepted guest connection from classification to close.
class ConnectionHandler {
 public:
  ConnectionHandler(TransparentProxy& proxy, TransparentProxy::Connection& connection,
                    UniqueFd guest)
      : proxy_(proxy),
        options_(proxy.options_),
        connection_(connection),
        guest_fd_(std::move(guest)) {}
  void Run();

 private:
  struct Prefix {
    Shape shape = Shape::kRaw;
    std::string bytes;
    std::optional<std::string> sni;  // kTls with a readable server_name
    bool closed = false;             // the guest closed before sending anything
  };
  Result<Prefix> ReadPrefix();
  Shape Classify(std::string_view bytes, std::optional<std::string>& sni) const;
  Result<std::vector<Endpoint>> UpstreamEndpoints(const std::string& name) const;
  Result<std::unique_ptr<FdStream>> ConnectUpstream();
  void WarnSecretsNeedInterception(const std::string& host);

  TransparentProxy& proxy_;
  const ProxyOptions& options_;
  TransparentProxy::Connection& connection_;
  UniqueFd guest_fd_;
  Endpoint destination_;
  std::optional<std::string> virtual_name_;
};

Shape ConnectionHandler::Classify(std::string_view bytes, std::optional<std::string>& sni) const {
  if (bytes.empty()) return Shape::kNeedMore;
  if (static_cast<unsigned char>(bytes[0]) == 0x16) {
    auto parsed = options_.sni_parser ? options_.sni_parser(AsBytes(bytes))
                                      : ParseClientHelloSni(AsBytes(bytes));
    if (!parsed) {
      log::Debug("egress proxy: no usable SNI", {{"error", parsed.error().message}});
      return Shape::kTls;
    }
    if (!*parsed) return bytes.size() >= kMaxClientHelloBytes ? Shape::kTls : Shape::kNeedMore;
    sni = **parsed;
    return Shape::kTls;
  }
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (bytes[i] == ' ' && i > 0) {
      // A request line: wait for the whole head (the session bounds it too).
      if (http::FindHeadEnd(bytes) || bytes.size() > http::kMaxHeadBytes) return Shape::kHttp;
      return Shape::kNeedMore;
    }
    if (!IsHttpMethodChar(bytes[i]) || i >= kMaxMethodBytes) return Shape::kRaw;
  }
  return Shape::kNeedMore;
}

Result<ConnectionHandler::Prefix> ConnectionHandler::ReadPrefix() {
  Prefix prefix;
  int fd = guest_fd_.Get();
  bool readable = CELLA_TRY(WaitReadable(fd, Clock::now() + options_.first_bytes_wait));
  if (!readable) return prefix;  // server-speaks-first: raw TCP
  auto deadline = Clock::now() + options_.head_wait;
  std::vector<char> buffer(kBufferBytes);
  for (;;) {
    ssize_t n = ::recv(fd, buffer.data(), buffer.size(), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno("recv from guest");
    }
    if (n == 0) {
      prefix.closed = prefix.bytes.empty();
      Shape shape = Classify(prefix.bytes, prefix.sni);
      prefix.shape = shape == Shape::kNeedMore ? Shape::kRaw : shape;
      return prefix;
    }
    prefix.bytes.append(buffer.data(), static_cast<size_t>(n));
    Shape shape = Classify(prefix.bytes, prefix.sni);
    if (shape != Shape::kNeedMore) {
      prefix.shape = shape;
      return prefix;
    }
    if (!CELLA_TRY(WaitReadable(fd, deadline))) {
      // Stalled mid-way: decide on what arrived.
      prefix.shape = static_cast<unsigned char>(prefix.bytes[0]) == 0x16 ? Shape::kTls
                     : prefix.bytes.find(' ') != std::string::npos       ? Shape::kHttp
                                                                         : Shape::kRaw;
      return prefix;
    }
  }
}

Result<std::vector<Endpoint>> ConnectionHandler::UpstreamEndpoints(const std::string& name) const {
  if (auto pin = options_.policy->PinFor(name, destination_.port)) return std::vector{*pin};
  std::vector<IpAddress> addresses;
  if (auto cached = options_.fake_ips ? options_.fake_ips->Resolved(name) : std::nullopt) {
    addresses = *cached;
  } else {
    addresses = CELLA_TRY_CTX(options_.resolver(name), "resolve " + name);
  }
  std::vector<Endpoint> endpoints;
  for (const IpAddress& address : addresses) {
    if (options_.policy->MayConnectToResolved(address)) {
      endpoints.push_back(Endpoint{address, destination_.port});
    }
  }
  if (endpoints.empty()) {
    return Fail(addresses.empty() ? "no address found for " + name
                                  : name + " resolves only to private or special addresses");
  }
  return endpoints;
}

Result<std::unique_ptr<FdStream>> ConnectionHandler::ConnectUpstream() {
  std::vector<Endpoint> endpoints;
  if (virtual_name_) {
    endpoints = CELLA_TRY(UpstreamEndpoints(*virtual_name_));
  } else if (options_.host_gateway && destination_.address == *options_.host_gateway) {
    // The gateway stands for the host, as in QEMU's user-mode network.
    endpoints.push_back(Endpoint{*IpAddress::Parse("127.0.0.1"), destination_.port});
  } else {
    endpoints.push_back(destination_);
  }
  std::string errors;
  for (const Endpoint& endpoint : endpoints) {
    auto fd = ConnectWithTimeout(endpoint, options_.connect_timeout);
    if (fd) {
      connection_.Watch(fd->Get());
      return std::make_unique<FdStream>(std::move(*fd));
    }
    if (!errors.empty()) errors += "; ";
    errors += fd.error().message;
  }
  return Fail(errors);
}

void ConnectionHandler::WarnSecretsNeedInterception(const std::string& host) {
  bool applies = false;
  for (const Secret& secret : options_.policy->secrets()) {
    if (Policy::SecretAppliesTo(secret, host)) applies = true;
  }
  if (!applies) return;
  {
    std::lock_guard lock(proxy_.mutex_);
    if (!proxy_.warned_secret_hosts_.insert(host).second) return;
  }
  log::Warn("secrets are not substituted in TLS without interception",
            {{"host", host}, {"hint", "use --network-intercept"}});
}

void ConnectionHandler::Run() {
  connection_.Watch(guest_fd_.Get());
  DisableNagle(guest_fd_.Get());
  OriginalDestinationFn original = options_.original_destination;
  if (!original) {
    original = [](int fd) -> Result<Endpoint> {
      sockaddr_in address = CELLA_TRY(OriginalDestination(fd));
      return Endpoint{IpAddress::V4(address.sin_addr), ntohs(address.sin_port)};
    };
  }
  auto destination = original(guest_fd_.Get());
  if (!destination) {
    log::Warn("egress proxy: no original destination", {{"error", destination.error().message}});
    return;
  }
  destination_ = *destination;

  Decision destination_decision;
  std::string destination_host;  // what the log names when nothing better is known
  if (FakeIpTable::IsVirtual(destination_.address)) {
    virtual_name_ = options_.fake_ips ? options_.fake_ips->NameFor(destination_.address.ToInAddr())
                                      : std::nullopt;
    if (!virtual_name_) {
      destination_host = destination_.address.ToString();
      destination_decision = {false, "unknown virtual address (not handed out by the sandbox DNS)"};
    } else if (IpAddress::Parse(*virtual_name_)) {
      // An address literal must never stand behind a virtual address: that
      // would skip the address checks (the host's loopback among them).
      destination_host = *virtual_name_;
      destination_decision = {false, "address literal behind a virtual address"};
    } else {
      destination_host = *virtual_name_;
      destination_decision = options_.policy->Check(*virtual_name_);
    }
  } else if (options_.host_gateway && destination_.address == *options_.host_gateway) {
    // The gateway is the host itself (its loopback): --allow-private alone
    // does not open it, only --allow-host-loopback or an entry naming the
    // gateway address.
    destination_host = destination_.address.ToString();
    if (options_.policy->MayReachHostGateway(destination_.address)) {
      destination_decision = {true, ""};
    } else {
      destination_decision = {false,
                              "the gateway is the host itself; use --allow-host-loopback "
                              "or allow " +
                                  destination_host + " explicitly to reach it"};
    }
  } else {
    destination_host = destination_.address.ToString();
    destination_decision = options_.policy->CheckAddress(destination_.address);
  }

  auto prefix = ReadPrefix();
  if (!prefix) {
    log::Info("egress proxy: guest connection failed", {{"error", prefix.error().message}});
    return;
  }
  if (prefix->closed) return;

  if (prefix->shape == Shape::kHttp) {
    FdStream guest(std::move(guest_fd_));
    HttpSession session(
        options_, guest, std::move(prefix->bytes), destination_, destination_decision,
        virtual_name_,
        [this]() -> Result<std::unique_ptr<ByteStream>> { return CELLA_TRY(ConnectUpstream()); },
        "http");
    session.Run();
    return;
  }

  const std::string protocol = prefix->shape == Shape::kTls ? "tls" : "tcp";
  std::string host = destination_host;
  auto block = [&](std::string_view why) { LogBlocked(host, why, destination_, protocol); };
  if (prefix->sni) {
    auto sni = NormalizeHost(*prefix->sni);
    host = sni.value_or(prefix->sni->substr(0, 255));
    if (!sni) return block("invalid SNI");
    if (!destination_decision) return block(destination_decision.reason);
    if (virtual_name_ && *sni != *virtual_name_) {
      return block("TLS SNI " + *sni + " does not match the resolved name " + *virtual_name_);
    }
    if (Decision decision = options_.policy->Check(*sni); !decision) {
      return block(decision.reason);
    }
  } else if (!destination_decision) {
    return block(destination_decision.reason);
  }

  if (prefix->shape == Shape::kTls && options_.policy->intercept()) {
    // Interception needs a name for the leaf: the SNI, else what the
    // destination stands for.
    auto raw_guest = std::make_unique<FdStream>(std::move(guest_fd_));
    int guest_fd = raw_guest->fd();
    if (auto timeout = SetReceiveTimeout(guest_fd, options_.head_wait); !timeout) {
      log::Warn("egress proxy: guest socket", {{"error", timeout.error().message}});
      return;
    }
    auto guest = options_.tls->AcceptFromGuest(std::move(raw_guest), prefix->bytes, host);
    if (!guest) {
      log::Info("egress proxy: TLS handshake with guest failed",
                {{"host", host}, {"error", guest.error().message}});
      return;
    }
    if (auto timeout = SetReceiveTimeout(guest_fd, std::chrono::milliseconds(0)); !timeout) {
      log::Warn("egress proxy: guest socket", {{"error", timeout.error().message}});
      return;
    }
    auto connect_tls = [this, host]() -> Result<std::unique_ptr<ByteStream>> {
      std::unique_ptr<FdStream> raw = CELLA_TRY(ConnectUpstream());
      // A silent upstream must not hold the handshake forever.
      const int fd = raw->fd();
      CELLA_TRY(SetReceiveTimeout(fd, options_.connect_timeout));
      auto tls = CELLA_TRY(options_.tls->ConnectUpstream(std::move(raw), host));
      CELLA_TRY(SetReceiveTimeout(fd, std::chrono::milliseconds(0)));
      return tls;
    };
    HttpSession session(options_, **guest, "", destination_, destination_decision, host,
                        connect_tls, "https");
    session.Run();
    return;
  }

  if (prefix->shape == Shape::kTls) WarnSecretsNeedInterception(host);
  FdStream guest(std::move(guest_fd_));
  auto upstream = ConnectUpstream();
  if (!upstream) {
    log::Warn("egress proxy: upstream connection failed",
              {{"host", host}, {"error", upstream.error().message}});
    return;
  }
  log::Debug("egress allowed", {{"host", host}, {"proto", protocol}});
  if (!prefix->bytes.empty() && !(*upstream)->Write(prefix->bytes)) return;
  Splice(guest, **upstream);
}

Result<std::unique_ptr<TransparentProxy>> TransparentProxy::Start(UniqueFd listener,
                                                                  ProxyOptions options) {
  if (!listener) return Fail("egress proxy: no listening socket");
  if (!options.policy) return Fail("egress proxy: no policy");
  if (!options.resolver) return Fail("egress proxy: no resolver");
  if (options.policy->intercept() && !options.tls) {
    return Fail("egress proxy: interception requested but no TLS provider (CA) configured");
  }
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) return FailErrno("egress proxy: eventfd");
  auto proxy = std::unique_ptr<TransparentProxy>(
      new TransparentProxy(std::move(listener), std::move(wake), std::move(options)));
  proxy->accept_thread_ = std::thread([raw = proxy.get()] { raw->AcceptLoop(); });
  return proxy;
}

TransparentProxy::~TransparentProxy() { Stop(); }

void TransparentProxy::Stop() {
  if (stopped_.exchange(true)) return;
  uint64_t one = 1;
  if (::write(wake_.Get(), &one, sizeof(one)) != sizeof(one)) {
    log::Error("egress proxy: eventfd write failed", {{"error", std::strerror(errno)}});
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  std::list<std::shared_ptr<Connection>> connections;
  {
    std::lock_guard lock(mutex_);
    connections.swap(connections_);
  }
  for (auto& connection : connections) connection->Abort();
  for (auto& connection : connections) {
    if (connection->thread.joinable()) connection->thread.join();
  }
}

void TransparentProxy::ReapFinished() {
  std::list<std::shared_ptr<Connection>> done;
  {
    std::lock_guard lock(mutex_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if ((*it)->finished.load()) {
        done.push_back(std::move(*it));
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& connection : done) connection->thread.join();
}

void TransparentProxy::AcceptLoop() {
  for (;;) {
    pollfd fds[2] = {{listener_.Get(), POLLIN, 0}, {wake_.Get(), POLLIN, 0}};
    // The timeout only bounds how long finished connection threads wait to
    // be joined on an idle proxy.
    int ready = ::poll(fds, 2, 5000);
    if (ready < 0) {
      if (errno == EINTR) continue;
      log::Error("egress proxy stopped", {{"error", std::string("poll: ") + std::strerror(errno)}});
      return;
    }
    ReapFinished();
    if (fds[1].revents != 0) return;
    if (fds[0].revents == 0) continue;
    UniqueFd guest(::accept4(listener_.Get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!guest) {
      // The guest may reset a connection before we accept it; fd/memory
      // exhaustion is transient too. Keep serving.
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
        log::Warn("egress proxy: accept failed", {{"error", std::strerror(errno)}});
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          ::poll(nullptr, 0, 100);
        } else if (errno == EBADF || errno == EINVAL || errno == ENOTSOCK) {
          return;
        }
      }
      continue;
    }
    auto connection = std::make_shared<Connection>();
    {
      std::lock_guard lock(mutex_);
      connections_.push_back(connection);
    }
    connection->thread = std::thread([this, connection, fd = guest.Release()]() mutable {
      ConnectionHandler(*this, *connection, UniqueFd(fd)).Run();
      connection->Release();
      connection->finished.store(true);
    });
  }
}

}  // namespace cella::net
