#include "host/sandbox/compose.h"

#include <sys/random.h>
#include <sys/stat.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "base/io.h"
#include "base/log.h"
#include "host/image/default_rootfs.h"
#include "host/kernel/initramfs.h"
#include "host/kernel/pvh.h"
#include "host/vmm/config_disk.h"

namespace cella::sandbox {
namespace {

Result<std::string> ExistingFile(const std::string& path, std::string_view what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return Fail(std::string(what) + " not found at " + path +
                " (build it with `make build`, or set CELLA_LIBEXEC_DIR)");
  return path;
}

}  // namespace

Status ApplyImageDefaults(const ImageDefaults& image, const std::vector<std::string>& user_command,
                          protocol::Config& guest) {
  guest.entrypoint = image.entrypoint;
  guest.cmd = user_command.empty() ? image.cmd : user_command;
  if (guest.entrypoint.empty() && guest.cmd.empty())
    return Fail("the image sets neither Entrypoint nor Cmd: give a command after `--`");
  for (const std::string& item : image.env) {
    size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0)
      return Fail("image config Env item \"" + item + "\" is not KEY=VALUE");
    guest.env[item.substr(0, eq)] = item.substr(eq + 1);
  }
  if (guest.workdir.empty()) guest.workdir = image.workdir;
  if (guest.user.empty()) guest.user = image.user;
  // The image's init applies only when its own command runs: `-- sh` on a
  // systemd image means "run sh", as docker would.
  guest.init_mode = user_command.empty() ? image.init_mode : protocol::InitMode::kExec;
  return {};
}

Result<std::string> GuestBinaryDir() {
  if (const char* dir = std::getenv("CELLA_LIBEXEC_DIR")) return std::string(dir);
  std::string self = CELLA_TRY(SelfExecutablePath());
  return std::filesystem::path(self).parent_path().string();
}

Result<GuestAssets> EnsureGuestAssets(
    const std::string& home, const std::string& guest_binary_dir,
    const std::optional<kernel::KernelOverride>& kernel_override) {
  GuestAssets assets;
  assets.kernel = CELLA_TRY(kernel::FindKernel(home, kernel_override));
  // Only a faster boot: a kernel cache that cannot be written (a full
  // disk) or a payload cella cannot read boots the bzImage, as before.
  if (auto boot = kernel::EnsureBootKernel(home, assets.kernel.vmlinuz)) {
    assets.boot_kernel_path = *boot;
  } else {
    log::Warn("booting the kernel as a bzImage (slower under TCG)",
              {{"kernel", assets.kernel.vmlinuz}, {"error", boot.error().message}});
    assets.boot_kernel_path = assets.kernel.vmlinuz;
  }
  kernel::InitramfsSpec spec;
  spec.init_binary = CELLA_TRY(ExistingFile(guest_binary_dir + "/cella-init", "guest init"));
  spec.agent_binary = CELLA_TRY(ExistingFile(guest_binary_dir + "/cella-agent", "guest agent"));
  spec.modules_dir = assets.kernel.modules_dir;
  spec.kernel_release = assets.kernel.release;
  spec.strip_module_signatures = kernel::KernelAcceptsUnsignedModules(assets.kernel);
  assets.initramfs_path = CELLA_TRY(kernel::EnsureInitramfs(home, spec)).path;
  assets.default_rootfs_path = CELLA_TRY(image::EnsureDefaultRootfs(home)).path;
  return assets;
}

Result<std::string> RandomMac() {
  std::array<uint8_t, 6> mac{};
  if (::getrandom(mac.data(), mac.size(), 0) != static_cast<ssize_t>(mac.size()))
    return FailErrno("getrandom for the guest's MAC address");
  mac[0] = static_cast<uint8_t>((mac[0] & 0xfc) | 0x02);  // unicast, locally administered
  char text[18];
  (void)std::snprintf(text, sizeof(text), "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2],
                      mac[3], mac[4], mac[5]);
  return std::string(text);
}

