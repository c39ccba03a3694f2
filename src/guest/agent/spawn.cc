#include "guest/agent/spawn.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "base/io.h"
#include "guest/agent/hardening.h"
#include "guest/agent/user.h"
#include "protocol/config.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

namespace cella::agent {
namespace {

// What the child reports through the status pipe when setup fails.
enum class Stage : int {
  kSession,
  kTty,
  kStdio,
  kCaps,
  kUser,
  kWorkdir,
  kSeccomp,
  kSignals,
  kExec,  // detached requests only: execve failed (see SpawnedChild::exec_errno)
};

const char* StageName(Stage stage) {
  switch (stage) {
    case Stage::kSession:
      return "setsid";
    case Stage::kExec:
      return "execute the program";
    case Stage::kTty:
      return "open the terminal";
    case Stage::kStdio:
      return "set up stdio";
    case Stage::kCaps:
      return "drop capabilities";
    case Stage::kUser:
      return "switch user";
    case Stage::kWorkdir:
      return "change to the working directory";
    case Stage::kSeccomp:
      return "install the seccomp filter";
    case Stage::kSignals:
      return "reset the signal mask";
  }
  return "set up";
}

struct StatusRecord {
  Stage stage;
  int err;
};

struct Pipe {
  UniqueFd read;
  UniqueFd write;
};

Result<Pipe> MakePipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return FailErrno("pipe2");
  return Pipe{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

std::string EnvValue(const std::vector<std::string>& env, std::string_view name) {
  for (const auto& kv : env)
    if (kv.size() > name.size() && kv.compare(0, name.size(), name) == 0 && kv[name.size()] == '=')
      return kv.substr(name.size() + 1);
  return {};
}

bool HasEnv(const std::vector<std::string>& env, std::string_view name) {
  for (const auto& kv : env)
    if (kv.size() > name.size() && kv.compare(0, name.size(), name) == 0 && kv[name.size()] == '=')
      return true;
  return false;
}

std::vector<std::string> Candidates(const std::string& program,
                                    const std::vector<std::string>& env) {
  if (program.find('/') != std::string::npos) return {program};
  std::string path = HasEnv(env, "PATH") ? EnvValue(env, "PATH") : protocol::kDefaultPath;
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t end = path.find(':', start);
    std::string dir =
        path.substr(start, end == std::string::npos ? std::string::npos : end - start);
    out.push_back((dir.empty() ? "." : dir) + "/" + program);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

[[noreturn]] void ChildFail(int status_fd, Stage stage, int err) {
  StatusRecord record{stage, err};
  // Nothing to do if this write fails: the parent then sees a plain exit.
  ssize_t ignored = ::write(status_fd, &record, sizeof(record));
  (void)ignored;
  _exit(127);
}

void ChildWriteStderr(const std::string& program, int err) {
  std::string msg = "cella-agent: " + program + ": " + std::strerror(err) + "\n";
  ssize_t ignored = ::write(STDERR_FILENO, msg.data(), msg.size());
  (void)ignored;
}

void MarkAllCloexecFrom(int first) {
  if (::syscall(SYS_close_range, first, ~0U, CLOSE_RANGE_CLOEXEC) == 0) return;
  for (int fd = first; fd < 4096; ++fd) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags >= 0) ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
  }
}

}  // namespace

Result<SpawnedChild> Spawn(const protocol::ExecRequest& request, Hardening hardening) {
  std::optional<Identity> identity;
  if (!request.user.empty()) identity = CELLA_TRY(ResolveUser(request.user));

  std::vector<std::string> env = request.env;
  if (!HasEnv(env, "HOME")) env.push_back("HOME=" + (identity ? identity->home : std::string("/")));
  std::vector<char*> argv_ptrs;
  argv_ptrs.reserve(request.argv.size() + 1);
  for (const auto& a : request.argv) argv_ptrs.push_back(const_cast<char*>(a.c_str()));
  argv_ptrs.push_back(nullptr);
  std::vector<char*> env_ptrs;
  env_ptrs.reserve(env.size() + 1);
  for (const auto& e : env) env_ptrs.push_back(const_cast<char*>(e.c_str()));
  env_ptrs.push_back(nullptr);
  std::vector<std::string> candidates = Candidates(request.argv[0], request.env);
  std::string workdir = request.workdir.empty() ? "/" : request.workdir;
  bool harden = hardening == Hardening::kOn && !request.privileged;

  SpawnedChild child;
  UniqueFd child_in, child_out, child_err;
  std::string slave_path;
  if (request.tty) {
    UniqueFd master(::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC));
    if (!master) return FailErrno("posix_openpt");
    if (::grantpt(master.Get()) != 0) return FailErrno("grantpt");
    if (::unlockpt(master.Get()) != 0) return FailErrno("unlockpt");
    char name[128];
    if (int err = ::ptsname_r(master.Get(), name, sizeof(name)); err != 0)
      return FailErrno("ptsname_r", err);
    slave_path = name;
    struct winsize ws {};
    ws.ws_row = request.rows;
    ws.ws_col = request.cols;
    if (::ioctl(master.Get(), TIOCSWINSZ, &ws) != 0) return FailErrno("ioctl(TIOCSWINSZ)");
    CELLA_TRY(SetNonBlocking(master.Get(), true));
    if (request.stdin_open) {
      child.stdin_fd.Reset(::fcntl(master.Get(), F_DUPFD_CLOEXEC, 0));
      if (!child.stdin_fd) return FailErrno("dup pty master");
    }
    child.stdout_fd.Reset(::fcntl(master.Get(), F_DUPFD_CLOEXEC, 0));
    if (!child.stdout_fd) return FailErrno("dup pty master");
    child.pty_master = std::move(master);
  } else if (request.detach) {
    // Nobody reads its output: /dev/null, so it never blocks on a full pipe
    // nor dies of SIGPIPE.
    child_in.Reset(::open("/dev/null", O_RDWR | O_CLOEXEC));
    if (!child_in) return FailErrno("open /dev/null");
    child_out.Reset(::fcntl(child_in.Get(), F_DUPFD_CLOEXEC, 0));
    child_err.Reset(::fcntl(child_in.Get(), F_DUPFD_CLOEXEC, 0));
    if (!child_out || !child_err) return FailErrno("dup /dev/null");
  } else {
    Pipe in = CELLA_TRY(MakePipe());
    Pipe out = CELLA_TRY(MakePipe());
    Pipe err = CELLA_TRY(MakePipe());
    child_in = std::move(in.read);
    // Without stdin the child reads EOF at once: its write end is dropped.
    if (request.stdin_open) child.stdin_fd = std::move(in.write);
    child_out = std::move(out.write);
    child_err = std::move(err.write);
    child.stdout_fd = std::move(out.read);
    child.stderr_fd = std::move(err.read);
    if (child.stdin_fd) CELLA_TRY(SetNonBlocking(child.stdin_fd.Get(), true));
    CELLA_TRY(SetNonBlocking(child.stdout_fd.Get(), true));
    CELLA_TRY(SetNonBlocking(child.stderr_fd.Get(), true));
  }
  Pipe status = CELLA_TRY(MakePipe());

