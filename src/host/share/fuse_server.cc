#include "host/share/fuse_server.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <functional>
#include <list>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>

#include "base/unique_fd.h"

namespace cella::share {
namespace {

constexpr uint64_t kRootId = FUSE_ROOT_ID;
// "No stale cache longer than a second" (issue 16): entries and attributes
// are valid for one second in the guest.
constexpr uint64_t kValidSeconds = 1;
constexpr uint32_t kModeBitsAllowed = 0777 | S_ISVTX;  // never setuid/setgid

int OpenAt2(int dirfd, const char* path, int flags, mode_t mode) {
  struct open_how how {};
  how.flags = static_cast<uint64_t>(flags) | O_CLOEXEC;
  how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS;
  long fd;
  do {
    fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
  } while (fd < 0 && (errno == EINTR || errno == EAGAIN));
  return static_cast<int>(fd);
}

bool ValidName(std::string_view name) {
  if (name.empty() || name.size() > NAME_MAX || name == "." || name == "..") return false;
  return name.find('/') == std::string_view::npos && name.find('\0') == std::string_view::npos;
}

std::string ProcFd(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

// Names in the saved state are hex: a guest may name files with any bytes
// but '/' and NUL, and JSON strings must be UTF-8.
std::string Hex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out += kDigits[c >> 4];
    out += kDigits[c & 15];
  }
  return out;
}
std::optional<std::string> Unhex(std::string_view hex) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (hex.size() % 2 != 0) return std::nullopt;
  std::string out;
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi << 4 | lo);
  }
  return out;
}

void FillAttr(const struct stat& st, fuse_attr* attr) {
  *attr = {};
  attr->ino = st.st_ino;
  attr->size = static_cast<uint64_t>(st.st_size);
  attr->blocks = static_cast<uint64_t>(st.st_blocks);
  attr->atime = static_cast<uint64_t>(st.st_atim.tv_sec);
  attr->mtime = static_cast<uint64_t>(st.st_mtim.tv_sec);
  attr->ctime = static_cast<uint64_t>(st.st_ctim.tv_sec);
  attr->atimensec = static_cast<uint32_t>(st.st_atim.tv_nsec);
  attr->mtimensec = static_cast<uint32_t>(st.st_mtim.tv_nsec);
  attr->ctimensec = static_cast<uint32_t>(st.st_ctim.tv_nsec);
  attr->mode = st.st_mode;
  attr->nlink = static_cast<uint32_t>(st.st_nlink);
  attr->uid = st.st_uid;
  attr->gid = st.st_gid;
  attr->rdev = static_cast<uint32_t>(st.st_rdev);
  attr->blksize = static_cast<uint32_t>(st.st_blksize);
}

// Reads request bodies: a cursor over the bytes after the header.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> body) : body_(body) {}
  template <class T>
  std::optional<T> Struct() {
    if (body_.size() - pos_ < sizeof(T)) return std::nullopt;
    T value;
    std::memcpy(&value, body_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  // A NUL-terminated string (the NUL must be inside the body).
  std::optional<std::string_view> CString() {
    const char* start = reinterpret_cast<const char*>(body_.data()) + pos_;
    size_t left = body_.size() - pos_;
    const void* nul = std::memchr(start, 0, left);
    if (!nul) return std::nullopt;
    size_t len = static_cast<size_t>(static_cast<const char*>(nul) - start);
    pos_ += len + 1;
    return std::string_view(start, len);
  }
  std::span<const std::byte> Rest() const { return body_.subspan(pos_); }

 private:
  std::span<const std::byte> body_;
  size_t pos_ = 0;
};

struct Node {
  uint64_t parent = 0;  // 0: detached (removed or replaced), only its handles still work
  std::string name;
  uint64_t lookups = 0;
  uint64_t handles = 0;  // open handles on it (kept while > 0: reopen by path needs it)
};

struct OpenHandle {
  uint64_t node = 0;
  int flags = 0;  // host open flags (no O_CREAT/O_TRUNC/O_EXCL when reopening)
  bool dir = false;
  UniqueFd fd;  // may be closed (LRU); reopened by path
  std::list<uint64_t>::iterator lru;
  bool in_lru = false;
};

}  // namespace

struct FuseServer::Impl {
  UniqueFd root;
  FuseServerOptions options;
  bool initialized = false;
  std::unordered_map<uint64_t, Node> nodes;
  std::map<std::pair<uint64_t, std::string>, uint64_t> by_name;
  uint64_t next_node = kRootId + 1;
  std::unordered_map<uint64_t, OpenHandle> handles;
  uint64_t next_fh = 1;
  std::list<uint64_t> lru;  // fhs with an open fd, most recent first
  size_t fds_open = 0;

  void Reset() {
    nodes.clear();
    by_name.clear();
    handles.clear();
    lru.clear();
    fds_open = 0;
    nodes[kRootId] = Node{kRootId, "", 1};
    next_node = kRootId + 1;
    next_fh = 1;
  }

