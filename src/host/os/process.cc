#include "host/os/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

#include "base/io.h"

namespace cella::host {

namespace {

using Clock = std::chrono::steady_clock;

std::string JoinArgv(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    if (!out.empty()) out += ' ';
    out += a;
  }
  return out;
}

std::vector<char*> CArgv(const std::vector<std::string>& argv) {
  std::vector<char*> out;
  out.reserve(argv.size() + 1);
  for (const auto& a : argv) out.push_back(const_cast<char*>(a.c_str()));
  out.push_back(nullptr);
  return out;
}

// Descriptors to place at kFirstInheritedFd.. in the child. `scratch` has
// one slot per descriptor, allocated before fork (the child must not).
struct InheritedFds {
  std::span<const int> fds;
  int* scratch = nullptr;
};

// Runs in the forked child: only async-signal-safe calls until exec.
[[noreturn]] void ExecChild(char* const* argv, int stdout_fd, pid_t parent,
                            const InheritedFds& inherited) {
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) ::_exit(126);
  // The parent may have died before prctl took effect.
  if (::getppid() != parent) ::_exit(126);
  // First move every inherited descriptor above the target range, so no
  // dup2 below overwrites one still to be placed (nor stdout_fd, which is
  // moved too when it sits in that range).
  const int first_free = kFirstInheritedFd + static_cast<int>(inherited.fds.size());
  for (size_t i = 0; i < inherited.fds.size(); ++i) {
    inherited.scratch[i] = ::fcntl(inherited.fds[i], F_DUPFD_CLOEXEC, first_free);
    if (inherited.scratch[i] < 0) ::_exit(126);
  }
  if (stdout_fd < first_free) {
    stdout_fd = ::fcntl(stdout_fd, F_DUPFD_CLOEXEC, first_free);
    if (stdout_fd < 0) ::_exit(126);
  }
  // Its own process group: a Ctrl-C on the terminal goes to cella, which
  // forwards it to the guest or stops the VM gracefully; QEMU itself must
  // not die of it mid-flight. PDEATHSIG still ties it to us.
  if (::setpgid(0, 0) != 0) ::_exit(126);
  int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull < 0 || ::dup2(devnull, STDIN_FILENO) < 0) ::_exit(126);
  if (::dup2(stdout_fd, STDOUT_FILENO) < 0 || ::dup2(stdout_fd, STDERR_FILENO) < 0) ::_exit(126);
  // dup2 leaves the new descriptor without close-on-exec: these survive exec.
  for (size_t i = 0; i < inherited.fds.size(); ++i) {
    if (::dup2(inherited.scratch[i], kFirstInheritedFd + static_cast<int>(i)) < 0) ::_exit(126);
  }
  // Signals the parent blocked or ignored must not leak into the child.
  sigset_t none;
  ::sigemptyset(&none);
  if (::sigprocmask(SIG_SETMASK, &none, nullptr) != 0) ::_exit(126);
  if (::signal(SIGPIPE, SIG_DFL) == SIG_ERR) ::_exit(126);
  ::execvp(argv[0], argv);
  static constexpr char kMsg[] = "cella: exec failed\n";
  ssize_t ignored = ::write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
  (void)ignored;
  ::_exit(127);
}

Result<SpawnedProcess> Spawn(const std::vector<std::string>& argv, int stdout_fd,
                             std::span<const int> inherited_fds = {}) {
  if (argv.empty()) return Fail("spawn: empty argv");
  for (int fd : inherited_fds) {
    if (::fcntl(fd, F_GETFD) < 0)
      return FailErrno("descriptor " + std::to_string(fd) + " for " + argv[0]);
  }
  std::vector<char*> cargv = CArgv(argv);
  std::vector<int> scratch(inherited_fds.size(), -1);
  InheritedFds inherited{inherited_fds, scratch.data()};
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) return FailErrno("fork for " + argv[0]);
  if (pid == 0) ExecChild(cargv.data(), stdout_fd, parent, inherited);
  // Raw syscall: glibc 2.36's <sys/pidfd.h> lacks C linkage for C++.
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) {
    int err = errno;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return FailErrno("pidfd_open for " + argv[0], err);
  }
  return SpawnedProcess{pid, UniqueFd(pidfd)};
}

ExitStatus FromWaitStatus(int status) {
  ExitStatus out;
  if (WIFEXITED(status)) {
    out.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    out.signal = WTERMSIG(status);
  }
  return out;
}

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

}  // namespace

