#include "host/sandbox/share.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/mount.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "base/beneath.h"
#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"

namespace cella::sandbox {
namespace {

#if defined(__x86_64__)
constexpr uint32_t kAuditArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr uint32_t kAuditArch = AUDIT_ARCH_AARCH64;
#else
#error "add this architecture's AUDIT_ARCH"
#endif

constexpr uint32_t kPrivilegeBits = S_ISUID | S_ISGID;

// One syscall whose mode argument must not carry setuid/setgid bits (and,
// for mknod, must not name a device).
struct ModeRule {
  long nr;
  int mode_arg;
  bool refuse_devices;
};

uint32_t ArgLow(int index) {
  // seccomp_data.args are u64; a mode fits the low word (little-endian).
  return static_cast<uint32_t>(offsetof(seccomp_data, args) + 8 * static_cast<size_t>(index));
}

// A filter stacked under virtiofsd's own: refuses (EPERM) any chmod/create/
// mknod whose mode has S_ISUID or S_ISGID, and mknod of a device (belt to
// modcaps=-mknod's braces). Syscalls that pass modes in a struct (openat2) or
// that this glibc never calls (fchmodat2) get ENOSYS, so nothing bypasses it.
std::vector<sock_filter> PrivilegeFilter() {
  std::vector<ModeRule> rules = {
      {SYS_fchmod, 1, false}, {SYS_fchmodat, 2, false}, {SYS_openat, 3, false},
      {SYS_mknodat, 2, true}, {SYS_mkdirat, 2, false},
#ifdef SYS_mkdir
      {SYS_mkdir, 1, false},
#endif
#ifdef SYS_chmod
      {SYS_chmod, 1, false},
#endif
#ifdef SYS_open
      {SYS_open, 2, false},
#endif
#ifdef SYS_creat
      {SYS_creat, 1, false},
#endif
#ifdef SYS_mknod
      {SYS_mknod, 1, true},
#endif
  };
  std::vector<sock_filter> f;
  f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)));
  f.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kAuditArch, 1, 0));
  f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM));
  for (long nr : {437L /* openat2 */, 452L /* fchmodat2 */}) {
    f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)));
    f.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(nr), 0, 1));
    f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
  }
  for (const ModeRule& rule : rules) {
    std::vector<sock_filter> body;
    body.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ArgLow(rule.mode_arg)));
    body.push_back(BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, kPrivilegeBits, 0, 0));  // jt patched
    if (rule.refuse_devices) {
      body.push_back(BPF_STMT(BPF_ALU | BPF_AND | BPF_K, S_IFMT));
      body.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, S_IFCHR, 0, 0));  // jt patched
      body.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, S_IFBLK, 0, 0));  // jt patched
    }
    body.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    body.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM));
    // Every conditional jump's "true" leads to the EPERM at the end.
    for (size_t i = 0; i + 1 < body.size(); ++i) {
      if (BPF_CLASS(body[i].code) == BPF_JMP)
        body[i].jt = static_cast<uint8_t>(body.size() - 1 - (i + 1));
    }
    f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)));
    f.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(rule.nr), 0,
                         static_cast<uint8_t>(body.size())));
    f.insert(f.end(), body.begin(), body.end());
  }
  f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  return f;
}

// After fork: only syscalls. Reports `what` and errno to the log fd (stderr)
// and exits.
[[noreturn]] void ChildFail(const char* what) {
  int saved = errno;
  char buf[256];
  int n = std::snprintf(buf, sizeof buf, "cella share setup: %s: %s\n", what, strerror(saved));
  if (n > 0) (void)!::write(STDERR_FILENO, buf, static_cast<size_t>(n));
  ::_exit(126);
}

int MountSetattr(const char* path, unsigned flags, uint64_t set) {
  mount_attr attr{};
  attr.attr_set = set;
  return static_cast<int>(::syscall(SYS_mount_setattr, AT_FDCWD, path, flags, &attr, sizeof attr));
}

