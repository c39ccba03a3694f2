// Host shares served over FUSE (config host_shares[i].fuse): the guest side
// of ops serve_share and shares_mounted.
//
// A FUSE mount answers nothing until the host serves it, and the host's
// answers come through the agent's relay on the agent's loop thread. So:
//   1. Before the switch of root (StageFuseShares, from MountVolumes), each
//      share's `fuse` is mounted at a stage in /cella (`/cella/shareN/fs`, or
//      the empty file `/cella/shareN/file` for a single-file rw/ro share:
//      FUSE roots may be regular files), which nothing else sees: mount(2)
//      of fuse itself waits for nothing. Mounts that lie beneath a FUSE
//      share's path (volumes, disks, tmpfs) are made at stages too
//      (StageBeneathShare), so the share, placed later, cannot hide them.
//      (MountVolumes makes the mount points of shares not beneath another
//      FUSE share in the new root, while it may still be written.)
//   2. After the switch, StartPlacingShares starts one thread that puts
//      every staged mount in place, parents before children (sorted by
//      path): an overlay share's overlayfs is mounted first (the FUSE mount
//      read-only as its lower, the private upper in
//      /cella/upper/cella-shares/N, beside the root's own writable layer),
//      then each stage is moved (MS_MOVE) onto its path, whose mount point
//      is created through the share above it when missing (as Docker does
//      in a bind source). Those calls block until the agent relays the
//      host's answers; the host asks shares_mounted after serving every
//      share and waits for the outcome with a time-out.
//   3. serve_share hands the agent a copy of the share's /dev/fuse
//      descriptor, kept here for the guest's life: links come and go
//      (standby, reconnects), the mount stays.
// Mount flags: allow_other, default_permissions (the guest kernel checks
// modes), nosuid,nodev always, read-only for ro and overlay (the host
// serves those read-only too). A single-file overlay share is served as a
// directory holding only that file; its overlay's file is bound on the path.
//
// Thread-safety: StageFuseShares/StageBeneathShare/StartPlacingShares from
// the init's main thread before the agent runs; ServeFuseShare and
// SharesPlaced* from the agent's loop thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "base/result.h"
#include "base/unique_fd.h"
#include "protocol/config.h"

namespace cella::init {

// Whether `path` lies strictly beneath the path of a FUSE share of config.
bool BeneathFuseShare(const protocol::Config& config, const std::string& path);

// Step 1 for the shares (before the switch of root; kNewRoot assembled).
Status StageFuseShares(const protocol::Config& config);

// Step 1 for a mount beneath a FUSE share: returns the directory (in
// /cella/stage) to mount it on instead of `guest_path`, where it is moved
// in step 2. `name` is unique per mount ("volume3").
Result<std::string> StageBeneathShare(const std::string& guest_path, const std::string& name);

// Step 2: starts the placing thread (nothing to place: done at once).
// After the switch of root; the stages are reached through a descriptor of
// /cella kept since step 1.
Status StartPlacingShares();

// The outcome of step 2 (nullopt while it runs), and a descriptor that is
// readable once it is known (-1 when nothing was staged).
std::optional<Status> SharesPlacedResult();
int SharesPlacedFd();

// Step 3: a new descriptor for share `index`'s FUSE connection. Fails for
// an index out of range or a share not served over FUSE.
Result<UniqueFd> ServeFuseShare(const protocol::Config& config, uint32_t index);

}  // namespace cella::init
