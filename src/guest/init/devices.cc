#include "guest/init/devices.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <thread>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"
#include "guest/init/console.h"
#include "guest/init/format.h"
#include "guest/init/fs_util.h"

namespace cella::init {
namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(20);

bool Exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

struct VirtioDisk {
  std::string name;    // "vda"
  std::string serial;  // empty when the disk has none
};

Result<std::vector<VirtioDisk>> ListVirtioDisks() {
  std::vector<VirtioDisk> disks;
  DIR* dir = ::opendir("/sys/block");
  if (dir == nullptr) return FailErrno("opendir /sys/block");
  errno = 0;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (!name.starts_with("vd")) continue;
    VirtioDisk disk{name, {}};
    auto serial = ReadFileToString("/sys/block/" + name + "/serial", 4096);
    if (serial) {
      disk.serial = *serial;
    } else if (serial.error().errno_value != ENOENT) {
      // ENOENT only means QEMU was given no serial= for this disk.
      ::closedir(dir);
      return std::unexpected(std::move(serial.error()));
    }
    disks.push_back(std::move(disk));
  }
  int err = errno;
  ::closedir(dir);
  if (err != 0) return FailErrno("readdir /sys/block", err);
  return disks;
}

}  // namespace

Result<std::vector<ModuleGroup>> ReadModuleOrder(const std::string& order_path) {
  auto text = ReadFileToString(order_path, 1 << 20);
  if (!text) return std::unexpected(std::move(text.error()));
  auto groups = ParseModuleOrder(*text);
  if (!groups) return std::unexpected(std::move(groups.error()).WithContext(order_path));
  return std::move(*groups);
}

int LoadModuleGroup(const ModuleGroup& group) {
  int loaded = 0;
  for (const std::string& path : group.paths) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) {
      SayError("module " + path + ": open: " + std::strerror(errno) + " (continuing)");
      continue;
    }
    if (::syscall(SYS_finit_module, fd.Get(), "", 0) != 0 && errno != EEXIST) {
      SayError("module " + path + ": finit_module: " + std::strerror(errno) + " (continuing)");
      continue;
    }
    Debug("loaded module " + path);
    ++loaded;
  }
  return loaded;
}

Status ScanDiskLinks() {
  auto disks = CELLA_TRY(ListVirtioDisks());
  bool dir_ready = false;
  for (const VirtioDisk& disk : disks) {
    if (disk.serial.empty()) continue;
    if (!dir_ready) {
      CELLA_TRY(MkdirAll("/dev/disk/by-id", 0755));
      dir_ready = true;
    }
    std::string link = "/dev/disk/by-id/" + DiskIdLinkName(disk.serial);
    std::string target = "../../" + disk.name;
    if (::symlink(target.c_str(), link.c_str()) == 0) {
      Debug("disk " + disk.name + " serial \"" + disk.serial + "\" -> " + link);
      continue;
    }
    if (errno != EEXIST)
      return FailErrno(std::string("symlink ").append(link).append(" -> ").append(target));
  }
  return {};
}

Status WaitForDevice(const std::string& device, Deadline deadline) {
  for (;;) {
    if (Exists(device)) return {};
    CELLA_TRY(ScanDiskLinks());
    if (Exists(device)) return {};
    if (std::chrono::steady_clock::now() >= deadline)
      return Fail("device " + device + " did not appear (is the disk attached?)");
    std::this_thread::sleep_for(kPollInterval);
  }
}

Result<std::string> FindConfigDevice(Deadline deadline) {
  for (;;) {
    CELLA_TRY(ScanDiskLinks());
    if (Exists(kConfigDiskLink)) return std::string(kConfigDiskLink);
    auto disks = CELLA_TRY(ListVirtioDisks());
    bool any_serial = false;
    for (const auto& disk : disks) any_serial = any_serial || !disk.serial.empty();
    // Disks without serials: the seed's positional layout (vda, vdb, vdc).
    if (!disks.empty() && !any_serial && Exists(kConfigDiskFallback))
      return std::string(kConfigDiskFallback);
    if (std::chrono::steady_clock::now() >= deadline) {
      if (Exists(kConfigDiskFallback)) return std::string(kConfigDiskFallback);
      return Fail("config disk not found: no disk with serial cella-config and no " +
                  std::string(kConfigDiskFallback) + " (" + std::to_string(disks.size()) +
                  " virtio disks seen)");
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

}  // namespace cella::init
