#include "host/rootfs/erofs_writer.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/unique_fd.h"

namespace cella::rootfs {

namespace {

static_assert(std::endian::native == std::endian::little,
              "erofs is little-endian; the writer stores host integers as-is");

// On-disk constants from the kernel's fs/erofs/erofs_fs.h.
constexpr uint32_t kSuperMagic = 0xE0F5E1E2;
constexpr uint64_t kSuperOffset = 1024;
constexpr uint32_t kBlockBits = 12;
constexpr uint32_t kExtendedInodeSize = 64;
constexpr uint32_t kXattrHeaderSize = 12;
constexpr uint32_t kDirentSize = 12;
constexpr uint32_t kNidUnit = 32;  // nid = byte offset in the metadata area / 32
constexpr uint16_t kLayoutFlatPlain = 0;
constexpr uint16_t kLayoutFlatInline = 2;
constexpr uint16_t kInodeLayoutExtended = 1;

// Directory entry file types (the kernel's FT_*).
enum class FileType : uint8_t {
  kRegular = 1,
  kDirectory = 2,
  kCharDevice = 3,
  kBlockDevice = 4,
  kFifo = 5,
  kSymlink = 7,
};

constexpr size_t kFlushBytes = 4u << 20;

uint64_t RoundUp(uint64_t v, uint64_t unit) { return (v + unit - 1) / unit * unit; }

template <class T>
void Put(std::byte* at, T value) {
  std::memcpy(at, &value, sizeof(value));
}

FileType FileTypeOf(InodeType type) {
  switch (type) {
    case InodeType::kRegular:
      return FileType::kRegular;
    case InodeType::kDirectory:
      return FileType::kDirectory;
    case InodeType::kSymlink:
      return FileType::kSymlink;
    case InodeType::kCharDevice:
      return FileType::kCharDevice;
    case InodeType::kBlockDevice:
      return FileType::kBlockDevice;
    case InodeType::kFifo:
      return FileType::kFifo;
  }
  return FileType::kRegular;
}

uint16_t ModeOf(const Inode& inode) {
  uint32_t type = 0;
  switch (inode.type) {
    case InodeType::kRegular:
      type = S_IFREG;
      break;
    case InodeType::kDirectory:
      type = S_IFDIR;
      break;
    case InodeType::kSymlink:
      type = S_IFLNK;
      break;
    case InodeType::kCharDevice:
      type = S_IFCHR;
      break;
    case InodeType::kBlockDevice:
      type = S_IFBLK;
      break;
    case InodeType::kFifo:
      type = S_IFIFO;
      break;
  }
  return static_cast<uint16_t>(type | (inode.permissions & 07777));
}

// erofs xattr name index and the part of the name stored after it.
struct XattrKey {
  uint8_t index;
  std::string_view suffix;
};

Result<XattrKey> XattrKeyOf(std::string_view name) {
  if (name == "system.posix_acl_access") return XattrKey{2, {}};
  if (name == "system.posix_acl_default") return XattrKey{3, {}};
  struct Prefix {
    std::string_view text;
    uint8_t index;
  };
  for (Prefix p : {Prefix{"user.", 1}, Prefix{"trusted.", 4}, Prefix{"security.", 6}}) {
    if (name.substr(0, p.text.size()) == p.text)
      return XattrKey{p.index, name.substr(p.text.size())};
  }
  return Fail("xattr \"" + std::string(name) + "\": namespace erofs cannot store");
}

uint32_t XattrEntrySize(const XattrKey& key, const Xattr& xattr) {
  return static_cast<uint32_t>(RoundUp(4 + key.suffix.size() + xattr.value.size(), 4));
}

// One directory entry as erofs stores it, in the kernel's sort order.
struct DirEntry {
  std::string_view name;
  const Inode* inode;  // the entry's target ("." = the dir, ".." = its parent)
};

// Children plus "." and "..", merged into byte-wise order.
std::vector<DirEntry> SortedDirEntries(const Inode& dir, const Inode& parent) {
  std::vector<DirEntry> out;
  out.reserve(dir.children.size() + 2);
  DirEntry dots[2] = {{".", &dir}, {"..", &parent}};
  size_t next_dot = 0;
  for (const auto& [name, dentry] : dir.children) {
    while (next_dot < 2 && dots[next_dot].name < std::string_view(name))
      out.push_back(dots[next_dot++]);
    out.push_back({name, dentry.inode.get()});
  }
  while (next_dot < 2) out.push_back(dots[next_dot++]);
  return out;
}

// Directory size in bytes: full blocks plus the used part of the last one.
// Entries never straddle blocks: each block holds dirents then their names.
uint64_t DirSize(const std::vector<DirEntry>& entries) {
  uint64_t full_blocks = 0;
  uint64_t used = 0;
  for (const DirEntry& e : entries) {
    uint64_t need = kDirentSize + e.name.size();
    if (used + need > kBlockSize) {
      ++full_blocks;
      used = 0;
    }
    used += need;
  }
  return full_blocks * kBlockSize + used;
}

struct Planned {
  const Inode* inode = nullptr;
  const Inode* parent = nullptr;  // directories: for ".."
  uint32_t nlink = 0;
  uint64_t nid = 0;
  uint64_t size = 0;
  uint16_t layout = kLayoutFlatPlain;
  uint32_t xattr_size = 0;   // inline xattr area, header included; 0 = none
  uint32_t inline_size = 0;  // tail bytes stored right after the xattrs
  uint64_t extra_blocks = 0;
  uint64_t blkaddr = 0;
};

// Writes at increasing offsets through a buffer; gaps become zeros. Hashes
// what it writes (FNV-1a) to derive a deterministic UUID.
class SequentialWriter {
 public:
  SequentialWriter(int fd, uint64_t start) : fd_(fd), buf_start_(start) {}