Result<std::string> LogTail(const std::string& path) {
  std::string text = CELLA_TRY(ReadFileToString(path, 1 << 20));
  if (text.size() > 2048) text = text.substr(text.size() - 2048);
  while (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

// Opens `path` (absolute) one component at a time, refusing a symlink at
// any of them (see base/beneath.h).
Result<UniqueFd> OpenWithoutSymlinks(const std::string& path) {
  if (!path.starts_with('/')) return Fail("share " + path + ": not an absolute path");
  UniqueFd root(::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!root) return FailErrno("open /");
  auto opened = OpenPathBeneath(root.Get(), path, "share " + path);
  if (!opened) {
    return Fail(opened.error().message +
                "; a shared path must not change under cella (recreate the sandbox to share what "
                "it now points to)");
  }
  return std::move(*opened);
}

}  // namespace

std::vector<std::string> VirtiofsdArgv(const ShareDaemonOptions& o) {
  // cache=auto: attributes and names are trusted for 1 s and file data is
  // revalidated on open, so a host edit shows in the guest within a second.
  // No xattr (security.capability would be a privilege), no flock/posix locks
  // held on the host for the guest.
  return {o.virtiofsd, "--socket-path=" + o.socket_path, "-o", "source=" + o.stage_dir, "-o",
          "cache=auto", "-o", "sandbox=namespace", "-o", "no_xattr", "-o",
          // -fsetid: a guest write to an existing setuid/setgid file clears
          // those bits (the kernel keeps them only for CAP_FSETID holders).
          "modcaps=-mknod:-setfcap:-fsetid", "-o", "log_level=warn",
          "--rlimit-nofile=" + std::to_string(kShareMaxFds)};
}

Result<std::string> ResolveVirtiofsd() {
  std::string path = kDefaultVirtiofsd;
  if (const char* env = std::getenv("CELLA_VIRTIOFSD"); env != nullptr && *env != '\0') path = env;
  if (::access(path.c_str(), X_OK) != 0)
    return Fail("host directory shares need virtiofsd at " + path +
                " (Debian: apt install qemu-system-common; or set CELLA_VIRTIOFSD)");
  return path;
}

Result<std::unique_ptr<ShareDaemon>> ShareDaemon::Start(const ShareDaemonOptions& o) {
  // Everything the child touches is made before fork.
  std::vector<std::string> argv_storage = VirtiofsdArgv(o);
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<sock_filter> filter = PrivilegeFilter();
  sock_fprog prog{static_cast<unsigned short>(filter.size()), filter.data()};
  std::string file_target;
  if (o.is_file) {
    auto slash = o.host_path.rfind('/');
    file_target = o.stage_dir + "/" + o.host_path.substr(slash + 1);
  }
  // The shared path was made canonical when the sandbox was created; a
  // symlink anywhere on it now was put there since (by this guest through
  // another share, say) to redirect the bind: refuse it, here with a clear
  // message, and again in the child, which walks the path the same way in
  // its own mount namespace (a bind's source must be in it) and binds
  // exactly what it opened, not whatever the path names a moment later.
  UniqueFd source = CELLA_TRY(OpenWithoutSymlinks(o.host_path));
  struct stat source_st {};
  if (::fstat(source.Get(), &source_st) != 0) return FailErrno("fstat " + o.host_path);
  if (o.is_file ? !S_ISREG(source_st.st_mode) : !S_ISDIR(source_st.st_mode))
    return Fail("share " + o.host_path + ": is no longer a " +
                (o.is_file ? "regular file" : "directory"));
  std::vector<std::string> components;
  for (size_t pos = 1; pos < o.host_path.size();) {
    size_t next = o.host_path.find('/', pos);
    if (next == std::string::npos) next = o.host_path.size();
    if (next > pos) components.push_back(o.host_path.substr(pos, next - pos));
    pos = next + 1;
  }
  constexpr int kSourceFd = 100;  // where the child keeps what it opened
  const std::string source_path = "/proc/self/fd/" + std::to_string(kSourceFd);
  if (::unlink(o.socket_path.c_str()) != 0 && errno != ENOENT)
    return FailErrno("unlink " + o.socket_path);
  UniqueFd log_fd(::open(o.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!log_fd) return FailErrno("open " + o.log_path);
  UniqueFd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!devnull) return FailErrno("open /dev/null");
  const bool read_only = o.mode != protocol::MountMode::kReadWrite;
  const uint64_t attrs =
      MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (read_only ? MOUNT_ATTR_RDONLY : uint64_t{0});
  pid_t parent = ::getpid();

  pid_t pid = ::fork();
  if (pid < 0) return FailErrno("fork virtiofsd");
  if (pid == 0) {
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) ChildFail("prctl PDEATHSIG");
    if (::getppid() != parent) ::_exit(125);
    if (::dup2(devnull.Get(), 0) < 0 || ::dup2(log_fd.Get(), 1) < 0 || ::dup2(log_fd.Get(), 2) < 0)
      ChildFail("dup2");
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    // The host's mount table never sees what follows.
    if (::unshare(CLONE_NEWNS) != 0) ChildFail("unshare(CLONE_NEWNS)");
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
      ChildFail("make / private");
    {
      int at = ::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
      if (at < 0) ChildFail("open /");
      for (const std::string& part : components) {
        int next = ::openat(at, part.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (next < 0) ChildFail("open the shared path");
        struct stat st {};
        if (::fstat(next, &st) != 0) ChildFail("fstat the shared path");
        if (S_ISLNK(st.st_mode)) {
          errno = ELOOP;
          ChildFail("the shared path has a symlink on it");
        }
        ::close(at);
        at = next;
      }
      if (at != kSourceFd && ::dup2(at, kSourceFd) < 0) ChildFail("dup2 the shared path");
    }
    if (o.is_file) {
      // A directory with one entry: the file. The tmpfs is read-only once
      // the bind is in place, so the guest cannot add siblings either.
      if (::mount("tmpfs", o.stage_dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "size=16k,nr_inodes=8,mode=0755") != 0)
        ChildFail("mount tmpfs on the stage");
      int fd = ::open(file_target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
      if (fd < 0) ChildFail("create the file mount point");
      ::close(fd);
      if (::mount(source_path.c_str(), file_target.c_str(), nullptr, MS_BIND, nullptr) != 0)
        ChildFail("bind the shared file");
      if (MountSetattr(o.stage_dir.c_str(), 0, MOUNT_ATTR_RDONLY) != 0)
        ChildFail("make the stage read-only");
    } else if (::mount(source_path.c_str(), o.stage_dir.c_str(), nullptr, MS_BIND | MS_REC,
                       nullptr) != 0) {
      ChildFail("bind the shared directory");
    }
    // After the binds: the source fd was needed until now.
    if (::close_range(3, ~0U, 0) != 0) ChildFail("close_range");
    // Recursive: directories mounted inside the share get the same flags.
    if (MountSetattr(o.stage_dir.c_str(), AT_RECURSIVE, attrs) != 0)
      ChildFail("mount_setattr on the share");
    if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
      ChildFail("install the seccomp filter");
    ::execv(argv[0], argv.data());
    ChildFail("exec virtiofsd");
  }
  auto daemon = std::unique_ptr<ShareDaemon>(new ShareDaemon(pid));
  // Bounded: virtiofsd creates its socket right after setting up.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    struct stat st {};
    if (::stat(o.socket_path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return daemon;
    int status = 0;
    pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid || std::chrono::steady_clock::now() > deadline) {
      if (done == pid) daemon->pid_ = -1;
      daemon->Stop();
      std::string tail = LogTail(o.log_path).value_or("");
      return Fail("share " + o.host_path + ": virtiofsd " +
                  (done == pid ? "exited during setup" : "did not create its socket in 10 s") +
                  (tail.empty() ? "" : ": " + tail));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

ShareDaemon::~ShareDaemon() { Stop(); }

std::optional<std::string> ShareDaemon::Exited() {
  if (exit_ || pid_ <= 0) return exit_;
  int status = 0;
  pid_t done = ::waitpid(pid_, &status, WNOHANG);
  if (done != pid_) return std::nullopt;
  pid_ = -1;
  exit_ = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                              : "exit status " + std::to_string(WEXITSTATUS(status));
  return exit_;
}

void ShareDaemon::Stop() {
  if (pid_ <= 0) return;
  // Only our own child, by pid, which we have not reaped yet (so the pid is
  // still ours). virtiofsd's inner process dies with it (its PDEATHSIG).
  if (::kill(pid_, SIGKILL) != 0 && errno != ESRCH)
    log::Warn("kill virtiofsd", {{"pid", pid_}, {"error", std::strerror(errno)}});
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

}  // namespace cella::sandbox
