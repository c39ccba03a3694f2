#include "guest/agent/fileops.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <limits>
#include <random>

#include "base/io.h"

namespace cella::agent {
namespace {

protocol::FileType TypeOf(mode_t mode) {
  if (S_ISREG(mode)) return protocol::FileType::kFile;
  if (S_ISDIR(mode)) return protocol::FileType::kDir;
  if (S_ISLNK(mode)) return protocol::FileType::kSymlink;
  return protocol::FileType::kOther;
}

protocol::FileInfo InfoFrom(std::string name, const struct stat& st) {
  protocol::FileInfo info;
  info.name = std::move(name);
  info.size = static_cast<uint64_t>(st.st_size);
  info.mode = st.st_mode & 07777;
  info.mtime = st.st_mtim.tv_sec;
  info.type = TypeOf(st.st_mode);
  info.uid = st.st_uid;
  info.gid = st.st_gid;
  return info;
}

// "a/b///" -> "a/b"; "/" stays "/".
std::string WithoutTrailingSlashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

// The target of the symlink name in dirfd, at most kMaxLinkTarget bytes.
Result<std::string> ReadLinkAt(int dirfd, const char* name, const std::string& where) {
  std::string target(protocol::kMaxLinkTarget + 1, '\0');
  ssize_t n = ::readlinkat(dirfd, name, target.data(), target.size());
  if (n < 0) return FailErrno("readlink " + where);
  if (static_cast<size_t>(n) > protocol::kMaxLinkTarget)
    return FailErrno("readlink " + where + ": target longer than " +
                         std::to_string(protocol::kMaxLinkTarget) + " bytes",
                     ENAMETOOLONG);
  if (n == 0) return FailErrno("readlink " + where + ": empty target", EINVAL);
  target.resize(static_cast<size_t>(n));
  return target;
}

// 16 random hex digits for temp names beside a target.
Result<std::string> RandomSuffix(std::random_device& rd) {
  char suffix[17];
  if (snprintf(suffix, sizeof(suffix), "%08x%08x", rd(), rd()) != 16)
    return FailErrno("name a temp file", EINVAL);
  return std::string(suffix);
}

std::string BaseName(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  size_t slash = p.rfind('/');
  return slash == std::string::npos ? p : (p.size() == 1 ? p : p.substr(slash + 1));
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Removes everything inside the directory dirfd (not following symlinks).
Status RemoveContents(int dirfd, const std::string& where) {
  // All names first: removing while readdir walks the same directory may
  // skip entries.
  std::vector<std::string> names =
      CELLA_TRY(ReadDirectoryNames(dirfd, where, std::numeric_limits<size_t>::max()));
  const std::string where_prefix = where + "/";
  for (const std::string& name : names) {
    std::string child = where_prefix + name;
    struct stat st {};
    if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
      if (errno == ENOENT) continue;  // removed meanwhile: that is the goal
      return FailErrno("lstat " + child);
    }
    if (S_ISDIR(st.st_mode)) {
      UniqueFd sub(::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
      if (!sub) return FailErrno("open " + child);
      CELLA_TRY(RemoveContents(sub.Get(), child));
      if (::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) != 0) return FailErrno("rmdir " + child);
    } else if (::unlinkat(dirfd, name.c_str(), 0) != 0) {
      return FailErrno("unlink " + child);
    }
  }
  return {};
}

}  // namespace

Result<protocol::FileInfo> StatPath(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
  auto info = InfoFrom(BaseName(path), st);
  if (S_ISLNK(st.st_mode)) info.link_target = CELLA_TRY(ReadLinkAt(AT_FDCWD, path.c_str(), path));
  return info;
}

Result<std::vector<protocol::FileInfo>> ListDirectory(const std::string& path) {
  UniqueFd dirfd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dirfd) return FailErrno("list " + path);
  std::vector<std::string> names =
      CELLA_TRY(ReadDirectoryNames(dirfd.Get(), "list " + path, protocol::kMaxListEntries));
  std::vector<protocol::FileInfo> out;
  out.reserve(names.size());
  for (const std::string& name : names) {
    struct stat st {};
    if (::fstatat(dirfd.Get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
      // Deleted between readdir and stat: not an error for a listing.
      if (errno == ENOENT) continue;
      return FailErrno(std::string("lstat ").append(path).append("/").append(name));
    }
    auto info = InfoFrom(name, st);
    if (S_ISLNK(st.st_mode)) {
      // Unreadable (replaced meanwhile, too long): the entry goes without
      // a target and a stat of it reports why.
      auto target = ReadLinkAt(dirfd.Get(), name.c_str(), path + "/" + name);
      if (target) info.link_target = std::move(*target);
    }
    out.push_back(std::move(info));
  }
  return out;
}

namespace {

// mkdir -p; true when the final component was created by this call.
Result<bool> MakeDirsCreated(const std::string& path, mode_t mode) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return false;
    return FailErrno("mkdir " + path, ENOTDIR);
  }
  if (errno != ENOENT) return FailErrno("stat " + path);
  std::string parent = DirName(path);
  if (parent != path && parent != "." && parent != "/") CELLA_TRY(MakeDirsCreated(parent, mode));
  if (::mkdir(path.c_str(), mode) == 0) return true;
  if (errno == EEXIST) return false;  // made by someone else meanwhile
  return FailErrno("mkdir " + path);
}

}  // namespace

