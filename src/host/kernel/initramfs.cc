#include "host/kernel/initramfs.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <map>
#include <memory>

#include "base/io.h"
#include "base/unique_fd.h"
#include "host/os/digest.h"
#include "host/os/paths.h"

namespace cella::kernel {

namespace {

// Bump when the layout changes, so cached archives of the old layout are
// not reused.
constexpr std::string_view kLayoutVersion = "cella-initramfs-v3";  // v3: unsigned modules

enum class EntryKind { kDir, kFile, kCharDevice };

struct Entry {
  EntryKind kind = EntryKind::kFile;
  mode_t mode = 0644;
  std::string host_path;  // kFile from disk: its first `size` bytes
  std::string content;    // kFile from memory (when host_path is empty)
  dev_t rdev = 0;
  int64_t size = 0;
  bool whole_file = true;  // false: host_path is longer, and only its first `size` bytes go in
};

using Tree = std::map<std::string, Entry>;  // guest path without leading '/'

void AddDirs(Tree& tree, const std::string& path) {
  for (size_t pos = path.find('/'); pos != std::string::npos; pos = path.find('/', pos + 1)) {
    tree.try_emplace(path.substr(0, pos), Entry{EntryKind::kDir, 0755, {}, {}, 0, 0});
  }
}

Status AddHostFile(Tree& tree, const std::string& guest, const std::string& host, mode_t mode) {
  struct stat st {};
  if (::stat(host.c_str(), &st) != 0) return FailErrno("stat " + host);
  if (!S_ISREG(st.st_mode)) return Fail(host + ": not a regular file");
  AddDirs(tree, guest);
  tree[guest] = Entry{EntryKind::kFile, mode, host, {}, 0, st.st_size};
  return {};
}

// A module without its appended signature (`strip_signature`: the kernel
// does not enforce signatures; Debian's has CONFIG_MODULE_SIG_FORCE off, and
// no lockdown without Secure Boot). It checks one that is there: SHA-256 of the
// module and an RSA-4096 verification, as translated code under TCG. The
// boot group's eight modules loaded ~70 ms faster unsigned (2026-12-07,
// docs/performance.md). The files come from the host's kernel package
// (scripts/fetch-kernel.sh checks its sha256), which is what vouches for
// them; the guest's root can load unsigned modules either way.
Status AddModuleFile(Tree& tree, const std::string& guest, const std::string& host,
                     bool strip_signature) {
  CELLA_TRY(AddHostFile(tree, guest, host, 0644));
  if (!strip_signature) return {};
  const size_t unsigned_size = CELLA_TRY(UnsignedModuleSizeOfFile(host));
  Entry& entry = tree[guest];
  if (static_cast<int64_t>(unsigned_size) != entry.size) {
    entry.size = static_cast<int64_t>(unsigned_size);
    entry.whole_file = false;
  }
  return {};
}

void AddContent(Tree& tree, const std::string& guest, std::string content, mode_t mode) {
  AddDirs(tree, guest);
  int64_t size = static_cast<int64_t>(content.size());
  tree[guest] = Entry{EntryKind::kFile, mode, {}, std::move(content), 0, size};
}

struct Plan {
  Tree tree;
  std::vector<std::string> load_order;
};

std::string Basename(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

Result<Plan> MakePlan(const InitramfsSpec& spec) {
  Plan plan;
  CELLA_TRY_CTX(AddHostFile(plan.tree, "init", spec.init_binary, 0755), "initramfs /init");
  CELLA_TRY_CTX(AddHostFile(plan.tree, "cella-agent", spec.agent_binary, 0755),
                "initramfs /cella-agent");
  plan.tree.try_emplace("dev", Entry{EntryKind::kDir, 0755, {}, {}, 0, 0});
  plan.tree["dev/console"] = Entry{EntryKind::kCharDevice, 0600, {}, {}, makedev(5, 1), 0};
  plan.tree.try_emplace("lib", Entry{EntryKind::kDir, 0755, {}, {}, 0, 0});
  plan.tree.try_emplace("lib/modules", Entry{EntryKind::kDir, 0755, {}, {}, 0, 0});
  std::string order_text;
  if (!spec.modules_dir.empty()) {
    std::string dir = spec.modules_dir;
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    std::string release = spec.kernel_release.empty() ? Basename(dir) : spec.kernel_release;
    if (release.empty() || release.find('/') != std::string::npos || release == "..") {
      return Fail("initramfs: bad kernel release \"" + release + "\"");
    }
    ModuleIndex index = CELLA_TRY(LoadModuleIndex(dir));
    std::vector<ModuleGroup> groups = CELLA_TRY(ResolveLoadGroups(index, spec.modules));
    const std::string guest_prefix = "lib/modules/" + release + "/";
    const std::string host_prefix = dir + "/";
    for (const ModuleGroup& group : groups) {
      if (group.paths.empty()) continue;
      // The boot group comes first, without a header.
      if (!group.name.empty()) order_text += "@" + group.name + "\n";
      for (const std::string& rel : group.paths) {
        std::string guest = guest_prefix + rel;
        CELLA_TRY_CTX(
            AddModuleFile(plan.tree, guest, host_prefix + rel, spec.strip_module_signatures),
            "initramfs module");
        plan.load_order.push_back("/" + guest);
        order_text += "/" + guest + "\n";
      }
    }
  }
  AddContent(plan.tree, "lib/modules/cella.order", std::move(order_text), 0644);
  return plan;
}

// File contents enter as their digests, remembered by file identity in
// `digest_cache` (host/os/digest.h): an unchanged input is not read again,
// which took ~0.1 s of every run.
Result<std::string> PlanHash(const Plan& plan, InitramfsCompression compression,
                             const std::string& digest_cache) {
  host::Sha256 h;
  h.Update(kLayoutVersion);
  h.Update(compression == InitramfsCompression::kGzip ? "|compression=gzip|"
                                                      : "|compression=none|");
  for (const auto& [path, entry] : plan.tree) {
    h.Update(path);
    h.Update(std::string(1, '\0') + std::to_string(static_cast<int>(entry.kind)) + ":" +
             std::to_string(entry.mode) + ":" + std::to_string(entry.rdev) + ":" +
             std::to_string(entry.size) + (entry.whole_file ? "" : ":prefix") + '\0');
    if (entry.kind != EntryKind::kFile) continue;
    if (entry.host_path.empty()) {
      h.Update(entry.content);
    } else {
      h.Update(CELLA_TRY(host::CachedSha256OfFile(entry.host_path, digest_cache)));
    }
  }
  return h.HexDigest();
}

struct ArchiveDeleter {
  void operator()(archive* a) const { archive_write_free(a); }
};
struct EntryDeleter {
  void operator()(archive_entry* e) const { archive_entry_free(e); }
};

Status ArchiveFail(archive* a, const std::string& what) {
  const char* msg = archive_error_string(a);
  return Fail("libarchive: " + what + ": " + (msg ? msg : "unknown error"));
}

Status WriteArchive(const Plan& plan, InitramfsCompression compression, int out_fd,
                    const std::string& out_path) {
  std::unique_ptr<archive, ArchiveDeleter> a(archive_write_new());
  if (!a) return Fail("libarchive: archive_write_new failed");
  if (archive_write_set_format_cpio_newc(a.get()) != ARCHIVE_OK) {
    return ArchiveFail(a.get(), "set newc format");
  }
  if (compression == InitramfsCompression::kGzip) {
    if (archive_write_add_filter_gzip(a.get()) != ARCHIVE_OK) {
      return ArchiveFail(a.get(), "add gzip filter");
    }
    // No timestamp in the gzip header: same inputs, same bytes.
    if (archive_write_set_filter_option(a.get(), "gzip", "timestamp", nullptr) != ARCHIVE_OK) {
      return ArchiveFail(a.get(), "gzip !timestamp");
    }
  }
  // No padding to 10 KiB blocks: the kernel does not need it.
  if (archive_write_set_bytes_in_last_block(a.get(), 1) != ARCHIVE_OK) {
    return ArchiveFail(a.get(), "bytes in last block");
  }
  if (archive_write_open_fd(a.get(), out_fd) != ARCHIVE_OK) {
    return ArchiveFail(a.get(), "open " + out_path);
  }
  int64_t ino = 0;
  std::array<char, size_t{64} * 1024> buf;
  for (const auto& [path, entry] : plan.tree) {
    std::unique_ptr<archive_entry, EntryDeleter> e(archive_entry_new());
    if (!e) return Fail("libarchive: archive_entry_new failed");
    archive_entry_set_pathname(e.get(), path.c_str());
    archive_entry_set_ino(e.get(), ++ino);
    archive_entry_set_uid(e.get(), 0);
    archive_entry_set_gid(e.get(), 0);
    archive_entry_set_mtime(e.get(), 0, 0);
    archive_entry_set_dev(e.get(), 0);
    archive_entry_set_size(e.get(), 0);
    switch (entry.kind) {
      case EntryKind::kDir:
        archive_entry_set_filetype(e.get(), AE_IFDIR);
        archive_entry_set_nlink(e.get(), 2);
        break;
      case EntryKind::kFile:
        archive_entry_set_filetype(e.get(), AE_IFREG);
        archive_entry_set_nlink(e.get(), 1);
        archive_entry_set_size(e.get(), entry.size);
        break;
      case EntryKind::kCharDevice:
        archive_entry_set_filetype(e.get(), AE_IFCHR);
        archive_entry_set_nlink(e.get(), 1);
        archive_entry_set_rdev(e.get(), entry.rdev);
        break;
    }
    archive_entry_set_perm(e.get(), entry.mode);
    if (archive_write_header(a.get(), e.get()) != ARCHIVE_OK) {
      return ArchiveFail(a.get(), "write header of " + path);
    }
    if (entry.kind != EntryKind::kFile) continue;
    if (entry.host_path.empty()) {
      la_ssize_t n = archive_write_data(a.get(), entry.content.data(), entry.content.size());
      if (n != static_cast<la_ssize_t>(entry.content.size())) {
        return ArchiveFail(a.get(), "write data of " + path);
      }
      continue;
    }
    UniqueFd in(::open(entry.host_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!in) return FailErrno("open " + entry.host_path);
    int64_t written = 0;
    while (true) {
      // A prefix entry stops at its size; a whole file reads on to its end,
      // so growth is seen below.
      std::span<char> want(buf);
      if (!entry.whole_file)
        want = want.first(static_cast<size_t>(
            std::min<int64_t>(entry.size - written, static_cast<int64_t>(buf.size()))));
      if (want.empty()) break;
      size_t n = CELLA_TRY_CTX(ReadSome(in.Get(), std::as_writable_bytes(want)),
                               "read " + entry.host_path);
      if (n == 0) break;
      if (archive_write_data(a.get(), buf.data(), n) != static_cast<la_ssize_t>(n)) {
        return ArchiveFail(a.get(), "write data of " + path);
      }
      written += static_cast<int64_t>(n);
    }
    // The header promised entry.size bytes; a file that changed under us
    // would leave a corrupt archive.
    if (written != entry.size) {
      return Fail(entry.host_path + " changed size while the initramfs was written");
    }
  }
  if (archive_write_close(a.get()) != ARCHIVE_OK) return ArchiveFail(a.get(), "close " + out_path);
  return {};
}

Status WriteToFd(const Plan& plan, InitramfsCompression compression, UniqueFd out,
                 const std::string& out_path) {
  CELLA_TRY(WriteArchive(plan, compression, out.Get(), out_path));
  if (::fsync(out.Get()) != 0) return FailErrno("fsync " + out_path);
  if (::close(out.Release()) != 0) return FailErrno("close " + out_path);
  return {};
}

Status WriteToPath(const Plan& plan, InitramfsCompression compression,
                   const std::string& out_path) {
  UniqueFd out(::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!out) return FailErrno("create " + out_path);
  return WriteToFd(plan, compression, std::move(out), out_path);
}

}  // namespace

Result<InitramfsFile> WriteInitramfs(const InitramfsSpec& spec, const std::string& out_path) {
  Plan plan = CELLA_TRY(MakePlan(spec));
  CELLA_TRY(WriteToPath(plan, spec.compression, out_path));
  return InitramfsFile{out_path, std::move(plan.load_order), true};
}

Result<InitramfsFile> EnsureInitramfs(const std::string& home, const InitramfsSpec& spec) {
  Plan plan = CELLA_TRY(MakePlan(spec));
  std::string dir = host::InitramfsCacheDir(home);
  CELLA_TRY(host::MakeDirs(dir, 0755));
  std::string digests = host::DigestCacheDir(home);
  CELLA_TRY(host::MakeDirs(digests, 0755));
  std::string hash =
      CELLA_TRY_CTX(PlanHash(plan, spec.compression, digests), "initramfs cache key");
  std::string suffix = spec.compression == InitramfsCompression::kGzip ? ".cpio.gz" : ".cpio";
  std::string path = dir + "/" + hash + suffix;
  if (::access(path.c_str(), R_OK) == 0) {
    return InitramfsFile{path, std::move(plan.load_order), false};
  }
  if (errno != ENOENT) return FailErrno("access " + path);
  std::string tmp = path + ".tmp.XXXXXX";
  UniqueFd tmp_fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (!tmp_fd) return FailErrno("create temp file in " + dir);
  if (::fchmod(tmp_fd.Get(), 0644) != 0) {
    Error err = Error::FromErrno("fchmod " + tmp);
    ::unlink(tmp.c_str());
    return std::unexpected(std::move(err));
  }
  if (auto st = WriteToFd(plan, spec.compression, std::move(tmp_fd), tmp); !st) {
    ::unlink(tmp.c_str());
    return std::unexpected(std::move(st.error()));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Error err = Error::FromErrno("rename " + tmp + " -> " + path);
    ::unlink(tmp.c_str());
    return std::unexpected(std::move(err));
  }
  return InitramfsFile{path, std::move(plan.load_order), true};
}

}  // namespace cella::kernel
