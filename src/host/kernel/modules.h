// Which kernel modules the guest init loads, in which order.
//
// The guest has no modprobe: the host resolves dependencies from the
// kernel's modules.dep (written by depmod) and the init loads the listed
// files in order with finit_module. Pure functions over text, and readers of
// modules.dep and module trailers; thread-safe.
#pragma once

#include <cstddef>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::kernel {

// The length of a module file without the signature the kernel's build
// appends (scripts/sign-file: the module, the PKCS#7 signature, a
// struct module_signature whose last field is the signature's big-endian
// length, then "~Module signature appended~\n"). `trailer` is the file's
// last bytes (kModuleTrailerBytes or fewer when the file is shorter);
// `file_size` the whole file's. An unsigned module keeps its size; a
// trailer whose stated length runs past the file is an error.
inline constexpr size_t kModuleTrailerBytes = 40;  // struct module_signature + marker
Result<size_t> UnsignedModuleSize(std::string_view trailer, size_t file_size);
// The same for a file, reading only its trailer.
Result<size_t> UnsignedModuleSizeOfFile(const std::string& path);

// modules.dep: "kernel/a/b.ko: kernel/c.ko kernel/d.ko" per line; the
// dependency list is already the transitive closure, in reverse load order.
struct ModuleIndex {
  // Module name ('-' normalised to '_') -> path relative to modules_dir.
  std::map<std::string, std::string> path_by_name;
  // Relative path -> its dependencies' relative paths.
  std::map<std::string, std::vector<std::string>> deps_by_path;
  // Names from modules.builtin (compiled into the kernel).
  std::set<std::string> builtin;
};

// Module name of a path: "kernel/fs/erofs/erofs.ko" -> "erofs"; dashes become
// underscores, as the kernel does; .ko.xz/.ko.zst/.ko.gz suffixes accepted.
std::string ModuleNameFromPath(std::string_view path);

Result<ModuleIndex> ParseModulesDep(std::string_view modules_dep, std::string_view modules_builtin);
// Reads <modules_dir>/modules.dep and (if present) modules.builtin.
Result<ModuleIndex> LoadModuleIndex(const std::string& modules_dir);

enum class Need {
  kRequired,   // error unless the module exists or is built in
  kIfModular,  // included when it is a module; silently skipped otherwise
};

// Module groups the guest init may leave unloaded on a cold boot that does
// not need them (the names are its contract with the init: see
// src/guest/init/README.md). A template boot loads every group, since a clone
// may need any; the boot group ("") is always loaded before the config is read.
inline constexpr std::string_view kModuleGroupBoot = "";
// The NIC driver: loaded once the config says the network is on.
inline constexpr std::string_view kModuleGroupNetwork = "network";
// FUSE and virtiofs: loaded once the config lists host shares (or the sandbox
// is privileged, so its workload may mount FUSE itself, as on a warm start).
inline constexpr std::string_view kModuleGroupShares = "shares";

struct WantedModule {
  std::string name;
  Need need = Need::kRequired;
  std::string group = std::string(kModuleGroupBoot);
};

// What the guest needs on microvm: virtio over mmio, block, console (agent
// port), erofs/overlay (image layers) and ext4 (upper/config) at boot; net
// and fuse/virtiofs in their groups. No virtio_pci (microvm has no PCI and
// boots with pci=off) and no vsock (the agent uses virtio-serial; QEMU gets
// no vhost-vsock device): each cost a load under TCG for nothing.
std::vector<WantedModule> DefaultGuestModules();

// Relative paths of the wanted modules and all their dependencies, each
// once, every module after its dependencies (ties keep the wanted order).
// Compressed modules are refused: the init loads plain .ko with finit_module.
Result<std::vector<std::string>> ResolveLoadOrder(const ModuleIndex& index,
                                                  std::span<const WantedModule> wanted);

// The load order split by group: the boot group first (always present, maybe
// empty), then every other group in order of first mention. A module lands in
// the first group that needs it (a dependency shared with the boot group is
// loaded at boot), so each group loads after the ones before it.
struct ModuleGroup {
  std::string name;
  std::vector<std::string> paths;  // relative to modules_dir, in load order
};
Result<std::vector<ModuleGroup>> ResolveLoadGroups(const ModuleIndex& index,
                                                   std::span<const WantedModule> wanted);

}  // namespace cella::kernel
