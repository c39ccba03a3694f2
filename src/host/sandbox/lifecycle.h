// The supervisor's state machine, apart from everything that builds the VM:
// boots a vmm::Machine, records each state change of the sandbox in the state
// store, serves the control requests stop / kill / status, watches the VM and
// the agent link, tears the VM down and records how the sandbox ended — the
// state, detail and exit code `cella ps` and `cella inspect` show.
//
// The machine comes from outside (a vmm::Backend): RunSupervisor hands in a
// QEMU machine; unit tests hand in a fake one and a temporary store, and
// drive every transition without a VM (tests/unit/sandbox_lifecycle_test.cc).
//
// Threads: Run() on one thread (the supervisor's main thread), which also
// owns the store connection. Handle() and SetMainStatus() from any thread
// (control connections, the router thread). Handle() may arrive before,
// during and after Run(); a stop or kill waits (bounded) until the end is
// recorded, and returns at once when it already is.
//
// Signals: SIGTERM and SIGINT request a graceful stop. Run() collects them
// with sigtimedwait, so the caller blocks them in every thread beforehand
// (RunSupervisor does); a thread that has them pending when Run() starts
// supervising sees the stop on its first tick.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "base/result.h"
#include "base/unique_fd.h"
#include "host/store/state_store.h"
#include "host/vmm/machine.h"

