#include "base/beneath.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <string>

namespace cella {
namespace {

// Splits off the next non-empty, non-"." component of `rest`; empty at the end.
std::string_view NextComponent(std::string_view& rest) {
  while (!rest.empty()) {
    size_t slash = rest.find('/');
    std::string_view part = rest.substr(0, slash);
    rest = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);
    if (!part.empty() && part != ".") return part;
  }
  return {};
}

Result<UniqueFd> Duplicate(int fd, std::string_view what) {
  UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!copy) return FailErrno(std::string(what) + ": duplicate the root descriptor");
  return copy;
}

std::unexpected<Error> RefuseDotDot(std::string_view what, std::string_view path) {
  return Fail(std::string(what) + ": \"" + std::string(path) + "\" has a '..' component");
}

// The walk of OpenDirBeneath; the directory reached is an O_PATH descriptor.
Result<UniqueFd> WalkDirs(int root_fd, std::string_view path, MissingDirs missing,
                          std::string_view what) {
  UniqueFd dir = CELLA_TRY(Duplicate(root_fd, what));
  std::string walked;
  std::string_view rest = path;
  for (std::string_view part = NextComponent(rest); !part.empty(); part = NextComponent(rest)) {
    if (part == "..") return RefuseDotDot(what, path);
    if (part.find('\0') != std::string_view::npos)
      return Fail(std::string(what) + ": a path component holds a NUL byte");
    std::string name(part);
    walked += walked.empty() ? name : "/" + name;
    if (missing == MissingDirs::kCreate && ::mkdirat(dir.Get(), name.c_str(), 0755) != 0 &&
        errno != EEXIST) {
      return FailErrno(std::string(what) + ": mkdir " + walked);
    }
    // Directories on the way are only searched (O_PATH: an 0711 ancestor is
    // enough, as for a path lookup).
    UniqueFd next(::openat(dir.Get(), name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!next) {
      int err = errno;
      if (err == ELOOP || err == ENOTDIR) {
        return Fail(std::string(what) + ": \"" + walked +
                    "\" is a symlink or not a directory (refusing to follow)");
      }
      return FailErrno(std::string(what) + ": open " + walked, err);
    }
    dir = std::move(next);
  }
  return dir;
}

}  // namespace

Result<UniqueFd> OpenDirBeneath(int root_fd, std::string_view path, MissingDirs missing,
                                std::string_view what) {
  UniqueFd walked = CELLA_TRY(WalkDirs(root_fd, path, missing, what));
  // Callers read, fsync or create in what they get: a real descriptor.
  UniqueFd dir(::openat(walked.Get(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir) return FailErrno(std::string(what) + ": open \"" + std::string(path) + "\"");
  return dir;
}

Result<UniqueFd> OpenPathBeneath(int root_fd, std::string_view path, std::string_view what) {
  size_t end = path.find_last_not_of('/');
  if (end == std::string_view::npos) return Duplicate(root_fd, what);
  std::string_view trimmed = path.substr(0, end + 1);
  size_t slash = trimmed.rfind('/');
  std::string_view parent = slash == std::string_view::npos ? "" : trimmed.substr(0, slash);
  std::string name(slash == std::string_view::npos ? trimmed : trimmed.substr(slash + 1));
  if (name == "..") return RefuseDotDot(what, path);
  if (name.find('\0') != std::string::npos)
    return Fail(std::string(what) + ": a path component holds a NUL byte");
  UniqueFd dir = CELLA_TRY(WalkDirs(root_fd, parent, MissingDirs::kFail, what));
  if (name == ".") return dir;
  UniqueFd leaf(::openat(dir.Get(), name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (!leaf) return FailErrno(std::string(what) + ": open " + std::string(trimmed));
  struct stat st {};
  if (::fstat(leaf.Get(), &st) != 0) return FailErrno(std::string(what) + ": fstat " + name);
  if (S_ISLNK(st.st_mode)) {
    return Fail(std::string(what) + ": \"" + std::string(trimmed) +
                "\" is a symlink (refusing to follow)");
  }
  return leaf;
}

}  // namespace cella
