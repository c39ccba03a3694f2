#include "host/vmm/qemu_argv.h"

#include <cmath>

namespace cella::vmm {

std::string LowerSerial(size_t index) { return "cella-lower" + std::to_string(index); }
std::string VolumeSerial(size_t index) { return "cella-vol" + std::to_string(index); }
std::string ExtraDiskSerial(size_t index) { return "cella-disk" + std::to_string(index); }
std::string GuestDevicePath(std::string_view serial) {
  return "/dev/disk/by-id/virtio-" + std::string(serial);
}

std::string QemuEscape(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    out.push_back(c);
    if (c == ',') out.push_back(',');
  }
  return out;
}

Result<StatePaths> ResolveStatePaths(const VMConfig& config) {
  if (config.StateDir.empty() || config.StateDir[0] != '/') {
    return Fail("VMConfig.StateDir: must be an absolute directory path, got \"" + config.StateDir +
                "\"");
  }
  StatePaths p;
  p.agent_socket = config.SocketPath.empty() ? config.StateDir + "/agent.sock" : config.SocketPath;
  p.qmp_socket = config.StateDir + "/qmp.sock";
  p.console_log = config.LogPath.empty() ? config.StateDir + "/console.log" : config.LogPath;
  p.qemu_log = config.StateDir + "/qemu.log";
  for (const std::string* sock : {&p.agent_socket, &p.qmp_socket}) {
    if (sock->size() > kMaxUnixSocketPath) {
      return Fail("socket path " + *sock + " is " + std::to_string(sock->size()) +
                  " characters; Unix sockets allow " + std::to_string(kMaxUnixSocketPath) +
                  " (use a shorter StateDir/CELLA_HOME)");
    }
  }
  return p;
}

bool BootsWithColdGo(const VMConfig& config) {
  return config.Template == TemplateRole::kNone && config.IncomingMigration.empty();
}

std::string BuildKernelCmdline(const VMConfig& config, uint64_t tsc_khz) {
  // panic=-1 + -no-reboot: a guest panic ends QEMU at once instead of hanging.
  // pci=off: microvm has no PCI; skips a probe and its error line.
  std::string cmdline = "console=ttyS0 panic=-1 quiet";
  if (tsc_khz != 0) cmdline += " tsc_early_khz=" + std::to_string(tsc_khz);
  cmdline += " no_timer_check pci=off";
  // On clones too: their argv must match the template's.
  if (config.Template != TemplateRole::kNone) cmdline += " cella.template=1";
  if (BootsWithColdGo(config)) cmdline += " cella.go=1";
  if (!config.KernelArgs.empty()) cmdline += " " + config.KernelArgs;
  return cmdline;
}

namespace {

struct Disk {
  std::string id;
  std::string path;
  std::string serial;
  bool read_only;
};

const std::string& RootDiskPath(const VMConfig& c) {
  return c.PrebuiltRootfs.empty() ? c.RootfsPath : c.PrebuiltRootfs;
}

Result<std::vector<Disk>> CollectDisks(const VMConfig& c) {
  std::vector<Disk> disks;
  if (c.OverlayEnabled) {
    if (c.OverlayLowerPaths.empty()) {
      return Fail("VMConfig.OverlayLowerPaths: OverlayEnabled needs at least one lower image");
    }
    if (!c.OverlayLowerFSTypes.empty() &&
        c.OverlayLowerFSTypes.size() != c.OverlayLowerPaths.size()) {
      return Fail("VMConfig.OverlayLowerFSTypes: " + std::to_string(c.OverlayLowerFSTypes.size()) +
                  " types for " + std::to_string(c.OverlayLowerPaths.size()) + " lower images");
    }
    for (size_t i = 0; i < c.OverlayLowerPaths.size(); ++i) {
      disks.push_back({"lower" + std::to_string(i), c.OverlayLowerPaths[i], LowerSerial(i), true});
    }
    if (!c.OverlayUpperPath.empty()) {
      disks.push_back({"upper", c.OverlayUpperPath, kUpperSerial, false});
    }
  } else if (!RootDiskPath(c).empty()) {
    disks.push_back({"root", RootDiskPath(c), kRootSerial, c.RootfsReadOnly});
  } else {
    return Fail("VMConfig: no root filesystem (set RootfsPath, PrebuiltRootfs or OverlayEnabled)");
  }
  if (!c.ConfigDiskPath.empty()) disks.push_back({"config", c.ConfigDiskPath, kConfigSerial, true});
  for (size_t i = 0; i < c.Volumes.size(); ++i) {
    disks.push_back(
        {"vol" + std::to_string(i), c.Volumes[i].HostPath, VolumeSerial(i), c.Volumes[i].ReadOnly});
  }
  for (size_t i = 0; i < c.ExtraDisks.size(); ++i) {
    disks.push_back({"disk" + std::to_string(i), c.ExtraDisks[i].HostPath, ExtraDiskSerial(i),
                     c.ExtraDisks[i].ReadOnly});
  }
  for (const Disk& d : disks) {
    if (d.path.empty() || d.path[0] != '/') {
      return Fail("VMConfig: disk " + d.serial + " needs an absolute host path, got \"" + d.path +
                  "\"");
    }
  }
  return disks;
}

}  // namespace