  Status WriteAt(uint64_t offset, std::span<const std::byte> data) {
    uint64_t end = buf_start_ + buf_.size();
    if (offset < end) return Fail("erofs writer: internal error, overlapping write");
    if (offset - end > kFlushBytes) {
      CELLA_TRY(Flush());
      buf_start_ = offset;
    } else {
      buf_.resize(buf_.size() + (offset - end));
    }
    buf_.insert(buf_.end(), data.begin(), data.end());
    if (buf_.size() >= kFlushBytes) CELLA_TRY(Flush());
    return {};
  }

  Status Flush() {
    for (std::byte b : buf_) hash_ = (hash_ ^ static_cast<uint8_t>(b)) * 0x100000001b3ull;
    size_t done = 0;
    while (done < buf_.size()) {
      ssize_t n = ::pwrite(fd_, buf_.data() + done, buf_.size() - done,
                           static_cast<off_t>(buf_start_ + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return FailErrno("pwrite image");
      }
      done += static_cast<size_t>(n);
    }
    buf_start_ += buf_.size();
    buf_.clear();
    return {};
  }

  uint64_t hash() const { return hash_; }

 private:
  int fd_;
  uint64_t buf_start_;
  std::vector<std::byte> buf_;
  uint64_t hash_ = 0xcbf29ce484222325ull;
};

Status CopyRange(int from, int to, uint64_t offset, uint64_t length) {
  loff_t in = static_cast<loff_t>(offset);
  loff_t out = static_cast<loff_t>(offset);
  while (length > 0) {
    ssize_t n = ::copy_file_range(from, &in, to, &out, length, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) break;
      return FailErrno("copy_file_range spool -> image");
    }
    if (n == 0) return {};  // past the spool's end: a trailing hole, already zeros
    length -= static_cast<uint64_t>(n);
  }
  // Fallback when the kernel cannot copy between these files.
  std::vector<char> buf(std::min<uint64_t>(length, 1 << 20));
  while (length > 0) {
    ssize_t n = ::pread(from, buf.data(), std::min<uint64_t>(length, buf.size()), in);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno("pread spool");
    }
    if (n == 0) return {};
    ssize_t done = 0;
    while (done < n) {
      ssize_t w = ::pwrite(to, buf.data() + done, static_cast<size_t>(n - done), out + done);
      if (w < 0) {
        if (errno == EINTR) continue;
        return FailErrno("pwrite image");
      }
      done += w;
    }
    in += n;
    out += n;
    length -= static_cast<uint64_t>(n);
  }
  return {};
}

class ErofsWriter {
 public:
  ErofsWriter(const Tree& tree, int fd) : tree_(tree), fd_(fd) {}

  Result<ImageStats> Write() {
    Plan();
    CELLA_TRY(PlanSizes());
    PlanMetadata();
    CELLA_TRY(PlanBlocks());
    CELLA_TRY(CopyContents());
    CELLA_TRY(WriteExtraAndMetadata());
    CELLA_TRY(WriteSuperblock());
    stats_.inodes = planned_.size();
    stats_.blocks = total_blocks_;
    stats_.image_bytes = total_blocks_ * kBlockSize;
    return stats_;
  }

