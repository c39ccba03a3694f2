#include "guest/init/fs_util.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/beneath.h"
#include "base/io.h"
#include "protocol/config.h"

namespace cella::init {

Status Mount(const std::string& source, const std::string& target, const std::string& fstype,
             unsigned long flags, const std::string& data) {
  if (::mount(source.c_str(), target.c_str(), fstype.empty() ? nullptr : fstype.c_str(), flags,
              data.empty() ? nullptr : data.c_str()) != 0) {
    std::string what = "mount " + source + " on " + target;
    if (!fstype.empty()) what += " (" + fstype + ")";
    if (!data.empty()) what += " with " + data;
    return FailErrno(what);
  }
  return {};
}

Result<std::string> MountFirstOf(const std::string& source, const std::string& target,
                                 std::initializer_list<std::string_view> fstypes,
                                 unsigned long flags) {
  std::string failures;
  for (std::string_view fstype : fstypes) {
    auto mounted = Mount(source, target, std::string(fstype), flags);
    if (mounted) return std::string(fstype);
    if (!failures.empty()) failures += "; ";
    failures += mounted.error().message;
  }
  return Fail(failures);
}

Status MkdirAll(const std::string& path, mode_t mode) {
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), mode) != 0 && errno != EEXIST) return FailErrno("mkdir " + prefix);
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
  if (!S_ISDIR(st.st_mode)) return Fail(path + ": exists and is not a directory");
  return {};
}

Result<UniqueFd> OpenDirBeneath(const std::string& root, std::string_view guest_path) {
  auto normal = protocol::NormalizeGuestPath(guest_path);
  if (!normal) return std::unexpected(std::move(normal.error()));
  UniqueFd dir(::open(root.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC));
  if (!dir) return FailErrno("open " + root);
  return cella::OpenDirBeneath(dir.Get(), *normal, MissingDirs::kCreate, root);
}

Result<UniqueFd> OpenFileBeneath(const std::string& root, const std::string& guest_path) {
  auto slash = guest_path.rfind('/');
  std::string parent = slash == 0 ? "/" : guest_path.substr(0, slash);
  std::string name = guest_path.substr(slash + 1);
  UniqueFd dir = CELLA_TRY(OpenDirBeneath(root, parent));
  UniqueFd fd(::openat(dir.Get(), name.c_str(), O_RDONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (!fd) return FailErrno("open " + guest_path + " (a file share's mount point)");
  struct stat st {};
  if (::fstat(fd.Get(), &st) != 0) return FailErrno("fstat " + guest_path);
  if (!S_ISREG(st.st_mode))
    return Fail(guest_path + ": a file share needs a file here, not a directory");
  return fd;
}

std::string FdPath(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

Status ReplaceFileAt(int dir_fd, const std::string& name, std::string_view content, mode_t mode) {
  std::string temp = name + ".cella-tmp";
  UniqueFd fd(
      ::openat(dir_fd, temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!fd) return FailErrno("create " + temp);
  CELLA_TRY_CTX(WriteAll(fd.Get(), content), temp);
  if (::fchmod(fd.Get(), mode) != 0) return FailErrno("chmod " + temp);
  fd.Reset();
  if (::renameat(dir_fd, temp.c_str(), dir_fd, name.c_str()) != 0) {
    int err = errno;
    ::unlinkat(dir_fd, temp.c_str(), 0);
    return FailErrno("rename " + temp + " to " + name, err);
  }
  return {};
}

Status ReplaceFile(const std::string& path, std::string_view content, mode_t mode) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return Fail(path + ": not an absolute path");
  std::string parent = slash == 0 ? "/" : path.substr(0, slash);
  CELLA_TRY(MkdirAll(parent, 0755));
  UniqueFd dir(::open(parent.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC));
  if (!dir) return FailErrno("open " + parent);
  CELLA_TRY_CTX(ReplaceFileAt(dir.Get(), path.substr(slash + 1), content, mode), parent);
  return {};
}

Status WriteExisting(const std::string& path, std::string_view content) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  CELLA_TRY_CTX(WriteAll(fd.Get(), content), "write " + path);
  return {};
}

Status CopyFile(const std::string& from, const std::string& to, mode_t mode) {
  UniqueFd in(::open(from.c_str(), O_RDONLY | O_CLOEXEC));
  if (!in) return FailErrno("open " + from);
  UniqueFd out(::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!out) return FailErrno("create " + to);
  char buf[65536];
  for (;;) {
    auto n = ReadSome(in.Get(), std::as_writable_bytes(std::span(buf)));
    if (!n) return std::unexpected(std::move(n.error()).WithContext(from));
    if (*n == 0) break;
    CELLA_TRY_CTX(WriteAll(out.Get(), std::string_view(buf, *n)), to);
  }
  if (::fchmod(out.Get(), mode) != 0) return FailErrno("chmod " + to);
  return {};
}

}  // namespace cella::init