int CountVirtioTransports(const VMConfig& config) {
  int disks = 0;
  if (config.OverlayEnabled) {
    disks += static_cast<int>(config.OverlayLowerPaths.size());
    disks += config.OverlayUpperPath.empty() ? 0 : 1;
  } else if (!RootDiskPath(config).empty()) {
    disks += 1;
  }
  disks += config.ConfigDiskPath.empty() ? 0 : 1;
  disks += static_cast<int>(config.Volumes.size() + config.ExtraDisks.size());
  disks += static_cast<int>(config.Shares.size());  // one vhost-user-fs device each
  int serial = 1;
  int nic = config.NoNetwork ? 0 : 1;
  return disks + serial + nic;
}

std::vector<int> QemuChildFds(const VMConfig& config) {
  if (config.NetworkFD >= 0) return {config.NetworkFD};
  return {};
}

Result<std::vector<std::string>> BuildQemuArgv(const VMConfig& c, const QemuLaunch& launch) {
  if (c.KernelPath.empty()) return Fail("VMConfig.KernelPath: empty");
  if (c.InitramfsPath.empty()) return Fail("VMConfig.InitramfsPath: empty");
  if (!(c.CPUs > 0) || c.CPUs > 255) {
    return Fail("VMConfig.CPUs: " + std::to_string(c.CPUs) + " is outside (0, 255]");
  }
  if (c.MemoryMB < 64 || c.MemoryMB > 1024 * 1024) {
    return Fail("VMConfig.MemoryMB: " + std::to_string(c.MemoryMB) +
                " is outside [64, 1048576] (the guest kernel needs at least 64 MiB)");
  }
  if (launch.agent_socket.empty() || launch.qmp_socket.empty() || launch.console_log.empty()) {
    return Fail("QemuLaunch: agent_socket, qmp_socket and console_log are required");
  }
  std::vector<Disk> disks = CELLA_TRY(CollectDisks(c));
  int transports = CountVirtioTransports(c);
  if (transports > kMicrovmVirtioTransports) {
    return Fail("VM needs " + std::to_string(transports) + " virtio-mmio devices (" +
                std::to_string(disks.size()) + " disks, the agent port" +
                (c.NoNetwork ? "" : ", the NIC") + ") but the microvm machine offers " +
                std::to_string(kMicrovmVirtioTransports) +
                "; use fewer image layers, volumes or extra disks");
  }

  std::vector<std::string> a = {launch.qemu_binary};
  auto add = [&a](std::initializer_list<std::string> items) {
    a.insert(a.end(), items.begin(), items.end());
  };
  if (c.Template != TemplateRole::kNone) {
    if (!c.Shares.empty()) return Fail("VMConfig: a template VM cannot have host shares");
    if (!c.SnapshotMemoryPath.empty())
      return Fail("VMConfig: a template VM's memory is its template's, not a snapshot's");
    if (c.TemplateMemoryPath.empty() || c.TemplateMemoryPath[0] != '/')
      return Fail("VMConfig.TemplateMemoryPath: needs an absolute path");
    if (c.Template == TemplateRole::kCapture && c.TemplateSaveUri.empty())
      return Fail("VMConfig.TemplateSaveUri: a template capture needs it");
    if (c.Template == TemplateRole::kClone && c.IncomingMigration.empty())
      return Fail("VMConfig.IncomingMigration: a template clone needs the template's state");
    // The capture writes guest RAM into the file (share=on); a clone maps it
    // privately, so pages it never writes stay shared with every other clone
    // through the page cache.
    const bool capture = c.Template == TemplateRole::kCapture;
    add({"-object",
         "memory-backend-file,id=mem,share=" + std::string(capture ? "on" : "off") + ",mem-path=" +
             QemuEscape(c.TemplateMemoryPath) + ",size=" + std::to_string(c.MemoryMB) + "M",
         "-M", "microvm,memory-backend=mem"});
  } else if (!c.SnapshotMemoryPath.empty()) {
    if (!c.Shares.empty())
      return Fail("VMConfig: a snapshot's memory file cannot have host shares");
    if (c.IncomingMigration.empty() || c.SnapshotMemoryPath[0] != '/')
      return Fail("VMConfig.SnapshotMemoryPath: needs an absolute path and IncomingMigration");
    // Private: the guest's writes never reach the snapshot, which other
    // copies may map too. (QEMU opens it read-write all the same: 7.2 has
    // no read-only file with writable private RAM. So no device that
    // discards guest RAM, e.g. a balloon, may come with it: QEMU would
    // punch holes in the shared file.)
    add({"-object",
         "memory-backend-file,id=mem,share=off,mem-path=" + QemuEscape(c.SnapshotMemoryPath) +
             ",size=" + std::to_string(c.MemoryMB) + "M",
         "-M", "microvm,memory-backend=mem"});
  } else if (c.Shares.empty()) {
    // RAM named "mem" like a template clone's, so a warm-started sandbox's
    // standby snapshot (its RAM is private, so in the stream) restores into
    // an ordinary boot's RAM block.
    add({"-object", "memory-backend-ram,id=mem,size=" + std::to_string(c.MemoryMB) + "M", "-M",
         "microvm,memory-backend=mem"});
  } else {
    // vhost-user: virtiofsd maps guest RAM to read and write request buffers
    // in place, so RAM must be a shareable memfd rather than anonymous memory.
    // virtiofsd's libvhost-user serves modern virtio only; microvm's
    // virtio-mmio transports are legacy unless told otherwise.
    add({"-object", "memory-backend-memfd,id=mem,share=on,size=" + std::to_string(c.MemoryMB) + "M",
         "-M", "microvm,memory-backend=mem", "-global", "virtio-mmio.force-legacy=false"});
  }
  if (launch.accel == Accel::kKvm) {
    add({"-accel", "kvm", "-cpu", "host"});
  } else {
    add({"-accel", "tcg", "-cpu", "max"});
  }
  add({"-smp", std::to_string(static_cast<int>(std::ceil(c.CPUs)))});
  add({"-m", std::to_string(c.MemoryMB) + "M"});
  add({"-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"});
  // Console through a named chardev so the path can be escaped.
  add({"-chardev", "file,id=console,append=on,path=" + QemuEscape(launch.console_log), "-serial",
       "chardev:console"});
  if (!c.IncomingMigration.empty() && !launch.restore_kernel.empty()) {
    add({"-kernel", launch.restore_kernel});
  } else {
    add({"-kernel", c.KernelPath, "-initrd", c.InitramfsPath});
  }
  add({"-append", BuildKernelCmdline(c, launch.tsc_khz)});
  for (const Disk& d : disks) {
    add({"-drive", "id=" + d.id + ",file=" + QemuEscape(d.path) + ",format=raw,if=none" +
                       (d.read_only ? ",readonly=on" : "")});
    add({"-device", "virtio-blk-device,drive=" + d.id + ",serial=" + d.serial});
  }
  for (size_t i = 0; i < c.Shares.size(); ++i) {
    const ShareConfig& share = c.Shares[i];
    if (share.SocketPath.empty() || share.SocketPath[0] != '/')
      return Fail("VMConfig.Shares[" + std::to_string(i) + "]: needs an absolute socket path");
    if (share.Tag.empty() || share.Tag.find_first_of(",=") != std::string::npos)
      return Fail("VMConfig.Shares[" + std::to_string(i) + "]: bad tag \"" + share.Tag + "\"");
    std::string id = "fs" + std::to_string(i);
    add({"-chardev", "socket,id=" + id + ",path=" + QemuEscape(share.SocketPath), "-device",
         "vhost-user-fs-device,chardev=" + id + ",tag=" + share.Tag});
  }
  add({"-device", "virtio-serial-device,max_ports=2"});
  add({"-chardev",
       "socket,id=agent,path=" + QemuEscape(launch.agent_socket) + ",server=on,wait=off"});
  // The id names the port in QMP (VSERPORT_CHANGE events, the device tree).
  add({"-device", std::string("virtserialport,chardev=agent,name=cella.agent,id=") + kAgentPortId});
  add({"-chardev", "socket,id=qmp,path=" + QemuEscape(launch.qmp_socket) + ",server=on,wait=off",
       "-mon", "chardev=qmp,mode=control"});
  if (c.NoNetwork && c.NetworkFD >= 0) {
    return Fail("VMConfig.NetworkFD: " + std::to_string(c.NetworkFD) +
                " is set but NoNetwork is true (a TAP needs the NIC)");
  }
  if (c.NetworkFD >= 0) {
    // The TAP descriptor reaches QEMU at a fixed number (see QemuChildFds).
    // vhost=off: no /dev/vhost-net is assumed, and the TAP may live in a
    // namespace QEMU is not in, which a plain tap fd does not mind.
    add({"-netdev", "tap,id=net0,fd=" + std::to_string(kQemuTapChildFd) + ",vhost=off", "-device",
         "virtio-net-device,netdev=net0"});
  } else if (!c.NoNetwork && c.Template == TemplateRole::kCapture) {
    // The NIC a clone will have, on a backend without migration state (user
    // networking saves slirp's, which a clone on a TAP could not load); the
    // guest sends nothing before the template point.
    add({"-netdev", "hubport,id=net0,hubid=0", "-device", "virtio-net-device,netdev=net0"});
  } else if (!c.NoNetwork) {
    std::string netdev = "user,id=net0,ipv6=off";
    if (c.SubnetCIDR.empty()) {
      netdev += std::string(",net=") + kUserNetSubnet + ",host=" + kUserNetGateway +
                ",dns=" + kUserNetDns;
    } else {
      netdev += ",net=" + QemuEscape(c.SubnetCIDR);
      if (!c.GatewayIP.empty()) netdev += ",host=" + QemuEscape(c.GatewayIP);
    }
    add({"-netdev", netdev, "-device", "virtio-net-device,netdev=net0"});
  }
  // -S: after the restore nothing runs until the restorer says cont.
  if (!c.IncomingMigration.empty()) add({"-S", "-incoming", "defer"});
  return a;
}

}  // namespace cella::vmm
