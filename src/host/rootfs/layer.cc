#include "host/rootfs/layer.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <string_view>

#include "base/unique_fd.h"

namespace cella::rootfs {

namespace {

constexpr std::string_view kWhiteoutPrefix = ".wh.";
constexpr std::string_view kWhiteoutMetaPrefix = ".wh..wh.";
constexpr std::string_view kOpaqueMarker = ".wh..wh..opq";
// Largest device numbers erofs can encode (Linux new_encode_dev: 12-bit
// major, 20-bit minor).
constexpr uint64_t kMaxDevMajor = 0xfff;
constexpr uint64_t kMaxDevMinor = 0xfffff;
constexpr size_t kMaxWarnings = 100;

struct ArchiveFree {
  void operator()(archive* a) const { archive_read_free(a); }
};
using ArchivePtr = std::unique_ptr<archive, ArchiveFree>;

std::string ArchiveError(archive* a) {
  const char* msg = archive_error_string(a);
  return msg != nullptr ? msg : "unknown libarchive error";
}

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

Status PwriteAll(int fd, const void* data, size_t size, uint64_t offset) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::pwrite(fd, p, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno("pwrite spool");
    }
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

// Checks an xattr name erofs can store with a short prefix index.
bool XattrNameSupported(std::string_view name) {
  for (std::string_view prefix : {"user.", "trusted.", "security."}) {
    if (StartsWith(name, prefix) && name.size() > prefix.size()) return true;
  }
  return name == "system.posix_acl_access" || name == "system.posix_acl_default";
}

class Applier {
 public:
  Applier(Tree& tree, const Limits& limits, archive* a)
      : tree_(tree), limits_(limits), archive_(a), layer_(tree.layers_applied + 1) {}

  Result<LayerStats> Run() {
    for (;;) {
      archive_entry* entry = nullptr;
      int r = archive_read_next_header(archive_, &entry);
      if (r == ARCHIVE_EOF) break;
      if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
        return Fail("reading layer after " + std::to_string(stats_.entries) +
                    " entries: " + ArchiveError(archive_));
      }
      const char* raw = archive_entry_pathname(entry);
      if (raw == nullptr) raw = archive_entry_pathname_utf8(entry);
      if (raw == nullptr)
        return Fail("layer entry " + std::to_string(stats_.entries) + ": no path");
      std::string path = raw;
      if (r == ARCHIVE_WARN) RecordWarning(path);
      if (tree_.entries_applied >= limits_.max_entries) {
        return Fail("layer entry \"" + path + "\": more than " +
                    std::to_string(limits_.max_entries) + " entries in the image (limit)");
      }
      ++tree_.entries_applied;
      ++stats_.entries;
      CELLA_TRY_CTX(ApplyEntry(entry, path), "layer entry \"" + path + "\"");
    }
    tree_.layers_applied = layer_;
    return std::move(stats_);
  }

 private:
  void RecordWarning(const std::string& path) {
    std::string message = ArchiveError(archive_);
    // In the C locale libarchive warns about every non-ASCII pax name, yet
    // hands over the name's raw bytes, which are exactly what the image
    // needs (Linux names are bytes).
    if (message.find("can't be converted from UTF-8") != std::string::npos) return;
    if (stats_.warnings.size() < kMaxWarnings) stats_.warnings.push_back(path + ": " + message);
  }

  // Walks to the directory holding the last component. Missing directories
  // are created (0755 root:root, as docker does) when `create` is set, else
  // nullptr is returned.
  Result<Inode*> WalkParent(const std::vector<std::string>& parts, bool create) {
    Inode* dir = &tree_.root();
    std::string walked;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      const std::string& name = parts[i];
      if (StartsWith(name, kWhiteoutPrefix)) {
        return Fail("directory component \"" + name + "\" uses the reserved whiteout prefix");
      }
      walked += (walked.empty() ? "" : "/") + name;
      auto it = dir->children.find(name);
      if (it == dir->children.end()) {
        if (!create) return nullptr;
        auto made = std::make_shared<Inode>();
        made->type = InodeType::kDirectory;
        made->permissions = 0755;
        it = dir->children.emplace(name, Dentry{std::move(made), layer_}).first;
      } else if (it->second.inode->type != InodeType::kDirectory) {
        return Fail(
            "path runs through \"" + walked + "\", which is " +
            (it->second.inode->type == InodeType::kSymlink ? "a symlink" : "not a directory") +
            " placed by an earlier entry; symlinks are never followed");
      }
      dir = it->second.inode.get();
    }
    return dir;
  }