 private:
  // Numbers inodes breadth-first from the root (a directory's children get
  // neighbouring inodes) and counts links.
  void Plan() {
    auto visit = [&](const Inode* inode, const Inode* parent) {
      auto [it, inserted] = index_.try_emplace(inode, static_cast<uint32_t>(planned_.size()));
      if (inserted) planned_.push_back(Planned{.inode = inode, .parent = parent});
      ++planned_[it->second].nlink;
    };
    visit(&tree_.root(), &tree_.root());
    for (size_t i = 0; i < planned_.size(); ++i) {
      const Inode* dir = planned_[i].inode;
      if (dir->type != InodeType::kDirectory) continue;
      planned_[i].nlink = 2;
      for (const auto& [name, dentry] : dir->children) {
        visit(dentry.inode.get(), dir);
        if (dentry.inode->type == InodeType::kDirectory) ++planned_[i].nlink;
      }
    }
  }

  Status PlanSizes() {
    for (Planned& p : planned_) {
      const Inode& inode = *p.inode;
      if (!inode.xattrs.empty()) {
        uint64_t size = kXattrHeaderSize;
        for (const Xattr& x : inode.xattrs)
          size += XattrEntrySize(CELLA_TRY(XattrKeyOf(x.name)), x);
        if (size > kXattrHeaderSize + 4ull * 65534) return Fail("xattrs too large for one inode");
        p.xattr_size = static_cast<uint32_t>(size);
      }
      uint64_t fixed = kExtendedInodeSize + p.xattr_size;
      switch (inode.type) {
        case InodeType::kDirectory: {
          p.size = DirSize(SortedDirEntries(inode, *p.parent));
          uint64_t tail = p.size % kBlockSize == 0 ? kBlockSize : p.size % kBlockSize;
          if (fixed + tail <= kBlockSize) {
            p.layout = kLayoutFlatInline;
            p.inline_size = static_cast<uint32_t>(tail);
            p.extra_blocks = (p.size - tail) / kBlockSize;
          } else {
            p.extra_blocks = RoundUp(p.size, kBlockSize) / kBlockSize;
          }
          ++stats_.directories;
          break;
        }
        case InodeType::kSymlink:
          p.size = inode.symlink_target.size();
          if (fixed + p.size <= kBlockSize) {
            p.layout = kLayoutFlatInline;
            p.inline_size = static_cast<uint32_t>(p.size);
          } else {
            p.extra_blocks = 1;
          }
          break;
        case InodeType::kRegular:
          p.size = inode.size;
          if (p.size > 0) p.blkaddr = inode.spool_offset / kBlockSize;
          stats_.content_bytes += p.size;
          ++stats_.regular_files;
          break;
        default:
          break;
      }
    }
    return {};
  }

  // Places inodes in the metadata area; an inode with inline data must not
  // cross a block boundary together with that data (the kernel refuses it).
  void PlanMetadata() {
    uint64_t pos = 0;
    for (Planned& p : planned_) {
      uint64_t total = kExtendedInodeSize + p.xattr_size + p.inline_size;
      if (total > kBlockSize || pos % kBlockSize + total > kBlockSize) {
        pos = RoundUp(pos, kBlockSize);
      }
      p.nid = pos / kNidUnit;
      pos += RoundUp(total, kNidUnit);
    }
    meta_bytes_ = pos;
  }

  Status PlanBlocks() {
    uint64_t next = std::max<uint64_t>(tree_.spool_end() / kBlockSize, 1);
    for (Planned& p : planned_) {
      if (p.extra_blocks == 0) continue;
      p.blkaddr = next;
      next += p.extra_blocks;
    }
    meta_blkaddr_ = next;
    total_blocks_ = meta_blkaddr_ + RoundUp(meta_bytes_, kBlockSize) / kBlockSize;
    if (total_blocks_ > UINT32_MAX) return Fail("image would exceed 2^32 blocks");
    if (::ftruncate(fd_, static_cast<off_t>(total_blocks_ * kBlockSize)) != 0) {
      return FailErrno("ftruncate image");
    }
    return {};
  }

