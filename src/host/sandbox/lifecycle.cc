#include "host/sandbox/lifecycle.h"

#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>

#include "base/log.h"

namespace cella::sandbox {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

std::string OneLine(std::string text) {
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  return text;
}

SandboxLifecycle::SandboxLifecycle(LifecycleOptions options, store::StateStore& store,
                                   std::unique_ptr<vmm::Machine> machine, LifecycleHooks hooks)
    : options_(std::move(options)),
      wake_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)),
      store_(store),
      machine_(std::move(machine)),
      hooks_(std::move(hooks)) {
  if (!wake_)
    log::Warn("no eventfd for control requests: each waits for the next tick",
              {{"id", options_.id}, {"error", std::strerror(errno)}});
}

void SandboxLifecycle::WakeLoop() {
  if (!wake_) return;
  const uint64_t one = 1;
  // EAGAIN: the counter is full, so the loop is woken already.
  if (::write(wake_.Get(), &one, sizeof(one)) < 0 && errno != EAGAIN)
    log::Warn("could not wake the supervisor's loop", {{"error", std::strerror(errno)}});
}

SandboxLifecycle::~SandboxLifecycle() = default;

LifecycleOutcome SandboxLifecycle::Run() {
  Status booted = Boot();
  // A failed boot is torn down and recorded before it is reported: the CLI
  // returns on the report, and `inspect` right after must say "failed".
  if (booted && hooks_.on_boot_result) hooks_.on_boot_result(booted);
  LifecycleOutcome outcome;
  if (!booted) {
    log::Warn("sandbox failed to start",
              {{"id", options_.id}, {"error", OneLine(booted.error().message)}});
    TearDown();
    bool killed = false;
    {
      std::lock_guard lock(mu_);
      killed = kill_requested_;
    }
    // The store allows no exit code before running: a deliberate kill is a
    // stop, not a failure the user has to investigate.
    if (killed) {
      outcome = {false, store::SandboxState::kStopped, "killed while booting (cella kill)", {}};
    } else {
      outcome = {false, store::SandboxState::kFailed, OneLine(booted.error().message), {}};
    }
  } else {
    log::Debug("sandbox booted", {{"id", options_.id}});
    outcome = Supervise();
    outcome.booted = true;
    log::Debug("sandbox ended; tearing down", {{"id", options_.id}});
    TearDown();
  }
  log::Debug("torn down", {{"id", options_.id}});
  Record(outcome);
  if (!booted && hooks_.on_boot_result) hooks_.on_boot_result(booted);
  Finish();
  return outcome;
}

Status SandboxLifecycle::Boot() {
  Status started = machine_->Start();
  bool killed = false;
  {
    std::lock_guard lock(mu_);
    killed = kill_requested_;
  }
  // A boot ended by `cella kill` is not retried (nor its failure blamed on
  // the machine).
  if (!started && !killed && hooks_.retry_boot) {
    if (std::unique_ptr<vmm::Machine> next = hooks_.retry_boot(started.error())) {
      std::unique_ptr<vmm::Machine> failed;
      {
        // Handle() kills through machine_ from other threads.
        std::lock_guard lock(mu_);
        if (kill_requested_) return Fail("the sandbox was killed while booting");
        failed = std::exchange(machine_, std::move(next));
      }
      if (auto st = failed->Close(); !st)
        log::Warn("closing the failed machine", {{"error", st.error().message}});
      started = machine_->Start();
    }
  }
  CELLA_TRY_CTX(started, "boot");
  {
    // A kill that arrived while Start was returning successfully.
    std::lock_guard lock(mu_);
    if (kill_requested_) return Fail("the sandbox was killed while booting");
  }
  store::ProcessIdentity hypervisor = CELLA_TRY(store::IdentifyProcess(machine_->PID()));
  CELLA_TRY(store_.SetHypervisor(options_.id, hypervisor));
  if (hooks_.after_boot) CELLA_TRY(hooks_.after_boot());
  return store_.Transition(options_.id, store::SandboxState::kRunning,
                           "booted in " + std::to_string(machine_->BootDuration().count()) + " ms");
}