Status MakeDirs(const std::string& path, mode_t mode, std::optional<uid_t> uid,
                std::optional<gid_t> gid) {
  std::string target = WithoutTrailingSlashes(path);
  bool created = CELLA_TRY(MakeDirsCreated(target, mode));
  if (created && (uid || gid)) {
    uid_t u = uid ? *uid : static_cast<uid_t>(-1);
    gid_t g = gid ? *gid : static_cast<gid_t>(-1);
    if (::lchown(target.c_str(), u, g) != 0) return FailErrno("chown " + target);
  }
  return {};
}

Status MakeSymlink(const protocol::SymlinkRequest& request) {
  std::string path = WithoutTrailingSlashes(request.path);
  std::string base = BaseName(path);
  if (base.empty() || base == "/" || base == "." || base == "..")
    return FailErrno("symlink " + path + ": not a file name", EINVAL);
  // A short temp name: base may already be NAME_MAX long.
  const std::string temp_prefix = DirName(path) + "/.cella-ln-";
  std::random_device rd;
  std::string temp;
  UploadJournal::Entry journal;
  for (int attempt = 0; attempt < 16 && temp.empty(); ++attempt) {
    std::string candidate = temp_prefix + CELLA_TRY(RandomSuffix(rd));
    CELLA_TRY(journal.Record(candidate));
    if (::symlink(request.target.c_str(), candidate.c_str()) == 0) {
      temp = candidate;
    } else if (errno != EEXIST) {
      return FailErrno("symlink " + candidate);
    }
  }
  if (temp.empty()) return FailErrno("create a temp symlink beside " + path, EEXIST);
  auto finish = [&]() -> Status {
    if (request.uid || request.gid) {
      uid_t u = request.uid ? *request.uid : static_cast<uid_t>(-1);
      gid_t g = request.gid ? *request.gid : static_cast<gid_t>(-1);
      if (::lchown(temp.c_str(), u, g) != 0) return FailErrno("chown " + temp);
    }
    if (request.mtime) {
      const struct timespec times[2] = {{0, UTIME_OMIT}, {*request.mtime, 0}};
      if (::utimensat(AT_FDCWD, temp.c_str(), times, AT_SYMLINK_NOFOLLOW) != 0)
        return FailErrno("set the mtime of " + temp);
    }
    if (::rename(temp.c_str(), path.c_str()) != 0) return FailErrno("rename to " + path);
    return {};
  };
  Status done = finish();
  // The temp link is ours: removing it after a failure cannot fail usefully.
  if (!done) (void)::unlink(temp.c_str());
  return done;
}

Status SetAttributes(const protocol::SetAttrRequest& request) {
  const std::string& path = request.path;
  if (request.uid || request.gid) {
    uid_t u = request.uid ? *request.uid : static_cast<uid_t>(-1);
    gid_t g = request.gid ? *request.gid : static_cast<gid_t>(-1);
    if (::fchownat(AT_FDCWD, path.c_str(), u, g, AT_SYMLINK_NOFOLLOW) != 0)
      return FailErrno("chown " + path);
  }
  if (request.mode) {
    // Linux has no lchmod; glibc's emulation needs /proc. The check and the
    // chmod race only against the guest itself, which owns this file anyway.
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
    if (S_ISLNK(st.st_mode))
      return FailErrno("chmod " + path + ": a symlink has no mode of its own", EOPNOTSUPP);
    if (::chmod(path.c_str(), *request.mode) != 0) return FailErrno("chmod " + path);
  }
  if (request.mtime) {
    const struct timespec times[2] = {{0, UTIME_OMIT}, {*request.mtime, 0}};
    if (::utimensat(AT_FDCWD, path.c_str(), times, AT_SYMLINK_NOFOLLOW) != 0)
      return FailErrno("set the mtime of " + path);
  }
  return {};
}

