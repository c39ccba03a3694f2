// Mount work of the guest init, in boot order: the early pseudo filesystems,
// the config disk, the root (overlay or plain), volumes and disks, then the
// switch into the new root. Runs in PID 1 before anything else exists; every
// function either finishes its step or returns an error naming the mount.
#pragma once

#include <string>
#include <vector>

#include "base/result.h"
#include "guest/init/devices.h"
#include "protocol/config.h"

namespace cella::init {

inline constexpr const char* kNewRoot = "/newroot";
// Scratch mount points in the initramfs (lower layers, uppers, config disk).
inline constexpr const char* kScratch = "/cella";
// Where the host puts the static agent binary in the initramfs.
inline constexpr const char* kInitramfsAgent = "/cella-agent";
// Where the systemd-mode agent lives in the new root (on a tmpfs /run).
inline constexpr const char* kRunDir = "/run/cella";
inline constexpr const char* kSystemdAgentPath = "/run/cella/cella-agent";
// systemd's runtime unit directory (below /etc/systemd/system in precedence).
inline constexpr const char* kSystemdRuntimeUnitDir = "/run/systemd/system";

// The writable layer's disk serial (the host's vmm::kUpperSerial).
inline constexpr const char* kUpperDiskSerial = "cella-upper";

// /proc, /sys, /dev (devtmpfs), /dev/pts (newinstance, ptmxmode=0666),
// /dev/shm, /sys/fs/cgroup (cgroup2).
Status MountEarly();

// Mounts the config disk read-only (ext4, then erofs), reads and parses
// /config.json, unmounts it.
Result<protocol::Config> ReadConfigDisk(const std::string& device);

// Assembles the root at kNewRoot (see README: overlay_root, or root_device).
// On a warm clone it keeps what PrepareRootForClones made, as far as it is
// what this config asks for, and unmounts the rest first.
Status AssembleRoot(const protocol::Config& config, Deadline deadline);

// Warm starts, at the template point (template_point.h), after the sandbox
// disks are unbound: the image's share of the root is made once for every
// clone instead of by each clone. Every cella-lower<N> disk still bound (the
// image's layers: their files are part of the template's key, so every clone
// attaches the same bytes) is mounted read-only as erofs at
// kScratch/lower<N>, the way MountOverlayRoot would; when the shape has no
// upper disk (`upper_disk` false: a clone's writable layer is a tmpfs, empty
// in every clone) the tmpfs upper and the overlay on kNewRoot are made too.
// A lower that does not mount as erofs ends the preparation there (the clone
// mounts it itself). Only the image's layers are touched: no per-sandbox
// disk is bound at this point. Returns how many mounts were made.
// With `seeded_upper` (the template's writable layer is part of it, see
// protocol/warm.h) the upper disk, still bound, is mounted as ext4 and the
// overlay made on it instead of on a tmpfs.
Result<int> PrepareRootForClones(bool upper_disk, bool seeded_upper);

// Writes what the prepared root's ext4 upper holds in the page cache to its
// disk (syncfs), so every clone's copy of that disk starts with it instead
// of each clone writing it back. Nothing without a seeded upper.
Status SyncPreparedUpper();

// Whether PrepareRootForClones made the whole root (the overlay on kNewRoot).
bool RootMadeForClones();

// Mounts volume_mounts (ro / rw / overlay) and disks inside kNewRoot. Mount
// points are created beneath the new root without following symlinks.
Status MountVolumes(const protocol::Config& config, Deadline deadline);

// Removes the temp files of uploads a previous boot left in flight (the
// journal on the writable layer's disk, see guest/agent/upload_journal.h),
// then installs the journal for this boot's agent. Exec mode with a
// persistent writable layer only; needs the root and volumes mounted.
Status RecoverInterruptedUploads(const protocol::Config& config);

// Systemd mode preparation inside kNewRoot: a tmpfs on /run holding the agent
// binary (copied from the initramfs), plus runtime units in
// /run/systemd/system (nothing is written into the image): cella-agent.service,
// enabled for multi-user.target, and a mask of serial-getty@<tty>.service for
// each of console_ttys (the console is cella's log; without udev systemd
// would wait 90 s for the tty device before giving up on that getty).
Status PrepareSystemd(const protocol::Config& config, const std::vector<std::string>& console_ttys);

// Moves /proc, /sys and /dev into kNewRoot, then makes it "/" (MS_MOVE +
// chroot: the initramfs is rootfs, which pivot_root refuses).
Status SwitchRoot();

// After the switch and once the init has written its files: `--tmpfs`
// mounts, then for `--read-only` a tmpfs on /tmp and /run (unless given) and
// the root remounted read-only (volumes and tmpfs stay writable).
Status MountTmpfsAndSealRoot(const protocol::Config& config);

}  // namespace cella::init