LifecycleOutcome SandboxLifecycle::Supervise() {
  sigset_t signals;
  sigemptyset(&signals);
  for (int s : {SIGTERM, SIGINT}) sigaddset(&signals, s);
  bool stop_sent = false;
  bool kill_sent = false;
  bool paused = false;
  std::optional<Clock::time_point> link_lost_at;
  for (;;) {
    auto exited = machine_->Wait(options_.tick, wake_.Get());
    if (wake_) {
      // Drained before the requests are looked at: one made after this
      // wakes the next Wait.
      uint64_t count = 0;
      if (::read(wake_.Get(), &count, sizeof(count)) < 0 && errno != EAGAIN)
        log::Warn("could not read the supervisor's wake eventfd",
                  {{"error", std::strerror(errno)}});
    }
    if (exited) {
      AwaitLinkDrained();
      return Conclude(*exited);
    }
    if (exited.error().errno_value != ETIMEDOUT) {
      return {true, store::SandboxState::kFailed, "waiting for the VM: " + exited.error().message,
              std::nullopt};
    }
    if (hooks_.on_tick) hooks_.on_tick();
    if (options_.end_at_main_result && !kill_sent) {
      bool main_ended = false;
      {
        std::lock_guard lock(mu_);
        main_ended = main_status_.has_value();
      }
      if (main_ended) {
        // The guest would only power off from here (its sync has nothing
        // of the host's to write): ending QEMU now saves its shutdown. The
        // result is recorded, so the end is "exited" with its code.
        log::Debug("main process ended; ending the VM without waiting for its power-off",
                   {{"id", options_.id}});
        kill_sent = true;
        if (auto st = machine_->Kill(); !st)
          log::Warn("kill VM failed", {{"error", st.error().message}});
        continue;
      }
    }
    timespec no_wait{0, 0};
    if (int sig = ::sigtimedwait(&signals, nullptr, &no_wait); sig > 0) {
      log::Notice("signal received; stopping the sandbox", {{"signal", sig}});
      std::lock_guard lock(mu_);
      if (!stop_grace_) stop_grace_ = options_.signal_stop_grace;
    }
    std::optional<milliseconds> grace;
    bool kill = false;
    {
      std::lock_guard lock(mu_);
      grace = stop_grace_;
      kill = kill_requested_;
    }
    if (kill && !kill_sent) {
      kill_sent = true;
      // Handle killed already; this covers a kill it could not deliver.
      if (auto st = machine_->Kill(); !st)
        log::Warn("kill VM failed", {{"error", st.error().message}});
    } else if (grace && !stop_sent) {
      stop_sent = true;
      // A frozen guest cannot power off gracefully: thaw it first.
      if (paused) {
        if (auto st = machine_->Resume(); !st)
          log::Warn("unpause before stop failed", {{"error", st.error().message}});
        paused = false;
      }
      if (auto st = store_.Transition(options_.id, store::SandboxState::kStopping,
                                      "stopping (grace " + std::to_string(grace->count()) + " ms)");
          !st)
        log::Warn("could not record stopping", {{"error", st.error().message}});
      // Ends with the VM gone (killed after the grace, or at once by a kill
      // request); the loop then concludes on the next Wait.
      if (auto st = machine_->Stop(*grace); !st)
        log::Warn("graceful stop failed", {{"error", st.error().message}});
    } else if (!grace && !kill) {
      if (auto ended = RunPendingOp(paused)) return *ended;
      // During a stop the link closes on purpose; only otherwise is a dead
      // link news. A paused guest answers nothing, which is not news either.
      if (!paused)
        if (auto failed = WatchLink(link_lost_at)) return *failed;
    }
  }
}

