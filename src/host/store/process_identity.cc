#include "host/store/process_identity.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <string_view>

#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"

namespace cella::store {
namespace {

// /proc/<pid>/stat is one line; comm is at most 16 bytes, so 4 KiB is ample.
constexpr size_t kMaxStatBytes = 4096;

Error Gone(int pid) {
  Error e = Error::Msg("process " + std::to_string(pid) + " does not exist");
  e.errno_value = ESRCH;
  return e;
}

}  // namespace

Result<ProcessIdentity> IdentifyProcess(int pid, const std::string& proc_root) {
  if (pid <= 0) {
    Error e = Error::Msg("identify process: invalid pid " + std::to_string(pid));
    e.errno_value = EINVAL;
    return std::unexpected(std::move(e));
  }
  const std::string path = proc_root + "/" + std::to_string(pid) + "/stat";
  auto text = ReadFileToString(path, kMaxStatBytes);
  if (!text) {
    // ESRCH: the process died between open and read.
    if (text.error().errno_value == ENOENT || text.error().errno_value == ESRCH)
      return std::unexpected(Gone(pid));
    return std::unexpected(std::move(text.error()));
  }
  // comm (field 2) is in parentheses and may itself contain ") ", so fields
  // are counted from the LAST ')'.
  const size_t close = text->rfind(')');
  if (close == std::string::npos) return Fail(path + ": no ')' after the command name");
  std::string_view rest = std::string_view(*text).substr(close + 1);
  // Fields after comm start at 3 (state); starttime is field 22.
  int field = 2;
  std::string_view state;
  std::string_view start;
  size_t pos = 0;
  while (pos < rest.size() && field < 22) {
    while (pos < rest.size() && rest[pos] == ' ') ++pos;
    size_t end = rest.find(' ', pos);
    if (end == std::string_view::npos) end = rest.size();
    // A trailing newline ends the last field.
    std::string_view token = rest.substr(pos, end - pos);
    if (!token.empty() && token.back() == '\n') token.remove_suffix(1);
    ++field;
    if (field == 3) state = token;
    if (field == 22) start = token;
    pos = end;
  }
  if (field < 22 || start.empty()) return Fail(path + ": fewer than 22 fields");
  if (state == "Z" || state == "X" || state == "x") return std::unexpected(Gone(pid));
  uint64_t ticks = 0;
  auto [ptr, ec] = std::from_chars(start.data(), start.data() + start.size(), ticks);
  if (ec != std::errc() || ptr != start.data() + start.size())
    return Fail(path + ": field 22 (starttime) is not a number: \"" + std::string(start) + "\"");
  return ProcessIdentity{pid, ticks};
}

Liveness CheckProcess(const ProcessIdentity& identity, const std::string& proc_root) {
  if (identity.pid <= 0) return Liveness::kGone;
  auto now = IdentifyProcess(identity.pid, proc_root);
  if (now) return now->start_ticks == identity.start_ticks ? Liveness::kAlive : Liveness::kGone;
  if (now.error().errno_value == ESRCH) return Liveness::kGone;
  log::Warn("cannot tell whether a process is alive",
            {{"pid", identity.pid}, {"error", now.error().message}});
  return Liveness::kUnknown;
}

bool IsAlive(const ProcessIdentity& identity, const std::string& proc_root) {
  // Unreadable or unparsable /proc: proof of death is missing, and callers
  // act on "dead" by failing the sandbox and cleaning up, so the safe
  // answer is "alive".
  return CheckProcess(identity, proc_root) != Liveness::kGone;
}

Result<bool> SignalIfSame(const ProcessIdentity& identity, int signal,
                          const std::string& proc_root) {
  if (identity.pid <= 0) return false;
  // Raw syscalls: glibc 2.36's <sys/pidfd.h> lacks C linkage for C++.
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, identity.pid, 0)));
  if (!pidfd) {
    if (errno == ESRCH) return false;
    return FailErrno("pidfd_open pid " + std::to_string(identity.pid));
  }
  // Checked after the pidfd exists: a match now means the pidfd holds the
  // recorded process, whatever happens to the pid number afterwards.
  switch (CheckProcess(identity, proc_root)) {
    case Liveness::kGone:
      return false;
    case Liveness::kUnknown:
      return Fail("pid " + std::to_string(identity.pid) +
                  " not signalled: cannot verify it is the recorded process");
    case Liveness::kAlive:
      break;
  }
  if (::syscall(SYS_pidfd_send_signal, pidfd.Get(), signal, nullptr, 0) != 0) {
    if (errno == ESRCH) return false;
    return FailErrno("signal pid " + std::to_string(identity.pid));
  }
  return true;
}

}  // namespace cella::store
