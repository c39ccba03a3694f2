// Where cella keeps its data on the host, and nothing outside it.
//
//   home = $CELLA_HOME                       when set (tests use it)
//        | /var/lib/cella                    when running as root
//        | $XDG_DATA_HOME/cella              otherwise
//        | ~/.local/share/cella              when XDG_DATA_HOME is unset
//
// scripts/fetch-kernel.sh applies the same rule; keep them in step.
// Pure functions (no I/O, no shared state): thread-safe.
#pragma once

#include <sys/types.h>

#include <string>

#include "base/result.h"

namespace cella::host {

// Looks up an environment variable; nullptr when unset. Injected so tests
// need not touch the process environment.
using EnvLookup = const char* (*)(const char*);

Result<std::string> ResolveCellaHome(EnvLookup lookup, uid_t effective_uid);
// The real process environment and euid.
Result<std::string> CellaHome();

// Subdirectories of home. None of these creates anything.
std::string KernelDir(const std::string& home);           // <home>/kernel
std::string KernelManifestPath(const std::string& home);  // <home>/kernel/manifest
std::string InitramfsCacheDir(const std::string& home);   // <home>/cache/initramfs
std::string DigestCacheDir(const std::string& home);      // <home>/cache/digests
std::string DefaultImageDir(const std::string& home);     // <home>/images/default

// mkdir -p with the given mode for directories it creates.
Status MakeDirs(const std::string& path, mode_t mode);

}  // namespace cella::host
