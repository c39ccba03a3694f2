// Small checked wrappers around the I/O syscalls everything uses.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/env.h"
#include "base/result.h"
#include "base/unique_fd.h"

namespace cella {

// Writes all of data, retrying on EINTR and short writes (through
// Env::Current(), or `env`).
Status WriteAll(int fd, std::span<const std::byte> data);
Status WriteAll(Env& env, int fd, std::span<const std::byte> data);
Status WriteAll(int fd, std::string_view data);
// Reads exactly buf.size() bytes. Returns false (not an error) on EOF before
// the first byte; an error on EOF in the middle.
Result<bool> ReadExact(int fd, std::span<std::byte> buf);
// Reads up to buf.size() bytes once, retrying on EINTR. 0 means EOF.
Result<size_t> ReadSome(int fd, std::span<std::byte> buf);
Status SetNonBlocking(int fd, bool on);
Status SetCloexec(int fd, bool on);
// Reads a whole (small) file, refusing anything larger than max_bytes.
Result<std::string> ReadFileToString(const std::string& path, size_t max_bytes);
// Not atomic: a crash can leave the file empty or partial. For state that
// must survive a crash use WriteFileAtomically.
Status WriteStringToFile(const std::string& path, std::string_view data, mode_t mode);
// Replaces `path` with `data` so that after a crash at any point the file
// holds either the old or the new content: a unique temporary beside it,
// written, fsynced, renamed over `path`, then the directory fsynced. On
// failure the temporary is removed, `path` is untouched (unless only the
// final directory fsync failed: then the new content may or may not survive
// a crash), and the error names the step ("fsync <temp>", "rename ...").
Status WriteFileAtomically(const std::string& path, std::string_view data, mode_t mode,
                           Env& env = Env::Current());
// fsync of a directory (makes creations, renames and removals in it durable).
Status SyncDirectory(const std::string& dir, Env& env = Env::Current());
// For a connected Unix socket: succeeds only if the peer runs as our
// effective user or as root (SO_PEERCRED). The socket files are 0600 already;
// this holds even if a directory's mode is loosened or a file is passed on.
Status RequireTrustedPeer(int fd);
// The running program's own path (/proc/self/exe), e.g. to start cella's
// supervisor or find the guest binaries installed beside it.
Result<std::string> SelfExecutablePath();
// fsync of a directory, so a rename or create in it survives a crash.
Status FsyncDirectory(const std::string& dir);
// Every name in the directory open at `dirfd` except "." and ".." (the
// caller keeps dirfd); at most `max_names`, else E2BIG. `where` names the
// directory in errors.
Result<std::vector<std::string>> ReadDirectoryNames(int dirfd, const std::string& where,
                                                    size_t max_names);

}  // namespace cella
