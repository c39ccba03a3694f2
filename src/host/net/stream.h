// A bidirectional byte stream the egress proxy reads and writes without
// caring whether it is a plain TCP socket or TLS on top of one.
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

namespace cella::net {

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

}  // namespace cella::net
