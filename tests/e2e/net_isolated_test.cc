// The sealed network with a real guest: QEMU gets the namespace's TAP, the
// guest keeps its usual addresses (10.0.2.15, gateway 10.0.2.2, DNS
// 10.0.2.3), and the test stands in for the supervisor's proxy and DNS
// server on the descriptors CreateIsolatedNetwork hands back.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "host/net/netns.h"
#include "host/sandbox/compose.h"
#include "host/vmm/qemu_backend.h"
#include "vm_test_base.h"

namespace cella::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string Endpoint(const sockaddr_in& a) {
  char text[INET_ADDRSTRLEN];
  ::inet_ntop(AF_INET, &a.sin_addr, text, sizeof(text));
  return std::string(text) + ":" + std::to_string(ntohs(a.sin_port));
}

// Stands in for the egress proxy and the DNS server until destroyed:
// every TCP connection gets an HTTP answer naming its original destination;
// every datagram is recorded and answered REFUSED.
class FakeSupervisor {
 public:
  explicit FakeSupervisor(net::IsolatedNetwork& network) : network_(network) {
    proxy_ = std::thread([this] { ServeProxy(); });
    dns_ = std::thread([this] { ServeDns(); });
  }
  ~FakeSupervisor() {
    stop_ = true;
    proxy_.join();
    dns_.join();
  }
  std::vector<std::string> Destinations() {
    std::lock_guard lock(mu_);
    return destinations_;
  }
  // "<source> <payload>" per datagram.
  std::vector<std::string> Datagrams() {
    std::lock_guard lock(mu_);
    return datagrams_;
  }

 private:
  static bool Readable(int fd) {
    pollfd pfd{fd, POLLIN, 0};
    return ::poll(&pfd, 1, 200) == 1;
  }

  void ServeProxy() {
    while (!stop_) {
      if (!Readable(network_.proxy_listener.Get())) continue;
      UniqueFd conn(::accept4(network_.proxy_listener.Get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn) continue;
      auto original = net::OriginalDestination(conn.Get());
      std::string where = original ? Endpoint(*original) : "error: " + original.error().message;
      {
        std::lock_guard lock(mu_);
        destinations_.push_back(where);
      }
      // Read the request head (bounded), then answer and close.
      std::string head;
      while (head.find("\r\n\r\n") == std::string::npos && head.size() < 8192) {
        pollfd pfd{conn.Get(), POLLIN, 0};
        if (::poll(&pfd, 1, 10'000) != 1) break;
        char buf[1024];
        ssize_t n = ::read(conn.Get(), buf, sizeof(buf));
        if (n <= 0) break;
        head.append(buf, static_cast<size_t>(n));
      }
      std::string response = "HTTP/1.0 200 OK\r\nContent-Length: " + std::to_string(where.size()) +
                             "\r\nConnection: close\r\n\r\n" + where;
      (void)::send(conn.Get(), response.data(), response.size(), MSG_NOSIGNAL);
    }
  }

  void ServeDns() {
    while (!stop_) {
      if (!Readable(network_.dns_socket.Get())) continue;
      char buf[1500];
      sockaddr_in from{};
      socklen_t size = sizeof(from);
      ssize_t n = ::recvfrom(network_.dns_socket.Get(), buf, sizeof(buf), 0,
                             reinterpret_cast<sockaddr*>(&from), &size);
      if (n < 12) continue;
      std::string query(buf, static_cast<size_t>(n));
      {
        std::lock_guard lock(mu_);
        datagrams_.push_back(Endpoint(from) + " " + query);
      }
      // Header only: QR=1, same opcode and RD, RCODE=5 (REFUSED), counts 0.
      char answer[12] = {};
      std::memcpy(answer, buf, 2);
      answer[2] = static_cast<char>(0x80 | (buf[2] & 0x79));
      answer[3] = 5;
      (void)::sendto(network_.dns_socket.Get(), answer, sizeof(answer), 0,
                     reinterpret_cast<sockaddr*>(&from), sizeof(from));
    }
  }

  net::IsolatedNetwork& network_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<std::string> destinations_;
  std::vector<std::string> datagrams_;
  std::thread proxy_;
  std::thread dns_;
};

class NetIsolatedTest : public VmTestBase {
 protected:
  Status Boot(int tap_fd) {
    protocol::Config guest;
    guest.keep_alive = true;
    return BootGuest(guest, "netisolated", {}, {}, tap_fd);
  }

  // Privileged so that ping gets its raw socket: a failed ping must mean
  // "no answer", not "no permission".
  std::string Sh(const std::string& script) { return VmTestBase::Sh(script, 60'000, true); }
};

TEST_F(NetIsolatedTest, GuestTcpGoesToTheProxyDnsToTheDnsSocketAndNothingElseAnywhere) {
  if (::geteuid() != 0) GTEST_SKIP() << "the e2e network test runs as root";
  auto network = net::CreateIsolatedNetwork({});
  ASSERT_TRUE(network) << network.error().message;
  ASSERT_TRUE(Boot(network->tap.Get()));
  FakeSupervisor supervisor(*network);

  // 203.0.113.0/24 (TEST-NET-3) is routed nowhere: only the redirect can
  // answer, and the proxy learns where the guest meant to go.
  // nc, not wget: the default image's static busybox wget segfaults (in
  // its own code, before connecting) on this Debian build.
  auto http_get = [](const std::string& host, int port) {
    return "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 " + host + " " + std::to_string(port) +
           " | tail -n 1";
  };
  EXPECT_EQ(Sh(http_get("203.0.113.7", 80)), "203.0.113.7:80");
  EXPECT_EQ(Sh(http_get("198.18.0.5", 8080)), "198.18.0.5:8080");
  EXPECT_EQ(supervisor.Destinations(),
            (std::vector<std::string>{"203.0.113.7:80", "198.18.0.5:8080"}));

  // The guest's resolver (10.0.2.3 from config.json) reaches dns_socket and
  // gets our REFUSED back, so nslookup fails fast instead of timing out.
  std::string lookup = Sh("timeout 20 nslookup allowed.test; echo rc=$?");
  EXPECT_EQ(lookup.find("rc=124"), std::string::npos)
      << "no DNS answer reached the guest: " << lookup;
  auto datagrams = supervisor.Datagrams();
  ASSERT_FALSE(datagrams.empty()) << lookup;
  for (const std::string& d : datagrams) {
    EXPECT_TRUE(d.starts_with("10.0.2.15:")) << d;
    EXPECT_NE(d.find("allowed"), std::string::npos) << "not the guest's query: " << d;
  }

  // Another resolver, the gateway itself: no answer at all.
  std::string elsewhere =
      Sh("timeout 8 nslookup other.test 203.0.113.9 >/dev/null 2>&1; echo rc=$?");
  EXPECT_NE(elsewhere, "rc=0\n");
  for (const std::string& d : supervisor.Datagrams()) {
    EXPECT_EQ(d.find("other"), std::string::npos) << "UDP to another address reached us: " << d;
  }
  EXPECT_EQ(Sh("ping -c 1 -W 3 10.0.2.2 >/dev/null 2>&1; echo rc=$?"), "rc=1\n");
  // And the guest is still fine.
  EXPECT_EQ(Sh("echo alive"), "alive\n");
}

}  // namespace
}  // namespace cella::test
