// Exec mode with the agent (the default): PID 1 embeds the agent from
// cella_agent_lib and serves the host over the virtio-serial port named by
// the config's agent_port. The host starts the main process with
// attach_main; PID 1 reaps every orphan meanwhile.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"
#include "guest/init/devices.h"
#include "protocol/config.h"

namespace cella::init {

// "/dev/<dir>" for the /sys/class/virtio-ports/<dir> whose name file equals
// name; waits (the port appears when virtio_console probes) until deadline.
Result<std::string> FindVirtioPort(std::string_view name, Deadline deadline);

// Serves links on port_path one after another. Powers off (never returns)
// when the host asks for shutdown (after StopAllProcesses with the request's
// grace_ms: SIGTERM, the grace, SIGKILL), or when the main process has exited and
// the config has no keep_alive: once the host has closed the link, or 2 s
// after the exit at the latest (the agent API offers no "flush then stop").
// Returns only errors that make serving impossible.
Status ServeAgent(const protocol::Config& config, const std::string& port_path);

}  // namespace cella::init
