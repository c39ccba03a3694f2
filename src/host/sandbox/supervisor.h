// The sandbox supervisor: one process per running sandbox (`cella` re-executed
// as `cella __supervise ID`, in its own session, detached from the terminal).
// It owns the sandbox's QEMU (a child that dies with it), the only agent link
// (behind a router that CLI processes reach at mux.sock), published ports,
// the main process's output log and the control socket; it records every
// state change in the state store and exits when the VM is gone, removing
// the sandbox first when it was started with --rm.
//
// What decides the sandbox's recorded states (boot, stop/kill/status,
// signals, watching the VM and the agent link, the final record) is
// SandboxLifecycle (lifecycle.h); this file builds the QEMU machine, the
// router, ports and egress around it.
//
// Readiness: when `ready_fd` >= 0 the supervisor writes zero or more
// "notice: <text>\n" lines to it (a sandbox that boots cold when it would
// have started warm, and why; SpawnSupervisor prints them as notices on
// stderr), then exactly one line, "ok\n" once the sandbox is running or
// "error: <message>\n", and closes it, so the spawning CLI can report boot
// failures itself.
#pragma once

#include <chrono>
#include <string>

#include "base/result.h"

namespace cella::sandbox {

enum class MainAttach {
  kBySupervisor,  // detached: the supervisor starts the main process (stdin closed)
  kByClient,      // foreground: the CLI attaches through mux.sock
};

struct SupervisorArgs {
  std::string id;
  int ready_fd = -1;
  MainAttach main_attach = MainAttach::kBySupervisor;
  // Wake the sandbox from its standby snapshot (cella resume) instead of
  // booting it: a snapshot that is missing, corrupt or made for another
  // kernel/QEMU/shape fails the start with that reason (disks kept).
  bool resume = false;
  // Started again by its own restart policy (`--restarted`): the restart
  // count goes on (layout.h RestartStatePath) instead of starting at 0.
  bool restarted = false;
};

// Runs until the sandbox's VM is gone. Returns the process exit code (0 when
// the sandbox ran and its end was recorded, 1 otherwise).
int RunSupervisor(const SupervisorArgs& args);

// Starts `cella __supervise` (self_exe) for `id` as a daemon: double fork,
// new session, stdio on /dev/null, stderr appended to `log_path`. Waits up to
// `ready_timeout` for its readiness line; an "error: ..." line becomes the
// returned error, "notice: ..." lines go to log::Notice (stderr).
// `secrets_json` ({"NAME":"value",...}) reaches the supervisor on its stdin,
// never through argv, the environment or a file.
Status SpawnSupervisor(const std::string& self_exe, const std::string& id, MainAttach attach,
                       const std::string& log_path, std::chrono::milliseconds ready_timeout,
                       const std::string& secrets_json = {}, bool resume = false);

}  // namespace cella::sandbox
