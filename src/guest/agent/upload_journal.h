// The upload journal: which temp files of uploads (write_file, symlink) are
// in flight, so a VM that dies in the middle of a `cella cp` into it leaves
// no `.NAME.cella-XXXXXXXXXXXXXXXX` file behind once it boots again.
//
// The journal is a file on the writable layer's own disk, beside the
// overlay's upper/ and work/ (never visible in the sandbox's tree). The
// init opens it before the switch of root, removes whatever temps it lists
// (RemoveJournaledTemps), empties it, and installs it for the agent, which
// runs in the same process (PID 1). Each temp's path (its directory with
// symlinks resolved, so the init can walk to it without following any) is
// appended and synced before the temp is created. The journal is emptied
// whenever no upload is in flight, and rewritten with only the live entries
// once it grows past kCompactBytes, so it stays about as small as the
// number of concurrent uploads.
//
// Crash ordering: the entry is fdatasync'ed before the temp exists, so a
// temp that survives a crash is always listed (ext4's delayed allocation
// gives no ordering between the two files otherwise).
//
// Threading: the agent's loop is single-threaded; the state is guarded all
// the same so a future second thread cannot corrupt the count.
// Without an installed journal (systemd mode, tmpfs layer, unit tests)
// every call is a no-op.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::agent {

// True for the names the agent gives its temps: "." + base + ".cella-" or
// ".cella-ln-", then 16 lowercase hex digits.
bool IsUploadTempName(std::string_view name);

class UploadJournal {
 public:
  static constexpr size_t kCompactBytes = 64 * 1024;

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

    // Records `temp_path` (absolute, no newline) before the caller creates it.
    Status Record(const std::string& temp_path);

   private:
    bool active_ = true;
    std::vector<std::string> recorded_;  // as written to the journal
  };
};

// Removes, beneath the directory root_fd, every path the journal text lists
// that still names an upload temp (a regular file or a symlink), never
// following a symlink or ".." on the way to it. Other lines are ignored: the
// journal is the guest's own and may be damaged. Returns how many were
// removed; an entry that cannot be stat'ed or removed does not stop the
// others, and all such failures are reported together afterwards.
Result<size_t> RemoveJournaledTemps(int root_fd, std::string_view journal);

}  // namespace cella::agent
