#include "guest/init/workload.h"

#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "base/unique_fd.h"
#include "guest/agent/hardening.h"
#include "guest/agent/user.h"
#include "guest/init/console.h"
#include "guest/init/format.h"

namespace cella::init {
namespace {

constexpr int kForwardedSignals[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

bool IsExecutableFile(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// Between fork and exec: only syscalls and a fixed-size message.
[[noreturn]] void ChildFail(const char* stage, int err, int exit_code) {
  char line[256];
  int n = std::snprintf(line, sizeof(line), "cella-init: error: main: %s: %s\n", stage,
                        std::strerror(err));
  if (n > 0)
    (void)!::write(STDERR_FILENO, line, static_cast<size_t>(std::min<int>(n, sizeof(line) - 1)));
  ::_exit(exit_code);
}

Result<UniqueFd> BlockSignalsToFd() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  for (int sig : kForwardedSignals) sigaddset(&set, sig);
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) != 0) return FailErrno("sigprocmask");
  UniqueFd fd(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!fd) return FailErrno("signalfd");
  return fd;
}

// Reaps every exited child; records the main one's status.
void ReapAll(pid_t main_pid, std::optional<int>& main_status) {
  for (;;) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid < 0 && errno == EINTR) continue;
    if (pid <= 0) return;  // 0: children still running; ECHILD: none left
    if (pid == main_pid) main_status = status;
  }
}

bool HasChildren() {
  siginfo_t info{};
  // WNOWAIT: only asks; ECHILD means nothing is left to reap.
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == 0;
}

// Waits for signals up to timeout; returns the signals read.
Status ReadSignals(int fd, int timeout_ms, std::vector<int>& signals) {
  signals.clear();
  pollfd pfd{fd, POLLIN, 0};
  if (::poll(&pfd, 1, timeout_ms) < 0) {
    if (errno == EINTR) return {};
    return FailErrno("poll signalfd");
  }
  if (fd < 0) return {};  // poll ignored it and just waited: a plain sleep
  for (;;) {
    signalfd_siginfo info{};
    ssize_t n = ::read(fd, &info, sizeof(info));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return {};
      return FailErrno("read signalfd");
    }
    if (n != sizeof(info)) return Fail("read signalfd: short read");
    signals.push_back(static_cast<int>(info.ssi_signo));
  }
}

// Everything but PID 1: TERM, up to `grace` for them to go, then KILL.
// signal_fd (SIGCHLD) only wakes the wait early; -1 makes it poll.
void StopEverythingElse(int signal_fd, std::chrono::milliseconds grace) {
  if (::kill(-1, SIGTERM) != 0 && errno != ESRCH)
    SayError(std::string("kill(-1, SIGTERM): ") + std::strerror(errno));
  std::optional<int> ignored;
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (HasChildren() && std::chrono::steady_clock::now() < deadline) {
    // A failing signalfd only shortens the wait; the deadline still holds.
    std::vector<int> unused;
    (void)ReadSignals(signal_fd, 50, unused);
    ReapAll(-1, ignored);
  }
  if (!HasChildren()) return;
  if (::kill(-1, SIGKILL) != 0 && errno != ESRCH)
    SayError(std::string("kill(-1, SIGKILL): ") + std::strerror(errno));
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (HasChildren() && std::chrono::steady_clock::now() < deadline) {
    // A failing signalfd only shortens the wait; the deadline still holds.
    std::vector<int> unused;
    (void)ReadSignals(signal_fd, 50, unused);
    ReapAll(-1, ignored);
  }
}

}  // namespace

