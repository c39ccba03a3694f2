#include "host/net/proxy_io.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstring>
#include <thread>
#include <vector>

#include "base/log.h"

namespace cella::net {

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

// Copies until EOF, then half-closes `to`.
Status Pump(ByteStream& from, ByteStream& to) {
  std::vector<std::byte> buffer(kBufferBytes);
  return cella::Pump(from, to, buffer);
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

}  // namespace cella::net
