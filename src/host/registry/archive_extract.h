// Unpacks an image archive (`docker save` tarball or OCI layout tarball,
// plain or gzip/zstd/xz/bzip2 compressed) into a fresh directory, refusing entries
// that could land outside it. Thread-safe (no shared state).
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"

namespace cella::registry {

// Bounds on what one archive may expand to. The archive is untrusted input:
// a 2 MiB gzip of zeros must not fill the disk before any check.
struct ExtractLimits {
  uint64_t max_bytes = uint64_t{64} << 30;           // absolute cap on bytes written
  uint64_t max_ratio = 100;                          // written / archive size, past the floor
  uint64_t ratio_floor_bytes = uint64_t{256} << 20;  // small archives may expand this far
  uint64_t max_entries = 1'000'000;
};

// Regular files, directories and relative symlinks only; "..", absolute
// names, hardlinks and device nodes are refused with the entry's name. Every
// entry is created beneath dest_dir through directory fds opened with
// O_NOFOLLOW, so no entry can pass through a symlink an earlier one planted.
Status ExtractImageArchive(const std::string& archive_path, const std::string& dest_dir,
                           const ExtractLimits& limits = {});

// Resolves rel (a path from an archive's manifest) under root, refusing
// absolute paths, ".." and symlinks that lead outside root.
Result<std::string> ResolveInside(const std::string& root, const std::string& rel);

}  // namespace cella::registry
