#include "guest/agent/spawn.h"

#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/io.h"
#include "base/sanitizers.h"
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
  // A failure's own words when it has them (a user lookup's), NUL-ended;
  // the whole record stays one atomic pipe write.
  char detail[240];
};
static_assert(sizeof(StatusRecord) <= PIPE_BUF);

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

[[noreturn]] void ChildFail(int status_fd, Stage stage, int err, std::string_view detail = {}) {
  StatusRecord record{stage, err, {}};
  // Not memcpy: an empty view's data() may be null, which memcpy must not
  // be given even for no bytes (UBSan ends the child there, unheard).
  detail.copy(record.detail, sizeof(record.detail) - 1);
  // Nothing to do if this write fails: the parent then sees a plain exit.
  ssize_t ignored = ::write(status_fd, &record, sizeof(record));
  (void)ignored;
  _exit(127);
}

// strerrordesc_np: the English text, with no locale lookup (no lock, no
// allocation: the child shares the parent's memory).
void ChildWriteStderr(const char* program, int err) {
  const char* what = ::strerrordesc_np(err);
  if (what == nullptr) what = "cannot execute";
  char prefix[] = "cella-agent: ";
  char colon[] = ": ";
  char newline[] = "\n";
  iovec parts[] = {{prefix, sizeof prefix - 1},
                   {const_cast<char*>(program), std::strlen(program)},
                   {colon, sizeof colon - 1},
                   {const_cast<char*>(what), std::strlen(what)},
                   {newline, 1}};
  ssize_t ignored = ::writev(STDERR_FILENO, parts, 5);
  (void)ignored;
}

void MarkAllCloexecFrom(int first) {
  if (::syscall(SYS_close_range, first, ~0U, CLOSE_RANGE_CLOEXEC) == 0) return;
  for (int fd = first; fd < 4096; ++fd) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags >= 0) ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
  }
}

// Every descriptor from 3 up but `keep` (close-on-exec) is closed: a child
// that waits on a host share before its exec must not hold the agent's
// port (which the agent reopens for its next host) or the pipes whose end
// tells the agent an operation finished. close_range(2) came with Linux
// 5.9; before it they are only marked close-on-exec.
void CloseAllFrom3Except(int keep) {
  if (keep > 3 && ::syscall(SYS_close_range, 3, keep - 1, 0) != 0) return MarkAllCloexecFrom(3);
  if (::syscall(SYS_close_range, keep + 1, ~0U, 0) != 0) MarkAllCloexecFrom(3);
}

// Everything the child needs, made ready by the parent. The child runs in
// the parent's memory until it execs (CLONE_VM | CLONE_VFORK: no copy of
// the agent's page tables, which under TCG is first-time translated kernel
// code in every fresh copy of a VM), so it allocates nothing, takes no lock
// and switches user by raw system calls (glibc's setuid would signal the
// parent's threads to follow).
struct ChildPlan {
  int status_fd = -1;
  bool tty = false;
  const char* slave_path = nullptr;
  int in_fd = -1, out_fd = -1, err_fd = -1;
  bool harden = false;
  const Identity* identity = nullptr;
  const char* workdir = nullptr;
  const std::vector<std::string>* candidates = nullptr;
  char* const* argv = nullptr;
  char* const* envp = nullptr;
  bool detach = false;
  // A forked child only (its memory is its own): the user to look up, in
  // place of `identity`, and the environment to add its HOME to, if any.
  // Looked up after the fork, as /etc/passwd may be on a host share that
  // only the agent's loop serves.
  const std::string* user_to_look_up = nullptr;
  const std::vector<std::string>* env_without_home = nullptr;
  bool make_workdir = false;
};

// mkdir -p without allocating (a vfork'd child runs in the agent's memory).
int MakeDirsAsChild(const char* path) {
  char buf[PATH_MAX];
  const size_t n = ::strnlen(path, sizeof(buf));
  if (n == sizeof(buf)) return ENAMETOOLONG;
  std::memcpy(buf, path, n + 1);
  for (size_t i = 1; i <= n; ++i) {
    if (buf[i] != '/' && buf[i] != '\0') continue;
    const char saved = buf[i];
    buf[i] = '\0';
    if (::mkdir(buf, 0755) != 0 && errno != EEXIST) return errno;
    buf[i] = saved;
  }
  return 0;
}

// The kernel's struct sigaction on x86-64 (not glibc's): handler, flags,
// restorer, mask.
struct KernelSigaction {
  void (*handler)(int) = SIG_DFL;
  unsigned long flags = 0;
  void (*restorer)() = nullptr;
  uint64_t mask = 0;
};

