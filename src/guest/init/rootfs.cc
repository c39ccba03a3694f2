#include "guest/init/rootfs.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "base/io.h"
#include "guest/agent/upload_journal.h"
#include "guest/init/console.h"
#include "guest/init/format.h"
#include "guest/init/fs_util.h"
#include "guest/init/fuse_share.h"

namespace cella::init {
namespace {

using protocol::Config;
using protocol::MountMode;

constexpr const char* kDefaultRootDevice = "/dev/vda";

// Mounts a writable layer's filesystem at dir (a device, or a tmpfs when
// device is empty) and creates the overlayfs upper/ and work/ inside it.
Status MountWritableLayer(const std::string& device, const std::string& fstype,
                          const std::string& dir, Deadline deadline) {
  CELLA_TRY(MkdirAll(dir, 0755));
  if (device.empty()) {
    CELLA_TRY(Mount("tmpfs", dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"));
  } else {
    CELLA_TRY(WaitForDevice(device, deadline));
    const std::string type = fstype.empty() ? "ext4" : fstype;
    CELLA_TRY(Mount(device, dir, type, MS_NOATIME, type == "ext4" ? kExt4MountOptions : ""));
  }
  CELLA_TRY(MkdirAll(dir + "/upper", 0755));
  CELLA_TRY(MkdirAll(dir + "/work", 0755));
  return {};
}

// A read-only device whose filesystem type is not stated: ext4 or erofs.
Status MountReadOnlyAnyFs(const std::string& device, const std::string& target) {
  auto fstype = MountFirstOf(device, target, {"ext4", "erofs"}, MS_RDONLY);
  if (!fstype) return std::unexpected(std::move(fstype.error()));
  Debug("mounted " + device + " (" + *fstype + ") read-only on " + target);
  return {};
}

// What PrepareRootForClones made at the template point (empty on a cold
// boot). Only PID 1's main thread touches it, before any other thread exists.
struct PreparedRoot {
  std::vector<dev_t> lowers;  // the device mounted at kScratch/lower<i>
  bool overlay = false;       // the upper and the overlay on kNewRoot
  dev_t upper = 0;            // the seeded upper disk mounted at UpperDir (0: a tmpfs)
};
PreparedRoot g_prepared;

std::string LowerDir(size_t index) {
  return std::string(kScratch) + "/lower" + std::to_string(index);
}
std::string UpperDir() { return std::string(kScratch) + "/upper"; }

Result<dev_t> DeviceNumber(const std::string& device) {
  struct stat st {};
  if (::stat(device.c_str(), &st) != 0) return FailErrno("stat " + device);
  if (!S_ISBLK(st.st_mode)) return Fail(device + " is not a block device");
  return st.st_rdev;
}

Status Unmount(const std::string& target) {
  if (::umount2(target.c_str(), 0) != 0) return FailErrno("umount " + target);
  return {};
}

// Does the template point's lower mount fit this config's layers (the same
// devices, in the same order, as erofs)?
Result<bool> PreparedLowersFit(const protocol::OverlayRoot& root, Deadline deadline) {
  if (g_prepared.lowers.empty() || g_prepared.lowers.size() != root.lower.size()) return false;
  for (size_t i = 0; i < root.lower.size(); ++i) {
    const auto& layer = root.lower[i];
    if (!layer.fstype.empty() && layer.fstype != "erofs") return false;
    CELLA_TRY(WaitForDevice(layer.device, deadline));
    if (CELLA_TRY(DeviceNumber(layer.device)) != g_prepared.lowers[i]) return false;
  }
  return true;
}

// Unmounts what the template point made and this config does not use
// (`keep_lowers`: the lower layers fit), top first.
Status DropPrepared(bool keep_lowers) {
  if (g_prepared.overlay) {
    CELLA_TRY(Unmount(kNewRoot));
    CELLA_TRY(Unmount(UpperDir()));
    g_prepared.overlay = false;
    g_prepared.upper = 0;
  }
  if (!keep_lowers) {
    for (size_t i = 0; i < g_prepared.lowers.size(); ++i) CELLA_TRY(Unmount(LowerDir(i)));
    g_prepared.lowers.clear();
  }
  return {};
}

// Does the template point's upper fit this config's (a tmpfs, or the same
// seeded disk as ext4)?
Result<bool> PreparedUpperFits(const protocol::OverlayRoot& root, Deadline deadline) {
  if (root.upper_device.empty()) return g_prepared.upper == 0;
  if (g_prepared.upper == 0) return false;
  if (!root.upper_fstype.empty() && root.upper_fstype != "ext4") return false;
  CELLA_TRY(WaitForDevice(root.upper_device, deadline));
  return CELLA_TRY(DeviceNumber(root.upper_device)) == g_prepared.upper;
}

Status MountOverlayRoot(const protocol::OverlayRoot& root, Deadline deadline) {
  const bool reuse_lowers = CELLA_TRY(PreparedLowersFit(root, deadline));
  if (reuse_lowers && g_prepared.overlay && CELLA_TRY(PreparedUpperFits(root, deadline))) {
    Debug("root as made at the template point");
    return {};
  }
  CELLA_TRY_CTX(DropPrepared(reuse_lowers), "undo the template point's root");
  std::vector<std::string> lower_dirs;
  for (size_t i = 0; i < root.lower.size(); ++i) {
    const auto& layer = root.lower[i];
    std::string dir = LowerDir(i);
    if (!reuse_lowers) {
      CELLA_TRY(MkdirAll(dir, 0755));
      CELLA_TRY(WaitForDevice(layer.device, deadline));
      CELLA_TRY(Mount(layer.device, dir, layer.fstype.empty() ? "erofs" : layer.fstype, MS_RDONLY));
    }
    lower_dirs.push_back(dir);
  }
  std::string upper = UpperDir();
  CELLA_TRY(MountWritableLayer(root.upper_device, root.upper_fstype, upper, deadline));
  std::string options =
      CELLA_TRY(OverlayMountOptions(lower_dirs, upper + "/upper", upper + "/work"));
  CELLA_TRY(MkdirAll(kNewRoot, 0755));
  CELLA_TRY(Mount("overlay", kNewRoot, "overlay", 0, options));
  return {};
}

}  // namespace

Status RecoverInterruptedUploads(const Config& config) {
  if (!config.overlay_root || config.overlay_root->upper_device.empty()) return {};
  // Beside upper/ and work/ on the layer's disk: outside the sandbox's tree.
  const std::string path = std::string(kScratch) + "/upper/upload-journal";
  UniqueFd journal(
      ::open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!journal) return FailErrno("open " + path);
  // As many lines as uploads were in flight; more means damage: read a cap.
  constexpr size_t kMaxJournalBytes = size_t{1} << 20;
  std::string text(kMaxJournalBytes, '\0');
  ssize_t n = ::pread(journal.Get(), text.data(), text.size(), 0);
  if (n < 0) return FailErrno("read " + path);
  text.resize(static_cast<size_t>(n));
  if (!text.empty()) {
    UniqueFd root(::open(kNewRoot, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!root) return FailErrno(std::string("open ") + kNewRoot);
    auto removed = agent::RemoveJournaledTemps(root.Get(), text);
    if (removed) {
      Debug("removed " + std::to_string(*removed) + " temp files of interrupted uploads");
    } else {
      Say("warning: removing temp files of interrupted uploads: " + removed.error().message);
    }
    if (::ftruncate(journal.Get(), 0) != 0) return FailErrno("truncate " + path);
  }
  agent::UploadJournal::Install(std::move(journal));
  return {};
}

namespace {

Status MountPlainRoot(const Config& config, Deadline deadline) {
  std::string device = config.root_device.empty() ? kDefaultRootDevice : config.root_device;
  CELLA_TRY(WaitForDevice(device, deadline));
  CELLA_TRY(MkdirAll(kNewRoot, 0755));
  if (!config.root_fstype.empty() && config.root_fstype != "erofs") {
    CELLA_TRY(Mount(device, kNewRoot, config.root_fstype, MS_NOATIME));
    return {};
  }
  if (config.root_fstype.empty()) {
    auto rw = Mount(device, kNewRoot, "ext4", MS_NOATIME, kExt4MountOptions);
    if (rw) return {};
    Debug("root " + device + " is not writable ext4 (" + rw.error().message + "); trying erofs");
  }
  // A read-only image root: give it a tmpfs upper so /etc/hosts and the
  // workload can still write.
  std::string lower = std::string(kScratch) + "/lower0";
  CELLA_TRY(MkdirAll(lower, 0755));
  CELLA_TRY(Mount(device, lower, "erofs", MS_RDONLY));
  std::string upper = std::string(kScratch) + "/upper";
  CELLA_TRY(MountWritableLayer("", "", upper, deadline));
  std::string options = CELLA_TRY(OverlayMountOptions({lower}, upper + "/upper", upper + "/work"));
  CELLA_TRY(Mount("overlay", kNewRoot, "overlay", 0, options));
  return {};
}

constexpr unsigned long kTmpfsFlags = MS_NOSUID | MS_NODEV | MS_NOEXEC;

std::string TmpfsOptions(int size_mib, const std::string& mode) {
  std::string options = "mode=" + mode;
  if (size_mib > 0) options += ",size=" + std::to_string(size_mib) + "m";
  return options;
}

// Where the mount meant for `guest_path` is made now: its mount point
// beneath the new root (held open: `path` names it through the fd), or a
// stage when a FUSE share above it is put in place only once served
// (fuse_share.h).
struct MountPoint {
  UniqueFd fd;
  std::string path;
};
Result<MountPoint> MountPointFor(const Config& config, const std::string& guest_path,
                                 const std::string& name) {
  if (BeneathFuseShare(config, guest_path))
    return MountPoint{UniqueFd(), CELLA_TRY(StageBeneathShare(guest_path, name))};
  UniqueFd target = CELLA_TRY(OpenDirBeneath(kNewRoot, guest_path));
  std::string path = FdPath(target.Get());
  return MountPoint{std::move(target), std::move(path)};
}

// One host share: the virtiofs tag is mounted in scratch (read-only for ro
// and overlay: the host exports those read-only anyway), an overlay joins it
// with a private layer for overlay mode, and the result (or its single file)
// is bound onto the guest path.
Status MountHostShare(const protocol::HostShare& share, size_t index) {
  std::string base = std::string(kScratch) + "/share" + std::to_string(index);
  std::string fs = base + "/fs";
  CELLA_TRY(MkdirAll(fs, 0755));
  unsigned long flags = share.mode == MountMode::kReadWrite ? 0 : MS_RDONLY;
  CELLA_TRY(Mount(share.tag, fs, "virtiofs", flags));
  std::string view = fs;
  if (share.mode == MountMode::kOverlay) {
    // The layer lives beside the root's own writable layer (an ext4 that
    // survives stop/start for detached sandboxes, else tmpfs), so it is kept
    // and discarded with the sandbox.
    std::string layer = std::string(kScratch) + "/upper/cella-shares/" + std::to_string(index);
    CELLA_TRY(MkdirAll(layer + "/upper", 0755));
    CELLA_TRY(MkdirAll(layer + "/work", 0755));
    view = base + "/merged";
    CELLA_TRY(MkdirAll(view, 0755));
    std::string options = CELLA_TRY(OverlayMountOptions({fs}, layer + "/upper", layer + "/work"));
    CELLA_TRY(Mount("overlay", view, "overlay", 0, options));
  }
  if (share.file.empty()) {
    UniqueFd target = CELLA_TRY(OpenDirBeneath(kNewRoot, share.path));
    CELLA_TRY(Mount(view, FdPath(target.Get()), "", MS_BIND));
  } else {
    UniqueFd target = CELLA_TRY(OpenFileBeneath(kNewRoot, share.path));
    CELLA_TRY(Mount(view + "/" + share.file, FdPath(target.Get()), "", MS_BIND));
  }
  return {};
}

}  // namespace

Status MountEarly() {
  struct Early {
    const char* source;
    const char* target;
    const char* fstype;
    unsigned long flags;
    const char* data;
  };
  const Early mounts[] = {
      {"proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""},
      {"sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""},
      {"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"},
      {"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
       "newinstance,ptmxmode=0666,mode=0620,gid=5"},
      {"shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
      {"cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""},
  };
  for (const Early& m : mounts) {
    CELLA_TRY(MkdirAll(m.target, 0755));
    auto mounted = Mount(m.source, m.target, m.fstype, m.flags, m.data);
    // The kernel may already have mounted devtmpfs (CONFIG_DEVTMPFS_MOUNT).
    if (!mounted && !(mounted.error().errno_value == EBUSY && std::string_view(m.target) == "/dev"))
      return mounted;
  }
  // With newinstance, /dev/ptmx must lead to this instance's multiplexer.
  ::unlink("/dev/ptmx");
  if (::symlink("pts/ptmx", "/dev/ptmx") != 0) return FailErrno("symlink /dev/ptmx -> pts/ptmx");
  return {};
}

Result<Config> ReadConfigDisk(const std::string& device) {
  std::string dir = std::string(kScratch) + "/config";
  CELLA_TRY(MkdirAll(dir, 0755));
  CELLA_TRY_CTX(MountReadOnlyAnyFs(device, dir), "config disk");
  auto text = ReadFileToString(dir + "/config.json", protocol::kMaxConfigBytes);
  if (::umount2(dir.c_str(), MNT_DETACH) != 0) return FailErrno("umount " + dir);
  if (!text) return std::unexpected(std::move(text.error()).WithContext("config disk"));
  auto config = protocol::ParseConfig(*text);
  if (!config) return std::unexpected(std::move(config.error()).WithContext("config.json"));
  return config;
}

Status AssembleRoot(const Config& config, Deadline deadline) {
  if (config.overlay_root) return MountOverlayRoot(*config.overlay_root, deadline);
  CELLA_TRY_CTX(DropPrepared(/*keep_lowers=*/false), "undo the template point's root");
  return MountPlainRoot(config, deadline);
}

bool RootMadeForClones() { return g_prepared.overlay; }

Result<int> PrepareRootForClones(bool upper_disk, bool seeded_upper) {
  CELLA_TRY(ScanDiskLinks());
  int mounts = 0;
  std::vector<std::string> lower_dirs;
  for (size_t i = 0;; ++i) {
    std::string device = "/dev/disk/by-id/" + DiskIdLinkName("cella-lower" + std::to_string(i));
    if (::access(device.c_str(), F_OK) != 0) {
      if (errno == ENOENT) break;
      return FailErrno("access " + device);
    }
    dev_t number = CELLA_TRY(DeviceNumber(device));
    std::string dir = LowerDir(i);
    CELLA_TRY(MkdirAll(dir, 0755));
    if (auto mounted = Mount(device, dir, "erofs", MS_RDONLY); !mounted) {
      // Not erofs (or unreadable): the clone mounts it as its config says.
      Debug("template point: " + device + " left to the clone (" + mounted.error().message + ")");
      break;
    }
    g_prepared.lowers.push_back(number);
    lower_dirs.push_back(dir);
    ++mounts;
  }
  if (lower_dirs.empty() || (upper_disk && !seeded_upper)) return mounts;
  std::string upper = UpperDir();
  if (seeded_upper) {
    const std::string device = "/dev/disk/by-id/" + DiskIdLinkName(kUpperDiskSerial);
    const dev_t number = CELLA_TRY(DeviceNumber(device));
    CELLA_TRY(MountWritableLayer(device, "ext4", upper, Deadline::max()));
    g_prepared.upper = number;
  } else {
    CELLA_TRY(MountWritableLayer("", "", upper, Deadline::max()));
  }
  g_prepared.overlay = true;  // from here on DropPrepared must unmount the upper
  std::string options =
      CELLA_TRY(OverlayMountOptions(lower_dirs, upper + "/upper", upper + "/work"));
  CELLA_TRY(MkdirAll(kNewRoot, 0755));
  if (auto mounted = Mount("overlay", kNewRoot, "overlay", 0, options); !mounted) {
    CELLA_TRY(Unmount(upper));
    g_prepared.overlay = false;
    g_prepared.upper = 0;
    return std::unexpected(std::move(mounted.error()));
  }
  return mounts + 2;
}

Status SyncPreparedUpper() {
  if (!g_prepared.overlay || g_prepared.upper == 0) return {};
  const std::string upper = UpperDir();
  UniqueFd fd(::open(upper.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + upper);
  if (::syncfs(fd.Get()) != 0) return FailErrno("syncfs " + upper);
  return {};
}

Status MountVolumes(const Config& config, Deadline deadline) {
  // FUSE shares first: mounts beneath them are staged beside them.
  CELLA_TRY_CTX(StageFuseShares(config), "host shares");
  for (size_t i = 0; i < config.volume_mounts.size(); ++i) {
    const auto& volume = config.volume_mounts[i];
    std::string where = "volume_mounts[" + std::to_string(i) + "] (" + volume.path + ")";
    CELLA_TRY_CTX(WaitForDevice(volume.device, deadline), where);
    MountPoint target =
        CELLA_TRY_CTX(MountPointFor(config, volume.path, "volume" + std::to_string(i)), where);
    const std::string& target_path = target.path;
    switch (volume.mode) {
      case MountMode::kReadOnly:
        CELLA_TRY_CTX(MountReadOnlyAnyFs(volume.device, target_path), where);
        break;
      case MountMode::kReadWrite:
        CELLA_TRY_CTX(Mount(volume.device, target_path, "ext4", MS_NOATIME, kExt4MountOptions),
                      where);
        break;
      case MountMode::kOverlay: {
        std::string base = std::string(kScratch) + "/volume" + std::to_string(i);
        CELLA_TRY_CTX(MkdirAll(base + "/lower", 0755), where);
        CELLA_TRY_CTX(MountReadOnlyAnyFs(volume.device, base + "/lower"), where);
        CELLA_TRY_CTX(MountWritableLayer(volume.overlay_device, "ext4", base + "/layer", deadline),
                      where);
        std::string options = CELLA_TRY_CTX(
            OverlayMountOptions({base + "/lower"}, base + "/layer/upper", base + "/layer/work"),
            where);
        CELLA_TRY_CTX(Mount("overlay", target_path, "overlay", 0, options), where);
        break;
      }
    }
    Debug("mounted " + where + " mode " + std::string(protocol::ToString(volume.mode)));
  }
  for (size_t i = 0; i < config.disks.size(); ++i) {
    const auto& disk = config.disks[i];
    std::string where = "disks[" + std::to_string(i) + "] (" + disk.path + ")";
    CELLA_TRY_CTX(WaitForDevice(disk.device, deadline), where);
    MountPoint target =
        CELLA_TRY_CTX(MountPointFor(config, disk.path, "disk" + std::to_string(i)), where);
    const std::string& target_path = target.path;
    if (disk.read_only) {
      CELLA_TRY_CTX(MountReadOnlyAnyFs(disk.device, target_path), where);
    } else {
      CELLA_TRY_CTX(Mount(disk.device, target_path, "ext4", MS_NOATIME, kExt4MountOptions), where);
    }
  }
  // tmpfs mounts beneath a FUSE share are staged now too (the others come
  // after the switch of root, MountTmpfsAndSealRoot).
  for (size_t i = 0; i < config.tmpfs.size(); ++i) {
    const auto& t = config.tmpfs[i];
    if (!BeneathFuseShare(config, t.path)) continue;
    std::string where = "tmpfs " + t.path;
    std::string stage =
        CELLA_TRY_CTX(StageBeneathShare(t.path, "tmpfs" + std::to_string(i)), where);
    CELLA_TRY_CTX(Mount("tmpfs", stage, "tmpfs", kTmpfsFlags, TmpfsOptions(t.size_mib, "1777")),
                  where);
  }
  for (size_t i = 0; i < config.host_shares.size(); ++i) {
    const auto& share = config.host_shares[i];
    if (share.fuse) {
      // Staged already, put in place once served (fuse_share.h); its mount
      // point is made now, while the root may still be written
      // (read_only_root seals it later), unless it lies in another FUSE
      // share (made through that one then).
      std::string where = "host_shares[" + std::to_string(i) + "] (" + share.path + ")";
      if (BeneathFuseShare(config, share.path)) continue;
      if (share.file.empty()) {
        CELLA_TRY_CTX(OpenDirBeneath(kNewRoot, share.path), where);
      } else {
        CELLA_TRY_CTX(OpenFileBeneath(kNewRoot, share.path), where);
      }
      continue;
    }
    CELLA_TRY_CTX(MountHostShare(share, i),
                  "host_shares[" + std::to_string(i) + "] (" + share.path + ")");
  }
  return {};
}

Status PrepareSystemd(const Config& config, const std::vector<std::string>& console_ttys) {
  UniqueFd run = CELLA_TRY(OpenDirBeneath(kNewRoot, "/run"));
  // systemd keeps an already-mounted /run, so the agent binary survives boot.
  CELLA_TRY(Mount("tmpfs", FdPath(run.Get()), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"));
  std::string root = kNewRoot;
  CELLA_TRY(MkdirAll(root + kRunDir, 0755));
  CELLA_TRY(CopyFile(kInitramfsAgent, root + kSystemdAgentPath, 0755));
  // Runtime units: an image's own /etc/systemd/system still overrides them,
  // and a persistent upper layer never keeps a stale copy.
  UniqueFd units = CELLA_TRY(OpenDirBeneath(kNewRoot, kSystemdRuntimeUnitDir));
  CELLA_TRY(ReplaceFileAt(units.Get(), "cella-agent.service",
                          SystemdAgentUnit(config, kSystemdAgentPath), 0644));
  UniqueFd wants = CELLA_TRY(
      OpenDirBeneath(kNewRoot, std::string(kSystemdRuntimeUnitDir) + "/multi-user.target.wants"));
  if (::symlinkat("../cella-agent.service", wants.Get(), "cella-agent.service") != 0)
    return FailErrno("symlink multi-user.target.wants/cella-agent.service");
  for (const std::string& tty : console_ttys) {
    std::string getty = "serial-getty@" + tty + ".service";
    if (::symlinkat("/dev/null", units.Get(), getty.c_str()) != 0 && errno != EEXIST)
      return FailErrno("mask " + std::string(kSystemdRuntimeUnitDir) + "/" + getty);
  }
  return {};
}

Status SwitchRoot() {
  // /proc last: the targets are named through /proc/self/fd.
  for (const char* dir : {"/sys", "/dev", "/proc"}) {
    UniqueFd target = CELLA_TRY(OpenDirBeneath(kNewRoot, dir));
    CELLA_TRY(Mount(dir, FdPath(target.Get()), "", MS_MOVE));
  }
  if (::chdir(kNewRoot) != 0) return FailErrno(std::string("chdir ") + kNewRoot);
  if (::mount(".", "/", nullptr, MS_MOVE, nullptr) != 0)
    return FailErrno(std::string("mount --move ") + kNewRoot + " /");
  if (::chroot(".") != 0) return FailErrno("chroot");
  if (::chdir("/") != 0) return FailErrno("chdir /");
  return {};
}

Status MountTmpfsAndSealRoot(const Config& config) {
  auto mount_tmpfs = [](const std::string& path, int size_mib, unsigned long flags,
                        const std::string& mode) -> Status {
    UniqueFd target = CELLA_TRY(OpenDirBeneath("/", path));
    return Mount("tmpfs", FdPath(target.Get()), "tmpfs", flags, TmpfsOptions(size_mib, mode));
  };
  bool tmp_given = false, run_given = false;
  for (const auto& t : config.tmpfs) {
    tmp_given = tmp_given || t.path == "/tmp";
    run_given = run_given || t.path == "/run";
    // Staged before the switch, placed with the share above it.
    if (BeneathFuseShare(config, t.path)) continue;
    // docker's --tmpfs defaults: noexec, nosuid, nodev, world-writable.
    CELLA_TRY_CTX(mount_tmpfs(t.path, t.size_mib, kTmpfsFlags, "1777"), "tmpfs " + t.path);
  }
  if (!config.read_only_root) return {};
  if (!tmp_given) CELLA_TRY_CTX(mount_tmpfs("/tmp", 0, MS_NOSUID | MS_NODEV, "1777"), "/tmp");
  if (!run_given) CELLA_TRY_CTX(mount_tmpfs("/run", 0, MS_NOSUID | MS_NODEV, "0755"), "/run");
  // The root mount only: what is mounted beneath it keeps its own flags.
  if (::mount(nullptr, "/", nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY, nullptr) != 0)
    return FailErrno("remount / read-only");
  return {};
}

}  // namespace cella::init
