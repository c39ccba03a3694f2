#include "cli/attach.h"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <termios.h>
#include <unistd.h>

#include <optional>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"

namespace cella::cli {
namespace {

constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGWINCH};

// An eventfd that wakes a poll loop for good.
class WakeFd {
 public:
  WakeFd() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    if (!fd_) log::Warn("eventfd failed");
  }
  int Get() const { return fd_.Get(); }
  void Wake() {
    uint64_t one = 1;
    if (::write(fd_.Get(), &one, sizeof one) < 0) log::Warn("eventfd write failed");
  }

 private:
  UniqueFd fd_;
};

// Collects the blocked signals through a signalfd, so no handler runs on an
// arbitrary thread: SIGWINCH becomes a resize, the rest go to the guest. An
// eventfd ends it at once (a polling tick would add its length to every
// exec's exit).
class SignalForwarder {
 public:
  explicit SignalForwarder(host::ExecSession* session) {
    sigset_t set;
    sigemptyset(&set);
    for (int s : kForwarded) sigaddset(&set, s);
    signal_fd_.Reset(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
    if (!signal_fd_) log::Warn("signalfd failed: signals are not forwarded");
    thread_ = std::thread([this, session] {
      for (;;) {
        pollfd fds[2] = {{wake_.Get(), POLLIN, 0}, {signal_fd_.Get(), POLLIN, 0}};
        int n = ::poll(fds, signal_fd_ ? 2 : 1, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || fds[0].revents) return;
        signalfd_siginfo info{};
        if (::read(signal_fd_.Get(), &info, sizeof info) != sizeof info) continue;
        int sig = static_cast<int>(info.ssi_signo);
        if (sig == SIGWINCH) {
          uint16_t rows = 0, cols = 0;
          if (TerminalSize(rows, cols)) {
            if (auto st = session->Resize(rows, cols); !st)
              log::Debug("resize failed", {{"error", st.error().message}});
          }
          continue;
        }
        log::Debug("forwarding signal to the guest", {{"signal", sig}});
        if (auto st = session->Signal(sig); !st)
          log::Warn("could not forward signal", {{"error", st.error().message}});
      }
    });
  }
  ~SignalForwarder() {
    wake_.Wake();
    thread_.join();
  }

 private:
  WakeFd wake_;
  UniqueFd signal_fd_;
  std::thread thread_;
};

// Copies our stdin to the session until EOF or until stopped.
class StdinPump {
 public:
  explicit StdinPump(host::ExecSession* session) {
    thread_ = std::thread([this, session] {
      char buf[65536];
      for (;;) {
        pollfd fds[2] = {{wake_.Get(), POLLIN, 0}, {STDIN_FILENO, POLLIN, 0}};
        int n = ::poll(fds, 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || fds[0].revents) break;
        auto got = ReadSome(STDIN_FILENO, std::as_writable_bytes(std::span(buf)));
        if (!got || *got == 0) break;
        if (!session->WriteStdin(std::string_view(buf, *got))) return;
      }
      if (auto st = session->CloseStdin(); !st)
        log::Debug("closing guest stdin failed", {{"error", st.error().message}});
    });
  }
  ~StdinPump() {
    wake_.Wake();
    thread_.join();
  }

 private:
  WakeFd wake_;
  std::thread thread_;
};

// The local terminal in raw mode for the session's life: keys (Ctrl-C too)
// go to the guest's terminal, which interprets them.
class RawTerminal {
 public:
  RawTerminal() {
    if (!::isatty(STDIN_FILENO) || ::tcgetattr(STDIN_FILENO, &saved_) != 0) return;
    termios raw = saved_;
    ::cfmakeraw(&raw);
    if (::tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0) active_ = true;
  }
  ~RawTerminal() {
    if (active_ && ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_) != 0)
      log::Warn("could not restore the terminal mode");
  }

 private:
  termios saved_{};
  bool active_ = false;
};

}  // namespace

void BlockForwardedSignals() {
  sigset_t set;
  sigemptyset(&set);
  for (int s : kForwarded) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

bool TerminalSize(uint16_t& rows, uint16_t& cols) {
  winsize ws{};
  for (int fd : {STDIN_FILENO, STDOUT_FILENO}) {
    if (::ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0) {
      rows = ws.ws_row;
      cols = ws.ws_col;
      return true;
    }
  }
  return false;
}

Result<host::ExecStatus> AttachToTerminal(const SessionStarter& start, AttachOptions options) {
  host::ExecCallbacks callbacks;
  callbacks.on_stdout = [](std::string_view bytes) {
    if (auto st = WriteAll(STDOUT_FILENO, bytes); !st)
      log::Debug("stdout write failed", {{"error", st.error().message}});
  };
  callbacks.on_stderr = [](std::string_view bytes) {
    if (auto st = WriteAll(STDERR_FILENO, bytes); !st)
      log::Debug("stderr write failed", {{"error", st.error().message}});
  };
  std::optional<RawTerminal> raw;
  if (options.tty && options.interactive) raw.emplace();
  std::unique_ptr<host::ExecSession> session = CELLA_TRY(start(std::move(callbacks)));
  if (options.tty) {
    uint16_t rows = 0, cols = 0;
    if (TerminalSize(rows, cols)) CELLA_TRY_CTX(session->Resize(rows, cols), "window size");
  }
  SignalForwarder signals(session.get());
  std::optional<StdinPump> stdin_pump;
  if (options.interactive) {
    stdin_pump.emplace(session.get());
  } else {
    // A process that already exited (and a guest already powering off)
    // has no stdin to close: that is not a failure of the run.
    if (auto closed = session->CloseStdin(); !closed)
      log::Debug("close guest stdin", {{"error", closed.error().message}});
  }
  return session->Wait();
}

}  // namespace cella::cli
