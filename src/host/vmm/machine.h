// The VM abstraction (seed: vmm.Backend / vmm.Machine): a Backend makes a
// Machine from a VMConfig; a Machine boots, runs commands and file
// operations through the guest agent, and is torn down.
//
// Threading: Start, Stop, Pause, Resume and Close are called from one
// controlling thread. Kill and PID may be called from any thread at any
// time, also while Start or Stop runs. After Start returns, Exec/WriteFile/ReadFile/ListFiles
// and Agent() may be used from any thread (AgentClient is thread-safe), and
// Wait may run on another thread concurrently with all of them.
// Lifetime: destroying a Machine closes it (kills the VM if still running).
// Stop and Close end the agent link: pointers from Agent() are invalid after.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/agent/client.h"
#include "host/os/process.h"
#include "host/vmm/vm_config.h"

namespace cella::vmm {

struct VmExit {
  host::ExitStatus hypervisor;  // how the QEMU process ended
  std::string console_tail;     // last lines of the guest console
};

class Machine {
 public:
  virtual ~Machine() = default;

  // Boots the VM and returns once the guest agent has said Hello (bounded by
  // the backend's boot timeout). On failure the VM is killed and the error
  // carries the tail of the guest console.
  virtual Status Start() = 0;
  // Graceful stop: asks the guest to power off (agent Shutdown, else ACPI
  // power button), waits up to `grace`, then kills. Safe to repeat.
  virtual Status Stop(std::chrono::milliseconds grace) = 0;
  // Waits for the VM to end (guest poweroff, crash, Stop). An error with
  // errno_value ETIMEDOUT when it is still running after `timeout`, or as
  // soon as `wake_fd` (polled beside the VM when >= 0, never read here)
  // is readable: the caller's loop has a request to look at.
  virtual Result<VmExit> Wait(std::chrono::milliseconds timeout, int wake_fd) = 0;
  Result<VmExit> Wait(std::chrono::milliseconds timeout) { return Wait(timeout, -1); }
  // Ends the VM at once (the hypervisor is killed, nothing is asked of the
  // guest), overtaking a Start or Stop in progress on another thread: a
  // Start not yet past launching fails, a running one fails promptly, and
  // Wait then reports the end. Safe to repeat; a no-op once the VM ended.
  virtual Status Kill() = 0;

  virtual Result<host::ExecResult> Exec(const protocol::ExecRequest& request) = 0;
  virtual Status WriteFile(const std::string& path, std::string_view content, uint32_t mode) = 0;
  virtual Result<std::string> ReadFile(const std::string& path) = 0;
  virtual Result<std::vector<protocol::FileInfo>> ListFiles(const std::string& path) = 0;
  // The agent link for streaming exec, attach, ports; nullptr before Start.
  virtual host::AgentClient* Agent() = 0;

  // Backend-specific descriptors; backends without them return an error
  // with errno_value ENOTSUP.
  virtual Result<int> NetworkFD() = 0;
  virtual Result<int> VsockFD() = 0;
  // Hypervisor process id; -1 when not running.
  virtual int PID() const = 0;
  // Kills the VM if running and removes its sockets and temporary files
  // (the console log stays for `cella logs`). Safe to repeat.
  virtual Status Close() = 0;
  virtual std::string RootfsPath() const = 0;
  // Freeze / unfreeze the vCPUs.
  virtual Status Pause() = 0;
  virtual Status Resume() = 0;

  // Snapshots, from the controlling thread. Backends without them (and
  // test fakes) fail with ENOTSUP.
  //
  // Lets go of the agent link before a snapshot: asks the guest agent to
  // release it (bounded; once it answered it reads nothing more from the
  // link and waits for its next host, so a guest restored later starts a
  // fresh link instead of continuing a dead one), then calls `close_link`
  // (which closes the link's far end: the supervisor's router) and drops
  // Agent(); those two also when the agent did not answer.
  virtual Status ReleaseAgent(const std::function<void()>& /*close_link*/,
                              std::chrono::milliseconds /*timeout*/) {
    return std::unexpected(Error{"snapshots are not supported by this machine", ENOTSUP});
  }
  // Freezes the vCPUs and writes the whole machine (memory, devices; disks
  // are flushed, their content is not included) to `uri`, a QEMU migration
  // URI ("exec:CMD" writes the stream to CMD's stdin). The VM stays frozen:
  // Resume() thaws it, Close() ends it.
  virtual Status SaveState(const std::string& /*uri*/, std::chrono::milliseconds /*timeout*/) {
    return std::unexpected(Error{"snapshots are not supported by this machine", ENOTSUP});
  }
  // SaveState into a descriptor (e.g. a pipe's write end the caller reads
  // the stream from); the machine's copy is closed when this returns.
  virtual Status SaveStateTo(UniqueFd /*fd*/, std::chrono::milliseconds /*timeout*/) {
    return std::unexpected(Error{"snapshots are not supported by this machine", ENOTSUP});
  }
  // After ReleaseAgent: thaws the VM and connects to the agent again as
  // Start does (a snapshot that did not go through).
  virtual Status ReconnectAgent() {
    return std::unexpected(Error{"snapshots are not supported by this machine", ENOTSUP});
  }

  virtual const VMConfig& Config() const = 0;
  // Wall time from launching the hypervisor to the agent's Hello.
  virtual std::chrono::milliseconds BootDuration() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view Name() const = 0;
  // Validates the config and prepares a Machine; nothing runs until Start.
  virtual Result<std::unique_ptr<Machine>> Create(const VMConfig& config) = 0;
};

}  // namespace cella::vmm
