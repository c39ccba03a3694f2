// Sparse ext4 images for writable layers and volumes. The file only takes
// the space the guest writes; mkfs.ext4 with lazy init keeps creation fast.
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"

namespace cella::sandbox {

// Creates `path` (must not exist) as a sparse ext4 filesystem of `size_bytes`
// with the given label. On failure nothing is left at `path`.
Status MakeExt4Image(const std::string& path, uint64_t size_bytes, const std::string& label);

// Whether the ext4 image at `path` was never mounted since mkfs (its
// superblock's mount count and last-mount time are 0): a sandbox's first
// boot, whose writable layer may come from its memory template instead
// (template_store.h, seeded upper). An image that is no ext4 is an error.
Result<bool> Ext4NeverMounted(const std::string& path);

// Replays the journal of an ext4 image a crashed VM left behind (e2fsck -p,
// under an exclusive lock on the image so two sandboxes starting at once do
// not both repair it). A guest cannot do this for a read-only attachment:
// the kernel refuses to mount an ext4 that needs recovery from a read-only
// device. Quick on a clean filesystem. Errors e2fsck cannot fix unattended
// are reported.
Status RecoverExt4Image(const std::string& path);

// "512m", "10G", "1.5g", "4096" (bytes), "100MiB" -> bytes (at most 16t).
Result<uint64_t> ParseByteSize(std::string_view text);
// As ParseByteSize, at least 16 MiB, rounded down to whole 4 KiB blocks.
Result<uint64_t> ParseDiskSize(std::string_view text);

}  // namespace cella::sandbox
