#include "host/template/template_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"
#include "host/os/digest.h"
#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/vmm/qemu_argv.h"
#include "protocol/warm.h"

namespace cella::warm {
namespace {

// The seeded template's writable-layer disk (TemplateInfo::upper_seed).
constexpr const char* kUpperSeedName = "upper.seed";

using nlohmann::json;

constexpr int kFormat = 1;
constexpr uint64_t kPlaceholderBytes = 1 << 20;
constexpr auto kStateFileWait = std::chrono::seconds(10);

Result<std::string> FileIdentity(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
  return path + " " + std::to_string(st.st_size) + " " +
         std::to_string(int64_t{st.st_mtim.tv_sec} * 1'000'000'000 + st.st_mtim.tv_nsec);
}

Result<std::string> ResolveBinary(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* path = std::getenv("PATH");
  std::string_view dirs = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (!dirs.empty()) {
    size_t colon = dirs.find(':');
    std::string dir(dirs.substr(0, colon));
    dirs = colon == std::string_view::npos ? std::string_view{} : dirs.substr(colon + 1);
    if (dir.empty()) continue;
    std::string candidate = dir + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return Fail(name + " not found in PATH");
}

constexpr const char* kMicrovmFirmware = "/usr/share/qemu/qboot.rom";

Result<std::string> HostKernelRelease() {
  utsname u{};
  if (::uname(&u) != 0) return FailErrno("uname");
  return std::string(u.release);
}

bool IsKey(std::string_view s) {
  if (s.size() != 16) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

Status FsyncPath(const std::string& path, bool directory) {
  UniqueFd fd(::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  if (::fsync(fd.Get()) != 0) return FailErrno("fsync " + path);
  return {};
}

Status MakePlaceholder(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd) return FailErrno("create " + path);
  if (::ftruncate(fd.Get(), kPlaceholderBytes) != 0) return FailErrno("ftruncate " + path);
  return {};
}

void RemoveTree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec) log::Warn("could not remove " + path, {{"error", ec.message()}});
}

// The builders' lock of one key: `<key>.lock`, held (flock, exclusive) by
// the process building that key for the whole of the build, released by the
// kernel when that process dies however it dies. A lock file is never
// removed (unlinking it would let two builders hold "the" lock at once).
std::string LockPath(const std::string& dir, const std::string& key) {
  return dir + "/" + key + ".lock";
}

// Takes the key's build lock without waiting. EWOULDBLOCK: another process
// is building this key right now.
Result<UniqueFd> LockKey(const std::string& dir, const std::string& key) {
  std::string path = LockPath(dir, key);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) return FailErrno("open " + path);
  while (::flock(fd.Get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK)
      return std::unexpected(
          Error{"template " + key + " is being built by another process", EWOULDBLOCK});
    return FailErrno("flock " + path);
  }
  return fd;
}

// `<key>.partial.<pid>` directories nobody is building: the key's lock is
// free, so their builder is gone (killed, crashed) whatever its pid names
// now. A partial whose key is locked is left alone.
// Every `<key>.partial.*` of one key; the caller holds the key's lock.
void RemovePartialsOf(const std::string& dir, const std::string& key) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  std::vector<std::string> partials;
  while (dirent* entry = ::readdir(d))
    if (std::string_view(entry->d_name).starts_with(key + ".partial."))
      partials.push_back(dir + "/" + entry->d_name);
  ::closedir(d);
  for (const std::string& path : partials) RemoveTree(path);
}

// Where a stale partial goes to be removed: no key's name, so the removal
// holds no lock. A sweeper killed mid-removal leaves it to the next sweep.
constexpr std::string_view kTrashPrefix = ".trash.";

void SweepPartials(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  std::vector<std::string> partials;
  std::vector<std::string> trash;
  while (dirent* entry = ::readdir(d)) {
    std::string name = entry->d_name;
    size_t at = name.find(".partial.");
    if (name.starts_with(kTrashPrefix))
      trash.push_back(name);
    else if (at != std::string::npos && IsKey(name.substr(0, at)))
      partials.push_back(name);
  }
  ::closedir(d);
  for (const std::string& name : partials) {
    auto lock = LockKey(dir, name.substr(0, name.find(".partial.")));
    if (!lock) {
      if (lock.error().errno_value != EWOULDBLOCK)
        log::Warn("could not check a partial template", {{"error", lock.error().message}});
      continue;
    }
    // Only moved aside under the lock: a run of this key that comes now must
    // not find it taken (it would boot cold) for as long as a removal takes.
    std::string aside = std::string(kTrashPrefix) + name + "." + std::to_string(::getpid());
    if (::rename((dir + "/" + name).c_str(), (dir + "/" + aside).c_str()) != 0) {
      if (errno != ENOENT)
        log::Warn("could not move a stale partial template aside",
                  {{"path", dir + "/" + name}, {"error", std::strerror(errno)}});
      continue;
    }
    trash.push_back(aside);
  }
  for (const std::string& name : trash) {
    // Another sweeper may be removing the same leftover: what it took first
    // is simply gone.
    std::error_code ec;
    std::filesystem::remove_all(dir + "/" + name, ec);
    if (ec && ec != std::errc::no_such_file_or_directory)
      log::Warn("could not remove " + dir + "/" + name, {{"error", ec.message()}});
  }
}

uint64_t AllocatedBytes(const std::string& dir) {
  uint64_t total = 0;
  for (const char* name : {"memory", "state", "manifest.json", kUpperSeedName}) {
    struct stat st {};
    if (::stat((dir + "/" + name).c_str(), &st) == 0) total += uint64_t(st.st_blocks) * 512;
  }
  return total;
}

// A template proven bad: its own files say so (a manifest that does not
// parse or names another key, files missing from a committed directory or
// of the wrong size). Only these are removed; an error reading them (EIO,
// EMFILE, EACCES...) says nothing about the template and is returned.
Error Damaged(std::string message) { return Error{std::move(message), EBADMSG}; }

Status StatExpecting(const std::string& path, struct stat& st) {
  if (::stat(path.c_str(), &st) == 0) return {};
  if (errno == ENOENT) return std::unexpected(Damaged(path + " is missing"));
  return FailErrno("stat " + path);
}

Result<TemplateInfo> ReadTemplate(const std::string& dir, const std::string& key) {
  auto text = ReadFileToString(dir + "/manifest.json", 1 << 20);
  if (!text) {
    if (text.error().errno_value == ENOENT) return std::unexpected(Damaged("no manifest"));
    return std::unexpected(std::move(text.error()));
  }
  TemplateInfo t;
  uint64_t upper_seed_bytes = 0;
  try {
    json doc = json::parse(*text);
    if (doc.at("format").get<int>() != kFormat)
      return std::unexpected(Damaged("unknown template format"));
    t.key = doc.at("key").get<std::string>();
    t.shape = doc.at("shape").get<std::string>();
    t.image = doc.at("image").get<std::string>();
    t.memory_mb = doc.at("memory_mb").get<int>();
    t.cpus = doc.at("cpus").get<double>();
    t.created = doc.at("created").get<int64_t>();
    t.memory_bytes = doc.at("memory_bytes").get<uint64_t>();
    t.state_bytes = doc.at("state_bytes").get<uint64_t>();
    upper_seed_bytes = doc.value("upper_seed_bytes", uint64_t{0});
  } catch (const json::exception& e) {
    return std::unexpected(Damaged(std::string("manifest: ") + e.what()));
  }
  if (t.key != key || KeyOf(t.shape) != key)
    return std::unexpected(Damaged("manifest names another key"));
  t.dir = dir;
  if (t.shape.find("\ndisk upper rw seeded ") != std::string::npos) {
    struct stat seed {};
    t.upper_seed = dir + "/" + kUpperSeedName;
    CELLA_TRY(StatExpecting(t.upper_seed, seed));
    if (uint64_t(seed.st_size) != upper_seed_bytes)
      return std::unexpected(Damaged("upper.seed has the wrong size"));
  }
  struct stat mem {};
  struct stat state {};
  CELLA_TRY(StatExpecting(dir + "/memory", mem));
  CELLA_TRY(StatExpecting(dir + "/state", state));
  if (uint64_t(mem.st_size) != t.memory_bytes ||
      t.memory_bytes != uint64_t(t.memory_mb) * 1024 * 1024)
    return std::unexpected(Damaged("memory file has the wrong size"));
  if (uint64_t(state.st_size) != t.state_bytes || t.state_bytes == 0)
    return std::unexpected(Damaged("state file has the wrong size"));
  t.disk_bytes = AllocatedBytes(dir);
  return t;
}

}  // namespace

