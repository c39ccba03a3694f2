// Unpacks an image archive (`docker save` tarball or OCI layout tarball,
// optionally gzip/zstd compressed) into a fresh directory, refusing entries
// that could land outside it. Thread-safe (no shared state).
#pragma once

#include <string>

#include "base/result.h"

namespace cella::registry {

// Regular files, directories and relative symlinks only; "..", absolute
// names, hardlinks and device nodes are refused with the entry's name.
Status ExtractImageArchive(const std::string& archive_path, const std::string& dest_dir);

// Resolves rel (a path from an archive's manifest) under root, refusing
// absolute paths, ".." and symlinks that lead outside root.
Result<std::string> ResolveInside(const std::string& root, const std::string& rel);

}  // namespace cella::registry