  // Copies live file contents block-aligned from the spool; adjacent files
  // go in one copy_file_range. Dead (overwritten/deleted) content is skipped
  // and stays a hole.
  Status CopyContents() {
    std::vector<std::pair<uint64_t, uint64_t>> extents;  // offset, length
    for (const Planned& p : planned_) {
      if (p.inode->type == InodeType::kRegular && p.inode->size > 0) {
        extents.emplace_back(p.inode->spool_offset, p.inode->size);
      }
    }
    std::sort(extents.begin(), extents.end());
    uint64_t run_start = 0, run_end = 0;
    for (auto [offset, length] : extents) {
      if (run_end != 0 && offset <= RoundUp(run_end, kBlockSize)) {
        run_end = std::max(run_end, offset + length);
        continue;
      }
      if (run_end != 0) CELLA_TRY(CopyRange(tree_.spool_fd(), fd_, run_start, run_end - run_start));
      run_start = offset;
      run_end = offset + length;
    }
    if (run_end != 0) CELLA_TRY(CopyRange(tree_.spool_fd(), fd_, run_start, run_end - run_start));
    return {};
  }

  uint64_t NidOf(const Inode* inode) const { return planned_[index_.at(inode)].nid; }

  std::vector<std::byte> DirContent(const Planned& p) const {
    std::vector<DirEntry> entries = SortedDirEntries(*p.inode, *p.parent);
    std::vector<std::byte> out(p.size);
    size_t i = 0;
    for (uint64_t block = 0; i < entries.size(); block += kBlockSize) {
      size_t first = i;
      uint64_t used = 0;
      while (i < entries.size() && used + kDirentSize + entries[i].name.size() <= kBlockSize) {
        used += kDirentSize + entries[i].name.size();
        ++i;
      }
      uint64_t nameoff = (i - first) * kDirentSize;
      for (size_t k = first; k < i; ++k) {
        std::byte* d = out.data() + block + (k - first) * kDirentSize;
        Put<uint64_t>(d, NidOf(entries[k].inode));
        Put<uint16_t>(d + 8, static_cast<uint16_t>(nameoff));
        Put<uint8_t>(d + 10, static_cast<uint8_t>(FileTypeOf(entries[k].inode->type)));
        std::memcpy(out.data() + block + nameoff, entries[k].name.data(), entries[k].name.size());
        nameoff += entries[k].name.size();
      }
    }
    return out;
  }

  Status WriteExtraAndMetadata() {
    SequentialWriter extra(fd_, std::max<uint64_t>(tree_.spool_end() / kBlockSize, 1) * kBlockSize);
    SequentialWriter meta(fd_, meta_blkaddr_ * kBlockSize);
    uint32_t ino = 0;
    for (const Planned& p : planned_) {
      const Inode& inode = *p.inode;
      std::vector<std::byte> content;  // directory blocks or symlink target
      if (inode.type == InodeType::kDirectory) {
        content = DirContent(p);
      } else if (inode.type == InodeType::kSymlink) {
        auto bytes = std::as_bytes(std::span(inode.symlink_target));
        content.assign(bytes.begin(), bytes.end());
      }
      uint64_t in_blocks = content.size() - p.inline_size;
      if (p.extra_blocks > 0) {
        CELLA_TRY(extra.WriteAt(p.blkaddr * kBlockSize, std::span(content).first(in_blocks)));
      }

      std::vector<std::byte> record(kExtendedInodeSize + p.xattr_size + p.inline_size);
      std::byte* r = record.data();
      Put<uint16_t>(r + 0, static_cast<uint16_t>(kInodeLayoutExtended | (p.layout << 1)));
      Put<uint16_t>(r + 2, static_cast<uint16_t>(
                               p.xattr_size == 0 ? 0 : (p.xattr_size - kXattrHeaderSize) / 4 + 1));
      Put<uint16_t>(r + 4, ModeOf(inode));
      Put<uint64_t>(r + 8, p.size);
      uint32_t i_u = static_cast<uint32_t>(p.blkaddr);
      if (inode.type == InodeType::kCharDevice || inode.type == InodeType::kBlockDevice) {
        // Linux new_encode_dev.
        i_u = (inode.rdev_minor & 0xff) | (inode.rdev_major << 8) |
              ((inode.rdev_minor & ~0xffu) << 12);
      }
      Put<uint32_t>(r + 16, i_u);
      Put<uint32_t>(r + 20, ++ino);
      Put<uint32_t>(r + 24, inode.uid);
      Put<uint32_t>(r + 28, inode.gid);
      Put<uint64_t>(r + 32, static_cast<uint64_t>(inode.mtime_sec));
      Put<uint32_t>(r + 40, inode.mtime_nsec);
      Put<uint32_t>(r + 44, p.nlink);
      build_time_ = std::max(build_time_, inode.mtime_sec);

      std::byte* x = r + kExtendedInodeSize + kXattrHeaderSize;  // header stays zero
      for (const Xattr& xattr : inode.xattrs) {
        XattrKey key = CELLA_TRY(XattrKeyOf(xattr.name));
        Put<uint8_t>(x, static_cast<uint8_t>(key.suffix.size()));
        Put<uint8_t>(x + 1, key.index);
        Put<uint16_t>(x + 2, static_cast<uint16_t>(xattr.value.size()));
        std::memcpy(x + 4, key.suffix.data(), key.suffix.size());
        std::memcpy(x + 4 + key.suffix.size(), xattr.value.data(), xattr.value.size());
        x += XattrEntrySize(key, xattr);
      }
      if (p.inline_size > 0) {
        std::memcpy(r + kExtendedInodeSize + p.xattr_size, content.data() + in_blocks,
                    p.inline_size);
      }
      CELLA_TRY(meta.WriteAt(meta_blkaddr_ * kBlockSize + p.nid * kNidUnit, record));
    }
    CELLA_TRY(extra.Flush());
    CELLA_TRY(meta.Flush());
    meta_hash_ = meta.hash();
    return {};
  }

