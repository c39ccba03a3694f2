// The stop signal of a thread that sleeps in poll(2): an eventfd polled
// beside the thread's own fds. Signal() makes it readable for good (it is
// never drained), so every poller — a loop and any workers it started —
// sees the stop, however late it looks. Used by every server loop with a
// Stop() (DNS, proxy, control socket, port forwarder).
#pragma once

#include <string>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella {

class WakeFd {
 public:
  // `owner` names the user in the error ("dns server: eventfd: ...").
  static Result<WakeFd> Create(const std::string& owner);
  WakeFd() = default;

  // Thread-safe, repeatable; a no-op on a WakeFd never created. Cannot fail on a live eventfd (only
  // a counter overflow could, after 2^64 calls); if it did, the thread would never be woken and its
  // join would hang, so that is a programmer error: Die.
  void Signal() const;
  int Get() const { return fd_.Get(); }
  explicit operator bool() const { return static_cast<bool>(fd_); }

 private:
  explicit WakeFd(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

}  // namespace cella
