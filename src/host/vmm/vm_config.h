// What a VM is made of: the host-side VM description (seed: vmm.VMConfig),
// every seed field kept with the same meaning; cella's extensions are marked.
// Plain data; copyable; no invariants beyond what ValidateVMConfig checks.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/network.h"

namespace cella::vmm {

// seed: vmm.DiskConfig — an additional block device.
struct DiskConfig {
  std::string HostPath;    // image file on the host
  std::string GuestMount;  // mount point inside the guest (carried to config.json by the caller)
  bool ReadOnly = false;
};

// extension: a vhost-user-fs device (virtiofs) served by a daemon the caller
// started (host/sandbox/share.h). Its presence makes guest RAM a shared memfd.
struct ShareConfig {
  std::string SocketPath;  // the daemon's vhost-user socket
  std::string Tag;         // what the guest mounts (mount -t virtiofs TAG)
};

// extension: the VM's part in a warm start (host/template/README.md).
enum class TemplateRole {
  kNone,     // an ordinary boot (or a snapshot restore)
  kCapture,  // boots to the template point and saves itself as a template
  kClone,    // restored from a template, then told to go on
};

// seed: api.HostIPMapping — one extra /etc/hosts line.
struct HostIPMapping {
  std::string Host;
  std::string IP;
};

struct VMConfig {
  std::string ID;
  std::string KernelPath;
  std::string InitramfsPath;   // extension: the cella initramfs (kernel/initramfs.h)
  std::string RootfsPath;      // root disk when !OverlayEnabled (serial cella-root)
  bool RootfsReadOnly = true;  // extension: erofs images are shared, so read-only by default
  bool OverlayEnabled = false;
  std::vector<std::string> OverlayLowerPaths;    // read-only, topmost first: cella-lower<N>
  std::vector<std::string> OverlayLowerFSTypes;  // per lower ("erofs", "ext4")
  std::string OverlayUpperPath;                  // writable: cella-upper
  double CPUs = 1;
  int MemoryMB = 512;
  // seed. >= 0: a TAP descriptor (IFF_TAP|IFF_NO_PI, e.g. net::CreateIsolatedNetwork) QEMU
  // uses instead of user-mode networking. Owned by the caller, who keeps it open until Start()
  // returns (QEMU holds its own copy from then on). -1: user-mode networking.
  int NetworkFD = -1;
  uint32_t VsockCID = 0;   // seed; unused by QEMU here (no vhost-vsock)
  std::string VsockPath;   // seed; unused by QEMU here
  std::string SocketPath;  // agent link Unix socket (default <StateDir>/agent.sock)
  std::string LogPath;     // guest console log (default <StateDir>/console.log)
  std::string KernelArgs;  // appended to cella's kernel command line
  std::map<std::string, std::string>
      Env;                       // into config.json (WriteGuestConfigDisk); not on the cmdline
  std::string GatewayIP;         // user-net host address (default 10.0.2.2)
  std::string GuestIP;           // into config.json (default 10.0.2.15)
  std::string SubnetCIDR;        // user-net network (default 10.0.2.0/24)
  std::string Workspace;         // carried (guest VFS mount point)
  bool UseInterception = false;  // carried (egress proxy; later issue)
  bool Privileged = false;       // into config.json (WriteGuestConfigDisk)
  std::vector<std::string> DNSServers;  // into config.json (WriteGuestConfigDisk)
  std::string Hostname;                 // into config.json (WriteGuestConfigDisk)
  std::vector<HostIPMapping> AddHosts;  // into config.json (WriteGuestConfigDisk)
  int MTU = 0;                          // into config.json (0 = the guest config's)
  bool NoNetwork = false;               // no NIC at all
  std::string PrebuiltRootfs;           // seed; when set it is the root disk instead of RootfsPath
  std::vector<DiskConfig> ExtraDisks;   // cella-disk<N>

  // --- cella extensions ---
  std::string StateDir;        // per-VM runtime dir (sockets, logs); required
  std::string ConfigDiskPath;  // ext4 image with /config.json (WriteConfigDisk): cella-config
  // The config.json on that disk (WriteGuestConfigDisk sets it): a warm
  // clone gets it with its go line instead of mounting the disk.
  std::string GuestConfigJson;
  std::vector<DiskConfig> Volumes;  // named volumes: cella-vol<N>
  // Host directory shares. Non-empty: guest RAM is memory-backend-memfd with
  // share=on (vhost-user needs the daemon to map it), so such a VM cannot use
  // copy-on-write template memory.
  std::vector<ShareConfig> Shares;
  // Set: the VM does not boot but is restored from a snapshot: QEMU starts
  // with `-incoming defer` and is fed this migration URI (e.g. "exec:cat
  // FILE") with migrate-incoming. Every other field must be what the
  // snapshot was taken with (the device set must match).
  std::string IncomingMigration;
  // Optional, with IncomingMigration: a file holding the raw (uncompressed)
  // stream. QEMU then reads it from an inherited descriptor (`fd:N`) and
  // IncomingMigration is not used: no shell and no `cat` started by QEMU
  // (a fork of QEMU and two execs, 50-90 ms on a loaded host).
  std::string IncomingStateFile;
  // Optional, with IncomingMigration (a format-2 snapshot): guest RAM is
  // this file mapped privately (memory-backend-file, share=off), the
  // snapshot's memory; the stream holds no page of it. Pages are read as
  // the guest touches them, and copies restored from one file share the
  // pages none of them wrote. No Shares, no Template.
  std::string SnapshotMemoryPath;
  // Warm starts. kCapture: guest RAM is TemplateMemoryPath mapped shared
  // (the file is the template's memory), the kernel command line carries
  // cella.template=1, and Start() returns once the guest reached the
  // template point and its device state went to TemplateSaveUri (migration
  // with x-ignore-shared, so RAM stays in the file); the VM stays frozen,
  // Close() ends it; Agent() stays null. kClone: guest RAM is a private
  // copy-on-write mapping of TemplateMemoryPath, IncomingMigration feeds the
  // template's device state, and Start() sends the go line
  // (protocol/warm.h: clock and RNG seed) before waiting for the agent as a
  // cold boot does. Both: every other field must describe the same devices
  // as the template's (host/template computes the key from them); no Shares.
  TemplateRole Template = TemplateRole::kNone;
  std::string TemplateMemoryPath;
  std::string TemplateSaveUri;
};

// Disk serials the guest init finds as /dev/disk/by-id/virtio-<serial>.
// Disks are attached in this order (so /dev/vdX letters follow it too):
//   cella-root | cella-lower0..N-1, cella-upper; cella-config; cella-vol0..;
//   cella-disk0..
inline constexpr const char* kRootSerial = "cella-root";
inline constexpr const char* kUpperSerial = "cella-upper";
inline constexpr const char* kConfigSerial = "cella-config";
std::string LowerSerial(size_t index);      // "cella-lower<index>"
std::string VolumeSerial(size_t index);     // "cella-vol<index>"
std::string ExtraDiskSerial(size_t index);  // "cella-disk<index>"
// "/dev/disk/by-id/virtio-<serial>", what config.json should name.
std::string GuestDevicePath(std::string_view serial);

// QEMU user-mode network as the guest sees it (protocol/network.h).
inline constexpr const char* kUserNetSubnet = protocol::kGuestSubnet;
inline constexpr const char* kUserNetGateway = protocol::kHostGateway;
inline constexpr const char* kUserNetDns = protocol::kGuestDns;
inline constexpr const char* kUserNetGuestIp = protocol::kGuestIp;
inline constexpr int kUserNetPrefix = protocol::kGuestPrefixLength;

}  // namespace cella::vmm