  pid_t pid = ::fork();
  if (pid < 0) return FailErrno("fork");
  if (pid == 0) {
    int sfd = status.write.Get();
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, nullptr) != 0) ChildFail(sfd, Stage::kSignals, errno);
    for (int sig = 1; sig < NSIG; ++sig) {
      // Fails (EINVAL) only for the signals glibc reserves for its threads;
      // glibc catches (never ignores) those, and execve resets caught ones.
      if (sig != SIGKILL && sig != SIGSTOP) (void)signal(sig, SIG_DFL);
    }
    if (::setsid() < 0) ChildFail(sfd, Stage::kSession, errno);
    if (request.tty) {
      int slave = ::open(slave_path.c_str(), O_RDWR);
      if (slave < 0) ChildFail(sfd, Stage::kTty, errno);
      if (::ioctl(slave, TIOCSCTTY, 0) != 0) ChildFail(sfd, Stage::kTty, errno);
      for (int target = 0; target < 3; ++target)
        if (::dup2(slave, target) < 0) ChildFail(sfd, Stage::kStdio, errno);
      if (slave > 2) ::close(slave);
    } else {
      if (::dup2(child_in.Get(), 0) < 0 || ::dup2(child_out.Get(), 1) < 0 ||
          ::dup2(child_err.Get(), 2) < 0)
        ChildFail(sfd, Stage::kStdio, errno);
    }
    MarkAllCloexecFrom(3);
    if (harden) {
      if (int err = DropBoundingCapabilities(); err != 0) ChildFail(sfd, Stage::kCaps, err);
    }
    if (identity) {
      if (::setgroups(identity->groups.size(), identity->groups.data()) != 0)
        ChildFail(sfd, Stage::kUser, errno);
      if (::setgid(identity->gid) != 0) ChildFail(sfd, Stage::kUser, errno);
      if (::setuid(identity->uid) != 0) ChildFail(sfd, Stage::kUser, errno);
    }
    if (::chdir(workdir.c_str()) != 0) ChildFail(sfd, Stage::kWorkdir, errno);
    if (harden) {
      if (int err = ApplyNoNewPrivsAndSeccomp(); err != 0) ChildFail(sfd, Stage::kSeccomp, err);
    }
    int exec_err = ENOENT;
    bool saw_eacces = false;
    for (const auto& path : candidates) {
      ::execve(path.c_str(), argv_ptrs.data(), env_ptrs.data());
      if (errno == EACCES) {
        saw_eacces = true;
      } else if (errno != ENOENT && errno != ENOTDIR) {
        exec_err = errno;
        break;
      }
    }
    if (saw_eacces && exec_err == ENOENT) exec_err = EACCES;
    // Nobody sees a detached child's stderr: tell the parent instead.
    if (request.detach) ChildFail(sfd, Stage::kExec, exec_err);
    ChildWriteStderr(request.argv[0], exec_err);
    _exit(exec_err == ENOENT ? 127 : 126);
  }

  status.write.Reset();
  child_in.Reset();
  child_out.Reset();
  child_err.Reset();
  StatusRecord record{};
  size_t got = 0;
  while (got < sizeof(record)) {
    ssize_t n =
        ::read(status.read.Get(), reinterpret_cast<char*>(&record) + got, sizeof(record) - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      // Cannot tell whether setup worked: do not leave a half-set-up child.
      int err = errno;
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
      return FailErrno("exec: read the child's status pipe", err);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got == sizeof(record)) {
    int wstatus = 0;
    while (::waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
    }
    if (record.stage == Stage::kExec) {
      child.pid = pid;
      child.exec_errno = record.err != 0 ? record.err : ENOENT;
      return child;
    }
    std::string what = std::string("exec: ") + StageName(record.stage);
    if (record.stage == Stage::kWorkdir) what += " " + workdir;
    if (record.stage == Stage::kUser) what += " " + request.user;
    return FailErrno(what, record.err);
  }
  child.pid = pid;
  return child;
}

}  // namespace cella::agent
