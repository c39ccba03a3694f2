#include "host/os/paths.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

namespace cella::host {

Result<std::string> ResolveCellaHome(EnvLookup lookup, uid_t effective_uid) {
  if (const char* home = lookup("CELLA_HOME"); home != nullptr && *home != '\0') {
    if (*home != '/')
      return Fail(std::string("CELLA_HOME must be an absolute path, got \"") + home + "\"");
    return std::string(home);
  }
  if (effective_uid == 0) return std::string("/var/lib/cella");
  if (const char* xdg = lookup("XDG_DATA_HOME"); xdg != nullptr && *xdg == '/') {
    return std::string(xdg) + "/cella";
  }
  const char* user_home = lookup("HOME");
  if (user_home == nullptr || *user_home != '/') {
    return Fail("cannot place cella's data: HOME is unset or not absolute; set CELLA_HOME");
  }
  return std::string(user_home) + "/.local/share/cella";
}

Result<std::string> CellaHome() {
  return ResolveCellaHome([](const char* name) -> const char* { return ::getenv(name); },
                          ::geteuid());
}

std::string KernelDir(const std::string& home) { return home + "/kernel"; }
std::string KernelManifestPath(const std::string& home) { return home + "/kernel/manifest"; }
std::string InitramfsCacheDir(const std::string& home) { return home + "/cache/initramfs"; }
std::string DigestCacheDir(const std::string& home) { return home + "/cache/digests"; }
std::string DefaultImageDir(const std::string& home) { return home + "/images/default"; }

Status MakeDirs(const std::string& path, mode_t mode) {
  if (path.empty()) return Fail("MakeDirs: empty path");
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), mode) == 0 || errno == EEXIST) continue;
    return FailErrno("mkdir " + prefix);
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
  if (!S_ISDIR(st.st_mode)) return Fail(path + ": exists and is not a directory");
  return {};
}

}  // namespace cella::host
