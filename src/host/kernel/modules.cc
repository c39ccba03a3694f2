#include "host/kernel/modules.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <functional>

#include "base/io.h"
#include "base/unique_fd.h"

namespace cella::kernel {

namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

std::vector<std::string_view> SplitWords(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
    size_t start = i;
    while (i < s.size() && s[i] != ' ' && s[i] != '\t') ++i;
    if (i > start) out.push_back(s.substr(start, i - start));
  }
  return out;
}

bool IsPlainKo(std::string_view path) { return path.ends_with(".ko"); }

}  // namespace

std::string ModuleNameFromPath(std::string_view path) {
  size_t slash = path.rfind('/');
  std::string_view base = slash == std::string_view::npos ? path : path.substr(slash + 1);
  size_t ko = base.find(".ko");
  if (ko != std::string_view::npos) base = base.substr(0, ko);
  std::string name(base);
  for (char& c : name) {
    if (c == '-') c = '_';
  }
  return name;
}

Result<ModuleIndex> ParseModulesDep(std::string_view modules_dep,
                                    std::string_view modules_builtin) {
  ModuleIndex index;
  size_t line_no = 0;
  while (!modules_dep.empty()) {
    size_t nl = modules_dep.find('\n');
    std::string_view line = Trim(modules_dep.substr(0, nl));
    modules_dep = nl == std::string_view::npos ? std::string_view{} : modules_dep.substr(nl + 1);
    ++line_no;
    if (line.empty() || line[0] == '#') continue;
    size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) {
      return Fail("modules.dep line " + std::to_string(line_no) + ": no \"path:\" prefix");
    }
    std::string path(Trim(line.substr(0, colon)));
    if (path.starts_with('/') || path.find("..") != std::string::npos) {
      return Fail("modules.dep line " + std::to_string(line_no) + ": bad module path \"" + path +
                  "\"");
    }
    std::vector<std::string> deps;
    for (std::string_view dep : SplitWords(line.substr(colon + 1))) {
      if (dep.starts_with('/') || dep.find("..") != std::string_view::npos) {
        return Fail("modules.dep line " + std::to_string(line_no) + ": bad dependency path \"" +
                    std::string(dep) + "\"");
      }
      deps.emplace_back(dep);
    }
    index.path_by_name[ModuleNameFromPath(path)] = path;
    index.deps_by_path[path] = std::move(deps);
  }
  while (!modules_builtin.empty()) {
    size_t nl = modules_builtin.find('\n');
    std::string_view line = Trim(modules_builtin.substr(0, nl));
    modules_builtin =
        nl == std::string_view::npos ? std::string_view{} : modules_builtin.substr(nl + 1);
    if (!line.empty()) index.builtin.insert(ModuleNameFromPath(line));
  }
  return index;
}

Result<ModuleIndex> LoadModuleIndex(const std::string& modules_dir) {
  std::string dep_path = modules_dir + "/modules.dep";
  std::string dep = CELLA_TRY_CTX(ReadFileToString(dep_path, 16u << 20), "read " + dep_path);
  std::string builtin_path = modules_dir + "/modules.builtin";
  std::string builtin;
  if (auto text = ReadFileToString(builtin_path, 16u << 20)) {
    builtin = std::move(*text);
  } else if (text.error().errno_value != ENOENT) {
    return std::unexpected(std::move(text.error()).WithContext("read " + builtin_path));
  }
  return CELLA_TRY_CTX(ParseModulesDep(dep, builtin), dep_path);
}

std::vector<WantedModule> DefaultGuestModules() {
  const std::string network(kModuleGroupNetwork);
  const std::string shares(kModuleGroupShares);
  return {
      {"virtio_ring", Need::kRequired},
      {"virtio", Need::kRequired},
      {"virtio_mmio", Need::kRequired},
      {"virtio_blk", Need::kRequired},
      {"virtio_console", Need::kRequired},
      {"erofs", Need::kRequired},
      {"overlay", Need::kRequired},
      {"ext4", Need::kRequired},
      {"virtio_net", Need::kRequired, network},
      // Host directory shares: over FUSE on the agent link, or virtiofs.
      {"fuse", Need::kIfModular, shares},
      {"virtiofs", Need::kIfModular, shares},
  };
}

