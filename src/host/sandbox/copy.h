// `cella cp`: copies files and trees between the host and a running guest
// through its agent, keeping modes (setuid/setgid/sticky included), numeric
// owners, mtimes (whole seconds) and symlinks (copied as links, never
// followed). Contents are streamed; nothing holds a whole file in memory.
//
// Destination rules (docker cp's):
//  - SRC a file or symlink: DST an existing directory -> DST/basename(SRC);
//    DST ending in '/' (or "/.") must be an existing directory, else an
//    error; otherwise DST is the new path and its parent must exist.
//  - SRC a directory: DST missing -> created as a copy of SRC (its parent
//    must exist); DST an existing directory -> DST/basename(SRC), merged
//    into what is there; SRC ending in "/." (or whose last component is "."
//    or "..", or "/") -> the contents of SRC go into DST, existing or created.
//    DST an existing non-directory -> an error.
//  - SRC itself is not followed if it is a symlink, unless it ends in '/' or
//    "/." (path resolution goes through it then).
//  - Devices, fifos and sockets are skipped, counted in CopyStats, not errors.
//  - Existing files are replaced (atomically: a temp file renamed over
//    them); an existing directory never is, a file onto it is an error.
//  - Guest paths are absolute (a missing leading '/' is added, as docker
//    does for container paths); host paths may be relative to the cwd.
//  - Hard links are copied as separate files; xattrs, ACLs and sub-second
//    mtimes are not kept.
//
// Trust: the guest is untrusted. Names it lists must be single components
// (no '/', not "." or ".."), unique within a directory; its symlinks are
// created on the host as links only, and everything below host_dst is
// reached through directory descriptors opened with O_NOFOLLOW, so no guest
// answer makes cella write outside host_dst. Trees are at most
// kMaxCopyDepth deep in either direction.
//
// Threading: one call uses the AgentClient from the calling thread only;
// other threads may use the same client meanwhile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/agent/client.h"

namespace cella::sandbox {

inline constexpr int kMaxCopyDepth = 256;
// Entries one copy out of a guest may create on the host (a hijacked agent
// must not be able to list without end).
inline constexpr uint64_t kMaxCopyEntries = 1'000'000;
inline constexpr size_t kMaxCopyWarnings = 100;

struct CopyStats {
  uint64_t files = 0, dirs = 0, symlinks = 0, bytes = 0;
  // Entries not copied: devices, fifos, sockets, names that are not UTF-8
  // (the protocol carries names as JSON strings), entries that vanished
  // while being copied. The first kMaxCopyWarnings are described in
  // warnings ("skipped <path>: <why>").
  uint64_t skipped = 0;
  std::vector<std::string> warnings;
};

enum class Ownership {
  // Numeric uid/gid as in the source (docker cp -a). The host side keeps
  // the caller's ownership, silently, where it may not chown (not root).
  // Only this mode, and only for a root caller, keeps setuid/setgid bits of
  // files copied out of a guest; otherwise they are dropped.
  kFromSource,
  // The copier's own: root in the guest, the caller on the host (docker
  // cp without -a).
  kDestinationDefault,
};

struct CopyOptions {
  Ownership ownership = Ownership::kFromSource;
};

Result<CopyStats> CopyToGuest(host::AgentClient& agent, const std::string& host_src,
                              const std::string& guest_dst, const CopyOptions& options = {});
Result<CopyStats> CopyFromGuest(host::AgentClient& agent, const std::string& guest_src,
                                const std::string& host_dst, const CopyOptions& options = {});

}  // namespace cella::sandbox
