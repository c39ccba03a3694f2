// The config disk: a small ext4 image holding /config.json, attached with
// serial cella-config; the guest init mounts it first thing at boot.
// Built with `mkfs.ext4 -d` (no root, no loop mount). Thread-safe.
#pragma once

#include <string>

#include "base/result.h"
#include "host/vmm/vm_config.h"
#include "protocol/config.h"

namespace cella::vmm {

// Writes an ext4 image at out_path containing /config.json = json (mode
// 0644). Returns out_path. The image is sized to fit (min 1 MiB).
Result<std::string> WriteConfigDisk(const std::string& json, const std::string& out_path);

// The guest's config.json for `vm`, on its config disk: the seed's
// guest-facing VMConfig fields (Hostname, DNSServers, GuestIP, GatewayIP,
// MTU, Privileged, Env, AddHosts, NoNetwork) are what the guest gets,
// overriding `guest`'s copies of them, so a VMConfig edited after it was
// composed still means what it says. Privileged always comes from `vm`;
// NoNetwork can only turn the network off; Env and AddHosts add to (and Env
// overrides) `guest`'s; empty/zero values of the others leave `guest`'s. The result is validated,
// then written to <StateDir>/config.img and recorded in vm.ConfigDiskPath.
// So code that changes one of these fields after sandbox::Compose copied
// them into the VMConfig changes the VMConfig's copy (the guest config's is
// overwritten).
Status WriteGuestConfigDisk(protocol::Config guest, VMConfig& vm);

// WriteGuestConfigDisk in two steps, for a warm clone whose config disk is
// written while QEMU starts. The first validates and records the config in
// vm.GuestConfigJson and vm.ConfigDiskPath, and creates the disk file
// (a new file, replacing one at that path) at its final size but empty:
// QEMU may open it (its size is what the guest's device reports). The
// second fills that same file in place (mkfs.ext4 writes into it: a QEMU
// that opened it reads the filesystem), before anything reads it.
Status ReserveGuestConfigDisk(protocol::Config guest, VMConfig& vm);
Status FillConfigDisk(const std::string& json, const std::string& path);

}  // namespace cella::vmm
