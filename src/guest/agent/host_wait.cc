#include "guest/agent/host_wait.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <thread>

namespace cella::agent {
namespace {

using Clock = std::chrono::steady_clock;

// The host side is open: the driver reports POLLHUP only while it is not
// (and while the guest side is not, which an open descriptor rules out).
Result<bool> HostConnected(int fd) {
  for (;;) {
    pollfd p{fd, POLLIN | POLLOUT, 0};
    int rc = ::poll(&p, 1, 0);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("poll the agent port");
    if (p.revents & POLLNVAL) return Fail("poll the agent port: not an open descriptor");
    return (p.revents & POLLHUP) == 0;
  }
}

Status SetAsync(int fd, bool on) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return FailErrno("fcntl F_GETFL");
  int want = on ? (flags | O_ASYNC) : (flags & ~O_ASYNC);
  if (want != flags && ::fcntl(fd, F_SETFL, want) != 0) return FailErrno("fcntl F_SETFL O_ASYNC");
  return {};
}

}  // namespace

Result<HostWaitResult> WaitForHost(int fd, std::chrono::milliseconds timeout,
                                   std::chrono::milliseconds poll_interval) {
  if (CELLA_TRY(HostConnected(fd))) return HostWaitResult{true, HostWait::kEvent};
  sigset_t sigio;
  ::sigemptyset(&sigio);
  ::sigaddset(&sigio, SIGIO);
  // Blocked before O_ASYNC is set: a SIGIO that comes between the check
  // below and the wait stays pending instead of being lost (or, in a
  // process that is not PID 1, killing it by its default action).
  if (int err = ::pthread_sigmask(SIG_BLOCK, &sigio, nullptr); err != 0)
    return FailErrno("block SIGIO", err);
  const bool event = ::fcntl(fd, F_SETOWN, ::getpid()) == 0 && SetAsync(fd, true).has_value();
  if (!event) {
    // No fasync on this device: one bounded sleep, then the caller retries.
    std::this_thread::sleep_for(std::min(timeout, poll_interval));
    return HostWaitResult{CELLA_TRY(HostConnected(fd)), HostWait::kPolled};
  }
  auto deadline = Clock::now() + timeout;
  HostWaitResult result{false, HostWait::kEvent};
  Status st = [&]() -> Status {
    for (;;) {
      // Checked after O_ASYNC is on: a connect before this point is seen
      // here, one after it raises SIGIO.
      if (CELLA_TRY(HostConnected(fd))) {
        result.connected = true;
        return {};
      }
      auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - Clock::now());
      if (left.count() <= 0) return {};
      timespec ts{static_cast<time_t>(left.count() / 1'000'000'000),
                  static_cast<long>(left.count() % 1'000'000'000)};
      if (::sigtimedwait(&sigio, nullptr, &ts) < 0) {
        // A handled signal (a stop request) ends the wait early: the
        // caller's loop looks at its flags before it waits again.
        if (errno == EINTR) return {};
        if (errno != EAGAIN) return FailErrno("wait for SIGIO");
      }
    }
  }();
  if (auto off = SetAsync(fd, false); !off && st) st = std::move(off);
  if (!st) return std::unexpected(std::move(st.error()));
  return result;
}

Result<bool> WaitForHostData(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(left.count()));
    if (rc < 0 && errno == EINTR) return false;  // the caller looks at its flags
    if (rc < 0) return FailErrno("poll the agent port");
    if (rc == 0) return false;
    if (p.revents & POLLNVAL) return Fail("poll the agent port: not an open descriptor");
    // Without a host the driver says POLLIN too (a read would not block: it
    // reads EOF). Serving then would end at once, and closing this
    // descriptor for the next attempt would discard a Hello that reached it
    // meanwhile: wait for a host to connect, then for its bytes.
    if (p.revents & (POLLHUP | POLLERR)) {
      auto waited = CELLA_TRY(WaitForHost(fd, left, std::chrono::milliseconds(200)));
      if (!waited.connected) return false;
      continue;
    }
    if (p.revents & POLLIN) return true;
  }
}

}  // namespace cella::agent
