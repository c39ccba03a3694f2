// Opening a path beneath a directory without following any symlink.
//
// Every caller that resolves a path someone else controls (an archive entry,
// a guest-named directory, a host path a guest can rewrite) walks it one
// component at a time with O_NOFOLLOW instead of handing the whole string to
// the kernel: a symlink planted at any component is refused, never followed,
// and ".." is refused outright. openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)
// would do the read-only half in one call but cannot create the missing
// directories that extraction and mount points need, so one walk serves both.
#pragma once

#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella {

enum class MissingDirs {
  kFail,    // a missing component is an error (ENOENT)
  kCreate,  // missing directories are created with mode 0755 as the walk goes
};

// The directory `path` beneath `root_fd` ("a/b", "/a/b" and "" alike: the
// path is always taken relative to root_fd; "." and empty components are
// skipped). Every component must be a directory that is not a symlink.
// Errors name `what` and the component walked so far.
Result<UniqueFd> OpenDirBeneath(int root_fd, std::string_view path, MissingDirs missing,
                                std::string_view what);

// `path` beneath `root_fd` as an O_PATH descriptor (nothing is read, a FIFO
// does not block), of whatever type, its parents walked as OpenDirBeneath
// with MissingDirs::kFail; a symlink at the last component is refused too.
// An empty path (or "/") gives root_fd itself, duplicated.
Result<UniqueFd> OpenPathBeneath(int root_fd, std::string_view path, std::string_view what);

}  // namespace cella