  // The node's path relative to the root ("" for the root), or an errno.
  std::expected<std::string, int> PathOf(uint64_t id) const {
    // A single-file share's root is the file itself; nothing is beneath it.
    if (!options.single_file.empty()) {
      if (id == kRootId) return options.single_file;
      return std::unexpected(ESTALE);
    }
    std::vector<const std::string*> parts;
    uint64_t cur = id;
    for (size_t depth = 0; cur != kRootId; ++depth) {
      auto it = nodes.find(cur);
      if (it == nodes.end()) return std::unexpected(ESTALE);
      if (it->second.parent == 0) return std::unexpected(ENOENT);
      if (depth > 4096) return std::unexpected(ELOOP);
      parts.push_back(&it->second.name);
      cur = it->second.parent;
    }
    std::string path;
    for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
      if (!path.empty()) path += '/';
      path += **it;
    }
    return path;
  }

  // An O_PATH descriptor of the node (a final symlink is the link itself).
  std::expected<UniqueFd, int> OpenNodePath(uint64_t id, bool want_dir = false) {
    auto path = PathOf(id);
    if (!path) return std::unexpected(path.error());
    int flags = O_PATH | O_NOFOLLOW | (want_dir ? O_DIRECTORY : 0);
    int fd = OpenAt2(root.Get(), path->empty() ? "." : path->c_str(), flags, 0);
    if (fd < 0) return std::unexpected(errno);
    return UniqueFd(fd);
  }

  std::expected<struct stat, int> StatNode(uint64_t id) {
    auto fd = OpenNodePath(id);
    if (!fd) return std::unexpected(fd.error());
    struct stat st;
    if (fstatat(fd->Get(), "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0)
      return std::unexpected(errno);
    return st;
  }

  // The child `name` of `parent` must be visible to the guest.
  int CheckChild(uint64_t parent, std::string_view name) const {
    if (!ValidName(name)) return EINVAL;
    if (!options.single_file.empty()) return ENOTDIR;
    if (!options.only_entry.empty() && parent == kRootId && name != options.only_entry)
      return ENOENT;
    return 0;
  }
  // A mutation of the directory `parent` (creating, removing, renaming).
  int CheckMutateIn(uint64_t parent) const {
    if (!options.single_file.empty()) return ENOTDIR;
    if (!options.only_entry.empty() && parent == kRootId) return EPERM;
    if (options.read_only) return EROFS;
    return 0;
  }

  // Looks up (or adds) the node for parent/name and counts one lookup.
  std::expected<uint64_t, int> Remember(uint64_t parent, const std::string& name) {
    auto key = std::make_pair(parent, name);
    auto it = by_name.find(key);
    if (it != by_name.end()) {
      ++nodes[it->second].lookups;
      return it->second;
    }
    if (nodes.size() >= kFuseMaxNodes) return std::unexpected(ENOMEM);
    uint64_t id = next_node++;
    nodes[id] = Node{parent, name, 1};
    by_name[key] = id;
    return id;
  }

  void Detach(uint64_t parent, const std::string& name) {
    auto it = by_name.find({parent, name});
    if (it == by_name.end()) return;
    nodes[it->second].parent = 0;
    by_name.erase(it);
  }

  void Forget(uint64_t id, uint64_t n) {
    if (id == kRootId) return;
    auto it = nodes.find(id);
    if (it == nodes.end()) return;
    it->second.lookups -= std::min(n, it->second.lookups);
    if (it->second.lookups > 0) return;
    // Kept while a handle refers to it (reopen by path needs the chain),
    // and while it is the parent of a remembered node.
    if (it->second.handles > 0) return;
    auto child = by_name.lower_bound({id, std::string()});
    if (child != by_name.end() && child->first.first == id) return;
    if (it->second.parent != 0) by_name.erase({it->second.parent, it->second.name});
    nodes.erase(it);
  }

  // --- descriptors of handles (LRU-bounded) ---
  void Touch(uint64_t fh, OpenHandle& h) {
    if (h.in_lru) lru.erase(h.lru);
    lru.push_front(fh);
    h.lru = lru.begin();
    h.in_lru = true;
  }
  void DropFd(OpenHandle& h) {
    if (h.in_lru) {
      lru.erase(h.lru);
      h.in_lru = false;
    }
    if (h.fd.Valid()) {
      h.fd.Reset();
      --fds_open;
    }
  }
  void MakeRoom() {
    while (fds_open >= kFuseMaxOpenFds && !lru.empty()) {
      uint64_t victim = lru.back();
      DropFd(handles[victim]);
    }
  }

  // Opens the node's file for real I/O with `flags` (O_NOFOLLOW, beneath the
  // root, non-blocking until it is known to be a regular file or directory:
  // a FIFO must never block the server).
  std::expected<UniqueFd, int> OpenNodeIo(uint64_t id, int flags, bool dir) {
    auto path = PathOf(id);
    if (!path) return std::unexpected(path.error());
    int f = flags | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | (dir ? O_DIRECTORY : 0);
    int fd = OpenAt2(root.Get(), path->empty() ? "." : path->c_str(), f, 0);
    if (fd < 0) return std::unexpected(errno);
    UniqueFd owned(fd);
    struct stat st;
    if (fstat(fd, &st) != 0) return std::unexpected(errno);
    if (dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) return std::unexpected(EINVAL);
    if (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags & ~O_NONBLOCK & ~O_ACCMODE) != 0)
      return std::unexpected(errno);
    return owned;
  }

  std::expected<int, int> HandleFd(uint64_t fh, bool dir) {
    auto it = handles.find(fh);
    if (it == handles.end() || it->second.dir != dir) return std::unexpected(EBADF);
    OpenHandle& h = it->second;
    if (!h.fd.Valid()) {
      MakeRoom();
      auto fd = OpenNodeIo(h.node, h.flags, dir);
      if (!fd) return std::unexpected(fd.error() == ENOENT ? ESTALE : fd.error());
      h.fd = std::move(*fd);
      ++fds_open;
    }
    Touch(fh, h);
    return h.fd.Get();
  }

  std::expected<uint64_t, int> AddHandle(uint64_t node, int flags, bool dir, UniqueFd fd) {
    if (handles.size() >= kFuseMaxHandles) return std::unexpected(EMFILE);
    MakeRoom();
    uint64_t fh = next_fh++;
    OpenHandle& h = handles[fh];
    h.node = node;
    h.flags = flags & ~(O_CREAT | O_EXCL | O_TRUNC);
    h.dir = dir;
    h.fd = std::move(fd);
    ++fds_open;
    ++nodes[node].handles;
    Touch(fh, h);
    return fh;
  }

  void RemoveHandle(uint64_t fh) {
    auto it = handles.find(fh);
    if (it == handles.end()) return;
    uint64_t node = it->second.node;
    DropFd(it->second);
    handles.erase(it);
    auto n = nodes.find(node);
    if (n != nodes.end() && n->second.handles > 0) --n->second.handles;
    Forget(node, 0);  // drops it if it was only kept for this handle
  }
};