std::string TemplatesDir(const std::string& home) { return home + "/templates"; }

std::string WhyCold(const vmm::VMConfig& vm, bool systemd_mode) {
  if (!vm.Shares.empty()) return "host directory shares need guest RAM shared with virtiofsd";
  if (systemd_mode) return "systemd-mode guests boot cold";
  if (!vm.IncomingMigration.empty()) return "restored from a snapshot";
  if (!vm.PrebuiltRootfs.empty() || (!vm.OverlayEnabled && !vm.RootfsReadOnly))
    return "a writable root disk";
  return {};
}

Result<std::string> ShapeText(const vmm::VMConfig& vm, const vmm::QemuBackendOptions& options) {
  std::string text;
  auto line = [&text](std::string_view part, std::string_view value) {
    text.append(part).append(" ").append(value).append("\n");
  };
  line("format", std::to_string(kFormat));
  std::string qemu = CELLA_TRY(ResolveBinary(options.qemu_binary));
  line("qemu", CELLA_TRY(FileIdentity(qemu)));
  line("kernel", CELLA_TRY(FileIdentity(vm.KernelPath)));
  line("initramfs", CELLA_TRY(FileIdentity(vm.InitramfsPath)));
  vmm::VMConfig as_template = vm;
  as_template.Template = vmm::TemplateRole::kCapture;
  line("cmdline", vmm::BuildKernelCmdline(as_template, options.tsc_khz));
  line("cpus", std::to_string(static_cast<int>(std::ceil(vm.CPUs))));
  line("memory_mb", std::to_string(vm.MemoryMB));
  line("accel", vmm::ToString(options.accel.chosen));
  // microvm's firmware is migrated with the device state (a ROM region): a
  // firmware package update changes what the state must match.
  if (::access(kMicrovmFirmware, F_OK) == 0)
    line("firmware", CELLA_TRY(FileIdentity(kMicrovmFirmware)));
  if (options.accel.chosen == vmm::Accel::kKvm) {
    // Under KVM (-cpu host) the saved vCPU state holds the host's CPU model
    // and feature set, and the host kernel's KVM decides which of them a
    // restore can load: a template is only good on the host kernel and CPU
    // it was made on. Under TCG the vCPU is QEMU's own `max` model, so the
    // QEMU binary above (any upgrade changes its identity) covers it.
    line("host_kernel", CELLA_TRY(HostKernelRelease()));
    line("host_cpu", HostCpuIdentity(CELLA_TRY(ReadFileToString("/proc/cpuinfo", 8 << 20))));
  }
  auto ro = [](bool read_only) { return read_only ? "ro" : "rw"; };
  if (vm.OverlayEnabled) {
    for (size_t i = 0; i < vm.OverlayLowerPaths.size(); ++i) {
      std::string fstype = i < vm.OverlayLowerFSTypes.size() ? vm.OverlayLowerFSTypes[i] : "";
      line("disk lower" + std::to_string(i),
           CELLA_TRY(FileIdentity(vm.OverlayLowerPaths[i])) + " " + fstype);
    }
    if (!vm.OverlayUpperPath.empty()) {
      if (protocol::CmdlineWantsSeededUpper(vm.KernelArgs)) {
        struct stat upper {};
        if (::stat(vm.OverlayUpperPath.c_str(), &upper) != 0)
          return FailErrno("stat " + vm.OverlayUpperPath);
        line("disk upper", "rw seeded " + std::to_string(upper.st_size));
      } else {
        line("disk upper", "rw");
      }
    }
  } else {
    line("disk root", CELLA_TRY(FileIdentity(vm.RootfsPath)) + " " + ro(vm.RootfsReadOnly));
  }
  if (!vm.ConfigDiskPath.empty()) line("disk config", "ro");
  for (size_t i = 0; i < vm.Volumes.size(); ++i)
    line("disk vol" + std::to_string(i), ro(vm.Volumes[i].ReadOnly));
  for (size_t i = 0; i < vm.ExtraDisks.size(); ++i)
    line("disk disk" + std::to_string(i), ro(vm.ExtraDisks[i].ReadOnly));
  line("nic", vm.NoNetwork ? "none" : "virtio-net");
  return text;
}

