#include "host/image/default_rootfs.h"

#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string_view>
#include <system_error>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"
#include "host/os/digest.h"
#include "host/os/paths.h"
#include "host/os/process.h"

namespace cella::image {

namespace {

// Bump when the layout below changes, so old cached images are not reused.
constexpr std::string_view kLayoutVersion = "cella-default-rootfs-v1";
constexpr auto kToolTimeout = std::chrono::seconds(120);

constexpr std::string_view kPasswd =
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
constexpr std::string_view kGroup =
    "root:x:0:\n"
    "nogroup:x:65534:\n";
constexpr std::string_view kOsRelease =
    "NAME=\"cella default (busybox)\"\n"
    "ID=cella-busybox\n"
    "PRETTY_NAME=\"cella built-in busybox image\"\n";

// The image has no libc or loader: a dynamic busybox would fail only inside
// the guest, with a confusing "not found". Refuse it here instead.
Status RequireStaticElf(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  Elf64_Ehdr eh{};
  ssize_t n = ::pread(fd.Get(), &eh, sizeof(eh), 0);
  if (n < 0) return FailErrno("read " + path);
  if (n != static_cast<ssize_t>(sizeof(eh)) ||
      std::string_view(reinterpret_cast<char*>(eh.e_ident), 4) != ELFMAG ||
      eh.e_ident[EI_CLASS] != ELFCLASS64) {
    return Fail(path + ": not a 64-bit ELF executable");
  }
  if (eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phnum > 256) {
    return Fail(path + ": unexpected ELF program header layout");
  }
  for (int i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph{};
    off_t off = static_cast<off_t>(eh.e_phoff + static_cast<uint64_t>(i) * sizeof(ph));
    if (::pread(fd.Get(), &ph, sizeof(ph), off) != static_cast<ssize_t>(sizeof(ph))) {
      return Fail(path + ": truncated ELF program headers");
    }
    if (ph.p_type == PT_INTERP) {
      return Fail(path +
                  " is dynamically linked; the default image needs a static busybox "
                  "(Debian package busybox-static)");
    }
  }
  return {};
}

Status MakeDir(const std::string& path, mode_t mode) {
  if (::mkdir(path.c_str(), mode) != 0 && errno != EEXIST) return FailErrno("mkdir " + path);
  // mkdir applies the umask; the image needs the exact mode (tmp is 1777).
  if (::chmod(path.c_str(), mode) != 0) return FailErrno("chmod " + path);
  return {};
}

Status CopyFile(const std::string& from, const std::string& to, mode_t mode) {
  UniqueFd in(::open(from.c_str(), O_RDONLY | O_CLOEXEC));
  if (!in) return FailErrno("open " + from);
  UniqueFd out(::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode));
  if (!out) return FailErrno("create " + to);
  std::vector<std::byte> buf(size_t{256} * 1024);
  while (true) {
    size_t n = CELLA_TRY_CTX(ReadSome(in.Get(), buf), "read " + from);
    if (n == 0) break;
    CELLA_TRY_CTX(WriteAll(out.Get(), std::span(buf.data(), n)), "write " + to);
  }
  if (::fchmod(out.Get(), mode) != 0) return FailErrno("chmod " + to);
  return {};
}

Status PopulateTree(const std::string& root, const std::string& busybox) {
  struct DirSpec {
    const char* path;
    mode_t mode;
  };
  static constexpr DirSpec kDirs[] = {
      {"bin", 0755}, {"sbin", 0755}, {"etc", 0755},     {"tmp", 01777},     {"proc", 0555},
      {"sys", 0555}, {"dev", 0755},  {"run", 0755},     {"root", 0700},     {"home", 0755},
      {"var", 0755}, {"usr", 0755},  {"usr/bin", 0755}, {"usr/sbin", 0755}, {"var/tmp", 01777},
  };
  const std::string root_prefix = root + "/";
  for (const DirSpec& d : kDirs) CELLA_TRY(MakeDir(root_prefix + d.path, d.mode));
  CELLA_TRY(CopyFile(busybox, root + "/bin/busybox", 0755));
  CELLA_TRY(WriteStringToFile(root + "/etc/passwd", kPasswd, 0644));
  CELLA_TRY(WriteStringToFile(root + "/etc/group", kGroup, 0644));
  CELLA_TRY(WriteStringToFile(root + "/etc/os-release", kOsRelease, 0644));

  std::string list = CELLA_TRY(host::CheckCommand({busybox, "--list-full"}, kToolTimeout));
  std::set<std::string> seen;
  size_t start = 0;
  while (start < list.size()) {
    size_t nl = list.find('\n', start);
    std::string applet =
        list.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
    start = nl == std::string::npos ? list.size() : nl + 1;
    // Only applets under the standard bin dirs: never let a surprising name
    // ("../x", "linuxrc" at the root) place files elsewhere.
    bool in_bin_dir = applet.starts_with("bin/") || applet.starts_with("sbin/") ||
                      applet.starts_with("usr/bin/") || applet.starts_with("usr/sbin/");
    if (!in_bin_dir || applet.find("..") != std::string::npos ||
        applet.find('/', applet.find_last_of('/') + 1) != std::string::npos ||
        applet == "bin/busybox" || !seen.insert(applet).second) {
      continue;
    }
    std::string link = root_prefix + applet;
    if (::symlink("/bin/busybox", link.c_str()) != 0) return FailErrno("symlink " + link);
  }
  if (seen.empty()) return Fail(busybox + " --list-full listed no applets");
  return {};
}

void RemoveTree(const std::string& path) {
  std::error_code ignored;  // best effort on a temp dir we created
  std::filesystem::remove_all(path, ignored);
}

}  // namespace

