// Child processes for the host side: short helper commands (mkfs.*, busybox)
// whose output we capture, and long-lived children (QEMU) that must die with
// us. Every child gets PR_SET_PDEATHSIG(SIGKILL), so a killed cella never
// leaves a QEMU behind.
//
// fork() is used (not posix_spawn) because PDEATHSIG must be set in the child;
// between fork and exec the child only makes async-signal-safe calls, so this
// is safe from multi-threaded callers. Functions here are thread-safe.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::host {

struct CommandResult {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  std::string output;  // stdout and stderr interleaved, capped
};

// Runs argv[0] (looked up in PATH) to completion with stdin from /dev/null.
// Kills it and fails when it runs longer than `timeout`. A nonzero exit is
// NOT an error here; callers decide (see CheckCommand).
Result<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                 std::chrono::milliseconds timeout,
                                 size_t max_output = size_t{256} * 1024);
// RunCommand, and a nonzero exit becomes an error quoting the command and
// the tail of its output.
Result<std::string> CheckCommand(const std::vector<std::string>& argv,
                                 std::chrono::milliseconds timeout);

// A started child. Owns a pidfd so waiting can be bounded and polled
// without a reaper thread. Destruction does not kill or reap: call Kill/Wait.
struct SpawnedProcess {
  pid_t pid = -1;
  UniqueFd pidfd;
};

// Where descriptors handed to a child start: inherited_fds[i] is fd
// kFirstInheritedFd + i in the child (e.g. QEMU's `-netdev tap,fd=3`).
inline constexpr int kFirstInheritedFd = 3;

// Starts argv with stdin from /dev/null and stdout+stderr appended to
// `output_path` (created 0600). The child dies when this process dies.
// `inherited_fds` are passed to the child at kFirstInheritedFd, +1, ...
// (without close-on-exec); the caller keeps and still owns its copies. No
// other descriptor of ours reaches the child as long as ours are all
// close-on-exec, which is the rule in this codebase.
Result<SpawnedProcess> SpawnWithOutputFile(const std::vector<std::string>& argv,
                                           const std::string& output_path,
                                           std::span<const int> inherited_fds = {});

struct ExitStatus {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  std::string Describe() const;
};

// Waits up to `timeout` for the child to exit and reaps it. nullopt-like
// semantics via errno_value ETIMEDOUT when it is still running.
Result<ExitStatus> WaitForExit(SpawnedProcess& process, std::chrono::milliseconds timeout);
// True when the child has exited (without reaping it).
Result<bool> HasExited(const SpawnedProcess& process);

// Single-quotes `text` for /bin/sh (QEMU's exec: migration URIs).
std::string ShellQuote(std::string_view text);

}  // namespace cella::host