std::string HostCpuIdentity(std::string_view cpuinfo) {
  // The first processor's block: every core of one host has the same model
  // and flags (a hybrid CPU's cores differ in neither here).
  std::string vendor, model, flags;
  while (!cpuinfo.empty()) {
    size_t nl = cpuinfo.find('\n');
    std::string_view row = cpuinfo.substr(0, nl);
    cpuinfo = nl == std::string_view::npos ? std::string_view{} : cpuinfo.substr(nl + 1);
    if (row.empty()) break;  // end of the first block
    size_t colon = row.find(':');
    if (colon == std::string_view::npos) continue;
    std::string_view name = row.substr(0, colon);
    while (!name.empty() && (name.back() == ' ' || name.back() == '\t')) name.remove_suffix(1);
    std::string_view value = row.substr(colon + 1);
    if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    if (name == "vendor_id") vendor = value;
    if (name == "model name") model = value;
    if (name == "flags") flags = value;
  }
  return vendor + " | " + model + " | flags " + host::Sha256Hex(flags).substr(0, 16);
}

std::string KeyOf(const std::string& shape_text) {
  return host::Sha256Hex(shape_text).substr(0, 16);
}

Result<std::optional<TemplateInfo>> Find(const std::string& home, const std::string& key) {
  if (!IsKey(key)) return Fail("not a template key: " + key);
  std::string dir = TemplatesDir(home) + "/" + key;
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::nullopt;
    return FailErrno("stat " + dir);
  }
  auto t = ReadTemplate(dir, key);
  if (!t) {
    if (t.error().errno_value != EBADMSG)
      return std::unexpected(std::move(t.error()).WithContext("template " + key));
    // A committed template is complete unless its files were tampered with
    // or the disk lost them: never restore from it.
    log::Warn("removing a damaged template", {{"key", key}, {"error", t.error().message}});
    RemoveTree(dir);
    return std::nullopt;
  }
  return std::optional<TemplateInfo>(std::move(*t));
}

