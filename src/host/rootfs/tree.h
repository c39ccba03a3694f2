// The merged in-memory view of an image's filesystem while OCI layers are
// applied, before it is written out as an erofs image.
//
// Metadata lives in memory (one Inode per file, a few hundred bytes each);
// file contents are spooled to one temp file in the work directory, each file
// starting on a 4 KiB boundary, so a multi-GiB image needs little RAM and the
// erofs writer can copy contents block for block (see erofs_writer.h).
//
// Thread rules: a Tree is used by one thread at a time. It owns its spool
// file, which has no name (O_TMPFILE, or unlinked at once), so nothing is left
// in the work directory even if the process dies.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::rootfs {

inline constexpr uint64_t kBlockSize = 4096;
// Longest name of one directory entry (erofs and Linux NAME_MAX).
inline constexpr size_t kMaxNameBytes = 255;
// Longest symlink target (Linux PATH_MAX without the terminating NUL).
inline constexpr size_t kMaxSymlinkBytes = 4095;

enum class InodeType : uint8_t {
  kRegular,
  kDirectory,
  kSymlink,
  kCharDevice,
  kBlockDevice,
  kFifo,
};

struct Xattr {
  std::string name;   // full name, e.g. "security.capability"
  std::string value;  // raw bytes
};

struct Inode;

// One name in a directory. Hardlinks are several Dentries sharing an Inode.
struct Dentry {
  std::shared_ptr<Inode> inode;
  // Index of the layer that last wrote this name; an opaque-directory marker
  // removes only names written by earlier layers.
  uint32_t layer = 0;
};

struct Inode {
  InodeType type = InodeType::kRegular;
  uint32_t permissions = 0;  // the 07777 bits, setuid/setgid/sticky included
  uint32_t uid = 0;
  uint32_t gid = 0;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
  std::vector<Xattr> xattrs;  // sorted by name, names unique

  // kRegular: content length, and where the content starts in the spool
  // (block aligned; meaningless when size is 0).
  uint64_t size = 0;
  uint64_t spool_offset = 0;
  // kSymlink
  std::string symlink_target;
  // kCharDevice / kBlockDevice
  uint32_t rdev_major = 0;
  uint32_t rdev_minor = 0;
  // kDirectory. std::string ordering is byte-wise (unsigned), the order erofs
  // requires for directory entries.
  std::map<std::string, Dentry, std::less<>> children;
};

class Tree {
 public:
  // Creates an empty tree (a root directory 0755 root:root) whose spool file
  // is created inside work_dir, which must exist.
  static Result<Tree> Create(const std::string& work_dir);

  Tree(Tree&&) noexcept = default;
  Tree& operator=(Tree&&) noexcept = default;
  Tree(const Tree&) = delete;
  Tree& operator=(const Tree&) = delete;

  const Inode& root() const { return *root_; }
  Inode& root() { return *root_; }

  // Reserves a block-aligned region of the spool for `size` bytes of file
  // content and returns its offset. Offsets start at 4096: block 0 of the
  // spool mirrors block 0 of the image (the superblock), so spool offsets
  // are image offsets.
  uint64_t ReserveSpool(uint64_t size);
  int spool_fd() const { return spool_fd_.Get(); }
  // End of the last reserved region (block aligned).
  uint64_t spool_end() const { return spool_end_; }

  // Counters every applied layer adds to, checked against Limits.
  uint32_t layers_applied = 0;
  uint64_t entries_applied = 0;
  uint64_t content_bytes = 0;  // declared entry data sizes (see Limits)

 private:
  Tree() = default;

  std::shared_ptr<Inode> root_;
  UniqueFd spool_fd_;
  uint64_t spool_end_ = kBlockSize;
};

}  // namespace cella::rootfs