std::string ExitStatus::Describe() const {
  if (signal != 0) return std::string("killed by signal ") + ::strsignal(signal);
  return "exit code " + std::to_string(exit_code);
}

Result<SpawnedProcess> SpawnWithOutputFile(const std::vector<std::string>& argv,
                                           const std::string& output_path,
                                           std::span<const int> inherited_fds) {
  UniqueFd out(::open(output_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!out) return FailErrno("open " + output_path);
  return Spawn(argv, out.Get(), inherited_fds);
}

Result<ExitStatus> WaitForExit(SpawnedProcess& process, std::chrono::milliseconds timeout) {
  if (process.pid < 0) return Fail("wait: no process");
  pollfd pfd{process.pidfd.Get(), POLLIN, 0};
  auto deadline = Clock::now() + timeout;
  while (true) {
    int rc = ::poll(&pfd, 1, RemainingMs(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("poll pidfd of pid " + std::to_string(process.pid));
    if (rc == 0) {
      return std::unexpected(Error{"pid " + std::to_string(process.pid) + " still running after " +
                                       std::to_string(timeout.count()) + " ms",
                                   ETIMEDOUT});
    }
    break;
  }
  int status = 0;
  while (true) {
    pid_t r = ::waitpid(process.pid, &status, 0);
    if (r == process.pid) break;
    if (r < 0 && errno == EINTR) continue;
    return FailErrno("waitpid " + std::to_string(process.pid));
  }
  process.pid = -1;
  process.pidfd.Reset();
  return FromWaitStatus(status);
}

Result<bool> HasExited(const SpawnedProcess& process) {
  if (process.pid < 0) return true;
  pollfd pfd{process.pidfd.Get(), POLLIN, 0};
  int rc = ::poll(&pfd, 1, 0);
  if (rc < 0) return FailErrno("poll pidfd of pid " + std::to_string(process.pid));
  return rc > 0;
}

Result<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                 std::chrono::milliseconds timeout, size_t max_output) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return FailErrno("pipe2");
  UniqueFd read_end(pipe_fds[0]);
  UniqueFd write_end(pipe_fds[1]);
  SpawnedProcess child = CELLA_TRY(Spawn(argv, write_end.Get()));
  write_end.Reset();

  CommandResult result;
  auto deadline = Clock::now() + timeout;
  std::array<char, size_t{16} * 1024> buf;
  bool timed_out = false;
  while (true) {
    pollfd pfd{read_end.Get(), POLLIN, 0};
    int rc = ::poll(&pfd, 1, RemainingMs(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) {
      ::kill(child.pid, SIGKILL);
      (void)WaitForExit(child, std::chrono::seconds(5));
      return FailErrno("poll output of " + argv[0]);
    }
    if (rc == 0) {
      timed_out = true;
      break;
    }
    ssize_t n = ::read(read_end.Get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // EOF (or an error on a pipe we own: treat as end)
    size_t room = max_output - std::min(max_output, result.output.size());
    result.output.append(buf.data(), std::min(room, static_cast<size_t>(n)));
  }
  if (timed_out) ::kill(child.pid, SIGKILL);
  auto status = WaitForExit(child, timed_out ? std::chrono::seconds(5) : timeout);
  if (!status) {
    ::kill(child.pid, SIGKILL);
    (void)WaitForExit(child, std::chrono::seconds(5));
    return std::unexpected(std::move(status.error()).WithContext(argv[0]));
  }
  if (timed_out) {
    return std::unexpected(Error{
        JoinArgv(argv) + ": still running after " + std::to_string(timeout.count()) + " ms; killed",
        ETIMEDOUT});
  }
  result.exit_code = status->exit_code;
  result.signal = status->signal;
  return result;
}

Result<std::string> CheckCommand(const std::vector<std::string>& argv,
                                 std::chrono::milliseconds timeout) {
  CommandResult r = CELLA_TRY(RunCommand(argv, timeout));
  if (r.exit_code == 0) return std::move(r.output);
  ExitStatus status{r.exit_code, r.signal};
  std::string tail = r.output.size() > 2000 ? r.output.substr(r.output.size() - 2000) : r.output;
  while (!tail.empty() && tail.back() == '\n') tail.pop_back();
  return Fail(JoinArgv(argv) + ": " + status.Describe() + (tail.empty() ? "" : ": " + tail));
}

std::string ShellQuote(std::string_view text) {
  std::string out = "'";
  for (char c : text) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

}  // namespace cella::host
