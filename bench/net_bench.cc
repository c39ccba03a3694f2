// Guest download throughput: QEMU user-mode networking (slirp, a userspace
// TCP/IP stack inside QEMU) against the sealed network (TAP in a private
// namespace, nftables redirect, a proxy socket in this process splicing to
// the server). Same guest, same host server on 127.0.0.1, same run.
//
// The guest runs `nc 10.0.2.2 PORT > /dev/null`; the server sends MB
// megabytes and closes. Under (a) slirp forwards 10.0.2.2:PORT to
// 127.0.0.1:PORT; under (b) the redirect hands the flow to proxy_listener,
// which this bench splices to 127.0.0.1:PORT (what the egress proxy does for
// plain TCP). Timed on the host around the guest command; best of RUNS.
// Usage: build/bench/net_bench [MB] [RUNS]   (root: the TAP namespace)
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "base/unique_fd.h"
#include "host/net/netns.h"
#include "host/os/paths.h"
#include "host/sandbox/compose.h"
#include "host/vmm/qemu_backend.h"

namespace {

using namespace cella;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "net_bench: %s\n", what.c_str());
  std::exit(1);
}

// Sends `bytes` zeros to every connection, then closes it.
class ZeroServer {
 public:
  explicit ZeroServer(size_t bytes) : bytes_(bytes) {
    listener_.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t size = sizeof(addr);
    if (!listener_ || ::bind(listener_.Get(), reinterpret_cast<sockaddr*>(&addr), size) != 0 ||
        ::listen(listener_.Get(), 16) != 0 ||
        ::getsockname(listener_.Get(), reinterpret_cast<sockaddr*>(&addr), &size) != 0) {
      Die("server socket on 127.0.0.1");
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }
  ~ZeroServer() {
    stop_ = true;
    thread_.join();
  }
  uint16_t port() const { return port_; }
  size_t last_sent() const { return last_sent_; }

 private:
  void Serve() {
    std::vector<char> zeros(size_t{1} << 20, 0);
    while (!stop_) {
      pollfd pfd{listener_.Get(), POLLIN, 0};
      if (::poll(&pfd, 1, 200) != 1) continue;
      UniqueFd conn(::accept4(listener_.Get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn) continue;
      size_t sent = 0;
      while (sent < bytes_) {
        ssize_t n =
            ::send(conn.Get(), zeros.data(), std::min(zeros.size(), bytes_ - sent), MSG_NOSIGNAL);
        if (n <= 0) break;
        sent += static_cast<size_t>(n);
      }
      last_sent_ = sent;
    }
  }

  size_t bytes_;
  UniqueFd listener_;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<size_t> last_sent_{0};
  std::thread thread_;
};

// from -> to through a pipe with splice(2) until EOF, then half-closes `to`.
void SpliceOneWay(int from, int to) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return;
  while (true) {
    ssize_t in = ::splice(from, nullptr, p[1], nullptr, 1 << 20, SPLICE_F_MOVE);
    if (in <= 0) break;
    ssize_t left = in;
    while (left > 0) {
      ssize_t out = ::splice(p[0], nullptr, to, nullptr, static_cast<size_t>(left), SPLICE_F_MOVE);
      if (out <= 0) {
        left = -1;
        break;
      }
      left -= out;
    }
    if (left < 0) break;
  }
  ::shutdown(to, SHUT_WR);
  ::close(p[0]);
  ::close(p[1]);
}

// The plain-TCP half of the egress proxy: accept on proxy_listener, connect
// to the server, splice both ways.
class SpliceProxy {
 public:
  SpliceProxy(int listener, uint16_t upstream_port) : listener_(listener), port_(upstream_port) {
    thread_ = std::thread([this] { Serve(); });
  }
  ~SpliceProxy() {
    stop_ = true;
    thread_.join();
  }