Result<DefaultRootfs> EnsureDefaultRootfs(const std::string& home, const std::string& busybox) {
  CELLA_TRY(RequireStaticElf(busybox));
  std::string dir = host::DefaultImageDir(home);
  CELLA_TRY(host::MakeDirs(dir, 0755));
  // busybox's digest is remembered by file identity: not re-read every run.
  std::string digests = host::DigestCacheDir(home);
  CELLA_TRY(host::MakeDirs(digests, 0755));
  host::Sha256 h;
  h.Update(kLayoutVersion);
  h.Update(CELLA_TRY(host::CachedSha256OfFile(busybox, digests)));
  std::string hash = h.HexDigest();

  std::string path = dir + "/" + hash + ".erofs";
  if (::access(path.c_str(), R_OK) == 0) return DefaultRootfs{path, false};
  if (errno != ENOENT) return FailErrno("access " + path);

  std::string work = dir + "/.build.XXXXXX";
  if (::mkdtemp(work.data()) == nullptr) return FailErrno("mkdtemp in " + dir);
  std::string tree = work + "/root";
  std::string image_tmp = work + "/image.erofs";
  auto build = [&]() -> Status {
    CELLA_TRY(MakeDir(tree, 0755));
    CELLA_TRY(PopulateTree(tree, busybox));
    // -T0 and a fixed UUID: the same busybox gives the same image bytes.
    CELLA_TRY(host::CheckCommand({"mkfs.erofs", "--quiet", "--force-uid=0", "--force-gid=0", "-T0",
                                  "-U00000000-0000-0000-0000-000000000000", image_tmp, tree},
                                 kToolTimeout));
    if (::chmod(image_tmp.c_str(), 0644) != 0) return FailErrno("chmod " + image_tmp);
    if (::rename(image_tmp.c_str(), path.c_str()) != 0) {
      return FailErrno("rename " + image_tmp + " -> " + path);
    }
    return {};
  };
  Status st = build();
  RemoveTree(work);
  if (!st) return std::unexpected(std::move(st.error()).WithContext("build default rootfs"));
  return DefaultRootfs{path, true};
}

}  // namespace cella::image
