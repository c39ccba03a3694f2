// A TCP echo server on 127.0.0.1 (an ephemeral port) for tests: serves one
// connection at a time until the client's EOF, then half-closes back, so a
// peer sees EOF too. Stands in for a service in the guest or upstream.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <cstdint>
#include <thread>

#include "base/unique_fd.h"

namespace cella::testing {

class EchoServer {
 public:
  EchoServer() {
    listener_.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (!listener_ ||
        ::bind(listener_.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listener_.Get(), 16) != 0 ||
        ::getsockname(listener_.Get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "echo server setup failed";
      return;
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        UniqueFd conn(::accept4(listener_.Get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (!conn) return;  // the listener was shut down
        ++accepts_;
        // Bounded: a test that forgets its end never hangs the server.
        timeval timeout{30, 0};
        (void)::setsockopt(conn.Get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
        (void)::setsockopt(conn.Get(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
        char buf[65536];
        for (;;) {
          ssize_t n = ::recv(conn.Get(), buf, sizeof buf, 0);
          if (n <= 0) break;
          if (::send(conn.Get(), buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) break;
        }
        (void)::shutdown(conn.Get(), SHUT_WR);
      }
    });
  }
  ~EchoServer() {
    (void)::shutdown(listener_.Get(), SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
  }
  EchoServer(const EchoServer&) = delete;
  EchoServer& operator=(const EchoServer&) = delete;

  uint16_t port() const { return port_; }
  int accepts() const { return accepts_.load(); }

 private:
  UniqueFd listener_;
  uint16_t port_ = 0;
  std::atomic<int> accepts_{0};
  std::thread thread_;
};

}  // namespace cella::testing