 private:
  void Serve() {
    while (!stop_) {
      pollfd pfd{listener_, POLLIN, 0};
      if (::poll(&pfd, 1, 200) != 1) continue;
      UniqueFd guest(::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC));
      if (!guest) continue;
      if (!net::OriginalDestination(guest.Get())) continue;
      UniqueFd upstream(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(port_);
      if (!upstream ||
          ::connect(upstream.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
        continue;
      }
      std::thread up([&] { SpliceOneWay(guest.Get(), upstream.Get()); });
      SpliceOneWay(upstream.Get(), guest.Get());
      up.join();
    }
  }

  int listener_;
  uint16_t port_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

struct Vm {
  std::string dir;
  std::unique_ptr<vmm::Machine> machine;
  ~Vm() {
    if (machine) (void)machine->Close();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

std::unique_ptr<Vm> Boot(const sandbox::GuestAssets& assets, int tap_fd, const char* name) {
  auto vm = std::make_unique<Vm>();
  char tmpl[] = "/tmp/cella-net-bench-XXXXXX";
  if (!::mkdtemp(tmpl)) Die("mkdtemp");
  vm->dir = tmpl;
  protocol::Config guest;
  guest.keep_alive = true;
  auto config = sandbox::Compose(assets, guest, {1, 512}, {}, {}, name, vm->dir);
  if (!config) Die(config.error().message);
  config->NetworkFD = tap_fd;
  if (auto st = sandbox::WriteGuestConfig(guest, *config); !st) Die(st.error().message);
  auto options = vmm::DetectQemuHost(vmm::AccelMode::kAuto);
  if (!options) Die(options.error().message);
  options->boot_timeout = 120s;
  auto machine = vmm::QemuBackend(*options).Create(*config);
  if (!machine) Die(machine.error().message);
  vm->machine = std::move(*machine);
  if (auto st = vm->machine->Start(); !st) Die(st.error().message);
  return vm;
}

// Best-of-runs MB/s for the guest fetching from 10.0.2.2:port.
double Download(vmm::Machine& machine, const ZeroServer& server, size_t bytes, int runs) {
  double best = 0;
  for (int i = 0; i < runs; ++i) {
    protocol::ExecRequest request;
    request.argv = {"sh", "-c",
                    "nc 10.0.2.2 " + std::to_string(server.port()) + " </dev/null >/dev/null"};
    request.env = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin"};
    request.timeout_ms = 600'000;
    auto t0 = Clock::now();
    auto r = machine.Exec(request);
    double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!r || r->status.exit_code != 0) {
      Die("guest download failed: " + (r ? r->stdout_data + r->stderr_data : r.error().message));
    }
    if (server.last_sent() != bytes) Die("the server sent " + std::to_string(server.last_sent()));
    double mbps = static_cast<double>(bytes) / (1 << 20) / seconds;
    std::fprintf(stderr, "  run %d: %.2f s, %.1f MB/s\n", i + 1, seconds, mbps);
    best = std::max(best, mbps);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int megabytes = argc > 1 ? std::atoi(argv[1]) : 100;
  int runs = argc > 2 ? std::atoi(argv[2]) : 3;
  if (megabytes <= 0 || runs <= 0) Die("usage: net_bench [MB] [RUNS]");
  size_t bytes = static_cast<size_t>(megabytes) << 20;
  auto home = host::CellaHome();
  if (!home) Die(home.error().message);
  auto assets = sandbox::EnsureGuestAssets(
      *home, std::filesystem::path(CELLA_BINARY).parent_path().string(), std::nullopt);
  if (!assets) Die(assets.error().message);
  ZeroServer server(bytes);

  std::fprintf(stderr, "(a) QEMU user-mode networking (slirp)\n");
  double slirp = 0;
  {
    auto vm = Boot(*assets, -1, "netbench-slirp");
    slirp = Download(*vm->machine, server, bytes, runs);
  }
  std::fprintf(stderr, "(b) TAP in a namespace + nftables redirect + splice proxy\n");
  double tap = 0;
  {
    auto network = net::CreateIsolatedNetwork({});
    if (!network) Die(network.error().message);
    SpliceProxy proxy(network->proxy_listener.Get(), server.port());
    auto vm = Boot(*assets, network->tap.Get(), "netbench-tap");
    tap = Download(*vm->machine, server, bytes, runs);
  }
  std::printf(
      "guest download of %d MB, best of %d: slirp %.1f MB/s, tap+redirect %.1f MB/s, "
      "ratio tap/slirp %.2f\n",
      megabytes, runs, slirp, tap, tap / slirp);
  return 0;
}
