#include "guest/init/template_point.h"

#include <dirent.h>
#include <elf.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"
#include "guest/agent/resume.h"
#include "guest/init/console.h"
#include "guest/init/fs_util.h"
#include "guest/init/network.h"
#include "guest/init/rootfs.h"
#include "guest/init/serve_agent.h"
#include "protocol/config.h"
#include "protocol/warm.h"

namespace cella::init {
namespace {

constexpr const char* kBlkDriverDir = "/sys/bus/virtio/drivers/virtio_blk";

std::string Trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

Status WriteSysfs(const std::string& path, std::string_view value) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  ssize_t n = ::write(fd.Get(), value.data(), value.size());
  if (n < 0) return FailErrno("write " + path + " <- " + std::string(value));
  if (static_cast<size_t>(n) != value.size()) return Fail("short write to " + path);
  return {};
}

// The serial of the one block device under /sys/.../virtioN/block/.
Result<std::string> DiskSerialOf(const std::string& device_dir) {
  std::string block_dir = device_dir + "/block";
  DIR* dir = ::opendir(block_dir.c_str());
  if (dir == nullptr) return FailErrno("opendir " + block_dir);
  std::string serial;
  bool found = false;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (!name.starts_with("vd")) continue;
    found = true;
    auto text = ReadFileToString(block_dir + "/" + name + "/serial", 4096);
    if (text) serial = Trimmed(*text);
  }
  ::closedir(dir);
  if (!found) return Fail("no block device under " + block_dir);
  return serial;
}

struct UnboundDisk {
  std::string device;  // "virtio3"
  std::string serial;
};

// Unbinds every bound virtio-blk device whose disk is not the image's;
// returns them to bind again later.
Result<std::vector<UnboundDisk>> UnbindSandboxDisks(bool keep_upper) {
  std::vector<std::string> devices;
  DIR* dir = ::opendir(kBlkDriverDir);
  if (dir == nullptr) return FailErrno(std::string("opendir ") + kBlkDriverDir);
  errno = 0;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name.starts_with("virtio")) devices.push_back(name);
  }
  int err = errno;
  ::closedir(dir);
  if (err != 0) return FailErrno(std::string("readdir ") + kBlkDriverDir, err);
  std::vector<UnboundDisk> unbound;
  for (const std::string& device : devices) {
    std::string serial = CELLA_TRY(DiskSerialOf(std::string(kBlkDriverDir) + "/" + device));
    if (serial.starts_with("cella-lower") || serial == "cella-root") continue;
    // A seeded upper is the template's own, copied for every clone.
    if (keep_upper && serial == kUpperDiskSerial) continue;
    CELLA_TRY(WriteSysfs(std::string(kBlkDriverDir) + "/unbind", device));
    Debug("template point: unbound " + device + " (" + serial + ")");
    unbound.push_back({device, serial});
  }
  return unbound;
}

// Opens `path` inside the image's root (absolute symlinks resolve inside it
// too); -1 with errno when it cannot.
int OpenInRoot(int root, const std::string& path, int flags) {
  open_how how{};
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
  return static_cast<int>(::syscall(SYS_openat2, root, path.c_str(), &how, sizeof how));
}

// The ELF interpreter a program names (PT_INTERP), or "" when none.
std::string ElfInterpreter(int fd) {
  Elf64_Ehdr header{};
  if (::pread(fd, &header, sizeof header, 0) != static_cast<ssize_t>(sizeof header)) return {};
  if (std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0 || header.e_ident[EI_CLASS] != ELFCLASS64 ||
      header.e_phentsize != sizeof(Elf64_Phdr) || header.e_phnum > 64)
    return {};
  for (unsigned i = 0; i < header.e_phnum; ++i) {
    Elf64_Phdr ph{};
    off_t at = static_cast<off_t>(header.e_phoff + i * sizeof ph);
    if (::pread(fd, &ph, sizeof ph, at) != static_cast<ssize_t>(sizeof ph)) return {};
    if (ph.p_type != PT_INTERP || ph.p_filesz < 2 || ph.p_filesz > 256) continue;
    std::string path(ph.p_filesz, '\0');
    if (::pread(fd, path.data(), path.size(), static_cast<off_t>(ph.p_offset)) !=
        static_cast<ssize_t>(path.size()))
      return {};
    path.resize(std::strlen(path.c_str()));
    return path;
  }
  return {};
}

// Reads a file of the image whole (up to kMaxWarmFileBytes), leaving its
// pages in the page cache; returns the bytes read.
constexpr size_t kMaxWarmFileBytes = size_t{16} << 20;
size_t ReadWhole(int fd, std::vector<char>& buf) {
  size_t total = 0;
  while (total < kMaxWarmFileBytes) {
    ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(total));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    total += static_cast<size_t>(n);
  }
  return total;
}

