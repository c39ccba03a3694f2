#include "cli/cp_stream.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <memory>
#include <string>

#include "base/beneath.h"
#include "base/unique_fd.h"

namespace cella::cli {
namespace {

struct ReadCloser {
  void operator()(archive* a) const { archive_read_free(a); }
};
struct WriteCloser {
  void operator()(archive* a) const { archive_write_free(a); }
};
using Reader = std::unique_ptr<archive, ReadCloser>;
using Writer = std::unique_ptr<archive, WriteCloser>;

std::unexpected<Error> ArchiveError(archive* a, const std::string& what) {
  const char* why = archive_error_string(a);
  return Fail(what + ": " + (why != nullptr ? why : "libarchive error"));
}

}  // namespace

Status WriteTarOf(const std::string& dir, const std::string& entry, int fd) {
  Writer out(archive_write_new());
  Reader disk(archive_read_disk_new());
  if (!out || !disk) return Fail("cp: out of memory for the tar stream");
  if (archive_write_set_format_pax_restricted(out.get()) != ARCHIVE_OK ||
      archive_write_open_fd(out.get(), fd) != ARCHIVE_OK)
    return ArchiveError(out.get(), "cp: tar to stdout");
  // Links stay links; names stay as the guest gave them.
  if (archive_read_disk_set_symlink_physical(disk.get()) != ARCHIVE_OK ||
      archive_read_disk_set_standard_lookup(disk.get()) != ARCHIVE_OK)
    return ArchiveError(disk.get(), "cp: read the copy");
  const std::string root = dir + "/" + entry;
  if (archive_read_disk_open(disk.get(), root.c_str()) != ARCHIVE_OK)
    return ArchiveError(disk.get(), "cp: read the copy");
  for (;;) {
    archive_entry* e = archive_entry_new();
    if (e == nullptr) return Fail("cp: out of memory for the tar stream");
    std::unique_ptr<archive_entry, decltype(&archive_entry_free)> owned(e, archive_entry_free);
    int r = archive_read_next_header2(disk.get(), e);
    if (r == ARCHIVE_EOF) break;
    if (r != ARCHIVE_OK) return ArchiveError(disk.get(), "cp: read the copy");
    archive_read_disk_descend(disk.get());
    // Member names relative to `dir`: "entry/...".
    std::string name = archive_entry_pathname(e);
    if (name.starts_with(dir + "/")) name.erase(0, dir.size() + 1);
    archive_entry_copy_pathname(e, name.c_str());
    if (archive_write_header(out.get(), e) != ARCHIVE_OK)
      return ArchiveError(out.get(), "cp: tar to stdout");
    if (archive_entry_filetype(e) == AE_IFREG && archive_entry_size(e) > 0) {
      const void* block = nullptr;
      size_t size = 0;
      la_int64_t offset = 0;
      // read_disk hands the data of the entry just read.
      for (;;) {
        int d = archive_read_data_block(disk.get(), &block, &size, &offset);
        if (d == ARCHIVE_EOF) break;
        if (d != ARCHIVE_OK) return ArchiveError(disk.get(), "cp: read " + name);
        if (archive_write_data(out.get(), block, size) < 0)
          return ArchiveError(out.get(), "cp: tar to stdout");
      }
    }
  }
  if (archive_write_close(out.get()) != ARCHIVE_OK)
    return ArchiveError(out.get(), "cp: tar to stdout");
  return {};
}

namespace {

// `name` hard-linked to `target` (both member names) beneath root_fd: the
// target is walked without following any symlink and must be a regular
// file; the new name's parent must exist (tar lists directories first).
Status MakeHardLink(int root_fd, const std::string& name, const std::string& target) {
  for (const std::string& path : {name, target}) {
    if (path.empty() || path.front() == '/')
      return Fail("cp: tar member " + name + ": absolute link names are refused");
    for (const auto& part : std::filesystem::path(path))
      if (part == "..") return Fail("cp: tar member " + name + ": \"..\" is refused");
  }
  UniqueFd source = CELLA_TRY(OpenPathBeneath(root_fd, target, "cp: hard link target"));
  struct stat st {};
  if (::fstat(source.Get(), &st) != 0) return FailErrno("cp: stat " + target);
  if (!S_ISREG(st.st_mode))
    return Fail("cp: tar member " + name + ": links to " + target + ", not a regular file");
  std::filesystem::path where(name);
  std::string leaf = where.filename().string();
  if (leaf.empty() || leaf == ".") return Fail("cp: tar member " + name + ": no file name");
  UniqueFd parent = CELLA_TRY(
      OpenDirBeneath(root_fd, where.parent_path().string(), MissingDirs::kFail, "cp: hard link"));
  // linkat of an O_PATH descriptor through /proc needs no privilege
  // (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
  const std::string proc = "/proc/self/fd/" + std::to_string(source.Get());
  (void)::unlinkat(parent.Get(), leaf.c_str(), 0);  // a later member replaces, as tar does
  if (::linkat(AT_FDCWD, proc.c_str(), parent.Get(), leaf.c_str(), AT_SYMLINK_FOLLOW) != 0)
    return FailErrno("cp: link " + name + " to " + target);
  return {};
}

}  // namespace

Status RemoveWhenProcessEnds(const std::string& dir) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return FailErrno("cp: pipe2");
  UniqueFd read_end(fds[0]);
  UniqueFd write_end(fds[1]);
  pid_t child = ::fork();
  if (child < 0) return FailErrno("cp: fork");
  if (child == 0) {
    // Ctrl-C reaches the whole process group, and a closed terminal sends
    // SIGHUP: this one must outlive both to do its job.
    ::signal(SIGINT, SIG_IGN);
    ::signal(SIGHUP, SIG_IGN);
    ::signal(SIGTERM, SIG_IGN);
    ::signal(SIGPIPE, SIG_IGN);
    const int keep = read_end.Get();
    // Holding nothing else of ours: a pipe on our stdout must see EOF when
    // we end, not when this one does.
    if (keep > 0) (void)::close_range(0, static_cast<unsigned>(keep) - 1, 0);
    (void)::close_range(static_cast<unsigned>(keep) + 1, ~0U, 0);
    char byte = 0;
    for (;;) {
      ssize_t n = ::read(keep, &byte, 1);
      if (n < 0 && errno == EINTR) continue;
      break;  // EOF: every holder of the write end (the CLI) is gone
    }
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
    ::_exit(0);
  }
  // The write end stays open in this process until it ends (never closed):
  // released on purpose, CLOEXEC so that nothing we exec holds it.
  (void)write_end.Release();
  return {};
}