  Result<std::shared_ptr<Inode>> FindHardlinkTarget(std::string_view target) {
    auto parts = CELLA_TRY_CTX(NormaliseLayerPath(target, limits_),
                               "hardlink target \"" + std::string(target) + "\"");
    if (parts.empty()) return Fail("hardlink target \"" + std::string(target) + "\" is the root");
    Inode* dir =
        CELLA_TRY_CTX(WalkParent(parts, false), "hardlink target \"" + std::string(target) + "\"");
    if (dir == nullptr) {
      return Fail("hardlink target \"" + std::string(target) + "\" does not exist");
    }
    auto it = dir->children.find(parts.back());
    if (it == dir->children.end()) {
      return Fail("hardlink target \"" + std::string(target) + "\" does not exist");
    }
    if (it->second.inode->type == InodeType::kDirectory) {
      return Fail("hardlink target \"" + std::string(target) + "\" is a directory");
    }
    return it->second.inode;
  }

  Status ReadXattrs(archive_entry* entry, Inode& inode) {
    if (archive_entry_acl_count(entry, ARCHIVE_ENTRY_ACL_TYPE_POSIX1E) > 0 ||
        archive_entry_acl_count(entry, ARCHIVE_ENTRY_ACL_TYPE_NFS4) > 0) {
      return Fail("carries ACLs, which are not supported");
    }
    size_t total = 0;
    int count = archive_entry_xattr_reset(entry);
    for (int i = 0; i < count; ++i) {
      const char* name = nullptr;
      const void* value = nullptr;
      size_t size = 0;
      if (archive_entry_xattr_next(entry, &name, &value, &size) != ARCHIVE_OK) break;
      if (name == nullptr) return Fail("xattr without a name");
      std::string_view name_view(name);
      if (!XattrNameSupported(name_view)) {
        return Fail("xattr \"" + std::string(name_view) + "\": namespace not supported");
      }
      total += name_view.size() + size;
      if (total > limits_.max_xattr_bytes) {
        return Fail("xattrs exceed " + std::to_string(limits_.max_xattr_bytes) + " bytes (limit)");
      }
      if (name_view.size() > 255 || size > 65535) {
        return Fail("xattr \"" + std::string(name_view) + "\" is too large for erofs");
      }
      Xattr xattr{std::string(name_view),
                  size > 0 ? std::string(static_cast<const char*>(value), size) : std::string()};
      auto pos = std::lower_bound(inode.xattrs.begin(), inode.xattrs.end(), xattr.name,
                                  [](const Xattr& x, const std::string& n) { return x.name < n; });
      if (pos != inode.xattrs.end() && pos->name == xattr.name) {
        *pos = std::move(xattr);  // a repeated name: the last one wins
      } else {
        inode.xattrs.insert(pos, std::move(xattr));
      }
    }
    return {};
  }

  Status ReadMetadata(archive_entry* entry, Inode& inode) {
    int64_t uid = archive_entry_uid(entry);
    int64_t gid = archive_entry_gid(entry);
    if (uid < 0 || uid >= UINT32_MAX || gid < 0 || gid >= UINT32_MAX) {
      return Fail("uid/gid out of range: " + std::to_string(uid) + "/" + std::to_string(gid));
    }
    inode.uid = static_cast<uint32_t>(uid);
    inode.gid = static_cast<uint32_t>(gid);
    inode.permissions = archive_entry_perm(entry) & 07777;
    if (archive_entry_mtime_is_set(entry)) {
      inode.mtime_sec = archive_entry_mtime(entry);
      long nsec = archive_entry_mtime_nsec(entry);
      inode.mtime_nsec = nsec >= 0 && nsec < 1'000'000'000 ? static_cast<uint32_t>(nsec) : 0;
    }
    return ReadXattrs(entry, inode);
  }

  // Charges an entry's declared data size to the content budget before any
  // of it is read: a header claiming terabytes fails here, at once. Data of
  // non-file entries (skipped by libarchive) counts too, since skipping a
  // compressed stream still means decompressing it.
  Result<uint64_t> ChargeDeclaredSize(archive_entry* entry) {
    int64_t declared = archive_entry_size_is_set(entry) ? archive_entry_size(entry) : 0;
    if (declared < 0) return Fail("negative size");
    uint64_t size = static_cast<uint64_t>(declared);
    if (size > limits_.max_content_bytes ||
        tree_.content_bytes + size > limits_.max_content_bytes) {
      return Fail("declares " + std::to_string(size) + " bytes; the image would exceed " +
                  std::to_string(limits_.max_content_bytes) + " bytes of content (limit)");
    }
    tree_.content_bytes += size;
    stats_.content_bytes += size;
    return size;
  }