std::optional<LifecycleOutcome> SandboxLifecycle::RunPendingOp(bool& paused) {
  std::shared_ptr<PendingOp> op;
  {
    std::lock_guard lock(mu_);
    if (!pending_op_ || pending_op_->result) return std::nullopt;
    op = pending_op_;
  }
  auto finish = [&](Status st) {
    std::lock_guard lock(mu_);
    op->result = std::move(st);
    changed_.notify_all();
  };
  using store::SandboxState;
  switch (op->op) {
    case VmOp::kPause: {
      if (paused) {
        finish(Fail("sandbox is already paused"));
        return std::nullopt;
      }
      if (auto st = machine_->Pause(); !st) {
        finish(std::unexpected(st.error()));
        return std::nullopt;
      }
      paused = true;
      Status recorded =
          store_.Transition(options_.id, SandboxState::kPaused, "paused (cella pause)");
      if (!recorded) log::Warn("could not record paused", {{"error", recorded.error().message}});
      finish(std::move(recorded));
      return std::nullopt;
    }
    case VmOp::kUnpause: {
      if (!paused) {
        finish(Fail("sandbox is not paused"));
        return std::nullopt;
      }
      if (auto st = machine_->Resume(); !st) {
        finish(std::unexpected(st.error()));
        return std::nullopt;
      }
      paused = false;
      Status recorded =
          store_.Transition(options_.id, SandboxState::kRunning, "unpaused (cella unpause)");
      if (!recorded) log::Warn("could not record running", {{"error", recorded.error().message}});
      finish(std::move(recorded));
      return std::nullopt;
    }
    case VmOp::kSnapshot: {
      if (paused) {
        finish(Fail("the sandbox is paused; unpause it before taking a snapshot"));
        return std::nullopt;
      }
      if (!hooks_.snapshot) {
        finish(Fail("this sandbox cannot be snapshotted"));
        return std::nullopt;
      }
      Status saved = hooks_.snapshot(op->dir);
      finish(saved);
      if (!saved && saved.error().errno_value == EIO) {
        if (auto st = machine_->Kill(); !st)
          log::Warn("kill VM failed", {{"error", st.error().message}});
        return LifecycleOutcome{
            true,
            SandboxState::kFailed,
            "snapshot failed and the VM could not be resumed: " + OneLine(saved.error().message),
            {}};
      }
      return std::nullopt;
    }
    case VmOp::kStandby: {
      if (!hooks_.standby) {
        finish(Fail("this sandbox cannot go to standby"));
        return std::nullopt;
      }
      // The guest must let go of its agent link before the save, which a
      // frozen guest cannot: a paused sandbox is thawed for the moment the
      // standby takes (it is saved stopped either way).
      if (paused) {
        if (auto st = machine_->Resume(); !st) {
          finish(std::unexpected(st.error()));
          return std::nullopt;
        }
      }
      Status saved = hooks_.standby();
      if (saved) {
        // Committed: the snapshot is the sandbox now. Recorded before the
        // VM is closed, so a supervisor killed from here on leaves a
        // standby sandbox, never a failed one with a good snapshot.
        LifecycleOutcome outcome{true, SandboxState::kStandby, "standby (cella standby)", {}};
        Record(outcome);
        recorded_early_ = true;
        finish({});
        return outcome;
      }
      finish(std::unexpected(saved.error()));
      if (saved.error().errno_value == EIO) {
        if (auto st = machine_->Kill(); !st)
          log::Warn("kill VM failed", {{"error", st.error().message}});
        return LifecycleOutcome{
            true,
            SandboxState::kFailed,
            "standby failed and the VM could not be resumed: " + OneLine(saved.error().message),
            {}};
      }
      // Still running (the hook resumed it); a paused VM was thawed too.
      if (paused) {
        paused = false;
        if (auto st = store_.Transition(options_.id, SandboxState::kRunning,
                                        "running again after a failed standby");
            !st)
          log::Warn("could not record running", {{"error", st.error().message}});
      }
      return std::nullopt;
    }
  }
  return std::nullopt;
}

