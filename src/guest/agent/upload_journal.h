// The upload journal: which temp files of uploads (write_file, symlink) are
// in flight, so a VM that dies in the middle of a `cella cp` into it leaves
// no `.NAME.cella-XXXXXXXXXXXXXXXX` file behind once it boots again.
//
// The journal is a file on the writable layer's own disk, beside the
// overlay's upper/ and work/ (never visible in the sandbox's tree). The
// init opens it before the switch of root, removes whatever temps it lists
// (RemoveJournaledTemps), empties it, and installs it for the agent, which
// runs in the same process (PID 1). Each temp's path is appended before the
// temp is created; the journal is emptied whenever no upload is in flight,
// so it stays as small as the number of concurrent uploads.
//
// Crash ordering: the append and the temp's creation are on the same ext4
// (data=ordered) when the temp is on the root, so the entry reaches the disk
// no later than the temp's name does. A temp on another disk (a volume)
// gets an fdatasync of the journal first.
//
// Threading: the agent's loop is single-threaded; the state is guarded all
// the same so a future second thread cannot corrupt the count.
// Without an installed journal (systemd mode, tmpfs layer, unit tests)
// every call is a no-op.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::agent {

// True for the names the agent gives its temps: "." + base + ".cella-" or
// ".cella-ln-", then 16 lowercase hex digits.
bool IsUploadTempName(std::string_view name);

class UploadJournal {
 public:
  // Installs the process-wide journal (fd: read-write, O_APPEND); an empty
  // fd removes it.
  static void Install(UniqueFd fd);

  // One upload: counts as in flight from construction to destruction.
  class Entry {
   public:
    Entry();
    ~Entry();
    Entry(Entry&& other) noexcept;
    Entry& operator=(Entry&&) = delete;
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;

    // Records `temp_path` (absolute) before the caller creates it.
    Status Record(const std::string& temp_path);

   private:
    bool active_ = true;
  };
};

// Removes, beneath the directory root_fd, every path the journal text lists
// that still names an upload temp (a regular file or a symlink), never
// following a symlink or ".." on the way to it. Other lines are ignored: the
// journal is the guest's own and may be damaged. Returns how many were
// removed.
Result<size_t> RemoveJournaledTemps(int root_fd, std::string_view journal);

}  // namespace cella::agent