  Status SpoolContent(uint64_t size, Inode& inode) {
    inode.size = size;
    if (size == 0) return {};
    inode.spool_offset = tree_.ReserveSpool(size);
    for (;;) {
      const void* block = nullptr;
      size_t length = 0;
      la_int64_t offset = 0;
      int r = archive_read_data_block(archive_, &block, &length, &offset);
      if (r == ARCHIVE_EOF) break;
      if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
        return Fail("reading content: " + ArchiveError(archive_));
      }
      if (offset < 0 || static_cast<uint64_t>(offset) > size ||
          length > size - static_cast<uint64_t>(offset)) {
        return Fail("content runs past the declared size " + std::to_string(size));
      }
      CELLA_TRY(PwriteAll(tree_.spool_fd(), block, length,
                          inode.spool_offset + static_cast<uint64_t>(offset)));
    }
    return {};
  }

  // A directory entry for an existing directory keeps its children and takes
  // the new entry's metadata (what tar/docker do for a re-listed directory).
  static void AdoptDirectoryMetadata(Inode& dir, Inode& from) {
    dir.permissions = from.permissions;
    dir.uid = from.uid;
    dir.gid = from.gid;
    dir.mtime_sec = from.mtime_sec;
    dir.mtime_nsec = from.mtime_nsec;
    dir.xattrs = std::move(from.xattrs);
  }

  // Puts `node` at dir/name: a directory over a directory merges (metadata
  // replaced, children kept); anything else replaces the old subtree.
  void Place(Inode& dir, const std::string& name, std::shared_ptr<Inode> node) {
    auto it = dir.children.find(name);
    if (it != dir.children.end() && node->type == InodeType::kDirectory &&
        it->second.inode->type == InodeType::kDirectory) {
      AdoptDirectoryMetadata(*it->second.inode, *node);
      it->second.layer = layer_;
      return;
    }
    dir.children.insert_or_assign(name, Dentry{std::move(node), layer_});
  }

  // Removes every name under `dir` that the current layer did not write.
  void PruneLowerEntries(Inode& dir) {
    for (auto it = dir.children.begin(); it != dir.children.end();) {
      if (it->second.layer != layer_) {
        it = dir.children.erase(it);
        continue;
      }
      if (it->second.inode->type == InodeType::kDirectory) PruneLowerEntries(*it->second.inode);
      ++it;
    }
  }

  Status ApplyWhiteout(const std::vector<std::string>& parts) {
    ++stats_.whiteouts;
    const std::string& name = parts.back();
    if (name == kOpaqueMarker) {
      Inode* dir = CELLA_TRY(WalkParent(parts, true));
      PruneLowerEntries(*dir);
      return {};
    }
    if (StartsWith(name, kWhiteoutMetaPrefix)) return {};  // aufs bookkeeping
    std::string victim = name.substr(kWhiteoutPrefix.size());
    if (victim.empty() || victim == "." || victim == "..") {
      return Fail("whiteout names no file");
    }
    Inode* dir = CELLA_TRY(WalkParent(parts, false));
    if (dir != nullptr) dir->children.erase(victim);
    return {};
  }

  Status ApplyEntry(archive_entry* entry, const std::string& path) {
    auto parts = CELLA_TRY(NormaliseLayerPath(path, limits_));
    uint64_t declared = CELLA_TRY(ChargeDeclaredSize(entry));
    if (!parts.empty() && StartsWith(parts.back(), kWhiteoutPrefix)) return ApplyWhiteout(parts);

    auto node = std::make_shared<Inode>();
    if (const char* link = archive_entry_hardlink(entry); link != nullptr) {
      ++stats_.hardlinks;
      if (parts.empty()) return Fail("a hardlink cannot replace the root");
      std::shared_ptr<Inode> target = CELLA_TRY(FindHardlinkTarget(link));
      Inode* dir = CELLA_TRY(WalkParent(parts, true));
      Place(*dir, parts.back(), std::move(target));
      return {};
    }

    CELLA_TRY(ReadMetadata(entry, *node));
    switch (archive_entry_filetype(entry)) {
      case AE_IFREG:
        node->type = InodeType::kRegular;
        ++stats_.regular_files;
        break;
      case AE_IFDIR:
        node->type = InodeType::kDirectory;
        ++stats_.directories;
        break;
      case AE_IFLNK: {
        node->type = InodeType::kSymlink;
        ++stats_.symlinks;
        const char* target = archive_entry_symlink(entry);
        if (target == nullptr) target = archive_entry_symlink_utf8(entry);
        if (target == nullptr || *target == '\0') return Fail("symlink without a target");
        node->symlink_target = target;
        if (node->symlink_target.size() > kMaxSymlinkBytes) {
          return Fail("symlink target longer than " + std::to_string(kMaxSymlinkBytes) + " bytes");
        }
        break;
      }
      case AE_IFCHR:
      case AE_IFBLK: {
        node->type = archive_entry_filetype(entry) == AE_IFCHR ? InodeType::kCharDevice
                                                               : InodeType::kBlockDevice;
        ++stats_.special_files;
        uint64_t major = archive_entry_rdevmajor(entry);
        uint64_t minor = archive_entry_rdevminor(entry);
        if (major > kMaxDevMajor || minor > kMaxDevMinor) {
          return Fail("device number " + std::to_string(major) + ":" + std::to_string(minor) +
                      " too large");
        }
        node->rdev_major = static_cast<uint32_t>(major);
        node->rdev_minor = static_cast<uint32_t>(minor);
        break;
      }
      case AE_IFIFO:
        node->type = InodeType::kFifo;
        ++stats_.special_files;
        break;
      default:
        return Fail("unsupported entry type " + std::to_string(archive_entry_filetype(entry)));
    }

    if (parts.empty()) {
      if (node->type != InodeType::kDirectory) return Fail("only a directory can be the root");
      AdoptDirectoryMetadata(tree_.root(), *node);
      return {};
    }
    Inode* dir = CELLA_TRY(WalkParent(parts, true));
    if (node->type == InodeType::kRegular) CELLA_TRY(SpoolContent(declared, *node));
    Place(*dir, parts.back(), std::move(node));
    return {};
  }

  Tree& tree_;
  const Limits& limits_;
  archive* archive_;
  uint32_t layer_;
  LayerStats stats_;
};

