#include "host/kernel/kernel.h"

#include <sys/stat.h>

#include <map>

#include "base/io.h"
#include "host/os/paths.h"

namespace cella::kernel {

namespace {

Status RequireFile(const std::string& path, std::string_view what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno(std::string(what) + " " + path);
  if (!S_ISREG(st.st_mode)) return Fail(std::string(what) + " " + path + ": not a regular file");
  return {};
}

Status RequireModulesDir(const std::string& dir) {
  return RequireFile(dir + "/modules.dep", "kernel modules index");
}

}  // namespace

Result<KernelInfo> ParseKernelManifest(std::string_view text) {
  std::map<std::string, std::string, std::less<>> kv;
  size_t line_no = 0;
  while (!text.empty()) {
    size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    ++line_no;
    if (line.empty() || line[0] == '#') continue;
    size_t eq = line.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      return Fail("kernel manifest line " + std::to_string(line_no) + ": want key=value, got \"" +
                  std::string(line) + "\"");
    }
    kv[std::string(line.substr(0, eq))] = std::string(line.substr(eq + 1));
  }
  auto get = [&](std::string_view key) -> std::string {
    auto it = kv.find(key);
    return it == kv.end() ? std::string() : it->second;
  };
  KernelInfo info;
  info.vmlinuz = get("vmlinuz");
  info.modules_dir = get("modules_dir");
  info.release = get("kernel_release");
  info.package = get("package");
  info.version = get("version");
  info.deb_sha256 = get("deb_sha256");
  info.notice = get("notice");
  if (info.vmlinuz.empty() || info.vmlinuz[0] != '/') {
    return Fail("kernel manifest: vmlinuz missing or not an absolute path");
  }
  if (!info.modules_dir.empty() && info.modules_dir[0] != '/') {
    return Fail("kernel manifest: modules_dir is not an absolute path");
  }
  return info;
}

Result<KernelInfo> FindKernel(const std::string& home,
                              const std::optional<KernelOverride>& override_kernel) {
  if (override_kernel) {
    KernelInfo info;
    info.vmlinuz = override_kernel->vmlinuz;
    info.modules_dir = override_kernel->modules_dir;
    CELLA_TRY_CTX(RequireFile(info.vmlinuz, "kernel"), "--kernel");
    if (!info.modules_dir.empty()) CELLA_TRY_CTX(RequireModulesDir(info.modules_dir), "--kernel");
    return info;
  }
  std::string manifest_path = host::KernelManifestPath(home);
  auto text = ReadFileToString(manifest_path, size_t{64} * 1024);
  if (!text) {
    if (text.error().errno_value == ENOENT) {
      return std::unexpected(
          Error{"no guest kernel in " + host::KernelDir(home) +
                    ": run `make deps` or `scripts/fetch-kernel.sh` (with CELLA_HOME=" + home +
                    " if you set it) to fetch Debian's cloud kernel, or pass --kernel PATH",
                ENOENT});
    }
    return std::unexpected(std::move(text.error()).WithContext("read " + manifest_path));
  }
  KernelInfo info = CELLA_TRY_CTX(ParseKernelManifest(*text), manifest_path);
  const std::string fix = ": run scripts/fetch-kernel.sh again to repair it";
  if (auto st = RequireFile(info.vmlinuz, "kernel"); !st) {
    return Fail(st.error().message + fix);
  }
  if (!info.modules_dir.empty()) {
    if (auto st = RequireModulesDir(info.modules_dir); !st) return Fail(st.error().message + fix);
  }
  return info;
}

bool KernelAcceptsUnsignedModules(const KernelInfo& kernel) {
  if (kernel.release.empty()) return false;
  const size_t slash = kernel.vmlinuz.find_last_of('/');
  if (slash == std::string::npos) return false;
  const std::string config = kernel.vmlinuz.substr(0, slash) + "/config-" + kernel.release;
  auto text = ReadFileToString(config, size_t{8} << 20);
  if (!text) return false;
  return text->find("\nCONFIG_MODULE_SIG_FORCE=y") == std::string::npos &&
         !text->starts_with("CONFIG_MODULE_SIG_FORCE=y");
}

}  // namespace cella::kernel
