// The agent's file operations. Synchronous helpers for the small ops, and a
// temp-file writer for write_file's atomic replace. Errors keep the Linux
// errno (ENOENT, EISDIR, ENOTDIR, EACCES...) so the host can branch on it.
#pragma once

#include <sys/types.h>

#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "guest/agent/upload_journal.h"
#include "protocol/messages.h"

namespace cella::agent {

// lstat semantics: a symlink is reported as a symlink, with its target.
Result<protocol::FileInfo> StatPath(const std::string& path);
// Entries are lstat'ed (owner included); symlinks carry their target.
Result<std::vector<protocol::FileInfo>> ListDirectory(const std::string& path);
// mkdir -p; an existing directory is fine, an existing non-directory is not.
// uid/gid are applied (lchown) to the final component only, and only when
// this call created it.
Status MakeDirs(const std::string& path, mode_t mode, std::optional<uid_t> uid = std::nullopt,
                std::optional<gid_t> gid = std::nullopt);
// A symlink at path -> target, built beside it and renamed over it, so an
// existing non-directory is replaced atomically (a directory: EISDIR).
Status MakeSymlink(const protocol::SymlinkRequest& request);
// chown, chmod, mtime; never follows a final symlink.
Status SetAttributes(const protocol::SetAttrRequest& request);
// Never follows symlinks; a non-empty directory needs recursive.
enum class Recursive { kNo, kYes };
Status RemovePath(const std::string& path, Recursive recursive);

// Opens a file for streaming to the host; a directory fails with EISDIR.
struct OpenedForRead {
  UniqueFd fd;  // non-blocking, close-on-exec
  uint64_t size = 0;
  uint32_t mode = 0;
};
Result<OpenedForRead> OpenForRead(const std::string& path);

// Writes to a temp file beside the target; Commit() applies mode and
// owner, fsyncs, and renames over the target. Destroying an uncommitted
// writer removes the temp file, so an abandoned upload leaves nothing.
class AtomicFileWriter {
 public:
  enum class CreateParents { kNo, kYes };
  // mtime: seconds since the epoch given to the file before the rename.
  static Result<AtomicFileWriter> Create(const std::string& path, mode_t mode,
                                         std::optional<uid_t> uid, std::optional<gid_t> gid,
                                         CreateParents parents,
                                         std::optional<int64_t> mtime = std::nullopt);
  AtomicFileWriter(AtomicFileWriter&&) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  Status Write(std::span<const std::byte> data);
  // Returns the final size.
  Result<uint64_t> Commit();

 private:
  AtomicFileWriter() = default;
  std::string path_;
  std::string temp_path_;
  UniqueFd fd_;
  mode_t mode_ = 0644;
  std::optional<uid_t> uid_;
  std::optional<gid_t> gid_;
  std::optional<int64_t> mtime_;
  uint64_t written_ = 0;
  bool committed_ = false;
  // Declared last: destroyed after the destructor removed an abandoned temp.
  std::optional<UploadJournal::Entry> journal_;
};

}  // namespace cella::agent