namespace {

using Reply = std::vector<std::byte>;

Reply Error(uint64_t unique, int err) {
  Reply out(sizeof(fuse_out_header));
  fuse_out_header header{static_cast<uint32_t>(out.size()), -err, unique};
  std::memcpy(out.data(), &header, sizeof header);
  return out;
}

Reply Ok(uint64_t unique, std::span<const std::byte> body) {
  Reply out(sizeof(fuse_out_header) + body.size());
  fuse_out_header header{static_cast<uint32_t>(out.size()), 0, unique};
  std::memcpy(out.data(), &header, sizeof header);
  if (!body.empty()) std::memcpy(out.data() + sizeof header, body.data(), body.size());
  return out;
}

template <class T>
Reply OkStruct(uint64_t unique, const T& value) {
  return Ok(unique, std::as_bytes(std::span(&value, 1)));
}

int OpenFlagsFor(uint32_t guest_flags, bool read_only) {
  int flags = static_cast<int>(guest_flags) & (O_ACCMODE | O_APPEND | O_TRUNC | O_DIRECT | O_SYNC |
                                               O_DSYNC | O_NOATIME | O_NONBLOCK);
  if (read_only) flags &= ~(O_ACCMODE | O_APPEND | O_TRUNC);  // O_RDONLY is 0
  return flags;
}

}  // namespace

FuseServer::FuseServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FuseServer::~FuseServer() = default;

