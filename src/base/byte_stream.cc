#include "base/byte_stream.h"

#include <sys/socket.h>
#include <unistd.h>

#include "base/io.h"

namespace cella {

Result<size_t> FdStream::Read(std::span<std::byte> buffer) {
  for (;;) {
    ssize_t n = ::recv(fd_.Get(), buffer.data(), buffer.size(), 0);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    return FailErrno("recv");
  }
}

Status FdStream::Write(std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::send(fd_.Get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno("send");
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  return {};
}

Status FdStream::ShutdownWrite() {
  if (::shutdown(fd_.Get(), SHUT_WR) != 0 && errno != ENOTCONN) return FailErrno("shutdown");
  return {};
}

void FdStream::Abort() {
  // Wakes a blocked recv/send on another thread; the fd stays valid until
  // the stream is destroyed, so no other thread can see it reused.
  (void)::shutdown(fd_.Get(), SHUT_RDWR);
}

}  // namespace cella