int ChildMain(void* arg) {
  const ChildPlan& plan = *static_cast<const ChildPlan*>(arg);
  const int sfd = plan.status_fd;
  // Every signal is blocked (the parent blocked them before the clone):
  // the handlers go back to their defaults before any can run here. By the
  // raw call: glibc's sigaction refuses the two signals it keeps for its
  // threads (32, 33), which an agent started with them ignored would pass
  // on ignored (execve keeps SIG_IGN).
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    KernelSigaction default_action{};  // SIG_DFL, no flags, empty mask
    (void)::syscall(SYS_rt_sigaction, sig, &default_action, nullptr, sizeof(uint64_t));
  }
  sigset_t none;
  sigemptyset(&none);
  if (::sigprocmask(SIG_SETMASK, &none, nullptr) != 0) ChildFail(sfd, Stage::kSignals, errno);
  if (::setsid() < 0) ChildFail(sfd, Stage::kSession, errno);
  if (plan.tty) {
    int slave = ::open(plan.slave_path, O_RDWR);
    if (slave < 0) ChildFail(sfd, Stage::kTty, errno);
    if (::ioctl(slave, TIOCSCTTY, 0) != 0) ChildFail(sfd, Stage::kTty, errno);
    for (int target = 0; target < 3; ++target)
      if (::dup2(slave, target) < 0) ChildFail(sfd, Stage::kStdio, errno);
    if (slave > 2) ::close(slave);
  } else {
    if (::dup2(plan.in_fd, 0) < 0 || ::dup2(plan.out_fd, 1) < 0 || ::dup2(plan.err_fd, 2) < 0)
      ChildFail(sfd, Stage::kStdio, errno);
  }
  CloseAllFrom3Except(sfd);
  if (plan.harden) {
    if (int err = DropBoundingCapabilities(); err != 0) ChildFail(sfd, Stage::kCaps, err);
  }
  // Made as root, before the switch to the user, as docker makes it.
  if (plan.make_workdir) {
    if (int err = MakeDirsAsChild(plan.workdir); err != 0) ChildFail(sfd, Stage::kWorkdir, err);
  }
  const Identity* identity = plan.identity;
  char* const* envp = plan.envp;
  std::optional<Identity> looked_up;
  std::vector<std::string> env;
  std::vector<char*> env_ptrs;
  if (plan.user_to_look_up != nullptr) {
    auto resolved = ResolveUser(*plan.user_to_look_up);
    if (!resolved)
      ChildFail(sfd, Stage::kUser, resolved.error().errno_value, resolved.error().message);
    looked_up = std::move(*resolved);
    identity = &*looked_up;
    if (plan.env_without_home != nullptr) {
      env = *plan.env_without_home;
      env.push_back("HOME=" + identity->home);
      for (std::string& e : env) env_ptrs.push_back(e.data());
      env_ptrs.push_back(nullptr);
      envp = env_ptrs.data();
    }
  }
  if (const Identity* id = identity) {
    if (::syscall(SYS_setgroups, id->groups.size(), id->groups.data()) != 0)
      ChildFail(sfd, Stage::kUser, errno);
    if (::syscall(SYS_setgid, id->gid) != 0) ChildFail(sfd, Stage::kUser, errno);
    if (::syscall(SYS_setuid, id->uid) != 0) ChildFail(sfd, Stage::kUser, errno);
  }
  if (::chdir(plan.workdir) != 0) ChildFail(sfd, Stage::kWorkdir, errno);
  if (plan.harden) {
    if (int err = ApplyNoNewPrivsAndSeccomp(); err != 0) ChildFail(sfd, Stage::kSeccomp, err);
  }
  int exec_err = ENOENT;
  bool saw_eacces = false;
  for (const std::string& path : *plan.candidates) {
    ::execve(path.c_str(), plan.argv, envp);
    if (errno == EACCES) {
      saw_eacces = true;
    } else if (errno != ENOENT && errno != ENOTDIR) {
      exec_err = errno;
      break;
    }
  }
  if (saw_eacces && exec_err == ENOENT) exec_err = EACCES;
  // Nobody sees a detached child's stderr: tell the parent instead.
  if (plan.detach) ChildFail(sfd, Stage::kExec, exec_err);
  ChildWriteStderr(plan.argv[0], exec_err);
  _exit(exec_err == ENOENT ? 127 : 126);
}

// The child's stack, for the clone only: the child stops using it when it
// execs or exits, and the parent is suspended until then. Its lowest page
// is a guard: an overflow faults instead of writing into PID 1's memory.
class ChildStack {
 public:
  static constexpr size_t kBytes = size_t{256} * 1024;
  static constexpr size_t kGuard = 4096;
  ChildStack() {
    void* p = ::mmap(nullptr, kGuard + kBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) return;
    base_ = static_cast<char*>(p);
    if (::mprotect(base_, kGuard, PROT_NONE) != 0) {
      (void)::munmap(base_, kGuard + kBytes);
      base_ = nullptr;
    }
  }
  ~ChildStack() {
    if (base_ != nullptr) (void)::munmap(base_, kGuard + kBytes);
  }
  ChildStack(const ChildStack&) = delete;
  ChildStack& operator=(const ChildStack&) = delete;
  bool ok() const { return base_ != nullptr; }
  void* top() const { return base_ + kGuard + kBytes; }

 private:
  char* base_ = nullptr;
};