Result<TemplateInfo> Create(const std::string& home, const vmm::VMConfig& vm,
                            const vmm::QemuBackendOptions& options,
                            const std::function<Status(const std::string&)>& make_upper_seed) {
  if (std::string why = WhyCold(vm, false); !why.empty())
    return Fail("this machine cannot have a template: " + why);
  std::string shape = CELLA_TRY(ShapeText(vm, options));
  std::string key = KeyOf(shape);
  std::string dir = TemplatesDir(home);
  CELLA_TRY(host::MakeDirs(dir, 0700));
  // Held until this function returns (the build, the commit, the check):
  // whoever sees a partial of this key while we hold it leaves it alone,
  // and no second process builds the same key at the same time.
  UniqueFd lock = CELLA_TRY(LockKey(dir, key));
  // Another process may have committed it while we waited for nothing.
  if (auto found = CELLA_TRY(Find(home, key))) return std::move(*found);
  SweepPartials(dir);          // other keys' (ours is locked: skipped there)
  RemovePartialsOf(dir, key);  // ours: we hold the lock, so all are stale
  std::string partial = dir + "/" + key + ".partial." + std::to_string(::getpid());
  if (::mkdir(partial.c_str(), 0700) != 0) return FailErrno("mkdir " + partial);
  const bool seeded =
      !vm.OverlayUpperPath.empty() && protocol::CmdlineWantsSeededUpper(vm.KernelArgs);
  auto built = [&]() -> Status {
    vmm::VMConfig c = vm;
    c.ID = "template-" + key;
    c.StateDir = partial;
    c.SocketPath.clear();
    c.LogPath.clear();
    c.NetworkFD = -1;  // user-mode NIC: the same virtio-net device, no traffic
    c.SubnetCIDR.clear();
    c.GatewayIP.clear();
    // The sandbox's own disks are never read by a template: placeholders of
    // the same roles (the guest unbinds them before the template point).
    if (!c.OverlayUpperPath.empty()) {
      c.OverlayUpperPath = partial + "/upper.img";
      if (seeded) {
        if (!make_upper_seed) return Fail("a seeded upper needs its disk made");
        CELLA_TRY_CTX(make_upper_seed(c.OverlayUpperPath), "the template's upper disk");
      } else {
        CELLA_TRY(MakePlaceholder(c.OverlayUpperPath));
      }
    }
    if (!c.ConfigDiskPath.empty()) {
      c.ConfigDiskPath = partial + "/config.img";
      CELLA_TRY(MakePlaceholder(c.ConfigDiskPath));
    }
    for (size_t i = 0; i < c.Volumes.size(); ++i) {
      c.Volumes[i].HostPath = partial + "/vol" + std::to_string(i) + ".img";
      CELLA_TRY(MakePlaceholder(c.Volumes[i].HostPath));
    }
    for (size_t i = 0; i < c.ExtraDisks.size(); ++i) {
      c.ExtraDisks[i].HostPath = partial + "/disk" + std::to_string(i) + ".img";
      CELLA_TRY(MakePlaceholder(c.ExtraDisks[i].HostPath));
    }
    c.Template = vmm::TemplateRole::kCapture;
    c.TemplateMemoryPath = partial + "/memory";
    // mv after cat: "state" exists only once the whole stream is on disk.
    c.TemplateSaveUri = "exec:cat > " + host::ShellQuote(partial + "/state.tmp") + " && mv " +
                        host::ShellQuote(partial + "/state.tmp") + " " +
                        host::ShellQuote(partial + "/state");
    vmm::QemuBackendOptions capture_options = options;
    capture_options.wrap_agent_link = nullptr;
    vmm::QemuBackend backend(capture_options);
    auto machine = CELLA_TRY(backend.Create(c));
    Status started = machine->Start();
    Status closed = machine->Close();
    if (!started) return started;
    if (!closed) return closed;
    auto deadline = std::chrono::steady_clock::now() + kStateFileWait;
    while (::access((partial + "/state").c_str(), F_OK) != 0) {
      if (std::chrono::steady_clock::now() >= deadline)
        return Fail("the template's device state was not written");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    // The seeded upper is the disk the saved guest has mounted (written
    // back at the template point; QEMU flushed it when it stopped): kept.
    uint64_t upper_seed_bytes = 0;
    if (seeded) {
      const std::string seed = partial + "/" + kUpperSeedName;
      if (::rename((partial + "/upper.img").c_str(), seed.c_str()) != 0)
        return FailErrno("rename upper.img to " + seed);
      CELLA_TRY(FsyncPath(seed, false));
      struct stat st {};
      if (::stat(seed.c_str(), &st) != 0) return FailErrno("stat " + seed);
      upper_seed_bytes = static_cast<uint64_t>(st.st_size);
    }
    for (const char* name : {"upper.img", "config.img", "console.log", "qemu.log"})
      if (::unlink((partial + "/" + name).c_str()) != 0 && errno != ENOENT)
        return FailErrno(std::string("unlink ") + name);
    for (size_t i = 0; i < c.Volumes.size(); ++i)
      ::unlink((partial + "/vol" + std::to_string(i) + ".img").c_str());
    for (size_t i = 0; i < c.ExtraDisks.size(); ++i)
      ::unlink((partial + "/disk" + std::to_string(i) + ".img").c_str());
    CELLA_TRY(FsyncPath(partial + "/memory", false));
    CELLA_TRY(FsyncPath(partial + "/state", false));
    struct stat mem {};
    struct stat state {};
    if (::stat((partial + "/memory").c_str(), &mem) != 0) return FailErrno("stat memory");
    if (::stat((partial + "/state").c_str(), &state) != 0) return FailErrno("stat state");
    std::string image = vm.OverlayEnabled ? vm.OverlayLowerPaths.front() : vm.RootfsPath;
    json manifest = {{"format", kFormat},
                     {"key", key},
                     {"shape", shape},
                     {"image", image},
                     {"memory_mb", vm.MemoryMB},
                     {"cpus", vm.CPUs},
                     {"created", static_cast<int64_t>(std::time(nullptr))},
                     {"memory_bytes", static_cast<uint64_t>(mem.st_size)},
                     {"state_bytes", static_cast<uint64_t>(state.st_size)}};
    if (seeded) manifest["upper_seed_bytes"] = upper_seed_bytes;
    std::string tmp = partial + "/manifest.json.tmp";
    CELLA_TRY(WriteStringToFile(tmp, manifest.dump(2) + "\n", 0600));
    CELLA_TRY(FsyncPath(tmp, false));
    if (::rename(tmp.c_str(), (partial + "/manifest.json").c_str()) != 0)
      return FailErrno("rename " + tmp);
    CELLA_TRY(FsyncPath(partial, true));
    // The commit point.
    std::string final_dir = dir + "/" + key;
    if (::rename(partial.c_str(), final_dir.c_str()) != 0) {
      if (errno != ENOTEMPTY && errno != EEXIST) return FailErrno("rename " + partial);
      RemoveTree(partial);  // another process committed this key first
    }
    return FsyncPath(dir, true);
  }();
  if (!built) {
    RemoveTree(partial);
    return std::unexpected(std::move(built.error()).WithContext("template " + key));
  }
  auto found = CELLA_TRY(Find(home, key));
  if (!found) return Fail("template " + key + " vanished right after it was made");
  return std::move(*found);
}

void MakeClone(const TemplateInfo& t, vmm::VMConfig& vm) {
  vm.Template = vmm::TemplateRole::kClone;
  vm.TemplateMemoryPath = t.dir + "/memory";
  vm.IncomingMigration = "exec:cat " + host::ShellQuote(t.dir + "/state");
  vm.IncomingStateFile = t.dir + "/state";
}

void RemoveStalePartials(const std::string& home) { SweepPartials(TemplatesDir(home)); }

Result<std::vector<TemplateInfo>> List(const std::string& home) {
  std::vector<TemplateInfo> out;
  std::string dir = TemplatesDir(home);
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return out;
    return FailErrno("opendir " + dir);
  }
  std::vector<std::string> keys;
  while (dirent* entry = ::readdir(d))
    if (IsKey(entry->d_name)) keys.emplace_back(entry->d_name);
  ::closedir(d);
  for (const std::string& key : keys) {
    auto t = ReadTemplate(dir + "/" + key, key);
    if (t) out.push_back(std::move(*t));
  }
  std::sort(out.begin(), out.end(),
            [](const TemplateInfo& a, const TemplateInfo& b) { return a.created < b.created; });
  return out;
}