Status RemovePath(const std::string& path, Recursive recursive) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return FailErrno("remove " + path);
  if (!S_ISDIR(st.st_mode)) {
    if (::unlink(path.c_str()) != 0) return FailErrno("unlink " + path);
    return {};
  }
  if (recursive == Recursive::kYes) {
    UniqueFd dirfd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!dirfd) return FailErrno("open " + path);
    CELLA_TRY(RemoveContents(dirfd.Get(), path));
  }
  if (::rmdir(path.c_str()) != 0) return FailErrno("rmdir " + path);
  return {};
}

Result<OpenedForRead> OpenForRead(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd) return FailErrno("open " + path);
  struct stat st {};
  if (::fstat(fd.Get(), &st) != 0) return FailErrno("fstat " + path);
  if (S_ISDIR(st.st_mode)) return FailErrno("read " + path, EISDIR);
  return OpenedForRead{std::move(fd), static_cast<uint64_t>(st.st_size), st.st_mode & 07777u};
}

Result<AtomicFileWriter> AtomicFileWriter::Create(const std::string& path, mode_t mode,
                                                  std::optional<uid_t> uid,
                                                  std::optional<gid_t> gid, CreateParents parents,
                                                  std::optional<int64_t> mtime) {
  std::string dir = DirName(path);
  std::string base = BaseName(path);
  if (base.empty() || base == "/" || base == "." || base == "..")
    return FailErrno("write " + path + ": not a file name", EINVAL);
  if (parents == CreateParents::kYes) CELLA_TRY(MakeDirs(dir, 0755));
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    return FailErrno("write " + path, EISDIR);

  AtomicFileWriter w;
  w.path_ = path;
  w.mode_ = mode;
  w.uid_ = uid;
  w.gid_ = gid;
  w.mtime_ = mtime;
  w.journal_.emplace();
  std::random_device rd;
  const std::string temp_prefix = dir + "/." + base + ".cella-";
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::string temp = temp_prefix + CELLA_TRY_CTX(RandomSuffix(rd), path);
    CELLA_TRY_CTX(w.journal_->Record(temp), path);
    w.fd_.Reset(::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (w.fd_) {
      w.temp_path_ = temp;
      return w;
    }
    if (errno != EEXIST) return FailErrno("create " + temp);
  }
  return FailErrno("create a temp file in " + dir, EEXIST);
}

AtomicFileWriter::AtomicFileWriter(AtomicFileWriter&& other) noexcept
    : path_(std::move(other.path_)),
      temp_path_(std::move(other.temp_path_)),
      fd_(std::move(other.fd_)),
      mode_(other.mode_),
      uid_(other.uid_),
      gid_(other.gid_),
      mtime_(other.mtime_),
      written_(other.written_),
      committed_(other.committed_),
      journal_(std::move(other.journal_)) {
  other.temp_path_.clear();
}

AtomicFileWriter::~AtomicFileWriter() {
  // Cleanup of an abandoned upload; nothing useful to do if unlink fails.
  if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
}

Status AtomicFileWriter::Write(std::span<const std::byte> data) {
  CELLA_TRY_CTX(WriteAll(fd_.Get(), data), "write " + temp_path_);
  written_ += data.size();
  return {};
}

Result<uint64_t> AtomicFileWriter::Commit() {
  if (::fchmod(fd_.Get(), mode_) != 0) return FailErrno("chmod " + temp_path_);
  if (uid_ || gid_) {
    uid_t u = uid_ ? *uid_ : static_cast<uid_t>(-1);
    gid_t g = gid_ ? *gid_ : static_cast<gid_t>(-1);
    if (::fchown(fd_.Get(), u, g) != 0) return FailErrno("chown " + temp_path_);
    // chown clears setuid/setgid bits; apply the requested mode again.
    if (::fchmod(fd_.Get(), mode_) != 0) return FailErrno("chmod " + temp_path_);
  }
  if (mtime_) {
    const struct timespec times[2] = {{0, UTIME_OMIT}, {*mtime_, 0}};
    if (::futimens(fd_.Get(), times) != 0) return FailErrno("set the mtime of " + temp_path_);
  }
  if (::fsync(fd_.Get()) != 0) return FailErrno("fsync " + temp_path_);
  if (::close(fd_.Release()) != 0) return FailErrno("close " + temp_path_);
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) return FailErrno("rename to " + path_);
  committed_ = true;
  UniqueFd dirfd(::open(DirName(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dirfd) return FailErrno("open " + DirName(path_));
  if (::fsync(dirfd.Get()) != 0) return FailErrno("fsync " + DirName(path_));
  return written_;
}

}  // namespace cella::agent
