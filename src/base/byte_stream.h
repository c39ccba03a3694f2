// A bidirectional byte stream read and written without caring what is under
// it: a plain socket, TLS on top of one (the egress proxy), and the one
// copy loop (`Pump`) every forwarder uses, for these and for any type with
// the same three calls (the agent's PortStream).
//
// Threading: Read may run on one thread while Write/ShutdownWrite run on
// another (the proxy pumps each direction on its own thread); no two
// threads Read at once, no two Write at once. Implementations say so if
// they need more (OpenSSL does: see tls.h).
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella {

class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Blocks for at least one byte; 0 means the peer finished sending.
  virtual Result<size_t> Read(std::span<std::byte> buffer) = 0;
  virtual Status Write(std::span<const std::byte> bytes) = 0;
  Status Write(std::string_view text) {
    return Write(std::as_bytes(std::span(text.data(), text.size())));
  }
  // Half-close: the peer reads EOF; reading goes on.
  virtual Status ShutdownWrite() = 0;
  // Ends both directions now; a blocked Read/Write on another thread returns.
  virtual void Abort() = 0;
};

// A connected stream socket (TCP or Unix).
class FdStream final : public ByteStream {
 public:
  explicit FdStream(UniqueFd fd) : fd_(std::move(fd)) {}
  Result<size_t> Read(std::span<std::byte> buffer) override;
  Status Write(std::span<const std::byte> bytes) override;
  using ByteStream::Write;
  Status ShutdownWrite() override;
  void Abort() override;
  int fd() const { return fd_.Get(); }

 private:
  UniqueFd fd_;
};

// Copies from `from` to `to` until `from` ends, then half-closes `to`.
// Any error (either side) ends the copy and is returned; the caller decides
// whether to abort the other direction.
template <typename From, typename To>
Status Pump(From& from, To& to, std::span<std::byte> buffer) {
  for (;;) {
    size_t n = CELLA_TRY(from.Read(buffer));
    if (n == 0) return to.ShutdownWrite();
    CELLA_TRY(to.Write(std::span<const std::byte>(buffer.data(), n)));
  }
}

}  // namespace cella