  Status WriteSuperblock() {
    std::byte sb[128] = {};
    Put<uint32_t>(sb + 0, kSuperMagic);
    Put<uint8_t>(sb + 12, static_cast<uint8_t>(kBlockBits));
    Put<uint16_t>(sb + 14, static_cast<uint16_t>(planned_[0].nid));
    Put<uint64_t>(sb + 16, planned_.size());
    Put<uint64_t>(sb + 24, static_cast<uint64_t>(build_time_));
    Put<uint32_t>(sb + 36, static_cast<uint32_t>(total_blocks_));
    Put<uint32_t>(sb + 40, static_cast<uint32_t>(meta_blkaddr_));
    // UUID: derived from the metadata, so equal trees give equal images.
    uint64_t uuid_lo = meta_hash_;
    uint64_t uuid_hi = (meta_hash_ ^ total_blocks_) * 0x9e3779b97f4a7c15ull;
    Put<uint64_t>(sb + 48, uuid_lo);
    Put<uint64_t>(sb + 56, uuid_hi);
    size_t done = 0;
    while (done < sizeof(sb)) {
      ssize_t n =
          ::pwrite(fd_, sb + done, sizeof(sb) - done, static_cast<off_t>(kSuperOffset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return FailErrno("pwrite superblock");
      }
      done += static_cast<size_t>(n);
    }
    return {};
  }

  const Tree& tree_;
  int fd_;
  std::vector<Planned> planned_;
  std::unordered_map<const Inode*, uint32_t> index_;
  uint64_t meta_bytes_ = 0;
  uint64_t meta_blkaddr_ = 0;
  uint64_t total_blocks_ = 0;
  int64_t build_time_ = 0;
  uint64_t meta_hash_ = 0;
  ImageStats stats_;
};

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

Result<ImageStats> WriteErofs(const Tree& tree, const std::string& out_path,
                              const WriteOptions& options) {
  std::string temp = out_path + ".tmp-XXXXXX";
  int raw = ::mkostemp(temp.data(), O_CLOEXEC);
  if (raw < 0) return FailErrno("create temp image " + temp);
  UniqueFd fd(raw);
  auto result = [&]() -> Result<ImageStats> {
    if (::fchmod(fd.Get(), 0644) != 0) return FailErrno("fchmod " + temp);
    ImageStats stats = CELLA_TRY(ErofsWriter(tree, fd.Get()).Write());
    if (options.durability == Durability::kFsync && ::fsync(fd.Get()) != 0) {
      return FailErrno("fsync " + temp);
    }
    if (::rename(temp.c_str(), out_path.c_str()) != 0) {
      return FailErrno("rename " + temp + " -> " + out_path);
    }
    if (options.durability == Durability::kFsync) {
      std::string dir = DirName(out_path);
      UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!dir_fd) return FailErrno("open " + dir);
      if (::fsync(dir_fd.Get()) != 0) return FailErrno("fsync " + dir);
    }
    return stats;
  }();
  if (!result && ::access(temp.c_str(), F_OK) == 0 && ::unlink(temp.c_str()) != 0) {
    return std::unexpected(
        std::move(result.error()).WithContext("(also failed to remove " + temp + ")"));
  }
  return result;
}

}  // namespace cella::rootfs
