// The workload without an agent (skip_guest_agent) and the systemd hand-off.
// Both run in PID 1 after the switch into the new root.
#pragma once

#include <chrono>

#include "base/result.h"
#include "protocol/config.h"

namespace cella::init {

// Grace between SIGTERM and SIGKILL when everything is stopped.
inline constexpr std::chrono::milliseconds kDefaultStopGrace{1000};
inline constexpr std::chrono::milliseconds kMaxStopGrace{10 * 60 * 1000};

// Stops every process but PID 1 before power-off: SIGTERM to all, then up to
// `grace` (0: kDefaultStopGrace; capped at kMaxStopGrace) while PID 1 reaps
// them, then SIGKILL. Returns early once no child is left. Blocks SIGCHLD.
void StopAllProcesses(std::chrono::milliseconds grace);

// Starts entrypoint ++ cmd as a child with the config's env, workdir and
// user, stdio on the console, hardened unless privileged. Supervises until
// it exits: reaps every orphan, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/
// SIGUSR1/SIGUSR2 to it. When it has exited, the remaining processes get
// SIGTERM, then (after at most 1 s) SIGKILL. Returns its waitpid status; a
// binary that cannot be found is status 127, like a shell.
Result<int> RunMainOnConsole(const protocol::Config& config);

// Replaces PID 1 with the image's init (/sbin/init, else systemd's usual
// paths). Returns only on failure.
Status ExecImageInit();

}  // namespace cella::init
