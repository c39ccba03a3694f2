// Warm starts, guest side (protocol/warm.h has the handshake). A guest booted
// with cella.template=1 stops at the template point: kernel, init and
// modules are up, and nothing of the sandbox has been read. The host saves
// it there (a template) and kills it; every clone restored from the template
// continues inside AwaitWarmStart, which then makes it a fresh machine.
#pragma once

#include <optional>
#include <string>

#include "base/result.h"
#include "guest/init/devices.h"

namespace cella::init {

// At the template point, in order:
//  1. the per-sandbox virtio-blk devices (every disk but the image's
//     cella-lower<N>/cella-root, which are part of the template's key) are
//     unbound from the driver, so no block, partition table or capacity of
//     the template's placeholder disks stays cached in the kernel;
//  2. the image's share of the root is made for every clone at once
//     (rootfs.h PrepareRootForClones: its erofs lowers mounted and, when the
//     writable layer is a tmpfs, the overlay on the new root) and, with the
//     overlay made, the default PATH's directories, /bin/sh, its ELF
//     interpreter and libc read into the page cache (all of it comes from
//     disks in the template's key), the paths every clone's init looks up
//     looked up, /etc and /run copied up (every clone writes there) with
//     /run/cella made; lo and the NIC (network.h BringLinksUpForClones)
//     are brought up whatever the shape;
//  3. the template-point line goes to the host on the agent port, and the
//     init blocks until the go line comes back (the template itself never
//     gets one; a clone gets it right after its restore);
//  4. the kernel CRNG is reseeded from the go line's seed and the wall clock
//     set, before anything else runs;
//  5. the unbound devices are bound again: the driver probes the clone's own
//     disk files afresh; when the go line carried the config.json (the host
//     always sends it), the config disk stays unbound and the config is
//     returned instead (nullopt: read the config disk as a cold boot does).
// The port is closed again; the agent opens it later as on a cold boot.
// `seeded_upper` (cella.seeded_upper=1): the upper disk is the template's
// own (every clone attaches a copy of it): it stays bound, and the root is
// made on it (rootfs.h PrepareRootForClones) and synced to it.
Result<std::optional<std::string>> AwaitWarmStart(Deadline port_deadline, bool seeded_upper);

// A cold boot with cella.go=1: the config-request line goes to the host on
// the agent port and the go line comes back; the CRNG is
// reseeded and the wall clock set from it, and its config.json returned
// (nullopt when it carried none: read the config disk). The config disk is
// never mounted then; the port is closed again for the agent.
Result<std::optional<std::string>> AwaitColdGo(Deadline port_deadline);

// Where guest programs (and tests) read how this machine started: "warm\n"
// (a template clone) or "cold\n". Written once /run is mounted, with
// `own_tmpfs` (exec mode) on a small tmpfs mounted on /run/cella first
// (systemd mode keeps its agent there, on systemd's /run).
inline constexpr const char* kStartKindPath = "/run/cella/start";
Status RecordStartKind(bool warm, bool own_tmpfs);

}  // namespace cella::init
