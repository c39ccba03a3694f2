#include "base/io.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace cella {

Status WriteAll(Env& env, int fd, std::span<const std::byte> data) {
  while (!data.empty()) {
    size_t n = CELLA_TRY(env.Write(fd, data));
    data = data.subspan(n);
  }
  return {};
}

Status WriteAll(int fd, std::span<const std::byte> data) {
  return WriteAll(Env::Current(), fd, data);
}

Status WriteAll(int fd, std::string_view data) {
  return WriteAll(fd, std::as_bytes(std::span(data.data(), data.size())));
}

Result<bool> ReadExact(int fd, std::span<std::byte> buf) {
  size_t got = 0;
  while (got < buf.size()) {
    ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno("read");
    }
    if (n == 0) {
      if (got == 0) return false;
      return Fail("read: unexpected end of stream after " + std::to_string(got) + " of " +
                  std::to_string(buf.size()) + " bytes");
    }
    got += static_cast<size_t>(n);
  }
  return true;
}

Result<size_t> ReadSome(int fd, std::span<std::byte> buf) {
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n >= 0) return static_cast<size_t>(n);
    if (errno != EINTR) return FailErrno("read");
  }
}

Status SetNonBlocking(int fd, bool on) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return FailErrno("fcntl(F_GETFL)");
  flags = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (::fcntl(fd, F_SETFL, flags) < 0) return FailErrno("fcntl(F_SETFL)");
  return {};
}

Status SetCloexec(int fd, bool on) {
  int flags = ::fcntl(fd, F_GETFD);
  if (flags < 0) return FailErrno("fcntl(F_GETFD)");
  flags = on ? (flags | FD_CLOEXEC) : (flags & ~FD_CLOEXEC);
  if (::fcntl(fd, F_SETFD, flags) < 0) return FailErrno("fcntl(F_SETFD)");
  return {};
}

Result<std::string> ReadFileToString(const std::string& path, size_t max_bytes) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  std::string out;
  char buf[65536];
  for (;;) {
    auto n = ReadSome(fd.Get(), std::as_writable_bytes(std::span(buf)));
    if (!n) return std::unexpected(std::move(n.error()).WithContext(path));
    if (*n == 0) break;
    if (out.size() + *n > max_bytes)
      return Fail(path + ": larger than the limit of " + std::to_string(max_bytes) + " bytes");
    out.append(buf, *n);
  }
  return out;
}

Status WriteStringToFile(const std::string& path, std::string_view data, mode_t mode) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode));
  if (!fd) return FailErrno("open " + path);
  CELLA_TRY_CTX(WriteAll(fd.Get(), data), path);
  return {};
}

Status SyncDirectory(const std::string& dir, Env& env) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return FailErrno("open directory " + dir);
  return env.Sync(fd.Get(), dir);
}

Status WriteFileAtomically(const std::string& path, std::string_view data, mode_t mode, Env& env) {
  static std::atomic<uint64_t> counter{0};
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "."
                          : slash == 0               ? "/"
                                                     : path.substr(0, slash);
  // Unique per process and call, so concurrent writers never share one.
  const std::string temp = path + ".tmp-" + std::to_string(::getpid()) + "-" +
                           std::to_string(counter.fetch_add(1, std::memory_order_relaxed));
  UniqueFd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode));
  if (!fd) return FailErrno("create " + temp);
  auto discard = [&](Error error) -> Status {
    fd.Reset();
    if (::unlink(temp.c_str()) != 0 && errno != ENOENT)
      error.message += " (and removing " + temp + " failed: " + std::strerror(errno) + ")";
    return std::unexpected(std::move(error));
  };
  if (auto st = WriteAll(env, fd.Get(), std::as_bytes(std::span(data.data(), data.size()))); !st)
    return discard(std::move(st.error()).WithContext(temp));
  // Durable before it becomes visible: a crash after the rename must not
  // leave an empty or partial file under the real name.
  if (auto st = env.Sync(fd.Get(), temp); !st) return discard(std::move(st.error()));
  if (::close(fd.Release()) != 0) return discard(Error::FromErrno("close " + temp));
  if (auto st = env.Rename(temp, path); !st) return discard(std::move(st.error()));
  // The rename itself is durable only once the directory is.
  return SyncDirectory(dir, env);
}

Status RequireTrustedPeer(int fd) {
  ucred cred{};
  socklen_t length = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0)
    return FailErrno("getsockopt SO_PEERCRED");
  if (cred.uid == 0 || cred.uid == ::geteuid()) return {};
  return std::unexpected(Error{"peer uid " + std::to_string(cred.uid) + " (pid " +
                                   std::to_string(cred.pid) + ") is neither root nor uid " +
                                   std::to_string(::geteuid()),
                               EPERM});
}

Result<std::string> SelfExecutablePath() {
  std::string path(PATH_MAX, '\0');
  ssize_t n = ::readlink("/proc/self/exe", path.data(), path.size());
  if (n < 0) return FailErrno("cannot find the running program: readlink /proc/self/exe");
  if (static_cast<size_t>(n) >= path.size())
    return Fail("cannot find the running program: /proc/self/exe is longer than PATH_MAX");
  path.resize(static_cast<size_t>(n));
  return path;
}

Status FsyncDirectory(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + dir);
  if (::fsync(fd.Get()) != 0) return FailErrno("fsync " + dir);
  return {};
}

Result<std::vector<std::string>> ReadDirectoryNames(int dirfd, const std::string& where,
                                                    size_t max_names) {
  // fdopendir takes ownership of its fd: give it a duplicate.
  int dup_fd = ::fcntl(dirfd, F_DUPFD_CLOEXEC, 0);
  if (dup_fd < 0) return FailErrno("dup " + where);
  DIR* dir = ::fdopendir(dup_fd);
  if (!dir) {
    int err = errno;
    ::close(dup_fd);
    return FailErrno("fdopendir " + where, err);
  }
  std::vector<std::string> names;
  int err = 0;
  for (;;) {
    errno = 0;
    struct dirent* ent = ::readdir(dir);
    if (!ent) {
      err = errno;
      break;
    }
    std::string_view name = ent->d_name;
    if (name == "." || name == "..") continue;
    if (names.size() >= max_names) {
      err = E2BIG;
      break;
    }
    names.emplace_back(name);
  }
  ::closedir(dir);
  if (err == E2BIG)
    return FailErrno(where + ": more than " + std::to_string(max_names) + " entries", E2BIG);
  if (err != 0) return FailErrno("readdir " + where, err);
  return names;
}

}  // namespace cella
