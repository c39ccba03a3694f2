#include "host/registry/archive_extract.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <memory>
#include <vector>

#include "base/io.h"
#include "host/vmm/paths.h"

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

Status ExtractImageArchive(const std::string& archive_path, const std::string& dest_dir) {
  std::unique_ptr<archive, decltype(&archive_read_free)> a(archive_read_new(), &archive_read_free);
  if (!a) return Fail("archive_read_new: out of memory");
  archive_read_support_format_tar(a.get());
  archive_read_support_filter_all(a.get());
  if (archive_read_open_filename(a.get(), archive_path.c_str(), 1 << 20) != ARCHIVE_OK)
    return Fail(archive_path + ": " + archive_error_string(a.get()));
  std::vector<char> buf(1 << 20);
  while (true) {
    archive_entry* entry = nullptr;
    int rc = archive_read_next_header(a.get(), &entry);
    if (rc == ARCHIVE_EOF) break;
    if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN)
      return Fail(archive_path + ": " + archive_error_string(a.get()));
    const char* raw_name = archive_entry_pathname(entry);
    std::string name = raw_name ? raw_name : "";
    const std::string where = archive_path + ": entry \"" + name + "\"";
    std::string rel = CELLA_TRY_CTX(CleanRelative(name), where);
    if (rel.empty()) continue;
    std::string out = dest_dir + "/" + rel;
    std::string parent = out.substr(0, out.rfind('/'));
    CELLA_TRY(host::MakeDirs(parent, 0755));
    if (archive_entry_hardlink(entry) != nullptr)
      return Fail(where + ": hardlinks are not supported");
    switch (archive_entry_filetype(entry)) {
      case AE_IFDIR:
        CELLA_TRY(host::MakeDirs(out, 0755));
        break;
      case AE_IFLNK: {
        const char* target = archive_entry_symlink(entry);
        // Older docker save shares layers by relative symlink; anything
        // else is refused, and ResolveInside re-checks on use.
        if (target == nullptr || *target == '/') return Fail(where + ": absolute symlink");
        if (::symlink(target, out.c_str()) != 0) return FailErrno("symlink " + out);
        break;
      }
      case AE_IFREG: {
        UniqueFd fd(
            ::open(out.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644));
        if (!fd) return FailErrno("create " + out);
        while (true) {
          la_ssize_t n = archive_read_data(a.get(), buf.data(), buf.size());
          if (n < 0) return Fail(where + ": " + archive_error_string(a.get()));
          if (n == 0) break;
          CELLA_TRY_CTX(WriteAll(fd.Get(), std::string_view(buf.data(), static_cast<size_t>(n))),
                        out);
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
