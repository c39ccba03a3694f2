// Builds the cella initramfs (newc cpio) and caches it by content.
//
// Layout:
//   /init                       the static cella-init binary (PID 1)
//   /cella-agent                the static agent (copied into systemd-mode roots)
//   /dev/console                char 5:1, so PID 1 has a console before devtmpfs
//   /lib/modules/<release>/...  the modules the guest needs, as in the kernel tree
//   /lib/modules/cella.order    their absolute paths, one per line, in load order;
//                               the boot group first, then "@<group>" lines
//                               each starting a group (modules.h)
//
// Reproducible: entries sorted, mtime 0, uid/gid 0, fixed modes, so the same
// inputs give the same bytes. Cached at <home>/cache/initramfs/<sha256>.cpio[.gz]
// where the hash covers every input's content: a rebuilt init or agent yields
// a new file automatically. Concurrent builders race benignly (write to a temp
// file, rename). Thread-safe.
#pragma once

#include <string>
#include <vector>

#include "base/result.h"
#include "host/kernel/kernel.h"
#include "host/kernel/modules.h"

namespace cella::kernel {

// Uncompressed is the default: measured under TCG here (interleaved runs,
// boot to agent Hello), median 3.6 s uncompressed vs 4.2 s gzip — the guest
// spends longer inflating ~27 MB than QEMU spends loading it.
enum class InitramfsCompression {
  kNone,
  kGzip,
};

struct InitramfsSpec {
  std::string init_binary;   // host path of cella-init
  std::string agent_binary;  // host path of cella-agent
  // Empty modules_dir: no modules (a kernel with everything built in).
  std::string modules_dir;
  std::string kernel_release;  // names lib/modules/<release>; required with modules_dir
  std::vector<WantedModule> modules = DefaultGuestModules();
  // Modules go in without their appended signatures (the guest kernel
  // checks one that is present, slowly under TCG). Only for a kernel that
  // does not enforce them: KernelAcceptsUnsignedModules.
  bool strip_module_signatures = false;
  InitramfsCompression compression = InitramfsCompression::kNone;
};

struct InitramfsFile {
  std::string path;                     // the cached archive
  std::vector<std::string> load_order;  // absolute guest paths, as in cella.order (all groups)
  bool built = false;                   // false: it was already cached
};

// Writes the archive to `out_path` (no caching).
Result<InitramfsFile> WriteInitramfs(const InitramfsSpec& spec, const std::string& out_path);

// Returns the cached archive for these inputs, building it when missing.
Result<InitramfsFile> EnsureInitramfs(const std::string& home, const InitramfsSpec& spec);

}  // namespace cella::kernel
