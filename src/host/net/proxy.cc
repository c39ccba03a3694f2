#include "host/net/proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstring>

#include "base/log.h"
#include "host/net/egress_decision.h"
#include "host/net/http_session.h"
#include "host/net/netns.h"
#include "host/net/proxy_io.h"
#include "host/net/tls.h"

namespace cella::net {
namespace {

constexpr size_t kMaxMethodBytes = 16;

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

  DestinationFacts facts;
  facts.address = destination_;
  facts.is_virtual = FakeIpTable::IsVirtual(destination_.address);
  if (facts.is_virtual && options_.fake_ips)
    facts.virtual_name = options_.fake_ips->NameFor(destination_.address.ToInAddr());
  facts.is_host_gateway =
      !facts.is_virtual && options_.host_gateway && destination_.address == *options_.host_gateway;
  const DestinationVerdict judged = DecideDestination(*options_.policy, facts);
  const Decision& destination_decision = judged.decision;
  virtual_name_ = judged.name;

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
  const Verdict stream = DecideStream(*options_.policy, judged, prefix->sni);
  const std::string& host = stream.host;
  if (!stream) {
    LogBlocked(host, stream.reason, destination_, protocol);
    if (options_.on_event) {
      EgressEvent event;
      event.host = host;
      event.protocol = protocol;
      event.blocked = true;
      event.block_reason = stream.reason;
      options_.on_event(std::move(event));
    }
    return;
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
  const auto start = std::chrono::steady_clock::now();
  if (!prefix->bytes.empty() && !(*upstream)->Write(prefix->bytes)) return;
  Splice(guest, **upstream);
  if (options_.on_event) {
    auto elapsed = std::chrono::steady_clock::now() - start;
    EgressEvent event;
    event.host = host;
    event.protocol = protocol;
    event.duration_ms = std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count();
    options_.on_event(std::move(event));
  }
}

Result<std::unique_ptr<TransparentProxy>> TransparentProxy::Start(UniqueFd listener,
                                                                  ProxyOptions options) {
  if (!listener) return Fail("egress proxy: no listening socket");
  if (!options.policy) return Fail("egress proxy: no policy");
  if (!options.resolver) return Fail("egress proxy: no resolver");
  if (options.policy->intercept() && !options.tls) {
    return Fail("egress proxy: interception requested but no TLS provider (CA) configured");
  }
  WakeFd wake = CELLA_TRY(WakeFd::Create("egress proxy"));
  auto proxy = std::unique_ptr<TransparentProxy>(
      new TransparentProxy(std::move(listener), std::move(wake), std::move(options)));
  proxy->accept_thread_ = std::thread([raw = proxy.get()] { raw->AcceptLoop(); });
  return proxy;
}

TransparentProxy::~TransparentProxy() { Stop(); }

void TransparentProxy::Stop() {
  if (stopped_.exchange(true)) return;
  wake_.Signal();
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
