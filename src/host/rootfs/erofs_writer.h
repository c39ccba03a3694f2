// Writes a Tree as an uncompressed erofs image (Linux fs/erofs on-disk
// format), without root and without touching a host directory tree.
//
// Layout (4 KiB blocks):
//   block 0            superblock at byte 1024
//   blocks 1..D-1      regular file contents, copied from the Tree's spool at
//                      the same offsets (files are FLAT_PLAIN: block aligned)
//   blocks D..M-1      directory blocks and symlink targets too big to inline
//   blocks M..         metadata: 64-byte extended inodes (per-file mtime,
//                      32-bit uid/gid, 64-bit size), inline xattrs, and inline
//                      tails (FLAT_INLINE) for directories and symlinks
// The root inode comes first in the metadata area (nid 0). Output is
// deterministic for a given Tree (the UUID is a hash of the metadata).
//
// Thread rules: reads the Tree only; the Tree must not change meanwhile.
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"
#include "host/rootfs/tree.h"

namespace cella::rootfs {

enum class Durability : uint8_t {
  kFsync,    // fsync the image and its directory before returning
  kNoFsync,  // faster; an OS crash may leave a truncated image at out_path
};

struct WriteOptions {
  Durability durability = Durability::kFsync;
};

struct ImageStats {
  uint64_t inodes = 0;
  uint64_t directories = 0;
  uint64_t regular_files = 0;
  uint64_t content_bytes = 0;  // bytes of live file content (hardlinks once)
  uint64_t image_bytes = 0;
  uint64_t blocks = 0;
};

// Writes the image to a temp file next to out_path, then renames it into
// place; on error nothing is left at out_path or beside it.
Result<ImageStats> WriteErofs(const Tree& tree, const std::string& out_path,
                              const WriteOptions& options = {});

}  // namespace cella::rootfs
