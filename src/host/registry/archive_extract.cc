#include "host/registry/archive_extract.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "base/beneath.h"
#include "base/io.h"
#include "host/os/paths.h"

namespace cella::registry {
namespace {

Result<std::string> CleanRelative(std::string_view name) {
  while (name.starts_with("./")) name.remove_prefix(2);
  while (name.ends_with("/")) name.remove_suffix(1);
  if (name.empty() || name == ".") return std::string();
  if (name.front() == '/') return Fail("absolute path");
  std::string out;
  size_t start = 0;
  while (start <= name.size()) {
    size_t slash = name.find('/', start);
    std::string_view c =
        name.substr(start, slash == std::string_view::npos ? name.npos : slash - start);
    if (c == "..") return Fail("\"..\" component");
    if (!c.empty() && c != ".") out += (out.empty() ? "" : "/") + std::string(c);
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return out;
}

}  // namespace

Result<std::string> ResolveInside(const std::string& root, const std::string& rel) {
  std::string clean = CELLA_TRY_CTX(CleanRelative(rel), "archive path \"" + rel + "\"");
  if (clean.empty()) return Fail("archive path \"" + rel + "\": empty");
  char real_root[PATH_MAX];
  if (::realpath(root.c_str(), real_root) == nullptr) return FailErrno("realpath " + root);
  std::string joined = root + "/" + clean;
  char real[PATH_MAX];
  if (::realpath(joined.c_str(), real) == nullptr) return FailErrno("archive path \"" + rel + "\"");
  std::string r(real), rr(real_root);
  if (!(r.size() > rr.size() && r.starts_with(rr) && r[rr.size()] == '/'))
    return Fail("archive path \"" + rel + "\" leads outside the archive");
  return r;
}

namespace {

// libarchive may have no message at all (NULL): never build a string from it.
std::string ArchiveError(archive* a) {
  const char* msg = archive_error_string(a);
  return msg != nullptr ? msg : "unknown libarchive error";
}

// Opens (creating if absent) each directory of rel's parent beneath root_fd
// without following any symlink: a symlink planted by an earlier entry can
// never become the parent of a later one.
Result<UniqueFd> OpenParentBeneath(int root_fd, const std::string& rel, const std::string& where) {
  size_t slash = rel.rfind('/');
  std::string_view parent =
      slash == std::string::npos ? std::string_view{} : std::string_view(rel).substr(0, slash);
  return OpenDirBeneath(root_fd, parent, MissingDirs::kCreate, where);
}

std::string BaseName(const std::string& rel) {
  size_t slash = rel.rfind('/');
  return slash == std::string::npos ? rel : rel.substr(slash + 1);
}

}  // namespace

Status ExtractImageArchive(const std::string& archive_path, const std::string& dest_dir,
                           const ExtractLimits& limits) {
  std::unique_ptr<archive, decltype(&archive_read_free)> a(archive_read_new(), &archive_read_free);
  if (!a) return Fail("archive_read_new: out of memory");
  // Tar, plain or compressed the ways `docker save | ...` is: no other
  // format's parser, and none of libarchive's filters that run an external
  // program (lrzip, lzop, grzip) on untrusted bytes.
  if (archive_read_support_format_tar(a.get()) != ARCHIVE_OK ||
      archive_read_support_filter_gzip(a.get()) < ARCHIVE_WARN ||
      archive_read_support_filter_zstd(a.get()) < ARCHIVE_WARN ||
      archive_read_support_filter_xz(a.get()) < ARCHIVE_WARN ||
      archive_read_support_filter_bzip2(a.get()) < ARCHIVE_WARN)
    return Fail("libarchive: " + ArchiveError(a.get()));
  struct stat archive_stat {};
  if (::stat(archive_path.c_str(), &archive_stat) != 0) return FailErrno("stat " + archive_path);
  // A bomb is refused by its expansion, not only its absolute size: past the
  // floor, the bytes written may not exceed max_ratio times the archive.
  const uint64_t ratio_cap = std::max<uint64_t>(
      limits.ratio_floor_bytes, static_cast<uint64_t>(archive_stat.st_size) * limits.max_ratio);
  const uint64_t byte_cap = std::min(limits.max_bytes, ratio_cap);
  // 64 KiB reads and copies: syscalls cost nothing at that size, and buffers
  // this small come from malloc's arenas, not a fresh mapping per archive.
  constexpr size_t kBlockBytes = size_t{64} << 10;
  if (archive_read_open_filename(a.get(), archive_path.c_str(), kBlockBytes) != ARCHIVE_OK)
    return Fail(archive_path + ": " + ArchiveError(a.get()));
  UniqueFd root(::open(dest_dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!root) return FailErrno("open " + dest_dir);
  auto buf = std::make_unique_for_overwrite<char[]>(kBlockBytes);
  uint64_t written = 0;
  uint64_t entries = 0;
  while (true) {
    archive_entry* entry = nullptr;
    int rc = archive_read_next_header(a.get(), &entry);
    if (rc == ARCHIVE_EOF) break;
    if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN)
      return Fail(archive_path + ": " + ArchiveError(a.get()));
    if (++entries > limits.max_entries)
      return Fail(archive_path + ": more than " + std::to_string(limits.max_entries) +
                  " entries; not an image archive");
    const char* raw_name = archive_entry_pathname(entry);
    std::string name = raw_name ? raw_name : "";
    const std::string where = archive_path + ": entry \"" + name + "\"";
    std::string rel = CELLA_TRY_CTX(CleanRelative(name), where);
    if (rel.empty()) continue;
    if (archive_entry_hardlink(entry) != nullptr)
      return Fail(where + ": hardlinks are not supported");
    UniqueFd parent = CELLA_TRY(OpenParentBeneath(root.Get(), rel, where));
    const std::string leaf = BaseName(rel);
    switch (archive_entry_filetype(entry)) {
      case AE_IFDIR:
        if (::mkdirat(parent.Get(), leaf.c_str(), 0755) != 0 && errno != EEXIST)
          return FailErrno(where + ": mkdir");
        break;
      case AE_IFLNK: {
        const char* target = archive_entry_symlink(entry);
        // Older docker save shares layers by relative symlink; anything
        // else is refused, later entries never pass through it
        // (OpenParentBeneath) and ResolveInside re-checks every use.
        if (target == nullptr || *target == '/') return Fail(where + ": absolute symlink");
        if (::symlinkat(target, parent.Get(), leaf.c_str()) != 0)
          return FailErrno(where + ": symlink");
        break;
      }
      case AE_IFREG: {
        UniqueFd fd(::openat(parent.Get(), leaf.c_str(),
                             O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644));
        if (!fd) return FailErrno(where + ": create");
        while (true) {
          la_ssize_t n = archive_read_data(a.get(), buf.get(), kBlockBytes);
          if (n < 0) return Fail(where + ": " + ArchiveError(a.get()));
          if (n == 0) break;
          written += static_cast<uint64_t>(n);
          if (written > byte_cap)
            return Fail(archive_path + ": expands past " + std::to_string(byte_cap >> 20) +
                        " MiB (archive is " + std::to_string(archive_stat.st_size >> 20) +
                        " MiB); refusing a decompression bomb");
          CELLA_TRY_CTX(WriteAll(fd.Get(), std::string_view(buf.get(), static_cast<size_t>(n))),
                        where);
        }
        break;
      }
      default:
        return Fail(where + ": unsupported entry type (only files, directories and symlinks)");
    }
  }
  return {};
}

}  // namespace cella::registry
