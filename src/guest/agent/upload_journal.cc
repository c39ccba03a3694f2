#include "guest/agent/upload_journal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

#include "base/beneath.h"
#include "base/io.h"

namespace cella::agent {
namespace {

constexpr size_t kSuffixDigits = 16;

struct JournalState {
  std::mutex mutex;
  UniqueFd fd;
  int in_flight = 0;
  size_t bytes = 0;                 // written since the journal was last emptied
  std::multiset<std::string> live;  // lines of the uploads in flight
};

JournalState& State() {
  static JournalState* state = new JournalState();  // leaked: used until exit
  return *state;
}

bool IsLowerHex(std::string_view text) {
  for (char c : text) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

std::string_view ParentOf(std::string_view path) {
  size_t slash = path.rfind('/');
  if (slash == std::string_view::npos || slash == 0) return "/";
  return path.substr(0, slash);
}

// The directory `dir` (absolute) beneath root_fd: no symlink, no "..",
// nothing created.
Result<UniqueFd> OpenParentBeneath(int root_fd, std::string_view dir) {
  return OpenDirBeneath(root_fd, dir, MissingDirs::kFail, "upload journal");
}

}  // namespace

bool IsUploadTempName(std::string_view name) {
  if (name.size() <= kSuffixDigits || !IsLowerHex(name.substr(name.size() - kSuffixDigits)))
    return false;
  std::string_view head = name.substr(0, name.size() - kSuffixDigits);
  if (head == ".cella-ln-") return true;
  // "." + base + ".cella-", base not empty.
  constexpr std::string_view kTail = ".cella-";
  return head.size() > kTail.size() + 1 && head.front() == '.' && head.ends_with(kTail);
}

void UploadJournal::Install(UniqueFd fd) {
  JournalState& state = State();
  std::lock_guard lock(state.mutex);
  state.fd = std::move(fd);
  state.bytes = 0;
}

UploadJournal::Entry::Entry() {
  JournalState& state = State();
  std::lock_guard lock(state.mutex);
  ++state.in_flight;
}

UploadJournal::Entry::Entry(Entry&& other) noexcept
    : active_(other.active_), recorded_(std::move(other.recorded_)) {
  other.active_ = false;
}

UploadJournal::Entry::~Entry() {
  if (!active_) return;
  JournalState& state = State();
  std::lock_guard lock(state.mutex);
  for (const std::string& line : recorded_) {
    if (auto it = state.live.find(line); it != state.live.end()) state.live.erase(it);
  }
  --state.in_flight;
  if (!state.fd) return;
  // Failures below only leave stale lines, which the next boot ignores
  // (their paths no longer name temps, or name ones that are stale too).
  if (state.in_flight == 0) {
    if (::ftruncate(state.fd.Get(), 0) == 0) state.bytes = 0;
  } else if (state.bytes > kCompactBytes) {
    // Long-running uploads keep the journal from emptying: keep only theirs.
    std::string lines;
    for (const std::string& line : state.live) lines += line;
    if (::ftruncate(state.fd.Get(), 0) == 0 && WriteAll(state.fd.Get(), lines) &&
        ::fdatasync(state.fd.Get()) == 0)
      state.bytes = lines.size();
  }
}

Status UploadJournal::Entry::Record(const std::string& temp_path) {
  if (temp_path.find('\n') != std::string::npos || !temp_path.starts_with('/'))
    return Fail("upload journal: temp path " + temp_path + " is not one line");
  JournalState& state = State();
  {
    std::lock_guard lock(state.mutex);
    if (!state.fd) return {};
  }
  // The directory as the init will walk it: no symlink on the way (a
  // merged-/usr image's /bin, a /var/run link) or it could not be cleaned.
  // Resolved without the lock: on a host share this may wait for the
  // agent's loop, and nothing else may wait with it.
  std::string parent(ParentOf(temp_path));
  char resolved[PATH_MAX];
  if (::realpath(parent.c_str(), resolved) == nullptr) return FailErrno("realpath " + parent);
  std::string dir = resolved;
  std::lock_guard lock(state.mutex);
  if (!state.fd) return {};
  std::string line = (dir == "/" ? "" : dir) + temp_path.substr(temp_path.rfind('/')) + "\n";
  if (line.find('\n') != line.size() - 1) return Fail("upload journal: " + dir + " has a newline");
  CELLA_TRY_CTX(WriteAll(state.fd.Get(), line), "upload journal");
  if (::fdatasync(state.fd.Get()) != 0) return FailErrno("upload journal: fdatasync");
  state.bytes += line.size();
  state.live.insert(line);
  recorded_.push_back(std::move(line));
  return {};
}

Result<size_t> RemoveJournaledTemps(int root_fd, std::string_view journal) {
  size_t removed = 0;
  std::string failures;  // every entry is tried; the failures are reported at the end
  size_t pos = 0;
  while (pos < journal.size()) {
    size_t end = journal.find('\n', pos);
    if (end == std::string_view::npos) end = journal.size();
    std::string_view path = journal.substr(pos, end - pos);
    pos = end + 1;
    if (!path.starts_with('/') || path.find('\0') != std::string_view::npos) continue;
    std::string name(path.substr(path.rfind('/') + 1));
    if (!IsUploadTempName(name)) continue;
    auto dir = OpenParentBeneath(root_fd, ParentOf(path));
    if (!dir) continue;  // gone, or not a plain directory path: nothing of ours
    struct stat st {};
    if (::fstatat(dir->Get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
      if (errno != ENOENT) failures += "; stat " + std::string(path) + ": " + std::strerror(errno);
      continue;
    }
    if (!S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) continue;
    if (::unlinkat(dir->Get(), name.c_str(), 0) != 0) {
      if (errno != ENOENT)
        failures += "; remove " + std::string(path) + ": " + std::strerror(errno);
      continue;
    }
    ++removed;
  }
  if (!failures.empty()) return Fail("removed " + std::to_string(removed) + " temps" + failures);
  return removed;
}

}  // namespace cella::agent
