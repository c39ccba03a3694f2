// Applies OCI image layers (tar, tar+gzip, tar+zstd) to a Tree, in order,
// with OCI whiteouts. Layers are untrusted input: every entry is checked and
// a bad one fails the whole layer with an error naming the entry.
//
// Rules (docker/containerd semantics unless noted):
// - Paths are normalised: leading "/" stripped ("/a" -> "a"), "." and empty
//   components dropped, ".." pops a component; ".." above the root is an
//   error (containerd: "breakout").
// - Symlinks are never followed while applying. An entry whose parent path
//   runs through a symlink (or any non-directory) is an error. (containerd
//   would resolve the symlink inside the root instead; we refuse, so a layer
//   cannot aim a later write somewhere its own path does not say.)
// - ".wh.NAME" deletes NAME (and its subtree) from the parent, if present.
//   ".wh..wh..opq" makes the parent opaque: every name in it not written by
//   the current layer is removed. Other ".wh..wh.*" (aufs metadata) are
//   skipped. A non-final component starting with ".wh." is an error.
// - A directory entry over an existing directory updates its metadata and
//   keeps its children; any other entry replaces what was at its path.
// - Hardlinks must name an existing non-directory already in the tree
//   (earlier in this layer or in a lower one); the new name shares its inode.
//   Data carried by a hardlink entry (legal in pax, never produced by image
//   builders) is ignored.
// - Ownership comes from the numeric uid/gid of the header (never the host
//   user); modes keep setuid/setgid/sticky; xattrs (pax SCHILY.xattr.* and
//   LIBARCHIVE.xattr.*) are kept. POSIX/NFSv4 ACLs are refused (not
//   supported yet), as are xattr namespaces erofs cannot name without long
//   prefixes (anything but user., trusted., security. and the two
//   system.posix_acl_* names).
// - Device nodes and fifos are fine: they are only inodes inside the image,
//   nothing is created on the host.
// - File flags (chattr) are ignored.
// - Names are the raw bytes of the tar header (pax names are UTF-8). The
//   process must stay in the C locale or a UTF-8 one (cella never calls
//   setlocale): in another locale libarchive would convert names.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/rootfs/tree.h"

namespace cella::rootfs {

// Caps against hostile layers. Counted across every layer applied to a Tree.
struct Limits {
  uint64_t max_entries = 2'000'000;
  // Sum of the data sizes entries declare (file contents, overwritten and
  // deleted files included since they still cost spool space, plus data of
  // other entries that is skipped), checked before the data is read.
  uint64_t max_content_bytes = 64ull << 30;
  size_t max_path_bytes = 4096;
  // Total bytes of xattr names and values on one entry.
  size_t max_xattr_bytes = size_t{64} * 1024;
};

struct LayerStats {
  uint64_t entries = 0;
  uint64_t regular_files = 0;
  uint64_t directories = 0;
  uint64_t symlinks = 0;
  uint64_t hardlinks = 0;
  uint64_t special_files = 0;  // char/block devices and fifos
  uint64_t whiteouts = 0;      // ".wh.NAME" and opaque markers
  uint64_t content_bytes = 0;
  // libarchive warnings that did not stop reading, as "entry: message"
  // (at most 100).
  std::vector<std::string> warnings;
};

// Reads a layer from fd (its current position to EOF). Compression is
// detected from the content.
Result<LayerStats> ApplyLayer(Tree& tree, int fd, const Limits& limits);
Result<LayerStats> ApplyLayerFile(Tree& tree, const std::string& path, const Limits& limits);
Result<LayerStats> ApplyLayerBytes(Tree& tree, std::span<const std::byte> bytes,
                                   const Limits& limits);

// Normalises a layer path to its components (see the rules above). Exposed
// for tests.
Result<std::vector<std::string>> NormaliseLayerPath(std::string_view path, const Limits& limits);

}  // namespace cella::rootfs
