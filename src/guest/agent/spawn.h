// Starts one exec request as a child process in its own session and process
// group, with pipes or a pseudo-terminal for its standard streams.
#pragma once

#include <sys/types.h>

#include "base/result.h"
#include "base/unique_fd.h"
#include "protocol/messages.h"

namespace cella::agent {

enum class Hardening { kOff, kOn };

// kUntilExec: the agent's loop waits until the child has exec'd or failed
// (a vfork: nothing of the agent is copied). kNoWait: the child is forked
// and Spawn returns at once with its status pipe; for a sandbox whose host
// shares are served by that same loop, where the child's chdir or exec on
// a share waits for the loop to relay the lookup.
enum class SpawnWait { kUntilExec, kNoWait };

struct SpawnedChild {
  pid_t pid = -1;       // also the process group id (the child calls setsid)
  UniqueFd stdin_fd;    // write end; invalid when the request has no stdin
  UniqueFd stdout_fd;   // read end (the pty master in tty mode)
  UniqueFd stderr_fd;   // read end; invalid in tty mode (merged into the pty)
  UniqueFd pty_master;  // tty mode only: for TIOCSWINSZ
  // Detached requests only: the program could not be executed (errno:
  // ENOENT not found, else cannot run); the child has exited and been reaped.
  // Nobody reads a detached child's stderr, so its caller reports this.
  int exec_errno = 0;
  // kNoWait only: readable once the child has exec'd or failed before it;
  // FinishSpawn reads it (exec_errno and setup failures are known then).
  UniqueFd status_fd;
};

// All returned descriptors are non-blocking and close-on-exec. Failures
// before exec (user lookup, workdir, hardening) come back as errors with
// errno; a missing or non-executable binary is not an error: the child
// writes a shell-like message on its stderr and exits 127 or 126 (for a
// detached request, exec_errno says so instead).
// kCreate: the sandbox's main process (docker's -w): a missing working
// directory is made (by root, mode 0755) before the child changes to it.
// It is made there, in the child, since it may lie on a host share mounted
// after the sandbox's own set-up. An exec's missing directory fails.
enum class MissingWorkdir { kFail, kCreate };

Result<SpawnedChild> Spawn(const protocol::ExecRequest& request, Hardening hardening,
                           SpawnWait wait = SpawnWait::kUntilExec,
                           MissingWorkdir missing_workdir = MissingWorkdir::kFail);

// For a kNoWait child whose status_fd is readable: its exec errno for a
// detached request (0: it runs), or its failure before exec as an error, as
// Spawn reports them for kUntilExec. Reaps nothing: a child that failed
// exits on its own and is its caller's to reap.
Result<int> FinishSpawn(UniqueFd status_fd, const protocol::ExecRequest& request);

}  // namespace cella::agent
