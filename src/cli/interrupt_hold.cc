#include "cli/interrupt_hold.h"

#include <pthread.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "base/io.h"

namespace cella::cli {

InterruptHold::InterruptHold() {
  sigemptyset(&set_);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set_, s);
  ::pthread_sigmask(SIG_BLOCK, &set_, &old_);
  signal_fd_ = UniqueFd(::signalfd(-1, &set_, SFD_CLOEXEC | SFD_NONBLOCK));
}

InterruptHold::~InterruptHold() {
  signal_fd_.Reset();
  // A signal that came stays pending and acts as usual once unblocked: the
  // command has cleaned up by then, and the CLI ends of it as it would.
  // One taken for a wait is sent again, for the same end.
  if (taken_ != 0) ::raise(taken_);
  ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
}

Status InterruptHold::Check() const {
  if (taken_ != 0)
    return std::unexpected(Error{std::string("interrupted (") + ::strsignal(taken_) + ")", EINTR});
  sigset_t pending;
  if (::sigpending(&pending) != 0) return FailErrno("sigpending");
  for (int s : {SIGINT, SIGTERM, SIGHUP})
    if (sigismember(&pending, s) == 1)
      return std::unexpected(Error{std::string("interrupted (") + ::strsignal(s) + ")", EINTR});
  return {};
}

bool InterruptHold::GiveUp() {
  if (!signal_fd_) return false;
  bool give_up = false;
  for (;;) {
    signalfd_siginfo info{};
    ssize_t n = ::read(signal_fd_.Get(), &info, sizeof info);
    if (n < 0 && errno == EINTR) continue;
    if (n != static_cast<ssize_t>(sizeof info)) break;  // EAGAIN: all taken
    taken_ = static_cast<int>(info.ssi_signo);
    if (taken_ != SIGINT || ++interrupts_ > 1) {
      give_up = true;
    } else {
      (void)WriteAll(STDERR_FILENO,
                     std::string_view("cella: interrupted; finishing the step under way and "
                                      "cleaning up (Ctrl-C again to give up at once)\n"));
    }
  }
  return give_up;
}

}  // namespace cella::cli