namespace cella::sandbox {

struct LifecycleOptions {
  std::string id;  // the sandbox's record in the store
  // How often the VM, the signals and the agent link are looked at.
  std::chrono::milliseconds tick{200};
  // A stop asked for by signal; a control stop names its own.
  std::chrono::milliseconds signal_stop_grace{10'000};
  // A stop or kill request waits this long beyond its grace for the end to
  // be recorded, so a wedged VM cannot hang the CLI forever.
  std::chrono::milliseconds request_wait{std::chrono::minutes(2)};
  // A standby or snapshot request waits this long for the save (a large
  // guest on a loaded host is slow): just under the CLI's own 15 minutes, so
  // the reply says how it ended rather than "no answer in time" while the
  // save goes on.
  std::chrono::milliseconds save_wait{std::chrono::minutes(14)};
  // The agent link closing is also the first sign of a guest powering off:
  // the VM gets this long to end by itself before the closed link counts as
  // a failure. A link that broke the protocol fails the sandbox at once.
  std::chrono::milliseconds closed_link_grace{10'000};
  // The guest sends the main process's Result and then powers off, so the VM
  // can be seen gone before the router thread has read the last frames. At
  // the end, the main status is awaited this long for the link to be read to
  // its end (link_error set) before the sandbox's end is decided.
  std::chrono::milliseconds link_drain_wait{2'000};
  // The VM is ended (killed) as soon as the main process's result is in,
  // instead of waiting for the guest to power off: for a sandbox that is
  // removed at its end and whose guest writes nothing the host keeps (no
  // writable disk, volume or share), so there is nothing for it to flush.
  // The sandbox still ends exited with the main process's code.
  bool end_at_main_result = false;
};

struct LifecycleHooks {
  // After the machine booted and before the sandbox is recorded running:
  // publishes what others reach (mux socket, ports, the main process). An
  // error fails the boot.
  std::function<Status()> after_boot;
  // Once, with the boot's result (the readiness line for the spawning CLI);
  // a failure only once the sandbox is torn down and recorded failed.
  std::function<void(const Status&)> on_boot_result;
  // Before the machine is closed: stops whatever uses it.
  std::function<void()> before_close;
  // After the machine is closed (the router, the mux socket).
  std::function<void()> after_close;
  // Why the agent link is gone, when it is (the router's upstream error);
  // empty while it works. Called on Run()'s thread.
  std::function<std::optional<Error>()> link_error;
  // Whether the agent link itself has been read to its end, for the wait
  // after the VM ended (link_error may also report other failures, such as
  // a share daemon that ends with QEMU, which say nothing about the link).
  // Unset: link_error is used.
  std::function<bool()> link_drained;
  // When the machine fails to start: another machine to boot instead (the
  // supervisor's cold boot after a warm restore failed), or null to let the
  // failure stand. Called at most once, on Run()'s thread, before
  // on_boot_result.
  std::function<std::unique_ptr<vmm::Machine>(const Error&)> retry_boot;
  // Every tick while the VM runs, on Run()'s thread: housekeeping that must
  // not wait for the end (the console log's cap). Must be quick.
  std::function<void()> on_tick;
  // `cella standby`, on Run()'s thread: saves the whole machine and commits
  // the snapshot (after which the sandbox is recorded standby and the VM is
  // closed). An error means no snapshot was committed: the hook leaves the
  // VM running and reachable again when it can (then the sandbox stays
  // running and the caller gets the error), or returns the error with
  // errno_value EIO when it could not (the sandbox is then failed). Unset:
  // standby is refused.
  std::function<Status()> standby;
  // `cella snapshot create`, on Run()'s thread: saves the machine into the
  // directory named, then lets it run on. Errors as for standby (EIO: the
  // VM could not be brought back, the sandbox is failed). Unset: refused.
  std::function<Status(const std::string& dir)> snapshot;
};

// What was recorded at the end.
struct LifecycleOutcome {
  bool booted = false;
  store::SandboxState state = store::SandboxState::kFailed;
  std::string detail;
  std::optional<int> exit_code;
};

class SandboxLifecycle {
 public:
  // `store` is used from Run()'s thread only and must outlive Run().
  SandboxLifecycle(LifecycleOptions options, store::StateStore& store,
                   std::unique_ptr<vmm::Machine> machine, LifecycleHooks hooks = {});
  ~SandboxLifecycle();
  SandboxLifecycle(const SandboxLifecycle&) = delete;
  SandboxLifecycle& operator=(const SandboxLifecycle&) = delete;

  // Boots the machine, records running, supervises until the VM is gone,
  // tears it down, records the end and wakes every waiting request. Once.
  LifecycleOutcome Run();

  // {"op":"status"} | {"op":"stop","grace_ms":N} | {"op":"kill"} |
  // {"op":"pause"} | {"op":"unpause"} | {"op":"standby"} |
  // {"op":"snapshot","dir":PATH} (running only); the reply the
  // control socket sends. Other ops: {"ok":false,...}. pause/unpause reply
  // once the vCPUs stopped (started) and the state is recorded; standby once
  // the snapshot is committed and the supervisor has finished. A paused
  // sandbox refuses a second pause, a running one an unpause (EINVAL-like
  // {"ok":false}). Stop of a paused sandbox unpauses it first, so the guest
  // can power off gracefully; kill needs no guest.
  nlohmann::json Handle(const nlohmann::json& request);

  // The main process's result, from the router's hook. With
  // end_at_main_result, also wakes the main loop, which kills the VM.
  void SetMainStatus(const host::ExecStatus& status);

  // Whether a stop or kill was asked for (control request or signal): the
  // user ended the sandbox, which a restart policy never undoes.
  bool StopRequested() {
    std::lock_guard lock(mu_);
    return stop_grace_.has_value() || kill_requested_;
  }

  vmm::Machine& machine() { return *machine_; }

 private:
  Status Boot();
  LifecycleOutcome Supervise();
  LifecycleOutcome Conclude(const vmm::VmExit& exit);
  std::optional<LifecycleOutcome> WatchLink(
      std::optional<std::chrono::steady_clock::time_point>& link_lost_at);
  void AwaitLinkDrained();
  void TearDown();
  void Record(const LifecycleOutcome& outcome);
  void Finish();
  // Runs a pending pause/unpause/standby on Run()'s thread; an outcome when
  // the sandbox ended by it (a committed standby).
  std::optional<LifecycleOutcome> RunPendingOp(bool& paused);
  // Makes the main loop look at a new request now rather than at its next
  // tick (up to 200 ms later: a fork's save waited that long to begin).
  void WakeLoop();

  enum class VmOp { kPause, kUnpause, kStandby, kSnapshot };
  struct PendingOp {
    VmOp op;
    std::string dir;               // kSnapshot
    std::optional<Status> result;  // set by Run()'s thread
  };

  LifecycleOptions options_;
  // An eventfd the main loop's Wait polls beside the VM; -1 if it could not
  // be made (requests then wait for the tick, as they did before).
  UniqueFd wake_;
  store::StateStore& store_;
  std::unique_ptr<vmm::Machine> machine_;
  LifecycleHooks hooks_;

  // Shared with Handle() and SetMainStatus().
  std::mutex mu_;
  std::condition_variable changed_;
  std::optional<std::chrono::milliseconds> stop_grace_;  // a stop was asked for
  bool kill_requested_ = false;
  bool finished_ = false;  // the end is recorded
  std::optional<host::ExecStatus> main_status_;
  std::shared_ptr<PendingOp> pending_op_;  // at most one at a time
  bool recorded_early_ = false;            // Run()'s thread: a standby recorded its end
};

// Newlines become spaces: a store detail and a log field are one line.
std::string OneLine(std::string text);

}  // namespace cella::sandbox
