// The built-in default image: a small root filesystem made from the host's
// static busybox, so `cella run -- echo hi` works offline with no image named.
//
// Contents: bin sbin etc tmp(1777) proc sys dev run root home var usr/bin
// usr/sbin, /bin/busybox plus one symlink per applet (`busybox --list-full`),
// /etc/passwd (root, nobody), /etc/group, /etc/os-release (ID=cella-busybox).
// Written as a read-only erofs image with mkfs.erofs (no root needed: owners
// forced to 0:0, mtimes fixed) and cached by the busybox binary's sha256 at
// <home>/images/default/<sha256>.erofs. Thread-safe; concurrent builders race
// benignly (temp dir + rename).
#pragma once

#include <string>

#include "base/result.h"

namespace cella::image {

inline constexpr const char* kHostBusybox = "/bin/busybox";

struct DefaultRootfs {
  std::string path;    // the erofs image
  bool built = false;  // false: it was already cached
};

// Returns the cached image, building it when missing. `busybox` must be a
// static binary (Debian's busybox-static): the image has no libc.
Result<DefaultRootfs> EnsureDefaultRootfs(const std::string& home,
                                          const std::string& busybox = kHostBusybox);

}  // namespace cella::image