Result<ArchivePtr> NewReader() {
  ArchivePtr a(archive_read_new());
  if (!a) return Fail("archive_read_new failed");
  // WARN means "works through an external program": still correct.
  if (archive_read_support_filter_gzip(a.get()) < ARCHIVE_WARN ||
      archive_read_support_filter_zstd(a.get()) < ARCHIVE_WARN ||
      archive_read_support_format_tar(a.get()) != ARCHIVE_OK ||
      archive_read_support_format_empty(a.get()) != ARCHIVE_OK) {
    return Fail("configuring libarchive: " + ArchiveError(a.get()));
  }
  return a;
}

}  // namespace

Result<std::vector<std::string>> NormaliseLayerPath(std::string_view path, const Limits& limits) {
  if (path.size() > limits.max_path_bytes) {
    return Fail("path longer than " + std::to_string(limits.max_path_bytes) + " bytes (limit)");
  }
  std::vector<std::string> parts;
  size_t pos = 0;
  while (pos <= path.size()) {
    size_t end = path.find('/', pos);
    if (end == std::string_view::npos) end = path.size();
    std::string_view part = path.substr(pos, end - pos);
    pos = end + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      if (parts.empty()) return Fail("path escapes the image root with \"..\"");
      parts.pop_back();
      continue;
    }
    if (part.size() > kMaxNameBytes) {
      return Fail("path component longer than " + std::to_string(kMaxNameBytes) + " bytes");
    }
    parts.emplace_back(part);
  }
  return parts;
}

Result<LayerStats> ApplyLayer(Tree& tree, int fd, const Limits& limits) {
  ArchivePtr a = CELLA_TRY(NewReader());
  if (archive_read_open_fd(a.get(), fd, 1 << 20) != ARCHIVE_OK) {
    return Fail("opening layer: " + ArchiveError(a.get()));
  }
  return Applier(tree, limits, a.get()).Run();
}

Result<LayerStats> ApplyLayerFile(Tree& tree, const std::string& path, const Limits& limits) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open layer " + path);
  return CELLA_TRY_CTX(ApplyLayer(tree, fd.Get(), limits), "layer " + path);
}

Result<LayerStats> ApplyLayerBytes(Tree& tree, std::span<const std::byte> bytes,
                                   const Limits& limits) {
  ArchivePtr a = CELLA_TRY(NewReader());
  if (archive_read_open_memory(a.get(), bytes.data(), bytes.size()) != ARCHIVE_OK) {
    return Fail("opening layer: " + ArchiveError(a.get()));
  }
  return Applier(tree, limits, a.get()).Run();
}

}  // namespace cella::rootfs
