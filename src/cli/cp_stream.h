// `cella cp SANDBOX:PATH -` and `cella cp - SANDBOX:DIR` (docker's): a tar
// stream on stdout / stdin. The copy itself goes through a private host
// directory and the `cp` engine (host/sandbox/copy.h), which keeps every
// guest-named path beneath its destination; these two only turn that
// directory into a tar stream and back.
#pragma once

#include <string>

#include "base/result.h"

namespace cella::cli {

// Writes `dir`/`entry` (a file, a symlink or a whole tree; symlinks are
// archived as links, never followed) as a POSIX tar to `fd`, with member
// names starting at `entry`.
Status WriteTarOf(const std::string& dir, const std::string& entry, int fd);

// Extracts the tar read from `fd` beneath `dir` (which must exist). Hostile
// archives are contained: absolute names, ".." components and paths through
// symlinks are refused (libarchive's secure extraction), devices and fifos
// are skipped, owners are not applied, setuid/setgid bits are dropped. A
// hard-link member becomes a hard link to its target, which must be a
// regular file extracted earlier, reached without any symlink or "..".
// Returns how many hard links it made (the copy into the guest makes them
// separate files: the caller says so).
Result<int> ExtractTarInto(int fd, const std::string& dir);

// Removes `dir` (a staging directory of this process) when this process
// ends however it ends, Ctrl-C and kill -9 included: a small forked
// process waits on a pipe only we hold and removes it at EOF. Call it before
// any thread is started. The directory is also removed normally by whoever
// made it; this is the net for the ways that code never runs.
Status RemoveWhenProcessEnds(const std::string& dir);

}  // namespace cella::cli