// A dead agent link leaves a VM nobody can reach: exec, cp, ports and a
// graceful stop all go through it, and the router cannot re-handshake with
// an agent mid-stream. Such a sandbox is failed and its VM torn down, so
// `ps` says why instead of "Up".
std::optional<LifecycleOutcome> SandboxLifecycle::WatchLink(
    std::optional<Clock::time_point>& link_lost_at) {
  if (!hooks_.link_error) return std::nullopt;
  std::optional<Error> error = hooks_.link_error();
  if (!error) return std::nullopt;
  auto now = Clock::now();
  if (!link_lost_at) {
    link_lost_at = now;
    log::Notice("the guest agent link ended", {{"id", options_.id}, {"error", error->message}});
  }
  bool broken = error->errno_value == EPROTO;
  if (!broken && now - *link_lost_at < options_.closed_link_grace) return std::nullopt;
  bool main_ended = false;
  {
    std::lock_guard lock(mu_);
    main_ended = main_status_.has_value();
  }
  log::Warn("the guest agent link is dead; tearing the VM down",
            {{"id", options_.id}, {"error", error->message}});
  if (auto st = machine_->Kill(); !st) log::Warn("kill VM failed", {{"error", st.error().message}});
  auto exited = machine_->Wait(milliseconds(10'000));
  // The main process had finished and the guest was on its way down: its
  // result is the better answer than the link it closed.
  if (main_ended && !broken && exited) return Conclude(*exited);
  return LifecycleOutcome{true, store::SandboxState::kFailed,
                          "the guest agent link failed (" + OneLine(error->message) +
                              "); the VM was torn down since it can no longer be controlled",
                          std::nullopt};
}

void SandboxLifecycle::AwaitLinkDrained() {
  if (!hooks_.link_error) return;
  auto until = Clock::now() + options_.link_drain_wait;
  for (;;) {
    {
      std::lock_guard lock(mu_);
      if (main_status_ || kill_requested_) return;
    }
    // Once the router saw the link end, every frame before it was handed in.
    bool drained = hooks_.link_drained ? hooks_.link_drained() : hooks_.link_error().has_value();
    if (drained || Clock::now() >= until) return;
    std::this_thread::sleep_for(milliseconds(10));
  }
}

LifecycleOutcome SandboxLifecycle::Conclude(const vmm::VmExit& exit) {
  std::lock_guard lock(mu_);
  if (kill_requested_) return {true, store::SandboxState::kExited, "killed (cella kill)", 137};
  if (stop_grace_) {
    // docker stop: the guest sent the main process SIGTERM and waited for
    // it, so its status is how the sandbox ended (143, or 0 if it trapped
    // TERM and exited cleanly, 137 if the grace ran out). Without one (no
    // main process, or a guest that did not answer) the sandbox is stopped.
    if (main_status_) {
      int code = main_status_->ShellCode();
      return {true, store::SandboxState::kExited,
              "main process exited with " + std::to_string(code) + " (cella stop)", code};
    }
    return {true, store::SandboxState::kStopped, "stopped (cella stop)", {}};
  }
  if (main_status_) {
    int code = main_status_->ShellCode();
    return {true, store::SandboxState::kExited, "main process exited with " + std::to_string(code),
            code};
  }
  if (exit.hypervisor.exit_code == 0)
    return {true, store::SandboxState::kStopped, "the guest powered off", {}};
  std::string detail = "the VM ended unexpectedly: QEMU " + exit.hypervisor.Describe();
  if (!exit.console_tail.empty()) {
    std::string tail = exit.console_tail;
    if (tail.size() > 400) tail = tail.substr(tail.size() - 400);
    detail += "; console: " + OneLine(tail);
  }
  return {true, store::SandboxState::kFailed, detail, {}};
}

void SandboxLifecycle::TearDown() {
  if (hooks_.before_close) hooks_.before_close();
  if (auto st = machine_->Close(); !st)
    log::Warn("VM cleanup failed", {{"error", st.error().message}});
  if (hooks_.after_close) hooks_.after_close();
}

void SandboxLifecycle::Record(const LifecycleOutcome& outcome) {
  if (recorded_early_) return;
  if (auto st = store_.Transition(options_.id, outcome.state, outcome.detail, outcome.exit_code);
      !st)
    log::Warn("could not record the sandbox's end", {{"error", st.error().message}});
}

void SandboxLifecycle::Finish() {
  {
    std::lock_guard lock(mu_);
    finished_ = true;
  }
  changed_.notify_all();
}

nlohmann::json SandboxLifecycle::Handle(const nlohmann::json& request) {
  std::string op = request.value("op", std::string());
  std::unique_lock lock(mu_);
  if (op == "status") return {{"ok", true}, {"finished", finished_}};
  if (op == "pause" || op == "unpause" || op == "standby" || op == "snapshot") {
    if (finished_) return {{"ok", false}, {"error", "the sandbox has ended"}};
    if (stop_grace_ || kill_requested_)
      return {{"ok", false}, {"error", "the sandbox is stopping"}};
    if (pending_op_ && !pending_op_->result)
      return {{"ok", false}, {"error", "another pause, unpause or standby is in progress"}};
    auto pending = std::make_shared<PendingOp>();
    pending->op = op == "pause"     ? VmOp::kPause
                  : op == "unpause" ? VmOp::kUnpause
                  : op == "standby" ? VmOp::kStandby
                                    : VmOp::kSnapshot;
    if (pending->op == VmOp::kSnapshot) {
      pending->dir = request.value("dir", std::string());
      if (pending->dir.empty() || pending->dir[0] != '/')
        return {{"ok", false}, {"error", "snapshot: \"dir\" must be an absolute path"}};
    }
    pending_op_ = pending;
    changed_.notify_all();
    WakeLoop();
    // A standby's reply waits for the end (the caller then sees QEMU gone).
    const bool saving = pending->op == VmOp::kStandby || pending->op == VmOp::kSnapshot;
    changed_.wait_for(lock, saving ? options_.save_wait : options_.request_wait, [&] {
      if (finished_) return true;
      return pending->result.has_value() && (pending->op != VmOp::kStandby || !*pending->result);
    });
    if (!pending->result) {
      return {{"ok", false},
              {"error", op + (finished_ ? ": the sandbox ended first" : ": no answer in time")}};
    }
    if (!*pending->result) return {{"ok", false}, {"error", pending->result->error().message}};
    return {{"ok", true}};
  }
  if (op != "stop" && op != "kill")
    return {{"ok", false}, {"error", "unknown control op \"" + op + "\""}};
  if (op == "kill") {
    kill_requested_ = true;
    // At once, not by the main loop: it may be inside a graceful stop (or a
    // boot) that kill must overtake.
    if (auto st = machine_->Kill(); !st)
      log::Warn("kill VM failed", {{"error", st.error().message}});
  } else {
    int64_t grace = request.value("grace_ms", int64_t{10'000});
    // Bounded so the waits computed from it cannot overflow.
    grace = std::clamp<int64_t>(grace, 0, int64_t{24} * 3600 * 1000);
    stop_grace_ = milliseconds(grace);
  }
  changed_.notify_all();
  WakeLoop();
  // Run records the end before it says finished; give up on waiting well
  // after any grace so a wedged VM cannot hang the caller.
  changed_.wait_for(lock, options_.request_wait + stop_grace_.value_or(milliseconds(0)),
                    [&] { return finished_; });
  return {{"ok", finished_}, {"error", "the sandbox did not stop"}};
}

void SandboxLifecycle::SetMainStatus(const host::ExecStatus& status) {
  std::lock_guard lock(mu_);
  main_status_ = status;
  // With end_at_main_result the main loop ends the VM: on its own thread,
  // and only once the boot (and its after_boot hook) is over.
  if (options_.end_at_main_result) WakeLoop();
}

}  // namespace cella::sandbox