Result<int> RunMainOnConsole(const protocol::Config& config) {
  std::vector<std::string> argv = WorkloadArgv(config);
  if (argv.empty()) return Fail("main: config has neither entrypoint nor cmd");
  auto identity = agent::ResolveUser(config.user.empty() ? "0" : config.user);
  if (!identity) return std::unexpected(std::move(identity.error()).WithContext("main: user"));
  std::vector<std::string> env = WorkloadEnvironment(config.env, identity->home);
  std::string binary = SearchPath(argv[0], EnvLookup(env, "PATH"), IsExecutableFile);
  if (binary.empty()) {
    SayError("main: " + argv[0] + ": not found in PATH");
    return 127 << 8;
  }
  std::string workdir = config.workdir.empty() ? "/" : config.workdir;
  std::vector<char*> c_argv = CStrings(argv);
  std::vector<char*> c_env = CStrings(env);
  const bool harden = !config.privileged;
  UniqueFd signal_fd = CELLA_TRY(BlockSignalsToFd());
  Debug("main: starting " + binary + " as uid " + std::to_string(identity->uid));

  pid_t pid = ::fork();
  if (pid < 0) return FailErrno("fork main");
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    if (::sigprocmask(SIG_SETMASK, &none, nullptr) != 0) ChildFail("sigprocmask", errno, 126);
    if (::setsid() < 0) ChildFail("setsid", errno, 126);
    if (::chdir(workdir.c_str()) != 0) ChildFail("chdir to the workdir", errno, 126);
    if (harden) {
      if (int err = agent::DropBoundingCapabilities(); err != 0)
        ChildFail("drop capabilities", err, 126);
    }
    if (::setgroups(identity->groups.size(), identity->groups.data()) != 0)
      ChildFail("setgroups", errno, 126);
    if (::setgid(identity->gid) != 0) ChildFail("setgid", errno, 126);
    if (::setuid(identity->uid) != 0) ChildFail("setuid", errno, 126);
    if (harden) {
      if (int err = agent::ApplyNoNewPrivsAndSeccomp(); err != 0)
        ChildFail("no_new_privs/seccomp", err, 126);
    }
    ::execve(binary.c_str(), c_argv.data(), c_env.data());
    ChildFail(binary.c_str(), errno, errno == ENOENT ? 127 : 126);
  }

  std::optional<int> main_status;
  std::vector<int> signals;
  while (!main_status) {
    if (auto read = ReadSignals(signal_fd.Get(), -1, signals); !read) {
      // Without the signalfd PID 1 cannot supervise; stop the workload.
      ::kill(pid, SIGKILL);
      return std::unexpected(std::move(read.error()));
    }
    for (int sig : signals) {
      if (sig == SIGCHLD) continue;
      Debug("forwarding signal " + std::to_string(sig) + " to the main process");
      if (::kill(pid, sig) != 0 && errno != ESRCH)
        SayError("forward signal " + std::to_string(sig) + ": " + std::strerror(errno));
    }
    ReapAll(pid, main_status);
  }
  StopEverythingElse(signal_fd.Get(), kDefaultStopGrace);
  return *main_status;
}

void StopAllProcesses(std::chrono::milliseconds grace) {
  if (grace <= std::chrono::milliseconds(0)) grace = kDefaultStopGrace;
  grace = std::min(grace, kMaxStopGrace);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  UniqueFd signal_fd;
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) != 0) {
    SayError(std::string("sigprocmask(SIGCHLD): ") + std::strerror(errno));
  } else {
    signal_fd.Reset(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
    if (!signal_fd) SayError(std::string("signalfd(SIGCHLD): ") + std::strerror(errno));
  }
  // Without a signalfd the wait polls every 50 ms instead; the bound holds.
  StopEverythingElse(signal_fd.Get(), grace);
}

Status ExecImageInit() {
  sigset_t none;
  sigemptyset(&none);
  if (::sigprocmask(SIG_SETMASK, &none, nullptr) != 0) return FailErrno("sigprocmask");
  std::string tried;
  for (const char* path : {"/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd"}) {
    char* argv[] = {const_cast<char*>(path), nullptr};
    std::string path_env = std::string("PATH=") + protocol::kDefaultPath;
    char* envp[] = {path_env.data(), nullptr};
    ::execve(path, argv, envp);
    tried += std::string(tried.empty() ? "" : "; ") + path + ": " + std::strerror(errno);
  }
  return Fail("systemd mode: cannot exec the image's init (" + tried + ")");
}

}  // namespace cella::init