Result<std::unique_ptr<FuseServer>> FuseServer::Open(const std::string& root,
                                                     FuseServerOptions options) {
  int fd = open(root.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return FailErrno("open share root " + root);
  if (!options.single_file.empty() && !ValidName(options.single_file))
    return Fail("single-file share: bad name '" + options.single_file + "'");
  if (!options.only_entry.empty() &&
      (!ValidName(options.only_entry) || !options.single_file.empty()))
    return Fail("share: bad only_entry '" + options.only_entry + "'");
  auto impl = std::make_unique<Impl>();
  impl->root = UniqueFd(fd);
  impl->options = std::move(options);
  impl->Reset();
  return std::unique_ptr<FuseServer>(new FuseServer(std::move(impl)));
}

bool FuseServer::initialized() const { return impl_->initialized; }
size_t FuseServer::node_count() const { return impl_->nodes.size(); }
size_t FuseServer::open_fd_count() const { return impl_->fds_open; }

std::vector<std::byte> FuseServer::Handle(std::span<const std::byte> request) {
  Impl& s = *impl_;
  if (request.size() < sizeof(fuse_in_header)) return {};
  fuse_in_header in;
  std::memcpy(&in, request.data(), sizeof in);
  const uint64_t u = in.unique;
  if (in.len != request.size() || request.size() > kFuseMaxRequest) return Error(u, EINVAL);
  Reader r(request.subspan(sizeof in + size_t{in.total_extlen} * 8 > request.size()
                               ? request.size()
                               : sizeof in + size_t{in.total_extlen} * 8));

  if (in.opcode == FUSE_INIT) {
    auto init = r.Struct<fuse_init_in>();
    if (!init) {
      // Kernels before 7.36 send the short fuse_init_in (no flags2).
      Reader again(request.subspan(sizeof in));
      struct Short {
        uint32_t major, minor, max_readahead, flags;
      };
      auto s2 = again.Struct<Short>();
      if (!s2) return Error(u, EINVAL);
      init = fuse_init_in{};
      init->major = s2->major;
      init->minor = s2->minor;
      init->max_readahead = s2->max_readahead;
      init->flags = s2->flags;
    }
    fuse_init_out out{};
    out.major = FUSE_KERNEL_VERSION;
    out.minor = FUSE_KERNEL_MINOR_VERSION;
    if (init->major < 7) return Error(u, EPROTO);
    if (init->major > 7) return OkStruct(u, out);  // the kernel retries with 7
    out.minor = std::min<uint32_t>(init->minor, FUSE_KERNEL_MINOR_VERSION);
    out.max_readahead = init->max_readahead;
    out.flags = init->flags &
                (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ATOMIC_O_TRUNC | FUSE_AUTO_INVAL_DATA);
    out.max_background = 16;
    out.congestion_threshold = 12;
    out.max_write = kFuseMaxIo;
    out.time_gran = 1;
    s.initialized = true;
    return OkStruct(u, out);
  }
  if (!s.initialized) return Error(u, EIO);
  if (in.nodeid == 0 ||
      (in.opcode != FUSE_FORGET && in.opcode != FUSE_BATCH_FORGET && in.opcode != FUSE_INTERRUPT &&
       in.opcode != FUSE_DESTROY && in.opcode != FUSE_STATFS && !s.nodes.contains(in.nodeid))) {
    if (in.opcode == FUSE_FORGET || in.opcode == FUSE_INTERRUPT) return {};
    if (in.opcode != FUSE_BATCH_FORGET) return Error(u, ESTALE);
  }
  const bool ro = s.options.read_only;

  auto entry_reply = [&](uint64_t parent, const std::string& name) -> Reply {
    auto id = s.Remember(parent, name);
    if (!id) return Error(u, id.error());
    auto st = s.StatNode(*id);
    if (!st) {
      s.Forget(*id, 1);
      return Error(u, st.error());
    }
    fuse_entry_out out{};
    out.nodeid = *id;
    out.entry_valid = kValidSeconds;
    out.attr_valid = kValidSeconds;
    FillAttr(*st, &out.attr);
    return OkStruct(u, out);
  };
  auto parent_fd = [&](uint64_t parent) { return s.OpenNodePath(parent, true); };
  // A new entry `name` in the directory `dirfd` goes to the guest caller
  // (owner_from_guest); on failure it is removed again.
  auto give_to_caller = [&](int dirfd, const std::string& name, bool is_dir) -> int {
    if (!s.options.owner_from_guest) return 0;
    if (fchownat(dirfd, name.c_str(), in.uid, in.gid, AT_SYMLINK_NOFOLLOW) == 0) return 0;
    int err = errno;
    unlinkat(dirfd, name.c_str(), is_dir ? AT_REMOVEDIR : 0);
    return err;
  };
  // SYMLINK, MKNOD and MKDIR: `make(dirfd)` creates `name` in the node
  // `parent` (0 or an errno), which then goes to the caller and is looked up.
  auto make_entry = [&](uint64_t parent, const std::string& name, bool is_dir,
                        const std::function<int(int dirfd)>& make) -> Reply {
    if (int e = s.CheckChild(parent, name)) return Error(u, e);
    if (int e = s.CheckMutateIn(parent)) return Error(u, e);
    auto pfd = parent_fd(parent);
    if (!pfd) return Error(u, pfd.error());
    if (int e = make(pfd->Get())) return Error(u, e);
    if (int e = give_to_caller(pfd->Get(), name, is_dir)) return Error(u, e);
    return entry_reply(parent, name);
  };
  auto name_arg = [&]() -> std::optional<std::string> {
    auto name = r.CString();
    if (!name) return std::nullopt;
    return std::string(*name);
  };

  switch (in.opcode) {
    case FUSE_DESTROY:
      s.Reset();
      s.initialized = false;
      return Ok(u, {});
    case FUSE_FORGET: {
      auto f = r.Struct<fuse_forget_in>();
      if (f) s.Forget(in.nodeid, f->nlookup);
      return {};
    }
    case FUSE_BATCH_FORGET: {
      auto b = r.Struct<fuse_batch_forget_in>();
      if (!b) return {};
      for (uint32_t i = 0; i < b->count; ++i) {
        auto one = r.Struct<fuse_forget_one>();
        if (!one) break;
        s.Forget(one->nodeid, one->nlookup);
      }
      return {};
    }
    case FUSE_INTERRUPT:
      return {};  // requests are answered one at a time, never left pending
    case FUSE_LOOKUP: {
      auto name = name_arg();
      if (!name) return Error(u, EINVAL);
      if (int e = s.CheckChild(in.nodeid, *name)) return Error(u, e);
      auto pfd = parent_fd(in.nodeid);
      if (!pfd) return Error(u, pfd.error());
      struct stat st;
      if (fstatat(pfd->Get(), name->c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return Error(u, errno);
      return entry_reply(in.nodeid, *name);
    }
    case FUSE_GETATTR: {
      auto st = s.StatNode(in.nodeid);
      if (!st) return Error(u, st.error());
      fuse_attr_out out{};
      out.attr_valid = kValidSeconds;
      FillAttr(*st, &out.attr);
      return OkStruct(u, out);
    }
    case FUSE_SETATTR: {
      auto a = r.Struct<fuse_setattr_in>();
      if (!a) return Error(u, EINVAL);
      if (ro) return Error(u, EROFS);
      auto fd = s.OpenNodePath(in.nodeid);
      if (!fd) return Error(u, fd.error());
      std::string proc = ProcFd(fd->Get());
      if (a->valid & FATTR_MODE) {
        struct stat st;
        if (fstatat(fd->Get(), "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0)
          return Error(u, errno);
        if (S_ISLNK(st.st_mode)) return Error(u, EOPNOTSUPP);
        if (chmod(proc.c_str(), a->mode & kModeBitsAllowed) != 0) return Error(u, errno);
      }
      if (a->valid & (FATTR_UID | FATTR_GID)) {
        uid_t uid = (a->valid & FATTR_UID) ? a->uid : static_cast<uid_t>(-1);
        gid_t gid = (a->valid & FATTR_GID) ? a->gid : static_cast<gid_t>(-1);
        if (fchownat(fd->Get(), "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0)
          return Error(u, errno);
      }
      if (a->valid & FATTR_SIZE) {
        int err = 0;
        if (a->valid & FATTR_FH) {
          auto hfd = s.HandleFd(a->fh, false);
          if (!hfd) return Error(u, hfd.error());
          if (ftruncate(*hfd, static_cast<off_t>(a->size)) != 0) err = errno;
        } else {
          auto wfd = s.OpenNodeIo(in.nodeid, O_WRONLY, false);
          if (!wfd) return Error(u, wfd.error());
          if (ftruncate(wfd->Get(), static_cast<off_t>(a->size)) != 0) err = errno;
        }
        if (err) return Error(u, err);
      }
      if (a->valid & (FATTR_ATIME | FATTR_MTIME)) {
        struct timespec times[2];
        times[0].tv_nsec = UTIME_OMIT;
        times[1].tv_nsec = UTIME_OMIT;
        if (a->valid & FATTR_ATIME) {
          times[0] = (a->valid & FATTR_ATIME_NOW)
                         ? timespec{0, UTIME_NOW}
                         : timespec{static_cast<time_t>(a->atime), static_cast<long>(a->atimensec)};
        }
        if (a->valid & FATTR_MTIME) {
          times[1] = (a->valid & FATTR_MTIME_NOW)
                         ? timespec{0, UTIME_NOW}
                         : timespec{static_cast<time_t>(a->mtime), static_cast<long>(a->mtimensec)};
        }
        // Through the O_PATH descriptor's /proc entry: the file itself, never
        // what a symlink names (a symlink's own times are set).
        if (utimensat(AT_FDCWD, proc.c_str(), times, AT_SYMLINK_NOFOLLOW) != 0)
          return Error(u, errno);
      }
      auto st = s.StatNode(in.nodeid);
      if (!st) return Error(u, st.error());
      fuse_attr_out out{};
      out.attr_valid = kValidSeconds;
      FillAttr(*st, &out.attr);
      return OkStruct(u, out);
    }
    case FUSE_READLINK: {
      auto fd = s.OpenNodePath(in.nodeid);
      if (!fd) return Error(u, fd.error());
      char buf[PATH_MAX];
      ssize_t n = readlinkat(fd->Get(), "", buf, sizeof buf);
      if (n < 0) return Error(u, errno);
      return Ok(u, std::as_bytes(std::span(buf, static_cast<size_t>(n))));
    }
    case FUSE_SYMLINK: {
      auto name = name_arg();
      auto target = r.CString();
      if (!name || !target || target->empty() || target->size() >= PATH_MAX)
        return Error(u, EINVAL);
      return make_entry(in.nodeid, *name, false, [&](int dirfd) {
        return symlinkat(std::string(*target).c_str(), dirfd, name->c_str()) == 0 ? 0 : errno;
      });
    }
    case FUSE_MKNOD: {
      auto m = r.Struct<fuse_mknod_in>();
      auto name = name_arg();
      if (!m || !name) return Error(u, EINVAL);
      mode_t type = m->mode & S_IFMT;
      if (type != S_IFREG && type != S_IFIFO && type != S_IFSOCK) {
        // The checks' own errors come first, as for any other new entry.
        if (int e = s.CheckChild(in.nodeid, *name)) return Error(u, e);
        if (int e = s.CheckMutateIn(in.nodeid)) return Error(u, e);
        return Error(u, EPERM);
      }
      return make_entry(in.nodeid, *name, false, [&](int dirfd) {
        return mknodat(dirfd, name->c_str(), type | (m->mode & kModeBitsAllowed), 0) == 0 ? 0
                                                                                          : errno;
      });
    }
    case FUSE_MKDIR: {
      auto m = r.Struct<fuse_mkdir_in>();
      auto name = name_arg();
      if (!m || !name) return Error(u, EINVAL);
      return make_entry(in.nodeid, *name, true, [&](int dirfd) {
        return mkdirat(dirfd, name->c_str(), m->mode & kModeBitsAllowed) == 0 ? 0 : errno;
      });
    }
    case FUSE_UNLINK:
    case FUSE_RMDIR: {
      auto name = name_arg();
      if (!name) return Error(u, EINVAL);
      if (int e = s.CheckChild(in.nodeid, *name)) return Error(u, e);
      if (int e = s.CheckMutateIn(in.nodeid)) return Error(u, e);
      auto pfd = parent_fd(in.nodeid);
      if (!pfd) return Error(u, pfd.error());
      if (unlinkat(pfd->Get(), name->c_str(), in.opcode == FUSE_RMDIR ? AT_REMOVEDIR : 0) != 0)
        return Error(u, errno);
      s.Detach(in.nodeid, *name);
      return Ok(u, {});
    }
    case FUSE_RENAME:
    case FUSE_RENAME2: {
      uint64_t newdir;
      uint32_t flags = 0;
      if (in.opcode == FUSE_RENAME) {
        auto a = r.Struct<fuse_rename_in>();
        if (!a) return Error(u, EINVAL);
        newdir = a->newdir;
      } else {
        auto a = r.Struct<fuse_rename2_in>();
        if (!a) return Error(u, EINVAL);
        newdir = a->newdir;
        flags = a->flags;
      }
      auto oldname = name_arg();
      auto newname = name_arg();
      if (!oldname || !newname) return Error(u, EINVAL);
      if (!s.nodes.contains(newdir)) return Error(u, ESTALE);
      if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) return Error(u, EINVAL);
      if (int e = s.CheckChild(in.nodeid, *oldname)) return Error(u, e);
      if (int e = s.CheckChild(newdir, *newname)) return Error(u, e);
      if (int e = s.CheckMutateIn(in.nodeid)) return Error(u, e);
      if (int e = s.CheckMutateIn(newdir)) return Error(u, e);
      auto ofd = parent_fd(in.nodeid);
      if (!ofd) return Error(u, ofd.error());
      auto nfd = parent_fd(newdir);
      if (!nfd) return Error(u, nfd.error());
      if (syscall(SYS_renameat2, ofd->Get(), oldname->c_str(), nfd->Get(), newname->c_str(),
                  flags) != 0)
        return Error(u, errno);
      auto moving = s.by_name.find({in.nodeid, *oldname});
      std::optional<uint64_t> moved;
      if (moving != s.by_name.end()) {
        moved = moving->second;
        s.by_name.erase(moving);
      }
      auto target = s.by_name.find({newdir, *newname});
      std::optional<uint64_t> replaced;
      if (target != s.by_name.end()) {
        replaced = target->second;
        s.by_name.erase(target);
      }
      if (moved) {
        s.nodes[*moved].parent = newdir;
        s.nodes[*moved].name = *newname;
        s.by_name[{newdir, *newname}] = *moved;
      }
      if (replaced) {
        if (flags & RENAME_EXCHANGE) {
          s.nodes[*replaced].parent = in.nodeid;
          s.nodes[*replaced].name = *oldname;
          s.by_name[{in.nodeid, *oldname}] = *replaced;
        } else {
          s.nodes[*replaced].parent = 0;
        }
      }
      return Ok(u, {});
    }
    case FUSE_LINK: {
      auto a = r.Struct<fuse_link_in>();
      auto name = name_arg();
      if (!a || !name) return Error(u, EINVAL);
      if (int e = s.CheckChild(in.nodeid, *name)) return Error(u, e);
      if (int e = s.CheckMutateIn(in.nodeid)) return Error(u, e);
      if (!s.nodes.contains(a->oldnodeid) || a->oldnodeid == kRootId) return Error(u, EPERM);
      const Node& old = s.nodes[a->oldnodeid];
      if (old.parent == 0) return Error(u, ENOENT);
      auto ofd = parent_fd(old.parent);
      if (!ofd) return Error(u, ofd.error());
      auto pfd = parent_fd(in.nodeid);
      if (!pfd) return Error(u, pfd.error());
      // flags 0: a symlink is linked itself, never followed.
      if (linkat(ofd->Get(), old.name.c_str(), pfd->Get(), name->c_str(), 0) != 0)
        return Error(u, errno);
      return entry_reply(in.nodeid, *name);
    }
    case FUSE_OPEN:
    case FUSE_OPENDIR: {
      auto a = r.Struct<fuse_open_in>();
      if (!a) return Error(u, EINVAL);
      bool dir = in.opcode == FUSE_OPENDIR;
      int flags = dir ? O_RDONLY : OpenFlagsFor(a->flags, ro);
      if (!dir && ro && (a->flags & (O_ACCMODE | O_TRUNC | O_APPEND)) != O_RDONLY)
        return Error(u, EROFS);
      if (!dir && in.nodeid == kRootId && s.options.single_file.empty()) return Error(u, EISDIR);
      auto fd = s.OpenNodeIo(in.nodeid, flags, dir);
      if (!fd) return Error(u, fd.error());
      auto fh = s.AddHandle(in.nodeid, flags, dir, std::move(*fd));
      if (!fh) return Error(u, fh.error());
      fuse_open_out out{};
      out.fh = *fh;
      return OkStruct(u, out);
    }
    case FUSE_CREATE: {
      auto a = r.Struct<fuse_create_in>();
      auto name = name_arg();
      if (!a || !name) return Error(u, EINVAL);
      if (int e = s.CheckChild(in.nodeid, *name)) return Error(u, e);
      if (int e = s.CheckMutateIn(in.nodeid)) return Error(u, e);
      auto path = s.PathOf(in.nodeid);
      if (!path) return Error(u, path.error());
      std::string full = path->empty() ? *name : *path + "/" + *name;
      int flags = OpenFlagsFor(a->flags, false);
      // O_EXCL first, so the server knows whether this request made the
      // file (only then may it change owner); an existing file is then
      // opened as it is, unless the guest asked for O_EXCL itself.
      bool created = true;
      int fd = OpenAt2(s.root.Get(), full.c_str(), flags | O_CREAT | O_EXCL | O_NOFOLLOW | O_NOCTTY,
                       a->mode & kModeBitsAllowed);
      if (fd < 0 && errno == EEXIST && !(a->flags & O_EXCL)) {
        created = false;
        fd = OpenAt2(s.root.Get(), full.c_str(), flags | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK, 0);
      }
      if (fd < 0) return Error(u, errno);
      UniqueFd owned(fd);
      struct stat st;
      if (fstat(fd, &st) != 0) return Error(u, errno);
      if (!S_ISREG(st.st_mode)) return Error(u, EINVAL);
      if (!created && !(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags & ~O_ACCMODE) != 0)
        return Error(u, errno);
      if (created && s.options.owner_from_guest) {
        if (fchown(fd, in.uid, in.gid) != 0 || fstat(fd, &st) != 0) return Error(u, errno);
      }
      auto id = s.Remember(in.nodeid, *name);
      if (!id) return Error(u, id.error());
      auto fh = s.AddHandle(*id, flags, false, std::move(owned));
      if (!fh) {
        s.Forget(*id, 1);
        return Error(u, fh.error());
      }
      struct {
        fuse_entry_out entry;
        fuse_open_out open;
      } out{};
      out.entry.nodeid = *id;
      out.entry.entry_valid = kValidSeconds;
      out.entry.attr_valid = kValidSeconds;
      FillAttr(st, &out.entry.attr);
      out.open.fh = *fh;
      return OkStruct(u, out);
    }
    case FUSE_READ: {
      auto a = r.Struct<fuse_read_in>();
      if (!a) return Error(u, EINVAL);
      auto fd = s.HandleFd(a->fh, false);
      if (!fd) return Error(u, fd.error());
      size_t size = std::min<size_t>(a->size, kFuseMaxIo);
      Reply out(sizeof(fuse_out_header) + size);
      ssize_t n;
      do {
        n = pread(*fd, out.data() + sizeof(fuse_out_header), size, static_cast<off_t>(a->offset));
      } while (n < 0 && errno == EINTR);
      if (n < 0) return Error(u, errno);
      out.resize(sizeof(fuse_out_header) + static_cast<size_t>(n));
      fuse_out_header header{static_cast<uint32_t>(out.size()), 0, u};
      std::memcpy(out.data(), &header, sizeof header);
      return out;
    }
    case FUSE_WRITE: {
      auto a = r.Struct<fuse_write_in>();
      if (!a) return Error(u, EINVAL);
      auto data = r.Rest();
      if (a->size > data.size() || a->size > kFuseMaxIo) return Error(u, EINVAL);
      if (ro) return Error(u, EROFS);
      auto fd = s.HandleFd(a->fh, false);
      if (!fd) return Error(u, fd.error());
      ssize_t n;
      do {
        n = pwrite(*fd, data.data(), a->size, static_cast<off_t>(a->offset));
      } while (n < 0 && errno == EINTR);
      if (n < 0) return Error(u, errno);
      fuse_write_out out{};
      out.size = static_cast<uint32_t>(n);
      return OkStruct(u, out);
    }
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR: {
      auto a = r.Struct<fuse_release_in>();
      if (!a) return Error(u, EINVAL);
      s.RemoveHandle(a->fh);
      return Ok(u, {});
    }
    case FUSE_FLUSH:
      return Ok(u, {});
    case FUSE_FSYNC:
    case FUSE_FSYNCDIR: {
      auto a = r.Struct<fuse_fsync_in>();
      if (!a) return Error(u, EINVAL);
      auto fd = s.HandleFd(a->fh, in.opcode == FUSE_FSYNCDIR);
      if (!fd) return Error(u, fd.error());
      if (((a->fsync_flags & 1) ? fdatasync(*fd) : fsync(*fd)) != 0) return Error(u, errno);
      return Ok(u, {});
    }
    case FUSE_STATFS: {
      struct statfs st;
      if (fstatfs(s.root.Get(), &st) != 0) return Error(u, errno);
      fuse_statfs_out out{};
      out.st.blocks = st.f_blocks;
      out.st.bfree = st.f_bfree;
      out.st.bavail = st.f_bavail;
      out.st.files = st.f_files;
      out.st.ffree = st.f_ffree;
      out.st.bsize = static_cast<uint32_t>(st.f_bsize);
      out.st.namelen = static_cast<uint32_t>(st.f_namelen);
      out.st.frsize = static_cast<uint32_t>(st.f_frsize);
      return OkStruct(u, out);
    }
    case FUSE_ACCESS: {
      // default_permissions: the guest kernel checks modes itself; this
      // only confirms the node still exists.
      auto st = s.StatNode(in.nodeid);
      if (!st) return Error(u, st.error());
      return Ok(u, {});
    }
    case FUSE_READDIR: {
      auto a = r.Struct<fuse_read_in>();
      if (!a) return Error(u, EINVAL);
      auto fd = s.HandleFd(a->fh, true);
      if (!fd) return Error(u, fd.error());
      // The root of an only_entry share lists that entry (and . and ..).
      std::string_view only;
      if (!s.options.only_entry.empty() && s.handles[a->fh].node == kRootId)
        only = s.options.only_entry;
      size_t cap = std::min<size_t>(a->size, kFuseMaxIo);
      Reply out(sizeof(fuse_out_header));
      if (lseek(*fd, static_cast<off_t>(a->offset), SEEK_SET) < 0) return Error(u, errno);
      alignas(8) char buf[16384];
      bool full = false;
      while (!full) {
        long n = syscall(SYS_getdents64, *fd, buf, sizeof buf);
        if (n < 0) return Error(u, errno);
        if (n == 0) break;
        for (long pos = 0; pos < n;) {
          auto* d = reinterpret_cast<struct dirent64*>(buf + pos);
          pos += d->d_reclen;
          std::string_view name(d->d_name);
          if (!only.empty() && name != only && name != "." && name != "..") continue;
          size_t entlen = FUSE_NAME_OFFSET + name.size();
          size_t padded = FUSE_DIRENT_ALIGN(entlen);
          if (out.size() - sizeof(fuse_out_header) + padded > cap) {
            full = true;
            break;
          }
          size_t at = out.size();
          out.resize(at + padded);
          fuse_dirent ent{};
          ent.ino = d->d_ino;
          ent.off = static_cast<uint64_t>(d->d_off);
          ent.namelen = static_cast<uint32_t>(name.size());
          ent.type = d->d_type;
          std::memcpy(out.data() + at, &ent, FUSE_NAME_OFFSET);
          std::memcpy(out.data() + at + FUSE_NAME_OFFSET, name.data(), name.size());
        }
      }
      fuse_out_header header{static_cast<uint32_t>(out.size()), 0, u};
      std::memcpy(out.data(), &header, sizeof header);
      return out;
    }
    case FUSE_FALLOCATE: {
      auto a = r.Struct<fuse_fallocate_in>();
      if (!a) return Error(u, EINVAL);
      if (ro) return Error(u, EROFS);
      auto fd = s.HandleFd(a->fh, false);
      if (!fd) return Error(u, fd.error());
      if (fallocate(*fd, static_cast<int>(a->mode), static_cast<off_t>(a->offset),
                    static_cast<off_t>(a->length)) != 0)
        return Error(u, errno);
      return Ok(u, {});
    }
    case FUSE_LSEEK: {
      auto a = r.Struct<fuse_lseek_in>();
      if (!a) return Error(u, EINVAL);
      if (a->whence != SEEK_DATA && a->whence != SEEK_HOLE && a->whence != SEEK_SET &&
          a->whence != SEEK_END && a->whence != SEEK_CUR)
        return Error(u, EINVAL);
      auto fd = s.HandleFd(a->fh, false);
      if (!fd) return Error(u, fd.error());
      off_t off = lseek(*fd, static_cast<off_t>(a->offset), static_cast<int>(a->whence));
      if (off < 0) return Error(u, errno);
      fuse_lseek_out out{};
      out.offset = static_cast<uint64_t>(off);
      return OkStruct(u, out);
    }
    default:
      return Error(u, ENOSYS);  // xattrs, locks, ioctl, poll, ...: not served
  }
}

std::string FuseServer::SaveState() const {
  const Impl& s = *impl_;
  nlohmann::json nodes = nlohmann::json::array();
  for (const auto& [id, node] : s.nodes) {
    if (id == kRootId) continue;
    nodes.push_back(
        {{"id", id}, {"parent", node.parent}, {"name", Hex(node.name)}, {"lookups", node.lookups}});
  }
  nlohmann::json handles = nlohmann::json::array();
  for (const auto& [fh, h] : s.handles)
    handles.push_back({{"fh", fh}, {"node", h.node}, {"flags", h.flags}, {"dir", h.dir}});
  nlohmann::json state = {{"version", 1},
                          {"initialized", s.initialized},
                          {"next_node", s.next_node},
                          {"next_fh", s.next_fh},
                          {"nodes", nodes},
                          {"handles", handles}};
  return state.dump();
}

Status FuseServer::LoadState(std::string_view json) {
  Impl& s = *impl_;
  s.Reset();
  s.initialized = false;
  auto fail = [&](std::string why) -> Status {
    s.Reset();
    return Fail("share state: " + why);
  };
  nlohmann::json state = nlohmann::json::parse(json, nullptr, false);
  if (state.is_discarded() || !state.is_object()) return fail("not a JSON object");
  try {
    if (state.at("version").get<int>() != 1) return fail("unknown version");
    uint64_t next_node = state.at("next_node").get<uint64_t>();
    uint64_t next_fh = state.at("next_fh").get<uint64_t>();
    const auto& nodes = state.at("nodes");
    const auto& handles = state.at("handles");
    if (nodes.size() >= kFuseMaxNodes || handles.size() > kFuseMaxHandles)
      return fail("too many entries");
    for (const auto& n : nodes) {
      uint64_t id = n.at("id").get<uint64_t>();
      uint64_t parent = n.at("parent").get<uint64_t>();
      std::string name = Unhex(n.at("name").get<std::string>()).value_or("");
      if (id <= kRootId || id >= next_node || s.nodes.contains(id) || !ValidName(name))
        return fail("bad node " + std::to_string(id));
      s.nodes[id] = Node{parent, name, n.at("lookups").get<uint64_t>()};
    }
    for (const auto& [id, node] : s.nodes) {
      if (id == kRootId || node.parent == 0) continue;
      if (!s.nodes.contains(node.parent) ||
          !s.by_name.emplace(std::pair{node.parent, node.name}, id).second)
        return fail("bad parent of node " + std::to_string(id));
    }
    for (const auto& [id, node] : s.nodes)
      if (!s.PathOf(id) && s.PathOf(id).error() == ELOOP) return fail("a cycle of nodes");
    for (const auto& h : handles) {
      uint64_t fh = h.at("fh").get<uint64_t>();
      uint64_t node = h.at("node").get<uint64_t>();
      if (fh == 0 || fh >= next_fh || s.handles.contains(fh) || !s.nodes.contains(node))
        return fail("bad handle " + std::to_string(fh));
      OpenHandle& entry = s.handles[fh];
      entry.node = node;
      entry.flags = h.at("flags").get<int>() & ~(O_CREAT | O_EXCL | O_TRUNC);
      if (s.options.read_only) entry.flags &= ~(O_ACCMODE | O_APPEND);
      entry.dir = h.at("dir").get<bool>();
      ++s.nodes[node].handles;
    }
    s.next_node = next_node;
    s.next_fh = next_fh;
    s.initialized = state.at("initialized").get<bool>();
  } catch (const nlohmann::json::exception& e) {
    return fail(e.what());
  }
  return {};
}

}  // namespace cella::share