Result<std::vector<std::string>> ResolveLoadOrder(const ModuleIndex& index,
                                                  std::span<const WantedModule> wanted) {
  std::vector<std::string> order;
  std::set<std::string> done;
  std::set<std::string> in_progress;
  // Depth-first: a module is appended after everything it depends on.
  std::function<Status(const std::string&)> visit = [&](const std::string& path) -> Status {
    if (done.contains(path)) return {};
    if (!in_progress.insert(path).second) return Fail("modules.dep: dependency cycle at " + path);
    auto it = index.deps_by_path.find(path);
    if (it == index.deps_by_path.end()) {
      return Fail("modules.dep: " + path + " is a dependency but has no entry of its own");
    }
    // The listed closure is in reverse load order; walking it backwards keeps
    // depmod's order for siblings.
    for (auto dep = it->second.rbegin(); dep != it->second.rend(); ++dep) {
      CELLA_TRY(visit(*dep));
    }
    if (!IsPlainKo(path)) {
      return Fail("module " + path + " is compressed; the guest init loads plain .ko files only");
    }
    in_progress.erase(path);
    done.insert(path);
    order.push_back(path);
    return {};
  };
  for (const WantedModule& want : wanted) {
    auto it = index.path_by_name.find(want.name);
    if (it == index.path_by_name.end()) {
      if (want.need == Need::kIfModular || index.builtin.contains(want.name)) continue;
      return Fail("kernel module " + want.name +
                  " is neither in modules.dep nor built in (modules.builtin)");
    }
    CELLA_TRY(visit(it->second));
  }
  return order;
}

Result<std::vector<ModuleGroup>> ResolveLoadGroups(const ModuleIndex& index,
                                                   std::span<const WantedModule> wanted) {
  // Group names in order, the boot group first.
  std::vector<std::string> names = {std::string(kModuleGroupBoot)};
  for (const WantedModule& want : wanted) {
    if (std::find(names.begin(), names.end(), want.group) == names.end())
      names.push_back(want.group);
  }
  // The depth-first order of a prefix of `wanted` is a prefix of the order of
  // all of it, so each group is what its wanted modules add to the groups
  // before it.
  std::vector<WantedModule> sorted;
  std::vector<ModuleGroup> groups;
  size_t resolved = 0;
  for (const std::string& name : names) {
    for (const WantedModule& want : wanted) {
      if (want.group == name) sorted.push_back(want);
    }
    std::vector<std::string> order = CELLA_TRY(ResolveLoadOrder(index, sorted));
    groups.push_back({name, {order.begin() + static_cast<std::ptrdiff_t>(resolved), order.end()}});
    resolved = order.size();
  }
  return groups;
}

Result<size_t> UnsignedModuleSize(std::string_view trailer, size_t file_size) {
  constexpr std::string_view kMarker = "~Module signature appended~\n";
  constexpr size_t kSignatureInfoBytes = 12;  // struct module_signature
  static_assert(kModuleTrailerBytes == kSignatureInfoBytes + kMarker.size());
  if (trailer.size() > file_size) return Fail("module trailer longer than the module");
  if (trailer.size() < kModuleTrailerBytes || !trailer.ends_with(kMarker)) return file_size;
  std::string_view info = trailer.substr(trailer.size() - kModuleTrailerBytes, kSignatureInfoBytes);
  const auto byte = [&](size_t i) { return static_cast<uint32_t>(static_cast<uint8_t>(info[i])); };
  const size_t signature_bytes = (byte(8) << 24) | (byte(9) << 16) | (byte(10) << 8) | byte(11);
  if (signature_bytes > file_size - kModuleTrailerBytes)
    return Fail("module signature of " + std::to_string(signature_bytes) +
                " bytes is longer than its " + std::to_string(file_size) + "-byte module");
  return file_size - kModuleTrailerBytes - signature_bytes;
}

Result<size_t> UnsignedModuleSizeOfFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open module " + path);
  struct stat st {};
  if (::fstat(fd.Get(), &st) != 0) return FailErrno("stat module " + path);
  const auto size = static_cast<size_t>(st.st_size);
  std::string trailer(std::min(size, kModuleTrailerBytes), '\0');
  ssize_t n =
      ::pread(fd.Get(), trailer.data(), trailer.size(), static_cast<off_t>(size - trailer.size()));
  if (n < 0) return FailErrno("read the end of module " + path);
  if (static_cast<size_t>(n) != trailer.size())
    return Fail("module " + path + " shrank while read");
  return CELLA_TRY_CTX(UnsignedModuleSize(trailer, size), "module " + path);
}

}  // namespace cella::kernel
