// One piece (~650 lines) on purpose: both directions of `cella cp` share
// the same fd-relative tree walk, temp-entry commit and ownership rules;
// apart they would drift.
#include "host/sandbox/copy.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <limits>
#include <optional>
#include <random>
#include <set>
#include <string_view>

#include "base/io.h"
#include "base/unique_fd.h"

namespace cella::sandbox {
namespace {

using host::AgentClient;
using host::FileInfo;
using host::FileType;

// ---- paths ------------------------------------------------------------------

std::string WithoutTrailingSlashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

bool EndsWithSlash(std::string_view path) { return !path.empty() && path.back() == '/'; }

// Last component, trailing slashes ignored: "a/b/" -> "b", "/" -> "".
std::string LastComponent(const std::string& path) {
  std::string p = WithoutTrailingSlashes(path);
  if (p == "/") return "";
  size_t slash = p.rfind('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

// "a/b" -> "a", "b" -> ".", "/b" -> "/".
std::string ParentOf(const std::string& path) {
  std::string p = WithoutTrailingSlashes(path);
  size_t slash = p.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return p.substr(0, slash);
}

std::string Join(const std::string& dir, const std::string& name) {
  return EndsWithSlash(dir) ? dir + name : dir + "/" + name;
}

// docker cp: SRC "dir/." (also "dir/./", ".", "/") means its contents.
bool MeansContents(const std::string& path) {
  std::string last = LastComponent(path);
  return last.empty() || last == "." || last == "..";
}

// DST ending in '/' or "/." must be an existing directory.
bool DemandsDirectory(const std::string& path) {
  return EndsWithSlash(path) || LastComponent(path) == ".";
}

// "/a/./." -> "/a", "/a/" -> "/a": the directory a "/." path names.
std::string WithoutCurrentDirSuffix(const std::string& path) {
  std::string p = WithoutTrailingSlashes(path);
  while (p != "/" && p != "." && LastComponent(p) == ".") p = ParentOf(p);
  return p;
}

std::string GuestAbsolute(const std::string& path) {
  return !path.empty() && path.front() == '/' ? path : "/" + path;
}

// One directory entry name: what a guest listing must be.
bool IsSingleComponent(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

// RFC 3629 UTF-8 (no overlongs, no surrogates, <= U+10FFFF): what JSON
// strings carry without replacement.
bool IsUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    static constexpr uint32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLength[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

Error WithErrno(std::string message, int err) { return Error{std::move(message), err}; }

// ---- host helpers -----------------------------------------------------------

const struct timespec* MtimeOnly(int64_t mtime, struct timespec (&times)[2]) {
  times[0] = {0, UTIME_OMIT};
  times[1] = {static_cast<time_t>(mtime), 0};
  return times;
}

// Without CAP_CHOWN (or an id this user namespace cannot map) the copy keeps
// the caller's ownership, as docker cp does for an unprivileged user.
bool ChownRefusedForLackOfPrivilege(int err) { return err == EPERM || err == EINVAL; }

Result<std::string> ReadLinkAt(int dirfd, const std::string& name, const std::string& where) {
  std::string target(protocol::kMaxLinkTarget + 1, '\0');
  ssize_t n = ::readlinkat(dirfd, name.c_str(), target.data(), target.size());
  if (n < 0) return FailErrno("readlink " + where);
  if (n == 0 || static_cast<size_t>(n) > protocol::kMaxLinkTarget)
    return FailErrno("readlink " + where + ": target is empty or too long", ENAMETOOLONG);
  target.resize(static_cast<size_t>(n));
  return target;
}

// Reads every name of a directory (not "." and ".."). The caller keeps dirfd.
Result<std::vector<std::string>> ReadNames(int dirfd, const std::string& where) {
  return ReadDirectoryNames(dirfd, where, std::numeric_limits<size_t>::max());
}

// A temp entry beside the final name in a directory; unlinked unless
// committed with renameat over the final name.
class TempEntry {
 public:
  explicit TempEntry(int dirfd) : dirfd_(dirfd) {}
  TempEntry(const TempEntry&) = delete;
  TempEntry& operator=(const TempEntry&) = delete;
  ~TempEntry() {
    // Cleanup after a failure that is already being reported.
    if (!name_.empty()) (void)::unlinkat(dirfd_, name_.c_str(), 0);
  }

  // Calls make(name) with fresh names until it does not fail with EEXIST.
  template <class Make>
  Status Create(Make&& make, const std::string& where) {
    static thread_local std::mt19937_64 rng{std::random_device{}()};
    for (int attempt = 0; attempt < 16; ++attempt) {
      char name[32];
      int n = std::snprintf(name, sizeof(name), ".cella-cp-%016llx",
                            static_cast<unsigned long long>(rng()));
      if (n <= 0 || static_cast<size_t>(n) >= sizeof(name))
        return FailErrno("name a temp file in " + where, EINVAL);
      if (make(name)) {
        name_ = name;
        return {};
      }
      if (errno != EEXIST) return FailErrno("create a temp entry in " + where);
    }
    return FailErrno("create a temp entry in " + where, EEXIST);
  }

  const std::string& name() const { return name_; }

  Status CommitAs(const std::string& final_name, const std::string& where) {
    if (::renameat(dirfd_, name_.c_str(), dirfd_, final_name.c_str()) != 0) {
      if (errno == EISDIR || errno == ENOTEMPTY || errno == EEXIST)
        return FailErrno("cannot replace the directory " + where + " with a non-directory", EISDIR);
      return FailErrno("rename into " + where);
    }
    name_.clear();
    return {};
  }

 private:
  int dirfd_;
  std::string name_;
};

// ---- the copier ---------------------------------------------------------------

class Copier {
 public:
  Copier(AgentClient& agent, const CopyOptions& options) : agent_(agent), options_(options) {}

  CopyStats& stats() { return stats_; }

  void Skip(const std::string& path, std::string_view why) {
    ++stats_.skipped;
    if (stats_.warnings.size() < kMaxCopyWarnings)
      stats_.warnings.push_back("skipped " + path + ": " + std::string(why));
  }

  bool KeepOwners() const { return options_.ownership == Ownership::kFromSource; }

  // ---- host -> guest --------------------------------------------------------

  // Copies the host entry `name` in dirfd (already lstat'ed as st) to the
  // guest path.
  Status SendEntry(int dirfd, const std::string& name, const struct stat& st,
                   const std::string& host_path, const std::string& guest_path, int depth) {
    if (S_ISREG(st.st_mode)) {
      UniqueFd fd(
          ::openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
      if (!fd) {
        if (errno == ENOENT) {
          Skip(host_path, "vanished while copying");
          return {};
        }
        return FailErrno("open " + host_path);
      }
      return SendFile(fd.Get(), host_path, guest_path);
    }
    if (S_ISDIR(st.st_mode)) {
      UniqueFd fd(::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
      if (!fd) {
        if (errno == ENOENT) {
          Skip(host_path, "vanished while copying");
          return {};
        }
        return FailErrno("open " + host_path);
      }
      return SendDir(fd.Get(), host_path, guest_path, depth);
    }
    if (S_ISLNK(st.st_mode)) {
      std::string target = CELLA_TRY(ReadLinkAt(dirfd, name, host_path));
      CELLA_TRY_CTX(agent_.MakeSymlink(guest_path, target, Owner(st.st_uid), Owner(st.st_gid),
                                       st.st_mtim.tv_sec),
                    "copy " + host_path + " to " + guest_path);
      ++stats_.symlinks;
      return {};
    }
    Skip(host_path, "not a regular file, directory or symlink");
    return {};
  }

  Status SendFile(int fd, const std::string& host_path, const std::string& guest_path) {
    // Stat the descriptor: what is sent is what was opened.
    struct stat st {};
    if (::fstat(fd, &st) != 0) return FailErrno("fstat " + host_path);
    if (!S_ISREG(st.st_mode)) {
      Skip(host_path, "replaced by a non-file while copying");
      return {};
    }
    host::WriteFileOptions write;
    write.mode = st.st_mode & 07777;
    write.uid = Owner(st.st_uid);
    write.gid = Owner(st.st_gid);
    write.mtime = st.st_mtim.tv_sec;
    CELLA_TRY_CTX(agent_.WriteFileFrom(guest_path, fd, write),
                  "copy " + host_path + " to " + guest_path);
    ++stats_.files;
    stats_.bytes += static_cast<uint64_t>(st.st_size);
    return {};
  }

  // The directory open as fd becomes guest_path (created, or merged into an
  // existing directory), its attributes applied after its contents.
  Status SendDir(int fd, const std::string& host_path, const std::string& guest_path, int depth) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return FailErrno("fstat " + host_path);
    host::MakeDirsOptions mkdir;
    mkdir.mode = 0700;  // the final mode comes after the contents: 0555 can be filled
    mkdir.uid = Owner(st.st_uid);
    mkdir.gid = Owner(st.st_gid);
    CELLA_TRY_CTX(agent_.MakeDirs(guest_path, mkdir), "copy " + host_path + " to " + guest_path);
    CELLA_TRY(SendChildren(fd, host_path, guest_path, depth));
    host::FileAttributes attrs;
    attrs.mode = st.st_mode & 07777;
    attrs.uid = Owner(st.st_uid);  // again: an existing directory was merged into
    attrs.gid = Owner(st.st_gid);
    attrs.mtime = st.st_mtim.tv_sec;
    CELLA_TRY_CTX(agent_.SetAttributes(guest_path, attrs),
                  "copy " + host_path + " to " + guest_path);
    ++stats_.dirs;
    return {};
  }

  Status SendChildren(int fd, const std::string& host_path, const std::string& guest_path,
                      int depth) {
    if (depth >= kMaxCopyDepth)
      return std::unexpected(WithErrno("copy " + host_path + ": deeper than " +
                                           std::to_string(kMaxCopyDepth) + " directory levels",
                                       ELOOP));
    for (const std::string& name : CELLA_TRY(ReadNames(fd, host_path))) {
      std::string child_host = Join(host_path, name);
      if (!IsUtf8(name)) {
        Skip(child_host, "name is not UTF-8 (the agent protocol carries UTF-8 names)");
        continue;
      }
      struct stat st {};
      if (::fstatat(fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno == ENOENT) {
          Skip(child_host, "vanished while copying");
          continue;
        }
        return FailErrno("lstat " + child_host);
      }
      CELLA_TRY(SendEntry(fd, name, st, child_host, Join(guest_path, name), depth + 1));
    }
    return {};
  }

  // ---- guest -> host --------------------------------------------------------

  // Receives the guest entry described by info into `name` in dirfd.
  Status ReceiveEntry(int dirfd, const std::string& name, const FileInfo& info,
                      const std::string& guest_path, const std::string& host_path, int depth) {
    switch (info.type) {
      case FileType::kFile:
        return ReceiveFile(dirfd, name, info, guest_path, host_path);
      case FileType::kDir:
        return ReceiveDir(dirfd, name, info, guest_path, host_path, depth);
      case FileType::kSymlink:
        return ReceiveSymlink(dirfd, name, info, guest_path, host_path);
      case FileType::kOther:
        break;
    }
    Skip(guest_path, "not a regular file, directory or symlink");
    return {};
  }

  // The owner fields of a host entry: errors other than a lack of privilege
  // are reported; that one is silent (docker cp does the same).
  // The mode a guest entry gets on the host. The guest is untrusted: its
  // setuid/setgid bits land on the host only in archive mode (-a) by a
  // root caller, who asked for exactly that (docker cp's rule).
  mode_t HostMode(uint32_t guest_mode) const {
    const bool keep_special = KeepOwners() && ::geteuid() == 0;
    return static_cast<mode_t>(guest_mode & (keep_special ? 07777u : 01777u));
  }

  Status ChownHost(int dirfd, const char* name, const FileInfo& info, int flags,
                   const std::string& where) {
    if (!KeepOwners()) return {};
    if (::fchownat(dirfd, name, info.uid, info.gid, flags) != 0 &&
        !ChownRefusedForLackOfPrivilege(errno))
      return FailErrno("chown " + where);
    return {};
  }

  Status ReceiveFile(int dirfd, const std::string& name, const FileInfo& info,
                     const std::string& guest_path, const std::string& host_path) {
    TempEntry temp(dirfd);
    UniqueFd fd;
    CELLA_TRY(temp.Create(
        [&](const char* temp_name) {
          fd.Reset(::openat(dirfd, temp_name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                            0600));
          return fd.Valid();
        },
        host_path));
    // The guest listed the size; it may not send more, nor more than the
    // host has room for: a hijacked agent cannot feed the host's disk.
    struct statvfs space {};
    if (::fstatvfs(fd.Get(), &space) != 0) return FailErrno("statfs " + host_path);
    uint64_t room = static_cast<uint64_t>(space.f_bavail) * space.f_frsize;
    if (info.size > room)
      return FailErrno("copy " + guest_path + " to " + host_path + ": " +
                           std::to_string(info.size) + " bytes do not fit (" +
                           std::to_string(room) + " free)",
                       ENOSPC);
    // As docker's tar does, the copy is the file as listed: bytes it gained
    // meanwhile (a growing log, a /proc file listed as empty) are left out.
    auto size = agent_.ReadFileTo(guest_path, fd.Get(), info.size);
    if (!size && size.error().errno_value == EFBIG) size = info.size;
    if (!size) {
      if (size.error().errno_value == ENOENT) {
        Skip(guest_path, "vanished while copying");
        return {};
      }
      return std::unexpected(
          std::move(size.error()).WithContext("copy " + guest_path + " to " + host_path));
    }
    std::string where = host_path;
    CELLA_TRY(ChownHost(fd.Get(), "", info, AT_EMPTY_PATH, where));
    // After chown, which clears setuid/setgid.
    if (::fchmod(fd.Get(), HostMode(info.mode)) != 0) return FailErrno("chmod " + where);
    struct timespec times[2];
    if (::futimens(fd.Get(), MtimeOnly(info.mtime, times)) != 0)
      return FailErrno("set the mtime of " + where);
    if (::close(fd.Release()) != 0) return FailErrno("close " + where);
    CELLA_TRY(temp.CommitAs(name, where));
    ++stats_.files;
    stats_.bytes += *size;
    return {};
  }

  Status ReceiveSymlink(int dirfd, const std::string& name, const FileInfo& info,
                        const std::string& guest_path, const std::string& host_path) {
    std::optional<std::string> target = info.link_target;
    if (!target) {
      // An agent that could not read it while listing: ask once more.
      auto again = agent_.Stat(guest_path);
      if (!again) {
        if (again.error().errno_value == ENOENT) {
          Skip(guest_path, "vanished while copying");
          return {};
        }
        return std::unexpected(std::move(again.error()).WithContext("copy " + guest_path));
      }
      if (again->type != FileType::kSymlink || !again->link_target)
        return FailErrno("copy " + guest_path + ": the agent reports no symlink target", EPROTO);
      target = again->link_target;
    }
    TempEntry temp(dirfd);
    CELLA_TRY(temp.Create(
        [&](const char* temp_name) { return ::symlinkat(target->c_str(), dirfd, temp_name) == 0; },
        host_path));
    CELLA_TRY(ChownHost(dirfd, temp.name().c_str(), info, AT_SYMLINK_NOFOLLOW, host_path));
    struct timespec times[2];
    if (::utimensat(dirfd, temp.name().c_str(), MtimeOnly(info.mtime, times),
                    AT_SYMLINK_NOFOLLOW) != 0)
      return FailErrno("set the mtime of " + host_path);
    CELLA_TRY(temp.CommitAs(name, host_path));
    ++stats_.symlinks;
    return {};
  }

  Status ReceiveDir(int dirfd, const std::string& name, const FileInfo& info,
                    const std::string& guest_path, const std::string& host_path, int depth) {
    // Private until its contents are in; the final mode comes last.
    bool created = true;
    if (::mkdirat(dirfd, name.c_str(), 0700) != 0) {
      if (errno != EEXIST) return FailErrno("mkdir " + host_path);
      created = false;
      struct stat st {};
      if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
        return FailErrno("lstat " + host_path);
      if (!S_ISDIR(st.st_mode))
        return FailErrno("cannot replace the non-directory " + host_path + " with a directory",
                         ENOTDIR);
    }
    UniqueFd fd(::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) return FailErrno("open " + host_path);
    bool vanished = false;
    CELLA_TRY(ReceiveChildren(fd.Get(), guest_path, host_path, depth, &vanished));
    if (vanished) {
      // Nothing was written into it; an empty leftover would look copied.
      if (created && ::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) != 0)
        return FailErrno("rmdir " + host_path);
      Skip(guest_path, "vanished while copying");
      return {};
    }
    CELLA_TRY(ApplyDirAttributes(fd.Get(), info, host_path));
    ++stats_.dirs;
    return {};
  }

  Status ApplyDirAttributes(int fd, const FileInfo& info, const std::string& host_path) {
    CELLA_TRY(ChownHost(fd, "", info, AT_EMPTY_PATH, host_path));
    if (::fchmod(fd, HostMode(info.mode)) != 0) return FailErrno("chmod " + host_path);
    struct timespec times[2];
    if (::futimens(fd, MtimeOnly(info.mtime, times)) != 0)
      return FailErrno("set the mtime of " + host_path);
    return {};
  }

  // Copies the guest directory's entries into fd. *vanished: the guest
  // directory itself was gone (ENOENT from list).
  Status ReceiveChildren(int fd, const std::string& guest_path, const std::string& host_path,
                         int depth, bool* vanished) {
    if (depth >= kMaxCopyDepth)
      return std::unexpected(WithErrno("copy " + guest_path + ": deeper than " +
                                           std::to_string(kMaxCopyDepth) + " directory levels",
                                       ELOOP));
    auto entries = agent_.ListFiles(guest_path);
    if (!entries) {
      if (entries.error().errno_value == ENOENT && vanished) {
        *vanished = true;
        return {};
      }
      return std::unexpected(std::move(entries.error()).WithContext("copy " + guest_path));
    }
    std::set<std::string, std::less<>> seen;
    for (const FileInfo& entry : *entries) {
      if (++entries_seen_ > kMaxCopyEntries)
        return FailErrno(
            "copy " + guest_path + ": more than " + std::to_string(kMaxCopyEntries) + " entries",
            E2BIG);
      // The guest is untrusted: a name must be one component, listed once.
      if (!IsSingleComponent(entry.name))
        return FailErrno("copy " + guest_path + ": the guest listed an invalid name \"" +
                             entry.name + "\" (not a single path component)",
                         EPROTO);
      if (!seen.insert(entry.name).second)
        return FailErrno("copy " + guest_path + ": the guest listed \"" + entry.name + "\" twice",
                         EPROTO);
      CELLA_TRY(ReceiveEntry(fd, entry.name, entry, Join(guest_path, entry.name),
                             Join(host_path, entry.name), depth + 1));
    }
    return {};
  }

 private:
  uint64_t entries_seen_ = 0;  // across the whole copy (kMaxCopyEntries)
  std::optional<uint32_t> Owner(uint32_t id) const {
    return KeepOwners() ? std::optional<uint32_t>(id) : std::nullopt;
  }

  AgentClient& agent_;
  CopyOptions options_;
  CopyStats stats_;
};

enum class Existing { kMissing, kDirectory, kOther };

// What the guest has at path, following a final symlink (as docker resolves
// the destination inside the container).
Result<Existing> GuestExisting(AgentClient& agent, const std::string& path) {
  auto info = agent.Stat(path);
  if (!info) {
    if (info.error().errno_value == ENOENT) return Existing::kMissing;
    return std::unexpected(std::move(info.error()).WithContext("destination " + path));
  }
  if (info->type == FileType::kDir) return Existing::kDirectory;
  if (info->type == FileType::kSymlink) {
    auto through = agent.Stat(path + "/");
    if (through && through->type == FileType::kDir) return Existing::kDirectory;
  }
  return Existing::kOther;
}

Result<Existing> HostExisting(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Existing::kMissing;
    return FailErrno("destination " + path);
  }
  return S_ISDIR(st.st_mode) ? Existing::kDirectory : Existing::kOther;
}

Status GuestParentIsDirectory(AgentClient& agent, const std::string& path) {
  std::string parent = ParentOf(path);
  if (CELLA_TRY(GuestExisting(agent, parent)) != Existing::kDirectory)
    return FailErrno("destination " + path + ": the directory " + parent + " does not exist",
                     ENOENT);
  return {};
}

Result<UniqueFd> OpenHostDirectory(const std::string& path, const std::string& for_what) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT)
      return FailErrno("destination " + for_what + ": the directory " + path + " does not exist",
                       ENOENT);
    return FailErrno("open " + path);
  }
  return fd;
}

}  // namespace

Result<CopyStats> CopyToGuest(AgentClient& agent, const std::string& host_src,
                              const std::string& guest_dst_arg, const CopyOptions& options) {
  if (host_src.empty() || guest_dst_arg.empty())
    return FailErrno("copy: empty source or destination path", EINVAL);
  const std::string guest_dst = GuestAbsolute(guest_dst_arg);
  const bool contents = MeansContents(host_src);
  // A trailing slash or "/." resolves through a symlink; a bare name is the
  // entry itself.
  const bool follow = contents || EndsWithSlash(host_src);
  struct stat st {};
  if ((follow ? ::stat(host_src.c_str(), &st) : ::lstat(host_src.c_str(), &st)) != 0)
    return FailErrno("copy: source " + host_src);
  if (follow && !S_ISDIR(st.st_mode))
    return FailErrno("copy: source " + host_src + " is not a directory", ENOTDIR);

  const std::string dst = WithoutTrailingSlashes(guest_dst);
  Existing existing = CELLA_TRY(GuestExisting(agent, dst));
  Copier copier(agent, options);

  if (S_ISDIR(st.st_mode)) {
    if (existing == Existing::kOther)
      return FailErrno(
          "copy: cannot copy the directory " + host_src + " onto the non-directory " + guest_dst,
          ENOTDIR);
    UniqueFd fd(
        ::open(host_src.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW)));
    if (!fd) return FailErrno("open " + host_src);
    if (contents && existing == Existing::kDirectory) {
      CELLA_TRY(copier.SendChildren(fd.Get(), host_src, dst, 0));
      return copier.stats();
    }
    std::string target = dst;
    if (existing == Existing::kDirectory) {
      target = Join(dst, LastComponent(host_src));
    } else {
      CELLA_TRY(GuestParentIsDirectory(agent, dst));
    }
    CELLA_TRY(copier.SendDir(fd.Get(), host_src, target, 0));
    return copier.stats();
  }

