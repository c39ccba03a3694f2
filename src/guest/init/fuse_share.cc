#include "guest/init/fuse_share.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "guest/init/console.h"
#include "guest/init/format.h"
#include "guest/init/fs_util.h"
#include "guest/init/rootfs.h"

namespace cella::init {
namespace {

using protocol::MountMode;

// One mount made at a stage in /cella, to be put on its guest path.
struct Staged {
  std::string guest_path;
  std::string stage;  // relative to /cella
  std::string where;  // for errors: "host_shares[1] (/work)"
  bool is_file = false;
  // An overlay share: overlayfs is mounted on `stage` first.
  bool overlay = false;
  std::string lower, upper, work;  // relative to /cella
  // A single-file overlay share: this file of the stage is bound on the
  // path (the stage itself stays where it is).
  std::string bind_file;
};

struct State {
  std::map<uint32_t, UniqueFd> fuse;  // share index -> its /dev/fuse (never closed)
  std::vector<Staged> staged;
  UniqueFd scratch;  // /cella, opened before the switch of root
  UniqueFd done;     // eventfd, written once the placing ends
  std::mutex mu;
  std::optional<Status> result;  // guarded by mu
};

State& Shares() {
  static State state;
  return state;
}

Status PlaceOne(const std::string& scratch, const Staged& s) {
  std::string stage = scratch + "/" + s.stage;
  if (s.overlay) {
    std::string options = CELLA_TRY(OverlayMountOptions(
        {scratch + "/" + s.lower}, scratch + "/" + s.upper, scratch + "/" + s.work));
    CELLA_TRY(Mount("overlay", stage, "overlay", 0, options));
  }
  // Beneath "/" one component at a time, no symlink followed; a missing
  // mount point is created (through the share above it, if any).
  UniqueFd target = s.is_file ? CELLA_TRY(OpenFileBeneath("/", s.guest_path))
                              : CELLA_TRY(OpenDirBeneath("/", s.guest_path));
  if (!s.bind_file.empty())
    return Mount(stage + "/" + s.bind_file, FdPath(target.Get()), "", MS_BIND);
  return Mount(stage, FdPath(target.Get()), "", MS_MOVE);
}

void PlaceAll() {
  State& state = Shares();
  std::string scratch = FdPath(state.scratch.Get());
  Status result;
  for (const Staged& s : state.staged) {
    if (auto st = PlaceOne(scratch, s); !st) {
      result = std::unexpected(std::move(st.error()).WithContext(s.where));
      break;
    }
  }
  {
    std::lock_guard lock(state.mu);
    state.result = std::move(result);
  }
  uint64_t one = 1;
  if (::write(state.done.Get(), &one, sizeof one) != sizeof one)
    Say("warning: could not signal that the shares are mounted");
}

std::string FuseOptions(int fuse_fd, bool file_root) {
  return "fd=" + std::to_string(fuse_fd) + (file_root ? ",rootmode=100000" : ",rootmode=40000") +
         ",user_id=0,group_id=0,allow_other,default_permissions";
}

}  // namespace

bool BeneathFuseShare(const protocol::Config& config, const std::string& path) {
  for (const auto& share : config.host_shares) {
    if (share.fuse && path.starts_with(share.path + "/")) return true;
  }
  return false;
}

Status StageFuseShares(const protocol::Config& config) {
  State& state = Shares();
  const std::string scratch = kScratch;
  for (size_t i = 0; i < config.host_shares.size(); ++i) {
    const protocol::HostShare& share = config.host_shares[i];
    if (!share.fuse) continue;
    std::string n = std::to_string(i);
    std::string where = "host_shares[" + n + "] (" + share.path + ")";
    const bool is_file = !share.file.empty();
    const bool overlay = share.mode == MountMode::kOverlay;
    UniqueFd fuse(::open("/dev/fuse", O_RDWR | O_CLOEXEC));
    if (!fuse) return FailErrno("open /dev/fuse (is fuse.ko loaded?)");
    unsigned long flags = MS_NOSUID | MS_NODEV;
    if (share.mode != MountMode::kReadWrite) flags |= MS_RDONLY;
    Staged staged;
    staged.guest_path = share.path;
    staged.where = where;
    staged.is_file = is_file;
    std::string base = "share" + n;
    CELLA_TRY_CTX(MkdirAll(scratch + "/" + base, 0755), where);
    if (is_file && !overlay) {
      staged.stage = base + "/file";
      std::string file = scratch + "/" + staged.stage;
      UniqueFd created(::open(file.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
      if (!created) return FailErrno("create " + file);
      CELLA_TRY_CTX(Mount("cella-" + share.tag, file, "fuse", flags, FuseOptions(fuse.Get(), true)),
                    where);
    } else {
      std::string fs = base + "/fs";
      CELLA_TRY_CTX(MkdirAll(scratch + "/" + fs, 0755), where);
      CELLA_TRY_CTX(Mount("cella-" + share.tag, scratch + "/" + fs, "fuse", flags,
                          FuseOptions(fuse.Get(), false)),
                    where);
      staged.stage = fs;
      if (overlay) {
        // Beside the root's own writable layer (an ext4 that survives
        // stop/start and is carried by snapshots, else a tmpfs in RAM), so
        // it is kept and discarded with the sandbox.
        std::string layer = "upper/cella-shares/" + n;
        CELLA_TRY_CTX(MkdirAll(scratch + "/" + layer + "/upper", 0755), where);
        CELLA_TRY_CTX(MkdirAll(scratch + "/" + layer + "/work", 0755), where);
        CELLA_TRY_CTX(MkdirAll(scratch + "/" + base + "/merged", 0755), where);
        staged.overlay = true;
        staged.lower = fs;
        staged.upper = layer + "/upper";
        staged.work = layer + "/work";
        staged.stage = base + "/merged";
        staged.bind_file = share.file;
      }
    }
    state.fuse.emplace(static_cast<uint32_t>(i), std::move(fuse));
    state.staged.push_back(std::move(staged));
  }
  if (!state.staged.empty() && !state.scratch) {
    state.scratch.Reset(::open(kScratch, O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!state.scratch) return FailErrno(std::string("open ") + kScratch);
  }
  return {};
}

Result<std::string> StageBeneathShare(const std::string& guest_path, const std::string& name) {
  State& state = Shares();
  if (!state.scratch) return Fail("a mount beneath a FUSE share staged before the shares");
  Staged staged;
  staged.guest_path = guest_path;
  staged.stage = "stage/" + name;
  staged.where = name + " (" + guest_path + ")";
  std::string dir = std::string(kScratch) + "/" + staged.stage;
  CELLA_TRY(MkdirAll(dir, 0755));
  state.staged.push_back(std::move(staged));
  return dir;
}

Status StartPlacingShares() {
  State& state = Shares();
  if (state.staged.empty()) return {};
  // Parents before children: a path sorts before every path it prefixes.
  std::stable_sort(state.staged.begin(), state.staged.end(),
                   [](const Staged& a, const Staged& b) { return a.guest_path < b.guest_path; });
  state.done.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!state.done) return FailErrno("eventfd");
  // The thread takes no signal: the agent's signalfd must see every
  // SIGCHLD, and a signal left to a thread that does not block it would be
  // discarded (SIGCHLD's default) instead. It inherits this mask.
  sigset_t all, saved;
  sigfillset(&all);
  if (int err = ::pthread_sigmask(SIG_SETMASK, &all, &saved); err != 0)
    return FailErrno("pthread_sigmask", err);
  try {
    std::thread(PlaceAll).detach();
  } catch (const std::system_error& e) {
    ::pthread_sigmask(SIG_SETMASK, &saved, nullptr);
    return Fail(std::string("start the share mounting thread: ") + e.what());
  }
  if (int err = ::pthread_sigmask(SIG_SETMASK, &saved, nullptr); err != 0)
    return FailErrno("pthread_sigmask", err);
  return {};
}

std::optional<Status> SharesPlacedResult() {
  State& state = Shares();
  if (state.staged.empty()) return Status{};
  std::lock_guard lock(state.mu);
  return state.result;
}

int SharesPlacedFd() { return Shares().done ? Shares().done.Get() : -1; }

Result<UniqueFd> ServeFuseShare(const protocol::Config& config, uint32_t index) {
  if (index >= config.host_shares.size())
    return std::unexpected(Error{"serve_share: no share " + std::to_string(index), EINVAL});
  if (!config.host_shares[index].fuse)
    return std::unexpected(
        Error{"serve_share: share " + std::to_string(index) + " is not served over FUSE", EINVAL});
  auto& mounted = Shares().fuse;
  auto it = mounted.find(index);
  if (it == mounted.end())
    return std::unexpected(
        Error{"serve_share: share " + std::to_string(index) + " was not mounted at boot", ENOENT});
  UniqueFd copy(::fcntl(it->second.Get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) return FailErrno("dup /dev/fuse");
  return copy;
}

}  // namespace cella::init