Result<vmm::VMConfig> Compose(const GuestAssets& assets, protocol::Config& guest,
                              const MachineShape& shape,
                              const std::vector<VolumeAttachment>& volumes,
                              const std::vector<vmm::DiskConfig>& extra_disks,
                              const std::string& id, const std::string& state_dir,
                              const std::string& root_image_path,
                              const std::string& upper_image_path) {
  vmm::VMConfig vm;
  vm.ID = id;
  vm.StateDir = state_dir;
  vm.KernelPath = assets.boot_kernel_path.empty() ? assets.kernel.vmlinuz : assets.boot_kernel_path;
  vm.InitramfsPath = assets.initramfs_path;
  vm.CPUs = shape.cpus;
  vm.MemoryMB = shape.memory_mib;

  vm.OverlayEnabled = true;
  vm.OverlayLowerPaths = {root_image_path.empty() ? assets.default_rootfs_path : root_image_path};
  vm.OverlayLowerFSTypes = {"erofs"};
  guest.overlay_root = protocol::OverlayRoot{
      .lower = {{vmm::GuestDevicePath(vmm::LowerSerial(0)), "erofs"}},
      .upper_device = "",  // tmpfs
      .upper_fstype = "",
  };
  if (!upper_image_path.empty()) {
    vm.OverlayUpperPath = upper_image_path;
    guest.overlay_root->upper_device = vmm::GuestDevicePath(vmm::kUpperSerial);
    guest.overlay_root->upper_fstype = "ext4";
  }

  guest.volume_mounts.clear();
  for (const VolumeAttachment& v : volumes) {
    protocol::VolumeMount mount;
    mount.path = v.guest_path;
    mount.mode = v.mode;
    mount.device = vmm::GuestDevicePath(vmm::VolumeSerial(vm.Volumes.size()));
    // The base of an overlay volume is shared by sandboxes: never writable.
    vm.Volumes.push_back({v.host_path, v.guest_path, v.mode != protocol::MountMode::kReadWrite});
    if (v.mode == protocol::MountMode::kOverlay) {
      if (v.overlay_host_path.empty())
        return Fail("volume " + v.guest_path + ": overlay mode needs a private layer image");
      mount.overlay_device = vmm::GuestDevicePath(vmm::VolumeSerial(vm.Volumes.size()));
      vm.Volumes.push_back({v.overlay_host_path, v.guest_path, false});
    }
    guest.volume_mounts.push_back(std::move(mount));
  }
  guest.disks.clear();
  for (size_t i = 0; i < extra_disks.size(); ++i) {
    guest.disks.push_back({vmm::GuestDevicePath(vmm::ExtraDiskSerial(i)), extra_disks[i].GuestMount,
                           extra_disks[i].ReadOnly});
  }
  vm.ExtraDisks = extra_disks;

  vm.NoNetwork = guest.no_network;
  guest.network_enabled = !guest.no_network;
  if (guest.network_enabled) {
    guest.guest_ip = vmm::kUserNetGuestIp;
    guest.guest_cidr = vmm::kUserNetPrefix;
    guest.guest_gw = vmm::kUserNetGateway;
    guest.guest_dns = vmm::kUserNetDns;
    if (guest.dns_servers.empty()) guest.dns_servers = {vmm::kUserNetDns};
    guest.guest_mac = CELLA_TRY(RandomMac());
  }
  // The default hostname is the CLI's to choose (docker's short ID), once:
  // an empty one here leaves the guest's own default.
  vm.GuestIP = guest.guest_ip;
  vm.GatewayIP = guest.guest_gw;
  vm.Hostname = guest.hostname;
  vm.DNSServers = guest.dns_servers;
  vm.MTU = guest.mtu;
  vm.Privileged = guest.privileged;
  vm.Env = guest.env;
  for (const auto& h : guest.extra_hosts) vm.AddHosts.push_back({h.host, h.ip});
  CELLA_TRY_CTX(protocol::ValidateConfig(guest), "guest config");
  return vm;
}

Status AttachShares(const std::vector<ShareAttachment>& shares, protocol::Config& guest,
                    vmm::VMConfig& vm) {
  guest.host_shares.clear();
  vm.Shares.clear();
  for (size_t i = 0; i < shares.size(); ++i) {
    std::string tag = "cella-share" + std::to_string(i);
    if (!shares[i].fuse) vm.Shares.push_back({shares[i].socket_path, tag});
    guest.host_shares.push_back(
        {tag, shares[i].guest_path, shares[i].mode, shares[i].file, shares[i].fuse});
  }
  CELLA_TRY_CTX(protocol::ValidateConfig(guest), "guest config");
  return {};
}

Status WriteGuestConfig(const protocol::Config& guest, vmm::VMConfig& vm) {
  return vmm::WriteGuestConfigDisk(guest, vm);
}

}  // namespace cella::sandbox
