// A FUSE file server for one host share: the guest kernel's FUSE requests
// (raw /dev/fuse messages, relayed by the guest agent over the agent link)
// answered from a host directory.
//
// The guest is hostile. What the server enforces, whatever it is sent:
//   - confinement: every path is resolved beneath the share root with
//     openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS),
//     so a symlink (planted by the guest or already there), `..`, or a rename
//     made behind the server's back never leads outside; symlinks are only
//     ever read (READLINK: the guest kernel resolves them in the guest).
//     Names with '/', ".", "..", NUL or longer than NAME_MAX are refused.
//     A hardlink can only be made to a node of this share.
//   - read-only (`ro` and `overlay` shares): every mutating request fails
//     EROFS and files are opened O_RDONLY, on the host, whatever the guest's
//     mount flags say.
//   - no setuid/setgid bits reach the host (stripped from every mode the
//     guest sets) and no device nodes (MKNOD of a char/block device: EPERM).
//     Files the guest creates belong to the user running the server, or with
//     owner_from_guest (cella runs as root) to the guest caller's uid/gid.
//   - bounds: one request in, one reply out (no queue here; the caller
//     handles a request at a time); reads are capped at kFuseMaxIo, READDIR
//     replies at kFuseMaxIo, the node table at kFuseMaxNodes (ENOMEM past
//     it), the handle table at kFuseMaxHandles (EMFILE), and at most
//     kFuseMaxOpenFds host descriptors are held (least recently used ones
//     are closed and reopened by path when next needed).
//
// Node ids are the server's own (1 = the root); a node is {parent, name,
// lookup count} and its host path is rebuilt from the chain of names on
// every access, so the table is plain data: SaveState/LoadState carry it
// (with the open handles: fh -> node + open flags) across standby, snapshot
// restore and fork, and the loaded server starts past INIT (the guest
// kernel's FUSE connection lives in the snapshot's memory). A node whose
// path has gone from the host answers ENOENT.
//
// Single-file shares: `single_file` names a file in `root`; the share's root
// node IS that file (the guest mounts FUSE with a regular-file rootmode right
// on its target), so its siblings are unreachable and nothing can be created,
// removed or renamed (ENOTDIR).
//
// Thread-safety: none; one thread drives a server.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::share {

// Largest READ/WRITE payload (negotiated as max_write; the guest kernel's
// default max_pages gives the same for reads).
inline constexpr uint32_t kFuseMaxIo = 128 * 1024;
// A request never exceeds this (header + write header + max_write): the
// relay's buffer size.
inline constexpr size_t kFuseMaxRequest = kFuseMaxIo + 4096;
inline constexpr size_t kFuseMaxNodes = 1 << 18;
inline constexpr size_t kFuseMaxHandles = 1 << 16;
inline constexpr size_t kFuseMaxOpenFds = 256;

struct FuseServerOptions {
  bool read_only = false;   // ro and overlay shares
  std::string single_file;  // non-empty: a single-file share of root/single_file
  // Non-empty (with single_file empty): the root directory shows only this
  // entry (a single-file overlay share: overlayfs needs a directory as its
  // lower); every other name in the root is ENOENT, READDIR lists only it,
  // and nothing in the root may be created, removed or renamed (EPERM).
  std::string only_entry;
  // Files the guest creates are given to the guest caller's uid/gid (what
  // virtiofsd does). Only meaningful when the server runs as root (cella
  // run as root); otherwise new files belong to the user running it.
  bool owner_from_guest = false;
};

class FuseServer {
 public:
  // Opens `root` (a directory, not followed if a symlink) as the share root.
  static Result<std::unique_ptr<FuseServer>> Open(const std::string& root,
                                                  FuseServerOptions options);
  ~FuseServer();
  FuseServer(const FuseServer&) = delete;
  FuseServer& operator=(const FuseServer&) = delete;

  // Answers one raw FUSE request (fuse_in_header + body, exactly as read from
  // /dev/fuse). Returns the reply (fuse_out_header + body) to write back, or
  // an empty vector for requests that take none (FORGET, BATCH_FORGET,
  // INTERRUPT). A malformed request gets an EINVAL reply when its header is
  // readable, nothing otherwise. Never fails as a whole.
  std::vector<std::byte> Handle(std::span<const std::byte> request);

  // True once INIT was answered (or state loaded); DESTROY clears it.
  bool initialized() const;

  // The node table and open handles as JSON (no descriptors: those are
  // reopened by path). LoadState replaces the current state with a saved one
  // and marks the server initialised; a malformed state fails and leaves the
  // server empty (only the root).
  std::string SaveState() const;
  Status LoadState(std::string_view json);

  // For tests: nodes in the table (root included) and host fds held.
  size_t node_count() const;
  size_t open_fd_count() const;

 private:
  struct Impl;
  explicit FuseServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cella::share