  if (DemandsDirectory(guest_dst) && existing != Existing::kDirectory)
    return FailErrno("copy: destination " + guest_dst + " is not an existing directory",
                     existing == Existing::kMissing ? ENOENT : ENOTDIR);
  std::string target = dst;
  if (existing == Existing::kDirectory) {
    target = Join(dst, LastComponent(host_src));
  } else {
    CELLA_TRY(GuestParentIsDirectory(agent, dst));
  }
  CELLA_TRY(copier.SendEntry(AT_FDCWD, host_src, st, host_src, target, 0));
  return copier.stats();
}

Result<CopyStats> CopyFromGuest(AgentClient& agent, const std::string& guest_src_arg,
                                const std::string& host_dst, const CopyOptions& options) {
  if (guest_src_arg.empty() || host_dst.empty())
    return FailErrno("copy: empty source or destination path", EINVAL);
  const std::string guest_src = GuestAbsolute(guest_src_arg);
  const bool contents = MeansContents(guest_src);
  // The agent's stat does not follow a final symlink; a trailing slash or
  // "/." makes the kernel resolve through it, as on the host.
  auto info = agent.Stat(guest_src);
  if (!info) return std::unexpected(std::move(info.error()).WithContext("copy: source"));
  const bool follow = contents || EndsWithSlash(guest_src);
  if (follow && info->type != FileType::kDir)
    return FailErrno("copy: source " + guest_src + " is not a directory", ENOTDIR);

  const std::string dst = WithoutTrailingSlashes(host_dst);
  Existing existing = CELLA_TRY(HostExisting(dst));
  Copier copier(agent, options);
  // The guest path the children are listed under: the directory itself.
  const std::string guest_dir = WithoutCurrentDirSuffix(guest_src);

  if (info->type == FileType::kDir) {
    if (existing == Existing::kOther)
      return FailErrno(
          "copy: cannot copy the directory " + guest_src + " onto the non-directory " + host_dst,
          ENOTDIR);
    if (contents && existing == Existing::kDirectory) {
      UniqueFd fd = CELLA_TRY(OpenHostDirectory(dst, host_dst));
      CELLA_TRY(copier.ReceiveChildren(fd.Get(), guest_dir, dst, 0, nullptr));
      return copier.stats();
    }
  } else if (DemandsDirectory(host_dst) && existing != Existing::kDirectory) {
    return FailErrno("copy: destination " + host_dst + " is not an existing directory",
                     existing == Existing::kMissing ? ENOENT : ENOTDIR);
  }

  // Into an existing directory under the source's name, or as dst itself.
  std::string parent = existing == Existing::kDirectory ? dst : ParentOf(dst);
  std::string name =
      existing == Existing::kDirectory ? LastComponent(guest_dir) : LastComponent(dst);
  if (!IsSingleComponent(name))
    return FailErrno("copy: no file name to create for " + guest_src + " in " + host_dst, EINVAL);
  UniqueFd parent_fd = CELLA_TRY(OpenHostDirectory(parent, host_dst));
  CELLA_TRY(copier.ReceiveEntry(parent_fd.Get(), name, *info, guest_dir, Join(parent, name), 0));
  return copier.stats();
}

}  // namespace cella::sandbox
