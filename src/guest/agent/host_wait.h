// Waiting for the host to connect to a virtio-serial port, without polling.
//
// A guest's end of a virtio-serial port reads EOF at once while no host is
// connected, so an agent that simply reopened and served the port in a loop
// would spin; it used to sleep 200 ms between attempts, and a host that
// came back (a resume, a fork copy, a CLI after a link release) waited up
// to that long for the agent's Hello, which each attempt also left queued
// in QEMU for the next host to read. The virtio_console driver instead
// raises SIGIO on the port's fasync owner when the host side opens (and
// reports POLLHUP while it is closed): WaitForHost blocks on that.
#pragma once

#include <chrono>

#include "base/result.h"

namespace cella::agent {

// How WaitForHost waited: kEvent with SIGIO (the port's driver supports
// fasync), kPolled by sleeping `poll_interval` once (a device without
// fasync: the caller's loop then must not spin either).
enum class HostWait { kEvent, kPolled };

struct HostWaitResult {
  bool connected = false;  // the host side is open now
  HostWait how = HostWait::kEvent;
};

// Returns once the host side of the port `fd` is connected (POLLHUP clear),
// or after `timeout` or a handled signal (connected = false; the caller
// checks its flags and waits again). SIGIO is
// blocked in the calling thread for good (children the agent spawns reset
// their mask); the port's O_ASYNC is cleared again before returning, so
// serving the link does not queue a SIGIO per chunk that arrives.
Result<HostWaitResult> WaitForHost(int fd, std::chrono::milliseconds timeout,
                                   std::chrono::milliseconds poll_interval);

// After a release (the agent let go of a link so the VM could be saved; see
// AgentOptions::answer_release_on_reopened_port): returns true once `fd`,
// the port opened anew, has bytes from a host, false after `timeout` or a
// handled signal. The host that asked for the release is still connected
// while the agent reopens, and the driver cannot tell it from the next one
// (a restored copy's, or the same supervisor's after the save): only the
// next host writes, so its first bytes, not its connection, say it is
// there. While no host is connected this waits by WaitForHost.
Result<bool> WaitForHostData(int fd, std::chrono::milliseconds timeout);

}  // namespace cella::agent