Result<int> ExtractTarInto(int fd, const std::string& dir) {
  Reader in(archive_read_new());
  if (!in) return Fail("cp: out of memory for the tar stream");
  if (archive_read_support_format_tar(in.get()) != ARCHIVE_OK ||
      archive_read_support_format_gnutar(in.get()) != ARCHIVE_OK ||
      archive_read_open_fd(in.get(), fd, 64 * 1024) != ARCHIVE_OK)
    return ArchiveError(in.get(), "cp: tar from stdin");
  Writer disk(archive_write_disk_new());
  if (!disk) return Fail("cp: out of memory for the tar stream");
  // Secure: no "..", nothing written through a symlink (absolute member
  // names are refused below, before `dir` is put in front); modes and times
  // kept, owners and special bits not.
  const int flags = ARCHIVE_EXTRACT_SECURE_NODOTDOT | ARCHIVE_EXTRACT_SECURE_SYMLINKS |
                    ARCHIVE_EXTRACT_PERM | ARCHIVE_EXTRACT_TIME;
  if (archive_write_disk_set_options(disk.get(), flags) != ARCHIVE_OK)
    return ArchiveError(disk.get(), "cp: extract");
  UniqueFd root(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!root) return FailErrno("cp: open " + dir);
  int links = 0;
  for (;;) {
    archive_entry* e = nullptr;
    int r = archive_read_next_header(in.get(), &e);
    if (r == ARCHIVE_EOF) break;
    if (r != ARCHIVE_OK && r != ARCHIVE_WARN) return ArchiveError(in.get(), "cp: tar from stdin");
    if (const char* target = archive_entry_hardlink(e); target != nullptr) {
      const char* member = archive_entry_pathname(e);
      CELLA_TRY(MakeHardLink(root.Get(), member != nullptr ? member : "", target));
      ++links;
      continue;
    }
    const mode_t type = archive_entry_filetype(e);
    if (type != AE_IFREG && type != AE_IFDIR && type != AE_IFLNK) continue;  // devices, fifos
    std::string name = archive_entry_pathname(e);
    if (name.empty() || name.front() == '/')
      return Fail("cp: tar member " + name + ": absolute names are refused");
    archive_entry_copy_pathname(e, (dir + "/" + name).c_str());
    archive_entry_set_perm(e, archive_entry_perm(e) & 01777);  // no setuid/setgid
    if (archive_write_header(disk.get(), e) != ARCHIVE_OK)
      return ArchiveError(disk.get(), "cp: extract " + name);
    if (type == AE_IFREG) {
      const void* block = nullptr;
      size_t size = 0;
      la_int64_t offset = 0;
      for (;;) {
        int d = archive_read_data_block(in.get(), &block, &size, &offset);
        if (d == ARCHIVE_EOF) break;
        if (d != ARCHIVE_OK) return ArchiveError(in.get(), "cp: tar from stdin");
        if (archive_write_data_block(disk.get(), block, size, offset) != ARCHIVE_OK)
          return ArchiveError(disk.get(), "cp: extract " + name);
      }
    }
    if (archive_write_finish_entry(disk.get()) != ARCHIVE_OK)
      return ArchiveError(disk.get(), "cp: extract " + name);
  }
  if (archive_write_close(disk.get()) != ARCHIVE_OK) return ArchiveError(disk.get(), "cp: extract");
  return links;
}

}  // namespace cella::cli