// Starts ChildMain. By fork() when the caller does not wait for the exec,
// and under ASan: the sanitizer takes the clone's child, running on a
// stack of its own with the parent's thread record, for a stack switch it
// was not told of, and says so on the child's stderr (the user's).
Result<pid_t> StartChild(ChildPlan& plan, SpawnWait wait) {
  if (kUnderAsan || wait == SpawnWait::kNoWait) {
    pid_t pid = ::fork();
    if (pid < 0) return FailErrno("fork");
    if (pid == 0) ChildMain(&plan);
    return pid;
  }
  ChildStack stack;
  if (!stack.ok()) return FailErrno("map the child's stack");
  pid_t pid = ::clone(ChildMain, stack.top(), CLONE_VM | CLONE_VFORK | SIGCHLD, &plan);
  if (pid < 0) return FailErrno("clone");
  return pid;
}

void KillAndReap(pid_t pid) {
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
}

// The child's status: none once it has exec'd (the pipe closed at exec),
// else what it wrote before it failed.
Result<std::optional<StatusRecord>> ReadStatusRecord(int status_fd) {
  StatusRecord record{};
  size_t got = 0;
  while (got < sizeof(record)) {
    ssize_t n = ::read(status_fd, reinterpret_cast<char*>(&record) + got, sizeof(record) - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("exec: read the child's status pipe");
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got != sizeof(record)) return std::nullopt;
  return record;
}

// A failure before exec, named by its stage (and what it was about).
Error SetupFailure(const StatusRecord& record, const protocol::ExecRequest& request) {
  if (record.detail[0] != '\0')
    return Error{std::string(record.detail, ::strnlen(record.detail, sizeof(record.detail))),
                 record.err};
  std::string what = std::string("exec: ") + StageName(record.stage);
  if (record.stage == Stage::kWorkdir)
    what += " " + (request.workdir.empty() ? std::string("/") : request.workdir);
  if (record.stage == Stage::kUser) what += " " + request.user;
  return Error::FromErrno(what, record.err);
}

int ExecErrno(const StatusRecord& record) { return record.err != 0 ? record.err : ENOENT; }

}  // namespace

Result<int> FinishSpawn(UniqueFd status_fd, const protocol::ExecRequest& request) {
  auto record = CELLA_TRY(ReadStatusRecord(status_fd.Get()));
  if (!record) return 0;
  if (record->stage == Stage::kExec) return ExecErrno(*record);
  return std::unexpected(SetupFailure(*record, request));
}

Result<SpawnedChild> Spawn(const protocol::ExecRequest& request, Hardening hardening,
                           SpawnWait wait, MissingWorkdir missing_workdir) {
  // A child that is not waited for looks its user up itself (see ChildPlan).
  const bool user_in_child = wait == SpawnWait::kNoWait && !request.user.empty();
  std::optional<Identity> identity;
  if (!request.user.empty() && !user_in_child) identity = CELLA_TRY(ResolveUser(request.user));

  std::vector<std::string> env = request.env;
  const bool home_from_user = !HasEnv(env, "HOME");
  if (home_from_user && !user_in_child)
    env.push_back("HOME=" + (identity ? identity->home : std::string("/")));
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

  ChildPlan plan;
  plan.status_fd = status.write.Get();
  plan.tty = request.tty;
  plan.slave_path = slave_path.c_str();
  plan.in_fd = child_in.Get();
  plan.out_fd = child_out.Get();
  plan.err_fd = child_err.Get();
  plan.harden = harden;
  plan.identity = identity ? &*identity : nullptr;
  plan.workdir = workdir.c_str();
  plan.candidates = &candidates;
  plan.argv = argv_ptrs.data();
  plan.envp = env_ptrs.data();
  plan.detach = request.detach;
  plan.make_workdir = missing_workdir == MissingWorkdir::kCreate;
  if (user_in_child) {
    plan.user_to_look_up = &request.user;
    if (home_from_user) plan.env_without_home = &env;
  }
  // Blocked across the start: the child resets every handler before it
  // lets a signal in (until it execs, it runs in this process's memory).
  sigset_t all, old;
  sigfillset(&all);
  if (int err = ::pthread_sigmask(SIG_SETMASK, &all, &old); err != 0)
    return FailErrno("block signals", err);
  auto started = StartChild(plan, wait);
  if (int err = ::pthread_sigmask(SIG_SETMASK, &old, nullptr); err != 0) {
    if (started) KillAndReap(*started);
    return FailErrno("restore the signal mask", err);
  }
  if (!started) return std::unexpected(std::move(started.error()));
  const pid_t pid = *started;

  status.write.Reset();
  child_in.Reset();
  child_out.Reset();
  child_err.Reset();
  child.pid = pid;
  if (wait == SpawnWait::kNoWait) {
    child.status_fd = std::move(status.read);
    return child;
  }
  auto record = ReadStatusRecord(status.read.Get());
  if (!record) {
    // Cannot tell whether setup worked: do not leave a half-set-up child.
    KillAndReap(pid);
    return std::unexpected(std::move(record.error()));
  }
  if (!*record) return child;
  int wstatus = 0;
  while (::waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
  }
  if ((*record)->stage == Stage::kExec) {
    child.exec_errno = ExecErrno(**record);
    return child;
  }
  return std::unexpected(SetupFailure(**record, request));
}

}  // namespace cella::agent