// The image is part of the template's key, so what a clone would first read
// of it is read once here and every clone finds it in its page cache
// (TCG makes each clone's disk read and erofs decompression dear): the
// directories of the default PATH (every bare command is looked up there)
// and /bin/sh with its ELF interpreter and the C library (what most
// commands and every shell need first). Best effort: anything missing or
// unreadable is skipped (an image need not have any of them).
void WarmImageCaches() {
  UniqueFd root(::open(kNewRoot, O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!root) return;
  size_t dirs = 0;
  size_t bytes = 0;
  std::vector<char> buf(size_t{64} * 1024);
  std::string_view path = protocol::kDefaultPath;
  while (!path.empty()) {
    size_t colon = path.find(':');
    std::string dir(path.substr(0, colon));
    path = colon == std::string_view::npos ? std::string_view{} : path.substr(colon + 1);
    UniqueFd fd(OpenInRoot(root.Get(), dir, O_RDONLY | O_DIRECTORY));
    if (!fd) continue;
    // getdents64 until the end: the directory's blocks are then cached.
    for (int rounds = 0; rounds < 256; ++rounds) {
      long n = ::syscall(SYS_getdents64, fd.Get(), buf.data(), buf.size());
      if (n <= 0) break;
    }
    ++dirs;
  }
  std::vector<std::string> files = {"/bin/sh", "/etc/ld.so.cache"};
  for (size_t i = 0; i < files.size() && i < 8; ++i) {
    // The image names these paths, and PID 1 opens them: found with
    // O_PATH (no open of a FIFO that blocks for ever, no device's open),
    // opened for reading only once they are regular files.
    UniqueFd found(OpenInRoot(root.Get(), files[i], O_PATH));
    if (!found) continue;
    struct stat st {};
    if (::fstat(found.Get(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    UniqueFd fd(::open(("/proc/self/fd/" + std::to_string(found.Get())).c_str(),
                       O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
    if (!fd) continue;
    bytes += ReadWhole(fd.Get(), buf);
    if (i != 0) continue;
    // The shell's loader (glibc's ld.so, or musl's, which is its libc) and
    // glibc's libc, wherever the image keeps it.
    if (std::string interp = ElfInterpreter(fd.Get()); !interp.empty()) {
      files.push_back(interp);
      for (const char* libc : {"/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"})
        files.push_back(libc);
    }
  }
  Debug("template point: " + std::to_string(dirs) + " PATH directories and " +
        std::to_string(bytes / 1024) + " KiB of programs read for the clones");
}

// What every clone's init does to the new root before its agent serves,
// done here where it is the same for all: the paths it looks up (their
// dentries and the image's directory blocks stay cached), and the copy-up
// of /etc (every clone writes /etc/hosts there) and of /run with
// /run/cella (the start marker) into the tmpfs upper. Nothing here depends
// on a sandbox: a clone's own files are still written after its go line.
// Best effort: an image without /etc or /run is left as it is.
void PrepareRootFiles() {
  UniqueFd root(::open(kNewRoot, O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!root) return;
  struct stat st {};
  for (const char* path : {"sys", "dev", "proc", "tmp", "etc/hostname", "etc/hosts",
                           "etc/resolv.conf", "etc/passwd", "etc/group"})
    (void)::fstatat(root.Get(), path, &st, AT_SYMLINK_NOFOLLOW);  // a miss is cached too
  if (::fstatat(root.Get(), "etc", &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode)) {
    // Creating a file copies the directory up; the file goes again at once.
    const char* probe = "etc/.cella-template-point";
    UniqueFd fd(
        ::openat(root.Get(), probe, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (fd) {
      fd.Reset();
      (void)::unlinkat(root.Get(), probe, 0);  // left behind, it is only an empty file
    }
  }
  if (::fstatat(root.Get(), "run", &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
    (void)::mkdirat(root.Get(), "run/cella", 0755);  // RecordStartKind accepts EEXIST
}

// Reads the go line and the config bytes it announces from the port
// (blocking: the template waits here for ever, its clone gets them at once).
// Read in chunks (a byte per read cost ~40 ms for a config under TCG): the
// host sends nothing after them until the agent's Hello, so a chunk never
// holds more; if it does, the host broke the handshake. Bounded by
// kMaxWarmLine and kMaxConfigBytes.
Result<protocol::WarmGo> ReadGo(int fd) {
  std::string text;
  size_t line_end = std::string::npos;
  std::optional<protocol::WarmGo> go;
  std::vector<char> buf(size_t{64} * 1024);
  for (;;) {
    if (!go) {
      line_end = text.find('\n');
      if (line_end == std::string::npos && text.size() >= protocol::kMaxWarmLine)
        return Fail("warm go line longer than " + std::to_string(protocol::kMaxWarmLine) +
                    " bytes");
      if (line_end != std::string::npos)
        go = CELLA_TRY(protocol::ParseWarmGo(std::string_view(text).substr(0, line_end + 1)));
    }
    if (go) {
      size_t have = text.size() - line_end - 1;
      if (have > go->config_bytes) return Fail("warm go: more bytes than the line announced");
      if (have == go->config_bytes) {
        go->config_json = text.substr(line_end + 1);
        return std::move(*go);
      }
    }
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("read agent port");
    // No host connected: the port reads EOF. Wait for one.
    if (n == 0) {
      ::usleep(20'000);
      continue;
    }
    text.append(buf.data(), static_cast<size_t>(n));
  }
}

// On the agent port, closed again for the agent: `line` to the host, then
// the go line (and config) it answers with. virtio_console blocks a write
// while no host is connected: nothing is lost before the host has the socket.
Result<protocol::WarmGo> ExchangeGoLine(std::string_view line, std::string_view what,
                                        Deadline port_deadline) {
  std::string port = CELLA_TRY(FindVirtioPort(protocol::kDefaultAgentPort, port_deadline));
  UniqueFd fd(::open(port.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY));
  if (!fd) return FailErrno("open agent port " + port);
  if (::write(fd.Get(), line.data(), line.size()) != static_cast<ssize_t>(line.size()))
    return FailErrno("write the " + std::string(what) + " line");
  return ReadGo(fd.Get());
}

Status ApplyGo(const protocol::WarmGo& go) {
  CELLA_TRY(agent::ReseedKernelRng(go.seed));
  timespec now{};
  now.tv_sec = static_cast<time_t>(go.realtime_ns / 1'000'000'000);
  now.tv_nsec = static_cast<long>(go.realtime_ns % 1'000'000'000);
  if (::clock_settime(CLOCK_REALTIME, &now) != 0) return FailErrno("clock_settime");
  return {};
}

}  // namespace

Result<std::optional<std::string>> AwaitWarmStart(Deadline port_deadline, bool seeded_upper) {
  std::vector<UnboundDisk> unbound =
      CELLA_TRY_CTX(UnbindSandboxDisks(seeded_upper), "unbind sandbox disks");
  // Shape-wide work every clone would repeat, done once here (the image's
  // disks, and a seeded upper, are in the template's key; no other sandbox
  // disk is bound now).
  bool upper_disk = seeded_upper;
  for (const UnboundDisk& disk : unbound)
    upper_disk = upper_disk || disk.serial == kUpperDiskSerial;
  int prepared =
      CELLA_TRY_CTX(PrepareRootForClones(upper_disk, seeded_upper), "prepare the root for clones");
  Debug("template point: " + std::to_string(prepared) + " root mounts made for the clones");
  CELLA_TRY_CTX(BringLinksUpForClones(), "template point");
  if (RootMadeForClones()) {
    WarmImageCaches();
    PrepareRootFiles();
    CELLA_TRY_CTX(SyncPreparedUpper(), "template point");
  }
  protocol::WarmGo go =
      CELLA_TRY(ExchangeGoLine(protocol::kTemplatePointLine, "template point", port_deadline));
  // First the RNG: nothing below may draw from the template's CRNG state.
  CELLA_TRY(ApplyGo(go));
  Debug("warm start: go line applied (RNG reseeded, clock set)");
  const bool config_given = go.config_bytes > 0;
  size_t bound = 0;
  for (const UnboundDisk& disk : unbound) {
    // The config came with the go line: its disk stays unbound (never
    // read; probing it alone took ~0.3 s under TCG).
    if (config_given && disk.serial == kConfigDiskSerial) continue;
    CELLA_TRY(WriteSysfs(std::string(kBlkDriverDir) + "/bind", disk.device));
    ++bound;
  }
  Debug("warm start: " + std::to_string(bound) + " disks probed afresh");
  if (!config_given) return std::optional<std::string>();
  return std::optional<std::string>(std::move(go.config_json));
}

Result<std::optional<std::string>> AwaitColdGo(Deadline port_deadline) {
  protocol::WarmGo go =
      CELLA_TRY(ExchangeGoLine(protocol::kConfigRequestLine, "config request", port_deadline));
  CELLA_TRY(ApplyGo(go));
  Debug("cold start: go line applied (RNG reseeded, clock set)");
  if (go.config_bytes == 0) return std::optional<std::string>();
  return std::optional<std::string>(std::move(go.config_json));
}

Status RecordStartKind(bool warm, bool own_tmpfs) {
  // Made beneath the root without following the image's symlinks.
  UniqueFd dir = CELLA_TRY(OpenDirBeneath("/", kRunDir));
  // What cella writes there at run time (the resume count, after a fork or
  // a resume) stays out of the writable layer: an ext4 create and rename
  // there were 40-125 ms of a fork copy's `resumed` under TCG (first-time
  // translated ext4 and jbd2 code), a tmpfs's far less.
  if (own_tmpfs && ::mount("tmpfs", FdPath(dir.Get()).c_str(), "tmpfs",
                           MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m") != 0)
    return FailErrno(std::string("mount tmpfs on ") + kRunDir);
  return WriteStringToFile(kStartKindPath, warm ? "warm\n" : "cold\n", 0644);
}

}  // namespace cella::init
