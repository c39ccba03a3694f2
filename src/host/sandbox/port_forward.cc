#include "host/sandbox/port_forward.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <charconv>
#include <cstring>

#include "base/byte_stream.h"
#include "base/io.h"
#include "base/log.h"

namespace cella::sandbox {

struct PortForwarder::Connection {
  explicit Connection(UniqueFd fd) : socket(std::move(fd)) {}
  FdStream socket;
  std::unique_ptr<host::PortStream> stream;
  std::thread to_guest;
  std::thread to_host;
  std::atomic<int> finished{0};
};

namespace {

Result<uint16_t> ParsePort(std::string_view text, std::string_view what) {
  unsigned value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value == 0 || value > 65535)
    return Fail(std::string(what) + " port \"" + std::string(text) + "\": want 1-65535");
  return static_cast<uint16_t>(value);
}

}  // namespace

Result<PortMapping> ParsePortMapping(std::string_view text) {
  PortMapping m;
  std::string_view rest = text;
  if (auto slash = rest.find('/'); slash != std::string_view::npos) {
    if (rest.substr(slash + 1) != "tcp")
      return Fail("port mapping \"" + std::string(text) + "\": only tcp is supported");
    rest = rest.substr(0, slash);
  }
  auto last = rest.rfind(':');
  if (last == std::string_view::npos)
    return Fail("port mapping \"" + std::string(text) + "\": want HOST:GUEST or IP:HOST:GUEST");
  m.guest_port = CELLA_TRY(ParsePort(rest.substr(last + 1), "guest"));
  rest = rest.substr(0, last);
  if (auto colon = rest.rfind(':'); colon != std::string_view::npos) {
    m.host_ip = std::string(rest.substr(0, colon));
    rest = rest.substr(colon + 1);
    in_addr probe{};
    if (::inet_pton(AF_INET, m.host_ip.c_str(), &probe) != 1)
      return Fail("port mapping \"" + std::string(text) + "\": \"" + m.host_ip +
                  "\" is not an IPv4 address");
  }
  m.host_port = CELLA_TRY(ParsePort(rest, "host"));
  return m;
}

Result<std::unique_ptr<PortForwarder>> PortForwarder::Start(const std::string& host_ip,
                                                            uint16_t host_port, uint16_t guest_port,
                                                            PortOpener opener) {
  std::unique_ptr<PortForwarder> f(new PortForwarder());
  f->guest_port_ = guest_port;
  f->opener_ = std::move(opener);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(host_port);
  if (::inet_pton(AF_INET, host_ip.c_str(), &addr.sin_addr) != 1)
    return Fail("publish: \"" + host_ip + "\" is not an IPv4 address");
  f->listen_fd_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!f->listen_fd_) return FailErrno("socket");
  int one = 1;
  if (::setsockopt(f->listen_fd_.Get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
    return FailErrno("setsockopt SO_REUSEADDR");
  const std::string where = host_ip + ":" + std::to_string(host_port);
  if (::bind(f->listen_fd_.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return std::unexpected(
        Error{"publish " + where + ": bind: " + std::strerror(errno) +
                  (errno == EADDRINUSE ? " (another program uses this port; pick another)" : ""),
              errno});
  }
  if (::listen(f->listen_fd_.Get(), 128) != 0) return FailErrno("listen " + where);
  socklen_t len = sizeof addr;
  if (::getsockname(f->listen_fd_.Get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    return FailErrno("getsockname " + where);
  f->bound_port_ = ntohs(addr.sin_port);
  f->wake_fd_ = CELLA_TRY(WakeFd::Create("port forward"));
  f->accept_thread_ = std::thread([p = f.get()] { p->AcceptLoop(); });
  return f;
}

PortForwarder::~PortForwarder() { Stop(); }

void PortForwarder::Stop() {
  if (stopping_.exchange(true)) return;
  wake_fd_.Signal();
  if (accept_thread_.joinable()) accept_thread_.join();
  // New connections are refused from here on, not left in the backlog.
  listen_fd_.Reset();
  std::list<std::shared_ptr<Connection>> live;
  {
    std::lock_guard lock(mu_);
    live.swap(connections_);
  }
  for (auto& c : live) {
    // Unblocks the host->guest pump, which half-closes the guest side.
    c->socket.Abort();
    if (c->to_guest.joinable()) c->to_guest.join();
    // The guest->host pump ends when the guest closes its side; a guest
    // that never does cannot be interrupted mid-read, so after a grace the
    // pump is left to end with the link (it owns its connection).
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (c->finished.load() < 2 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (c->finished.load() == 2) {
      c->to_host.join();
    } else {
      c->to_host.detach();
    }
  }
}

void PortForwarder::ReapFinished() {
  std::lock_guard lock(mu_);
  for (auto it = connections_.begin(); it != connections_.end();) {
    if ((*it)->finished.load() == 2) {
      (*it)->to_guest.join();
      (*it)->to_host.join();
      it = connections_.erase(it);
    } else {
      ++it;
    }
  }
}

void PortForwarder::AcceptLoop() {
  while (!stopping_.load()) {
    pollfd fds[2] = {{listen_fd_.Get(), POLLIN, 0}, {wake_fd_.Get(), POLLIN, 0}};
    int rc = ::poll(fds, 2, 1000);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) {
      log::Warn("port forward: poll failed", {{"error", std::strerror(errno)}});
      return;
    }
    ReapFinished();
    if (fds[1].revents) return;
    if (!(fds[0].revents & POLLIN)) continue;
    UniqueFd socket(::accept4(listen_fd_.Get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!socket) continue;
    auto stream = opener_(guest_port_);
    if (!stream) {
      // The client sees a reset; the reason goes to the log.
      log::Notice("port forward: guest port unreachable",
                  {{"guest_port", guest_port_}, {"error", stream.error().message}});
      continue;
    }
    auto conn = std::make_shared<Connection>(std::move(socket));
    conn->stream = std::move(*stream);
    Serve(conn);
    std::lock_guard lock(mu_);
    connections_.push_back(conn);
  }
}

void PortForwarder::Serve(const std::shared_ptr<Connection>& conn) {
  // The pumps hold the connection alive: a detached one (see Stop) may
  // outlive the forwarder.
  Connection* c = conn.get();
  // An error ends a direction; the guest side still gets its EOF (and the
  // host socket its FIN) so the peer does not wait on a dead direction.
  c->to_guest = std::thread([c, conn] {
    std::byte buf[64 * 1024];
    if (auto st = Pump(c->socket, *c->stream, buf); !st) {
      log::Debug("port forward: host to guest ended", {{"error", st.error().message}});
      (void)c->stream->ShutdownWrite();  // may fail again: the link is gone
    }
    c->finished.fetch_add(1);
  });
  c->to_host = std::thread([c, conn] {
    std::byte buf[64 * 1024];
    if (auto st = Pump(*c->stream, c->socket, buf); !st) {
      log::Debug("port forward: guest to host ended", {{"error", st.error().message}});
      (void)c->socket.ShutdownWrite();  // best effort: the socket may be gone too
    }
    c->finished.fetch_add(1);
  });
}

}  // namespace cella::sandbox
