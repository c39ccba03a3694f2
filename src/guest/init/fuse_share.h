// Host shares served over FUSE (config host_shares[i].fuse): the guest side
// of op serve_share. The share is mounted the first time the host asks for
// it, after the agent's link is up, so the relay already runs when anything
// touches the mount (a FUSE mount answers nothing until the host does).
//
// Mount: `fuse` straight on the share's path (a directory, or for a
// single-file share the file itself: FUSE roots may be regular files), with
// allow_other and default_permissions (the guest kernel checks modes), ro
// shares read-only, always nosuid,nodev. The /dev/fuse descriptor is kept
// here for the life of the guest: links come and go (standby, reconnects),
// the mount stays.
//
// Thread-safety: the agent's loop thread only.
#pragma once

#include <cstdint>

#include "base/result.h"
#include "base/unique_fd.h"
#include "protocol/config.h"

namespace cella::init {

// A new descriptor for share `index`'s FUSE connection, mounting it first if
// this is the first request. Fails for an index out of range or a share not
// served over FUSE.
Result<UniqueFd> ServeFuseShare(const protocol::Config& config, uint32_t index);

}  // namespace cella::init
