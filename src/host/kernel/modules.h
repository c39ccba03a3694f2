// Which kernel modules the guest init loads, in which order.
//
// The guest has no modprobe: the host resolves dependencies from the
// kernel's modules.dep (written by depmod) and the init loads the listed
// files in order with finit_module. Pure functions over text; thread-safe.
#pragma once

#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::kernel {

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

struct WantedModule {
  std::string name;
  Need need = Need::kRequired;
};

// What the guest needs on microvm: virtio over mmio, block, console (agent
// port), net, vsock, erofs/overlay (image layers) and ext4 (upper/config).
std::vector<WantedModule> DefaultGuestModules();

// Relative paths of the wanted modules and all their dependencies, each
// once, every module after its dependencies (ties keep the wanted order).
// Compressed modules are refused: the init loads plain .ko with finit_module.
Result<std::vector<std::string>> ResolveLoadOrder(const ModuleIndex& index,
                                                  std::span<const WantedModule> wanted);

}  // namespace cella::kernel
