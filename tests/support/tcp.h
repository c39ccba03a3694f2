// TCP helpers for tests: a port on 127.0.0.1 nothing listens on now, one
// echo round trip through a port whose listener (a guest's, behind a
// forward) may still be coming up, and a host service on the loopback that
// a guest may or may not reach (HelloHttpServer).
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <string>
#include <thread>

namespace cella::testing {

// A TCP port on 127.0.0.1 that nothing listens on right now (0 when none
// could be had: a test then fails where it uses it). Drawn below the
// kernel's ephemeral range (32768 and up), where the outgoing connections
// of other tests and their registries take their ports: between this check
// and the caller's bind only another explicit bind can take it.
inline uint16_t FreePort() {
  static thread_local uint32_t state =
      static_cast<uint32_t>(::getpid()) * 2654435761u ^ static_cast<uint32_t>(::time(nullptr));
  for (int attempt = 0; attempt < 200; ++attempt) {
    state = state * 1664525u + 1013904223u;
    const auto port = static_cast<uint16_t>(20000 + (state >> 8) % 12000);
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    const bool bound = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    if (bound) return port;
  }
  return 0;
}

// One round trip to 127.0.0.1:port: connects, sends `message`,
// half-closes, and returns what came back until EOF (each read waits at
// most `read_timeout`); "connect failed" when nothing accepted.
inline std::string Exchange(uint16_t port, const std::string& message,
                            std::chrono::seconds read_timeout = std::chrono::seconds(10)) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "connect failed";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{static_cast<time_t>(read_timeout.count()), 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return "connect failed";
  }
  (void)!::write(fd, message.data(), message.size());
  ::shutdown(fd, SHUT_WR);
  std::string got;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) got.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return got;
}

// Exchange, tried again while the listener (a guest's, behind a forward)
// comes up: not accepting yet, or dropping the connection at once. ""
// when nothing came back within about 100 tries.
inline std::string EchoThrough(uint16_t port, const std::string& message) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string got = Exchange(port, message, std::chrono::seconds(20));
    if (got == "connect failed") {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    if (!got.empty()) return got;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return "";
}

// An HTTP server on 127.0.0.1 (an ephemeral port) answering every request
// with "hello guest\n", counting the connections it accepted: the host
// service behind the gateway that a sandbox must not reach unless
// --allow-host-loopback. Serves until Stop (or its end).
class HelloHttpServer {
 public:
  HelloHttpServer() {
    listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (listener_ < 0 || ::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listener_, 4) != 0 ||
        ::getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "hello server setup failed";
      return;
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] {
      // Until the listener is shut down; the receive bound keeps a broken
      // guest from hanging the test.
      for (;;) {
        int conn = ::accept(listener_, nullptr, nullptr);
        if (conn < 0) return;
        ++accepted_;
        timeval tv{30, 0};
        ::setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char buf[4096];
        (void)::recv(conn, buf, sizeof buf, 0);
        const char reply[] = "HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhello guest\n";
        (void)::send(conn, reply, sizeof reply - 1, MSG_NOSIGNAL);
        ::close(conn);
      }
    });
  }
  ~HelloHttpServer() { Stop(); }
  HelloHttpServer(const HelloHttpServer&) = delete;
  HelloHttpServer& operator=(const HelloHttpServer&) = delete;

  uint16_t port() const { return port_; }
  int accepted() const { return accepted_.load(); }
  void Stop() {
    if (listener_ < 0) return;
    ::shutdown(listener_, SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
    ::close(listener_);
    listener_ = -1;
  }

 private:
  int listener_ = -1;
  uint16_t port_ = 0;
  std::atomic<int> accepted_{0};
  std::thread thread_;
};

}  // namespace cella::testing
