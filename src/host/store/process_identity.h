// Identifies a process by pid plus kernel start time, so a recorded pid that
// the kernel has since handed to an unrelated process is not mistaken for the
// process we started. Pure /proc reads; thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"

namespace cella::store {

struct ProcessIdentity {
  int pid = 0;  // 0 = no process recorded
  // /proc/<pid>/stat field 22 (starttime, clock ticks since boot). Two
  // processes that get the same pid cannot share it.
  uint64_t start_ticks = 0;

  bool operator==(const ProcessIdentity&) const = default;
};

// Reads the identity of a live pid. Fails with errno_value ESRCH when the
// process is gone; a zombie counts as gone (it runs no code any more).
Result<ProcessIdentity> IdentifyProcess(int pid, const std::string& proc_root = "/proc");

// True when the identity's pid exists, is not a zombie and started at the
// recorded time. pid 0 is never alive. When /proc cannot be read for a
// reason other than the process being gone, answers true (and logs a
// warning): callers kill and clean up on "dead", so only proof counts.
bool IsAlive(const ProcessIdentity& identity, const std::string& proc_root = "/proc");

// What /proc proves about a recorded process: kUnknown when it cannot be
// read or parsed (neither alive nor dead is proven).
enum class Liveness { kAlive, kGone, kUnknown };
Liveness CheckProcess(const ProcessIdentity& identity, const std::string& proc_root = "/proc");

// Sends `signal` to the recorded process only once it is proven to be that
// process: a pidfd is opened first and the identity checked after, so the
// signal reaches the process that was verified even if the pid is reused a
// moment later. Returns true when sent, false when the process is gone (or
// the pid belongs to another process now). An error, and no signal, when
// the identity cannot be verified (e.g. /proc unreadable): a process that
// is not proven ours is never signalled.
Result<bool> SignalIfSame(const ProcessIdentity& identity, int signal,
                          const std::string& proc_root = "/proc");

}  // namespace cella::store
