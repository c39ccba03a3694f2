// Filesystem helpers for the guest init: mounting with errors that say what
// and where, directories created beneath a root without following symlinks
// (an image is untrusted: /data -> / must not redirect a volume), and files
// replaced atomically.
#pragma once

#include <sys/types.h>

#include <initializer_list>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::init {

// Every read-write ext4 this init mounts (writable layers, volumes, disks):
// no background zeroing of inode tables nor prefetch of block bitmaps. Under
// TCG both are kernel work in every fresh copy of a VM (a template's layer
// is mounted before the template point, so each clone would go on with its
// zeroing, and write it to its own copy of the disk); ext4 keeps
// uninitialised inode tables valid without it.
inline constexpr const char* kExt4MountOptions = "noinit_itable,no_prefetch_block_bitmaps";

// mount(2); the error names source, target and type.
Status Mount(const std::string& source, const std::string& target, const std::string& fstype,
             unsigned long flags, const std::string& data = {});

// Tries each filesystem type in order; returns the one that worked. The
// error lists every attempt.
Result<std::string> MountFirstOf(const std::string& source, const std::string& target,
                                 std::initializer_list<std::string_view> fstypes,
                                 unsigned long flags);

// mkdir -p for trusted paths (the initramfs). Existing directories are fine.
Status MkdirAll(const std::string& path, mode_t mode);

// Opens (creating as needed, mode 0755) the directory `guest_path` beneath
// the directory `root`, refusing symlinks and ".." on the way, so the result
// is always inside root. guest_path must be absolute.
Result<UniqueFd> OpenDirBeneath(const std::string& root, std::string_view guest_path);

// Opens (creating an empty one if missing) the regular file `guest_path`
// beneath root, refusing symlinks on the way and at the end: a mount point for
// a single-file share.
Result<UniqueFd> OpenFileBeneath(const std::string& root, const std::string& guest_path);

// "/proc/self/fd/N": names exactly the directory an fd refers to, for
// mount(2) targets that must not be re-resolved through symlinks.
std::string FdPath(int fd);

// Writes content to path via a temp file + rename, so a symlink at path is
// replaced rather than followed. Parent directories are created.
Status ReplaceFile(const std::string& path, std::string_view content, mode_t mode);
// Same, for the file `name` inside the directory dir_fd.
Status ReplaceFileAt(int dir_fd, const std::string& name, std::string_view content, mode_t mode);

// Writes to an existing file (sysfs, cgroupfs) without creating it.
Status WriteExisting(const std::string& path, std::string_view content);

Status CopyFile(const std::string& from, const std::string& to, mode_t mode);

}  // namespace cella::init
