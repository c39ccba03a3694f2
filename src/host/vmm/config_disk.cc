#include "host/vmm/config_disk.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "base/io.h"
#include "base/unique_fd.h"
#include "host/os/process.h"

namespace cella::vmm {

namespace {

// The guest's config.json for `vm` (see WriteGuestConfigDisk), validated.
Result<std::string> GuestConfigFor(protocol::Config guest, const VMConfig& vm) {
  if (vm.StateDir.empty()) return Fail("config disk: VMConfig.StateDir is empty");
  if (!vm.Hostname.empty()) guest.hostname = vm.Hostname;
  if (!vm.DNSServers.empty()) guest.dns_servers = vm.DNSServers;
  if (!vm.GuestIP.empty()) guest.guest_ip = vm.GuestIP;
  if (!vm.GatewayIP.empty()) guest.guest_gw = vm.GatewayIP;
  if (vm.MTU != 0) guest.mtu = vm.MTU;
  guest.privileged = vm.Privileged;
  for (const auto& [key, value] : vm.Env) guest.env[key] = value;
  for (const HostIPMapping& h : vm.AddHosts) {
    protocol::HostEntry entry{h.Host, h.IP};
    if (std::find(guest.extra_hosts.begin(), guest.extra_hosts.end(), entry) ==
        guest.extra_hosts.end())
      guest.extra_hosts.push_back(std::move(entry));
  }
  if (vm.NoNetwork) {
    guest.no_network = true;
    guest.network_enabled = false;
  }
  CELLA_TRY_CTX(protocol::ValidateConfig(guest), "guest config for " + vm.ID);
  return protocol::SerializeConfig(guest);
}

// 1 KiB blocks: the content twice over plus fixed metadata room, at least
// 1 MiB.
size_t ConfigDiskKiB(const std::string& json) {
  return std::max<size_t>(1024, (json.size() * 2) / 1024 + 512);
}

// mkfs.ext4 -d of a directory holding only config.json = json, into
// out_path (created, or written in place when it exists).
Status MakeConfigFilesystem(const std::string& json, const std::string& out_path, bool replace) {
  if (out_path.empty()) return Fail("WriteConfigDisk: empty output path");
  std::string parent = out_path.substr(0, out_path.find_last_of('/') + 1);
  std::string dir = (parent.empty() ? std::string("./") : parent) + ".config-disk.XXXXXX";
  if (::mkdtemp(dir.data()) == nullptr) return FailErrno("mkdtemp " + dir);
  std::string file = dir + "/config.json";
  auto build = [&]() -> Status {
    CELLA_TRY(WriteStringToFile(file, json, 0644));
    // 1 KiB blocks, no journal, few inodes: the smallest image mkfs accepts
    // quickly.
    if (replace && ::unlink(out_path.c_str()) != 0 && errno != ENOENT)
      return FailErrno("unlink " + out_path);
    CELLA_TRY(host::CheckCommand(
        {"mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "16", "-O", "^has_journal,^resize_inode",
         "-E", "root_owner=0:0", "-L", "cella-config", "-d", dir, out_path,
         std::to_string(ConfigDiskKiB(json)) + "k"},
        std::chrono::seconds(60)));
    return {};
  };
  Status st = build();
  if (::unlink(file.c_str()) != 0 && errno != ENOENT && st) st = FailErrno("unlink " + file);
  if (::rmdir(dir.c_str()) != 0 && st) st = FailErrno("rmdir " + dir);
  if (!st) return std::unexpected(std::move(st.error()).WithContext("config disk " + out_path));
  return {};
}

}  // namespace

Status WriteGuestConfigDisk(protocol::Config guest, VMConfig& vm) {
  vm.GuestConfigJson = CELLA_TRY(GuestConfigFor(std::move(guest), vm));
  vm.ConfigDiskPath = CELLA_TRY(WriteConfigDisk(vm.GuestConfigJson, vm.StateDir + "/config.img"));
  return {};
}

Status ReserveGuestConfigDisk(protocol::Config guest, VMConfig& vm) {
  vm.GuestConfigJson = CELLA_TRY(GuestConfigFor(std::move(guest), vm));
  const std::string path = vm.StateDir + "/config.img";
  // A new file (a snapshot's copy or an earlier boot's disk is never
  // written through), sparse at the size mkfs will fill.
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return FailErrno("unlink " + path);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (!fd) return FailErrno("create " + path);
  const off_t bytes = static_cast<off_t>(ConfigDiskKiB(vm.GuestConfigJson)) * 1024;
  if (::ftruncate(fd.Get(), bytes) != 0) return FailErrno("size " + path);
  vm.ConfigDiskPath = path;
  return {};
}

Status FillConfigDisk(const std::string& json, const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("config disk " + path);
  if (static_cast<uint64_t>(st.st_size) != uint64_t{ConfigDiskKiB(json)} * 1024)
    return Fail("config disk " + path + ": not the size ReserveGuestConfigDisk made it");
  return MakeConfigFilesystem(json, path, /*replace=*/false);
}

Result<std::string> WriteConfigDisk(const std::string& json, const std::string& out_path) {
  CELLA_TRY(MakeConfigFilesystem(json, out_path, /*replace=*/true));
  return out_path;
}

}  // namespace cella::vmm
