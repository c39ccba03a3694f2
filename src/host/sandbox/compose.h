// Turns a request for a sandbox into a matching (config.json, VMConfig) pair.
//
// The guest finds every disk by its virtio serial, so the only way the two
// halves can disagree is if they are built apart; this module builds both.
// Pure apart from EnsureGuestAssets (which builds/caches files) and
// WriteGuestConfig (which writes the config disk). Thread-safe.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/kernel/kernel.h"
#include "host/vmm/vm_config.h"
#include "protocol/config.h"

namespace cella::sandbox {

struct GuestAssets {
  kernel::KernelInfo kernel;
  // What QEMU boots: the kernel's PVH ELF from the cache, or kernel.vmlinuz
  // (kernel/pvh.h).
  std::string boot_kernel_path;
  std::string initramfs_path;
  std::string default_rootfs_path;  // the built-in busybox erofs image
};

// Finds the kernel, and builds (or finds cached) the initramfs from the
// cella-init/cella-agent binaries in `guest_binary_dir` and the default image.
Result<GuestAssets> EnsureGuestAssets(const std::string& home, const std::string& guest_binary_dir,
                                      const std::optional<kernel::KernelOverride>& kernel_override);

// Where cella-init and cella-agent are: $CELLA_LIBEXEC_DIR, else beside the
// running executable.
Result<std::string> GuestBinaryDir();

// A random unicast, locally administered MAC address ("02:..." style) for
// a guest's NIC: every fresh sandbox (cold boot or warm clone) draws one.
Result<std::string> RandomMac();

// A block device image shown to the guest at `guest_path`.
struct VolumeAttachment {
  std::string host_path;
  std::string guest_path;
  protocol::MountMode mode = protocol::MountMode::kReadOnly;
  // kOverlay only: this sandbox's private writable layer (ext4 image).
  std::string overlay_host_path;
};

struct MachineShape {
  double cpus = 1;
  int memory_mib = 512;
};

// How an image says it wants to run (its OCI config), in the terms the guest
// config uses. Kept free of registry types so this module does not depend on
// the image store.
struct ImageDefaults {
  std::vector<std::string> entrypoint;
  std::vector<std::string> cmd;
  std::vector<std::string> env;  // "KEY=VALUE" in image order; later wins
  std::string workdir;
  std::string user;
  protocol::InitMode init_mode = protocol::InitMode::kExec;
};

// Docker's rules for the image half of a run: the entrypoint always stays,
// `user_command` (what followed `--`) replaces the image's Cmd when given,
// the image's env goes on top of what `guest.env` holds now (so the caller
// applies the user's env after this call), and the image's workdir/user fill
// guest.workdir/guest.user only where those are still empty. Fails when
// neither the image nor the user names a command, or an env item has no '='.
Status ApplyImageDefaults(const ImageDefaults& image, const std::vector<std::string>& user_command,
                          protocol::Config& guest);

// Fills the guest config's root, volume and disk entries and network
// addressing (QEMU user-mode NAT unless no_network), and returns the VMConfig
// that attaches exactly those disks. `guest` keeps every other field as the
// caller set it; the result is validated. `root_image_path` is the erofs
// image of the root filesystem; empty means the built-in default image.
// `upper_image_path` is an ext4 image holding the sandbox's writable layer
// (kept across restarts); empty means a tmpfs upper that dies with the VM.
Result<vmm::VMConfig> Compose(const GuestAssets& assets, protocol::Config& guest,
                              const MachineShape& shape,
                              const std::vector<VolumeAttachment>& volumes,
                              const std::vector<vmm::DiskConfig>& extra_disks,
                              const std::string& id, const std::string& state_dir,
                              const std::string& root_image_path = {},
                              const std::string& upper_image_path = {});

// A host share whose daemon is running (share.h): both halves of it.
struct ShareAttachment {
  std::string socket_path;  // the daemon's vhost-user socket
  std::string guest_path;
  protocol::MountMode mode = protocol::MountMode::kReadOnly;
  std::string file;   // non-empty: a single-file share of this name
  bool fuse = false;  // served over FUSE on the agent link: no device, no socket
};

// Adds each share to `vm` (a vhost-user-fs device, tag cella-share<N>) and to
// `guest` (host_shares, the same tag), then validates `guest`. Call after
// Compose, before WriteGuestConfig.
Status AttachShares(const std::vector<ShareAttachment>& shares, protocol::Config& guest,
                    vmm::VMConfig& vm);

// Serializes `guest` onto the config disk at <state_dir>/config.img and
// records it in `vm`.
Status WriteGuestConfig(const protocol::Config& guest, vmm::VMConfig& vm);

}  // namespace cella::sandbox