Status Remove(const std::string& home, const std::string& key) {
  if (!IsKey(key)) return std::unexpected(Error{"no template " + key, ENOENT});
  std::string dir = TemplatesDir(home) + "/" + key;
  // Aside in one rename first: a clone looking the key up meanwhile finds
  // the whole template or none (and boots cold), never one half deleted.
  // The aside name is a partial's, so what a failed or killed removal
  // leaves is swept like a dead build's (RemoveStalePartials).
  static std::atomic<unsigned> removals{0};
  std::string aside = dir + ".partial.removed-" + std::to_string(::getpid()) + "-" +
                      std::to_string(removals.fetch_add(1));
  if (::rename(dir.c_str(), aside.c_str()) != 0) {
    if (errno == ENOENT) return std::unexpected(Error{"no template " + key, ENOENT});
    return FailErrno("rename " + dir + " aside");
  }
  std::error_code ec;
  std::filesystem::remove_all(aside, ec);
  if (ec)
    log::Warn("a removed template's files are left for the next sweep",
              {{"dir", aside}, {"error", ec.message()}});
  return {};
}

Result<int> RemoveOrphans(const std::string& home) {
  int removed = 0;
  for (const TemplateInfo& t : CELLA_TRY(List(home))) {
    if (t.image.empty() || ::access(t.image.c_str(), F_OK) == 0 || errno != ENOENT) continue;
    CELLA_TRY(Remove(home, t.key));
    ++removed;
  }
  return removed;
}

}  // namespace cella::warm
