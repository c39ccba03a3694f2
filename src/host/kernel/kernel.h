// The guest kernel: where it is and which modules it has.
//
// scripts/fetch-kernel.sh fetches Debian's cloud kernel (pinned in
// kernel.pin) and writes <home>/kernel/manifest (key=value lines: package,
// version, kernel_release, deb_sha256, vmlinuz, modules_dir, notice).
// FindKernel reads it. Pure file reads; thread-safe.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace cella::kernel {

struct KernelInfo {
  std::string vmlinuz;      // absolute path of the bzImage
  std::string modules_dir;  // lib/modules/<release>; empty = no modules (all built in)
  std::string release;      // e.g. 6.1.0-56-cloud-amd64; empty when unknown
  std::string package;      // Debian package it came from; empty for an override
  std::string version;
  std::string deb_sha256;
  std::string notice;  // set when fetch-kernel.sh had to fall back from the pin
};

struct KernelOverride {
  std::string vmlinuz;      // any bzImage (`cella run --kernel PATH`)
  std::string modules_dir;  // optional: a lib/modules/<release> tree with modules.dep
};

// Parses the manifest text; errors name the missing or bad key.
Result<KernelInfo> ParseKernelManifest(std::string_view text);

// With an override: checks the files exist and returns them. Otherwise reads
// <home>/kernel/manifest; when it is missing, the error says what to run.
Result<KernelInfo> FindKernel(const std::string& home,
                              const std::optional<KernelOverride>& override_kernel = std::nullopt);

// Whether the kernel loads modules without a signature: its build config
// (`config-<release>` beside the bzImage, as Debian ships it) is found and
// does not set CONFIG_MODULE_SIG_FORCE. No config found: false (keep them).
bool KernelAcceptsUnsignedModules(const KernelInfo& kernel);

}  // namespace cella::kernel
