// The supervisor's state machine (host/sandbox/lifecycle.h) around a fake
// machine and a temporary state store: every scenario asserts what `cella ps`
// and `cella inspect` would show (state, detail, exit code), without a VM.
#include <gtest/gtest.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include "base/io.h"
#include "host/agent/router.h"
#include "host/sandbox/lifecycle.h"
#include "protocol/messages.h"
#include "protocol/wire.h"

namespace cella::sandbox {
namespace {

using namespace std::chrono_literals;
using std::chrono::milliseconds;
using enum store::SandboxState;

const std::string kId = "0123456789abcdef0123456789abcdef";

// What the fake VM does and what was done to it; shared by the test and the
// FakeMachine the lifecycle owns.
struct FakeVm {
  std::mutex mu;
  std::condition_variable cv;
  // Script.
  std::optional<Error> start_error;
  bool start_blocks = false;  // Start waits for release_start (or a kill)
  bool release_start = false;
  bool obey_stop = true;  // Stop powers off at once; else waits its grace, then kills
  std::optional<Error> wait_error;
  std::string console_tail;
  // Called by Stop before the VM powers off, outside the lock: the guest's
  // last words (the main process's status) on the way down.
  std::function<void()> on_stop;
  // Observations.
  bool start_entered = false;
  std::optional<host::ExitStatus> exit;  // the VM ended
  int stops = 0;
  int kills = 0;
  int closes = 0;
  bool frozen = false;  // Pause without Resume
  bool stopped_while_frozen = false;

  void End(host::ExitStatus status) {
    std::lock_guard lock(mu);
    if (!exit) exit = status;
    cv.notify_all();
  }
  void PowerOff() { End({0, 0}); }
  void Crash() { End({-1, SIGSEGV}); }
  bool Ended() {
    std::lock_guard lock(mu);
    return exit.has_value();
  }
  template <class Pred>
  bool AwaitFor(milliseconds timeout, Pred pred) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, pred);
  }
};

class FakeMachine final : public vmm::Machine {
 public:
  explicit FakeMachine(std::shared_ptr<FakeVm> vm) : vm_(std::move(vm)) {}

  Status Start() override {
    std::unique_lock lock(vm_->mu);
    vm_->start_entered = true;
    vm_->cv.notify_all();
    if (vm_->start_blocks)
      vm_->cv.wait(lock, [&] { return vm_->release_start || vm_->exit.has_value(); });
    if (vm_->exit) return Fail("VM fake: QEMU ended (killed) while waiting for the agent");
    if (vm_->start_error) {
      vm_->exit = host::ExitStatus{-1, SIGKILL};  // a failed boot kills the VM
      return std::unexpected(*vm_->start_error);
    }
    return {};
  }
  Status Stop(milliseconds grace) override {
    if (vm_->on_stop) vm_->on_stop();
    std::unique_lock lock(vm_->mu);
    ++vm_->stops;
    if (vm_->frozen) vm_->stopped_while_frozen = true;
    if (vm_->exit) return {};
    if (vm_->obey_stop) {
      vm_->exit = host::ExitStatus{0, 0};
    } else if (!vm_->cv.wait_for(lock, grace, [&] { return vm_->exit.has_value(); })) {
      vm_->exit = host::ExitStatus{-1, SIGKILL};
    }
    vm_->cv.notify_all();
    return {};
  }
  using vmm::Machine::Wait;
  Result<vmm::VmExit> Wait(milliseconds timeout, int wake_fd) override {
    // As QemuMachine: a readable wake_fd ends the wait early (looked at in
    // slices here: the fake's VM is a condition variable, not a pidfd).
    auto woken = [wake_fd] {
      pollfd p{wake_fd, POLLIN, 0};
      return wake_fd >= 0 && ::poll(&p, 1, 0) > 0;
    };
    auto deadline = std::chrono::steady_clock::now() + timeout;
    std::unique_lock lock(vm_->mu);
    if (vm_->wait_error) return std::unexpected(*vm_->wait_error);
    while (!vm_->exit.has_value()) {
      if (woken() || std::chrono::steady_clock::now() >= deadline)
        return std::unexpected(Error{"still running", ETIMEDOUT});
      vm_->cv.wait_for(lock, std::min<std::chrono::steady_clock::duration>(
                                 milliseconds(5), deadline - std::chrono::steady_clock::now()));
    }
    return vmm::VmExit{*vm_->exit, vm_->console_tail};
  }
  Status Kill() override {
    std::lock_guard lock(vm_->mu);
    ++vm_->kills;
    if (!vm_->exit) vm_->exit = host::ExitStatus{-1, SIGKILL};
    vm_->cv.notify_all();
    return {};
  }
  Result<host::ExecResult> Exec(const protocol::ExecRequest&) override { return Fail("fake"); }
  Status WriteFile(const std::string&, std::string_view, uint32_t) override { return Fail("fake"); }
  Result<std::string> ReadFile(const std::string&) override { return Fail("fake"); }
  Result<std::vector<protocol::FileInfo>> ListFiles(const std::string&) override {
    return Fail("fake");
  }
  host::AgentClient* Agent() override { return nullptr; }
  Result<int> NetworkFD() override { return std::unexpected(Error{"fake", ENOTSUP}); }
  Result<int> VsockFD() override { return std::unexpected(Error{"fake", ENOTSUP}); }
  // The lifecycle records the hypervisor's identity: ours is a live process.
  int PID() const override {
    std::lock_guard lock(vm_->mu);
    return vm_->exit ? -1 : ::getpid();
  }
  Status Close() override {
    std::lock_guard lock(vm_->mu);
    ++vm_->closes;
    if (!vm_->exit) vm_->exit = host::ExitStatus{-1, SIGKILL};
    vm_->cv.notify_all();
    return {};
  }
  std::string RootfsPath() const override { return {}; }
  Status Pause() override {
    std::lock_guard lock(vm_->mu);
    vm_->frozen = true;
    return {};
  }
  Status Resume() override {
    std::lock_guard lock(vm_->mu);
    vm_->frozen = false;
    return {};
  }
  const vmm::VMConfig& Config() const override { return config_; }
  milliseconds BootDuration() const override { return 7ms; }

 private:
  std::shared_ptr<FakeVm> vm_;
  vmm::VMConfig config_;
};

class FakeBackend final : public vmm::Backend {
 public:
  explicit FakeBackend(std::shared_ptr<FakeVm> vm) : vm_(std::move(vm)) {}
  std::string_view Name() const override { return "fake"; }
  Result<std::unique_ptr<vmm::Machine>> Create(const vmm::VMConfig&) override {
    return std::make_unique<FakeMachine>(vm_);
  }

 private:
  std::shared_ptr<FakeVm> vm_;
};

class SandboxLifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "cella-life-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    auto opened = store::StateStore::Open(dir_ + "/state.db");
    ASSERT_TRUE(opened) << opened.error().message;
    store_.emplace(std::move(*opened));
    store::SandboxRecord record;
    record.id = kId;
    record.command = {"true"};
    record.spec_json = "{}";
    ASSERT_TRUE(store_->Create(record));
  }
  void TearDown() override {
    lifecycle_.reset();
    store_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Builds the lifecycle the way the supervisor does: a Backend makes the
  // machine.
  SandboxLifecycle& Make(LifecycleHooks hooks = {}) {
    LifecycleOptions options;
    options.id = kId;
    options.tick = tick_;
    options.request_wait = 10s;
    options.closed_link_grace = closed_link_grace_;
    options.end_at_main_result = end_at_main_result_;
    FakeBackend backend(vm_);
    auto machine = backend.Create(vmm::VMConfig{});
    EXPECT_TRUE(machine);
    lifecycle_ = std::make_unique<SandboxLifecycle>(std::move(options), *store_,
                                                    std::move(*machine), std::move(hooks));
    return *lifecycle_;
  }

  // Run() on its own thread, as the supervisor's main loop.
  std::future<LifecycleOutcome> RunAsync() {
    return std::async(std::launch::async, [this] { return lifecycle_->Run(); });
  }

  // Waits until the record reaches `state` (the store is the main thread's
  // connection, so a second one reads it).
  bool AwaitState(store::SandboxState state, milliseconds timeout = 5s) {
    auto reader = store::StateStore::Open(dir_ + "/state.db");
    if (!reader) return false;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      auto r = reader->Get(kId);
      if (r && r->state == state) return true;
      std::this_thread::sleep_for(5ms);
    }
    return false;
  }

  store::SandboxRecord Record() {
    auto r = store_->Get(kId);
    EXPECT_TRUE(r) << r.error().message;
    return r ? *r : store::SandboxRecord{};
  }
  std::vector<store::SandboxState> States() {
    std::vector<store::SandboxState> out;
    auto history = store_->History(kId);
    EXPECT_TRUE(history);
    if (history)
      for (const auto& change : *history) out.push_back(change.state);
    return out;
  }

  std::string dir_;
  std::optional<store::StateStore> store_;
  std::shared_ptr<FakeVm> vm_ = std::make_shared<FakeVm>();
  std::unique_ptr<SandboxLifecycle> lifecycle_;
  milliseconds closed_link_grace_ = 10s;
  milliseconds tick_ = 10ms;
  bool end_at_main_result_ = false;
};

TEST_F(SandboxLifecycleTest, BootFailureIsFailedWithTheConsoleTail) {
  vm_->start_error = Error::Msg(
      "VM x: timed out waiting for the agent\nguest console, last lines:\nKernel panic - not "
      "syncing: VFS");
  std::optional<Status> ready;
  std::optional<store::SandboxState> state_when_told;
  int closes_when_told = -1;
  LifecycleHooks hooks;
  hooks.on_boot_result = [&](const Status& st) {
    ready = st;
    state_when_told = Record().state;
    closes_when_told = vm_->closes;
  };
  LifecycleOutcome outcome = Make(std::move(hooks)).Run();
  EXPECT_FALSE(outcome.booted);
  // The CLI returns on the report: what it (or `inspect` next) reads must be
  // the end, not "creating".
  EXPECT_EQ(state_when_told, kFailed);
  EXPECT_EQ(closes_when_told, 1);
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kFailed);
  EXPECT_NE(r.reason.find("boot: VM x: timed out waiting for the agent"), std::string::npos)
      << r.reason;
  EXPECT_NE(r.reason.find("Kernel panic - not syncing: VFS"), std::string::npos) << r.reason;
  EXPECT_EQ(r.reason.find('\n'), std::string::npos) << "a store detail is one line";
  EXPECT_FALSE(r.exit_code);
  ASSERT_TRUE(ready.has_value());
  EXPECT_FALSE(*ready) << "the readiness line carries the error";
  EXPECT_EQ(vm_->closes, 1);
  EXPECT_EQ(States(), (std::vector{kCreating, kFailed}));
}

// A warm clone whose restore fails: the supervisor hands in a cold machine,
// which boots, and the sandbox runs (the failed machine is closed first).
TEST_F(SandboxLifecycleTest, AFailedBootCanBeRetriedOnAnotherMachine) {
  vm_->start_error = Error::Msg("VM x: QEMU refused the incoming state");
  auto cold = std::make_shared<FakeVm>();
  std::optional<std::string> retried_after;
  std::optional<Status> ready;
  LifecycleHooks hooks;
  hooks.retry_boot = [&](const Error& e) -> std::unique_ptr<vmm::Machine> {
    retried_after = e.message;
    return std::make_unique<FakeMachine>(cold);
  };
  hooks.on_boot_result = [&](const Status& st) { ready = st; };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  ASSERT_TRUE(retried_after.has_value());
  EXPECT_EQ(*retried_after, "VM x: QEMU refused the incoming state");
  EXPECT_EQ(vm_->closes, 1) << "the failed machine is closed";
  cold->PowerOff();
  EXPECT_TRUE(run.get().booted);
  // Read only once the run is over: the hook runs after the running state
  // is committed, so it may not have run when that state is seen.
  ASSERT_TRUE(ready.has_value());
  EXPECT_TRUE(*ready);
  EXPECT_EQ(Record().state, kStopped);
  // Without a machine to retry on, the failure stands.
  vm_ = std::make_shared<FakeVm>();
  vm_->start_error = Error::Msg("no kernel");
  ASSERT_TRUE(store_->Transition(kId, kCreating, "again"));
  LifecycleHooks none;
  none.retry_boot = [](const Error&) { return std::unique_ptr<vmm::Machine>(); };
  EXPECT_FALSE(Make(std::move(none)).Run().booted);
  EXPECT_EQ(Record().state, kFailed);
}

TEST_F(SandboxLifecycleTest, GuestPoweringOffByItselfIsStopped) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  EXPECT_EQ(Record().hypervisor.pid, ::getpid());
  EXPECT_EQ(Record().reason, "booted in 7 ms");
  vm_->PowerOff();
  LifecycleOutcome outcome = run.get();
  EXPECT_TRUE(outcome.booted);
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kStopped);
  EXPECT_EQ(r.reason, "the guest powered off");
  EXPECT_FALSE(r.exit_code);
  EXPECT_EQ(States(), (std::vector{kCreating, kRunning, kStopped}));
}

TEST_F(SandboxLifecycleTest, MainProcessExitCodeIsTheSandboxsExitCode) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  host::ExecStatus status;
  status.exit_code = 42;
  lifecycle_->SetMainStatus(status);
  vm_->PowerOff();
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kExited);
  EXPECT_EQ(r.exit_code, 42);
  EXPECT_EQ(r.reason, "main process exited with 42");
}

TEST_F(SandboxLifecycleTest, AThrowawaySandboxEndsItsVmAtTheMainResult) {
  end_at_main_result_ = true;
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  host::ExecStatus status;
  status.exit_code = 3;
  lifecycle_->SetMainStatus(status);  // no power-off from the guest
  ASSERT_EQ(run.wait_for(5s), std::future_status::ready);
  LifecycleOutcome outcome = run.get();
  EXPECT_EQ(outcome.state, kExited);
  EXPECT_EQ(outcome.exit_code, 3);
  EXPECT_GE(vm_->kills, 1);
  EXPECT_EQ(Record().reason, "main process exited with 3");
}

// `run -d --rm true`: the result can come while the boot's after_boot hook
// still uses the machine (attach, close stdin). The VM must not be killed
// under it: the boot completes, then the loop ends the VM, and the sandbox
// ends exited, not failed.
TEST_F(SandboxLifecycleTest, AMainResultDuringTheBootEndsTheVmOnlyAfterIt) {
  end_at_main_result_ = true;
  int kills_during_boot = -1;
  LifecycleHooks hooks;
  hooks.after_boot = [&]() -> Status {
    host::ExecStatus status;
    status.exit_code = 0;
    lifecycle_->SetMainStatus(status);
    std::lock_guard lock(vm_->mu);
    kills_during_boot = vm_->kills;
    return {};
  };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_EQ(run.wait_for(5s), std::future_status::ready);
  LifecycleOutcome outcome = run.get();
  EXPECT_EQ(kills_during_boot, 0) << "killed while after_boot still ran";
  EXPECT_TRUE(outcome.booted);
  EXPECT_EQ(outcome.state, kExited);
  EXPECT_EQ(outcome.exit_code, 0);
  EXPECT_GE(vm_->kills, 1);
}

TEST_F(SandboxLifecycleTest, WithoutEndAtMainResultTheVmIsLeftToPowerOff) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  host::ExecStatus status;
  status.exit_code = 3;
  lifecycle_->SetMainStatus(status);
  // The guest still has its flush to do: nothing ends the VM but the guest.
  EXPECT_EQ(run.wait_for(100ms), std::future_status::timeout);
  {
    std::lock_guard lock(vm_->mu);
    EXPECT_EQ(vm_->kills, 0);
  }
  vm_->PowerOff();
  EXPECT_EQ(run.get().exit_code, 3);
}

TEST_F(SandboxLifecycleTest, MainProcessKilledBySignalIsShellCode) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  host::ExecStatus status;
  status.signal = SIGTERM;
  lifecycle_->SetMainStatus(status);
  vm_->PowerOff();
  run.get();
  EXPECT_EQ(Record().state, kExited);
  EXPECT_EQ(Record().exit_code, 128 + SIGTERM);
}

TEST_F(SandboxLifecycleTest, QemuCrashIsFailedUnexpectedly) {
  vm_->console_tail = "[  1.0] oops\n[  1.1] general protection fault";
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  vm_->Crash();
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kFailed);
  EXPECT_TRUE(r.reason.starts_with("the VM ended unexpectedly: QEMU ")) << r.reason;
  EXPECT_NE(r.reason.find("general protection fault"), std::string::npos) << r.reason;
  EXPECT_FALSE(r.exit_code);
}

TEST_F(SandboxLifecycleTest, StopRecordsStoppingThenStopped) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  nlohmann::json reply = lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 3000}});
  EXPECT_EQ(reply["ok"], true) << reply.dump();
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kStopped);
  EXPECT_EQ(r.reason, "stopped (cella stop)");
  EXPECT_EQ(States(), (std::vector{kCreating, kRunning, kStopping, kStopped}));
  EXPECT_EQ(vm_->stops, 1);
  auto history = store_->History(kId);
  ASSERT_TRUE(history);
  EXPECT_EQ((*history)[2].detail, "stopping (grace 3000 ms)");
}

// docker stop: the guest sends SIGTERM to the main process and reports how
// it ended; that is the sandbox's exit code, not a bare "stopped".
TEST_F(SandboxLifecycleTest, StopKeepsTheMainProcessesExitCode) {
  for (int code : {0, 143}) {
    if (code != 0) {  // the second round is a `cella start` of the first's end
      vm_ = std::make_shared<FakeVm>();
      ASSERT_TRUE(store_->Transition(kId, kCreating, "started (cella start)"));
    }
    Make();
    vm_->on_stop = [&] {
      host::ExecStatus status;
      if (code == 143) {
        status.signal = SIGTERM;
      } else {
        status.exit_code = 0;  // it trapped TERM and exited cleanly
      }
      lifecycle_->SetMainStatus(status);
    };
    auto run = RunAsync();
    ASSERT_TRUE(AwaitState(kRunning));
    EXPECT_EQ(lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 3000}})["ok"], true);
    run.get();
    store::SandboxRecord r = Record();
    EXPECT_EQ(r.state, kExited) << code;
    EXPECT_EQ(r.exit_code, code);
    EXPECT_EQ(r.reason, "main process exited with " + std::to_string(code) + " (cella stop)");
    auto states = States();
    ASSERT_GE(states.size(), 2u);
    EXPECT_EQ(states[states.size() - 2], kStopping);
  }
}

// The guest writes the main process's Result and powers off at once: the VM
// can be seen gone before the router has handed the Result in. The end is
// decided only once the link has been read to its end.
TEST_F(SandboxLifecycleTest, AMainStatusStillOnTheLinkWhenTheVmEndsIsKept) {
  std::atomic<bool> delivered{false};
  LifecycleHooks hooks;
  hooks.link_error = [&]() -> std::optional<Error> {
    if (!vm_->Ended()) return std::nullopt;
    if (!delivered.exchange(true)) {
      // The router reads the last frames only now, after the VM ended.
      host::ExecStatus status;
      status.exit_code = 7;
      lifecycle_->SetMainStatus(status);
      return std::nullopt;
    }
    return Error{"guest agent link closed", EPIPE};
  };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  EXPECT_EQ(lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 1000}})["ok"], true);
  run.get();
  EXPECT_EQ(Record().state, kExited);
  EXPECT_EQ(Record().exit_code, 7);
}

TEST_F(SandboxLifecycleTest, StopRacingTheGuestsOwnPowerOffIsStopped) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  // Both at once: the guest ends while the stop request is on its way.
  std::thread guest([&] { vm_->PowerOff(); });
  nlohmann::json reply = lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 1000}});
  guest.join();
  EXPECT_EQ(reply["ok"], true) << reply.dump();
  run.get();
  store::SandboxRecord r = Record();
  // Either way the user sees a stopped sandbox, never failed, and no hang.
  EXPECT_EQ(r.state, kStopped);
  EXPECT_FALSE(r.exit_code);
  // A second stop after the end returns at once.
  auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(lifecycle_->Handle({{"op", "stop"}})["ok"], true);
  EXPECT_LT(std::chrono::steady_clock::now() - started, 1s);
}

TEST_F(SandboxLifecycleTest, KillDuringBootEndsTheBootAtOnce) {
  vm_->start_blocks = true;
  std::optional<Status> ready;
  LifecycleHooks hooks;
  hooks.on_boot_result = [&](const Status& st) { ready = st; };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(vm_->AwaitFor(5s, [&] { return vm_->start_entered; }));
  auto started = std::chrono::steady_clock::now();
  nlohmann::json reply = lifecycle_->Handle({{"op", "kill"}});
  // Far below a boot that never ends; loose, as every commit here is an
  // fsync on a disk other tests keep busy.
  EXPECT_LT(std::chrono::steady_clock::now() - started, 8s);
  EXPECT_EQ(reply["ok"], true) << reply.dump();
  LifecycleOutcome outcome = run.get();
  EXPECT_FALSE(outcome.booted);
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kStopped);
  EXPECT_EQ(r.reason, "killed while booting (cella kill)");
  ASSERT_TRUE(ready.has_value());
  EXPECT_FALSE(*ready);
  EXPECT_GE(vm_->kills, 1);
}

TEST_F(SandboxLifecycleTest, KillOvertakesALongGracefulStop) {
  vm_->obey_stop = false;  // the guest ignores the power-off request
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  auto stopper = std::async(std::launch::async, [&] {
    return lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 60'000}});
  });
  ASSERT_TRUE(AwaitState(kStopping));
  auto started = std::chrono::steady_clock::now();
  nlohmann::json reply = lifecycle_->Handle({{"op", "kill"}});
  // The grace is 60 s; a loose bound, as commits here are fsyncs.
  EXPECT_LT(std::chrono::steady_clock::now() - started, 8s) << "kill waited for the grace";
  EXPECT_EQ(reply["ok"], true) << reply.dump();
  EXPECT_EQ(stopper.get()["ok"], true);
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kExited);
  EXPECT_EQ(r.exit_code, 137);
  EXPECT_EQ(r.reason, "killed (cella kill)");
}

TEST_F(SandboxLifecycleTest, SigtermToTheSupervisorStopsTheSandbox) {
  Make();
  // The supervisor blocks SIGTERM in every thread and collects it; here one
  // thread plays the supervisor's main thread and receives it.
  auto run = std::async(std::launch::async, [this] {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    pthread_kill(pthread_self(), SIGTERM);
    return lifecycle_->Run();
  });
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kStopped);
  EXPECT_EQ(r.reason, "stopped (cella stop)");
  EXPECT_EQ(States(), (std::vector{kCreating, kRunning, kStopping, kStopped}));
  auto history = store_->History(kId);
  ASSERT_TRUE(history);
  EXPECT_EQ((*history)[2].detail, "stopping (grace 10000 ms)");
}

TEST_F(SandboxLifecycleTest, StopAfterAFailedBootDoesNotHang) {
  vm_->start_error = Error::Msg("no kernel");
  Make();
  auto run = RunAsync();
  run.get();
  auto started = std::chrono::steady_clock::now();
  nlohmann::json stop = lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 5000}});
  nlohmann::json kill = lifecycle_->Handle({{"op", "kill"}});
  EXPECT_LT(std::chrono::steady_clock::now() - started, 1s);
  EXPECT_EQ(stop["ok"], true);
  EXPECT_EQ(kill["ok"], true);
  EXPECT_EQ(Record().state, kFailed);
  EXPECT_EQ(Record().reason, "boot: no kernel");
}

TEST_F(SandboxLifecycleTest, StopRequestedDuringBootWaitsForTheEnd) {
  vm_->start_blocks = true;
  vm_->start_error = Error::Msg("timed out");
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(vm_->AwaitFor(5s, [&] { return vm_->start_entered; }));
  auto stopper = std::async(std::launch::async, [&] {
    return lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 10}});
  });
  std::this_thread::sleep_for(50ms);
  {
    std::lock_guard lock(vm_->mu);
    vm_->release_start = true;
    vm_->cv.notify_all();
  }
  EXPECT_EQ(stopper.get()["ok"], true);
  run.get();
  EXPECT_EQ(Record().state, kFailed);
}

TEST_F(SandboxLifecycleTest, WaitErrorIsFailedAndTearsDown) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  {
    std::lock_guard lock(vm_->mu);
    vm_->wait_error = Error{"pidfd poll: Bad file descriptor", EBADF};
  }
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kFailed);
  EXPECT_EQ(r.reason, "waiting for the VM: pidfd poll: Bad file descriptor");
  EXPECT_EQ(vm_->closes, 1);
}

TEST_F(SandboxLifecycleTest, AfterBootFailureFailsTheBootAndClosesTheVm) {
  LifecycleHooks hooks;
  int before = 0;
  int after = 0;
  hooks.after_boot = [] { return Fail("start the main process: no such file"); };
  hooks.before_close = [&] { ++before; };
  hooks.after_close = [&] { ++after; };
  Make(std::move(hooks)).Run();
  EXPECT_EQ(Record().state, kFailed);
  EXPECT_EQ(Record().reason, "start the main process: no such file");
  EXPECT_EQ(vm_->closes, 1);
  EXPECT_EQ(before, 1);
  EXPECT_EQ(after, 1);
}

TEST_F(SandboxLifecycleTest, StatusAndUnknownOps) {
  Make();
  EXPECT_EQ(lifecycle_->Handle({{"op", "status"}})["finished"], false);
  nlohmann::json bad = lifecycle_->Handle({{"op", "reboot"}});
  EXPECT_EQ(bad["ok"], false);
  EXPECT_EQ(bad["error"], "unknown control op \"reboot\"");
  vm_->start_error = Error::Msg("x");
  lifecycle_->Run();
  EXPECT_EQ(lifecycle_->Handle({{"op", "status"}})["finished"], true);
}

// ---- the agent link --------------------------------------------------------

// A guest agent that says Hello and then, when told, writes garbage.
class FakeAgentLink {
 public:
  FakeAgentLink() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    host_end_ = UniqueFd(sv[0]);
    guest_end_ = UniqueFd(sv[1]);
    std::vector<std::byte> hello;
    protocol::EncodeFrame(0, protocol::FrameType::kHello, protocol::Channel::kControl,
                          protocol::AsBytes(protocol::EncodeHello(
                              {protocol::kProtocolVersion, protocol::Role::kAgent})),
                          hello);
    EXPECT_TRUE(WriteAll(guest_end_.Get(), hello));
  }
  UniqueFd TakeHostEnd() { return std::move(host_end_); }
  void WriteGarbage() {
    std::string junk(64, '\xff');
    EXPECT_TRUE(WriteAll(guest_end_.Get(), junk));
  }
  void Close() { guest_end_.Reset(); }

 private:
  UniqueFd host_end_;
  UniqueFd guest_end_;
};

TEST_F(SandboxLifecycleTest, GarbageOnTheAgentLinkFailsTheSandboxVisibly) {
  closed_link_grace_ = 60s;  // so "at once" is far from "after the grace"
  FakeAgentLink link;
  auto router = host::Router::Start(link.TakeHostEnd(), {}, 5s);
  ASSERT_TRUE(router) << router.error().message;
  LifecycleHooks hooks;
  hooks.link_error = [&] { return (*router)->UpstreamError(); };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(Record().state, kRunning) << "a working link is left alone";
  link.WriteGarbage();
  auto started = std::chrono::steady_clock::now();
  run.get();
  EXPECT_LT(std::chrono::steady_clock::now() - started, 20s) << "a broken protocol fails at once";
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kFailed);
  EXPECT_TRUE(r.reason.starts_with("the guest agent link failed (guest agent broke the protocol"))
      << r.reason;
  EXPECT_NE(r.reason.find("the VM was torn down since it can no longer be controlled"),
            std::string::npos)
      << r.reason;
  EXPECT_GE(vm_->kills, 1) << "the VM nobody can control is gone";
  (*router)->Stop();
}

TEST_F(SandboxLifecycleTest, AClosedLinkWithTheVmStillUpFailsAfterTheGrace) {
  closed_link_grace_ = 300ms;
  FakeAgentLink link;
  auto router = host::Router::Start(link.TakeHostEnd(), {}, 5s);
  ASSERT_TRUE(router) << router.error().message;
  LifecycleHooks hooks;
  hooks.link_error = [&] { return (*router)->UpstreamError(); };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  link.Close();  // the agent died; the VM runs on
  auto started = std::chrono::steady_clock::now();
  run.get();
  EXPECT_GE(std::chrono::steady_clock::now() - started, 250ms);
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kFailed);
  // Closed or reset (the host's Hello was never read): either way, gone.
  EXPECT_TRUE(r.reason.starts_with("the guest agent link failed (")) << r.reason;
  EXPECT_EQ(r.reason.find("broke the protocol"), std::string::npos) << r.reason;
  (*router)->Stop();
}

TEST_F(SandboxLifecycleTest, AClosedLinkFollowedByPowerOffIsAnOrdinaryEnd) {
  closed_link_grace_ = 5s;
  std::atomic<bool> closed{false};
  LifecycleHooks hooks;
  hooks.link_error = [&]() -> std::optional<Error> {
    if (!closed) return std::nullopt;
    return Error{"guest agent link closed", EPIPE};
  };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  host::ExecStatus status;
  status.exit_code = 3;
  lifecycle_->SetMainStatus(status);
  closed = true;  // the guest's agent goes first while the guest powers off
  std::this_thread::sleep_for(100ms);
  vm_->PowerOff();
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kExited);
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(vm_->kills, 0);
}

TEST_F(SandboxLifecycleTest, AStopClosesTheLinkWithoutFailingTheSandbox) {
  closed_link_grace_ = 0ms;
  std::atomic<bool> closed{false};
  vm_->obey_stop = false;  // the guest takes the whole grace
  LifecycleHooks hooks;
  hooks.link_error = [&]() -> std::optional<Error> {
    if (!closed) return std::nullopt;
    return Error{"guest agent link closed", EPIPE};
  };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  auto stopper = std::async(std::launch::async, [&] {
    return lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 300}});
  });
  ASSERT_TRUE(AwaitState(kStopping));
  closed = true;  // the agent's shutdown ends the link on purpose
  EXPECT_EQ(stopper.get()["ok"], true);
  run.get();
  EXPECT_EQ(Record().state, kStopped);
  EXPECT_EQ(Record().reason, "stopped (cella stop)");
}

}  // namespace
}  // namespace cella::sandbox

namespace cella::sandbox {
namespace {

// A request is taken up when it comes, not at the loop's next tick: with a
// tick of an hour, each of these would otherwise end "no answer in time"
// after request_wait (10 s).
TEST_F(SandboxLifecycleTest, RequestsWakeTheLoopInsteadOfWaitingForItsTick) {
  tick_ = std::chrono::hours(1);
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  nlohmann::json paused = lifecycle_->Handle({{"op", "pause"}});
  EXPECT_EQ(paused["ok"], true) << paused.dump();
  EXPECT_TRUE(vm_->frozen);
  nlohmann::json unpaused = lifecycle_->Handle({{"op", "unpause"}});
  EXPECT_EQ(unpaused["ok"], true) << unpaused.dump();
  EXPECT_FALSE(vm_->frozen);
  vm_->obey_stop = true;
  EXPECT_EQ(lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 1000}})["ok"], true);
  run.get();
  EXPECT_EQ(Record().state, kStopped);
}

TEST_F(SandboxLifecycleTest, PauseAndUnpauseAreRecordedAndAStopThawsAPausedGuestFirst) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  EXPECT_EQ(lifecycle_->Handle({{"op", "unpause"}})["ok"], false) << "not paused";
  nlohmann::json paused = lifecycle_->Handle({{"op", "pause"}});
  EXPECT_EQ(paused["ok"], true) << paused.dump();
  EXPECT_TRUE(vm_->frozen);
  EXPECT_EQ(Record().state, kPaused);
  nlohmann::json again = lifecycle_->Handle({{"op", "pause"}});
  EXPECT_EQ(again["ok"], false);
  EXPECT_EQ(again["error"], "sandbox is already paused");
  EXPECT_EQ(lifecycle_->Handle({{"op", "unpause"}})["ok"], true);
  EXPECT_FALSE(vm_->frozen);
  EXPECT_EQ(Record().state, kRunning);
  ASSERT_EQ(lifecycle_->Handle({{"op", "pause"}})["ok"], true);
  // A frozen guest could not power off: stop thaws it, then stops it.
  EXPECT_EQ(lifecycle_->Handle({{"op", "stop"}, {"grace_ms", 1000}})["ok"], true);
  run.get();
  EXPECT_FALSE(vm_->stopped_while_frozen);
  EXPECT_EQ(Record().state, kStopped);
  EXPECT_EQ(States(),
            (std::vector{kCreating, kRunning, kPaused, kRunning, kPaused, kStopping, kStopped}));
  EXPECT_EQ(lifecycle_->Handle({{"op", "pause"}})["ok"], false) << "ended";
}

TEST_F(SandboxLifecycleTest, KillOfAPausedSandboxIsExited137) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  ASSERT_EQ(lifecycle_->Handle({{"op", "pause"}})["ok"], true);
  EXPECT_EQ(lifecycle_->Handle({{"op", "kill"}})["ok"], true);
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kExited);
  EXPECT_EQ(r.exit_code, 137);
}

TEST_F(SandboxLifecycleTest, ACommittedStandbyIsRecordedBeforeTheVmCloses) {
  LifecycleHooks hooks;
  int closes_at_commit = -1;
  bool frozen_during_save = true;
  hooks.standby = [&]() -> Status {
    closes_at_commit = vm_->closes;
    frozen_during_save = vm_->frozen;
    return {};
  };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  ASSERT_EQ(lifecycle_->Handle({{"op", "pause"}})["ok"], true);
  nlohmann::json reply = lifecycle_->Handle({{"op", "standby"}});
  EXPECT_EQ(reply["ok"], true) << reply.dump();
  LifecycleOutcome outcome = run.get();
  EXPECT_EQ(outcome.state, kStandby);
  EXPECT_EQ(closes_at_commit, 0);
  EXPECT_FALSE(frozen_during_save) << "the guest must be able to let go of its link";
  EXPECT_EQ(vm_->closes, 1);
  EXPECT_EQ(Record().state, kStandby);
  EXPECT_EQ(States(), (std::vector{kCreating, kRunning, kPaused, kStandby}));
}

TEST_F(SandboxLifecycleTest, AFailedStandbyKeepsTheSandboxRunningOrFailsItWhenUnreachable) {
  LifecycleHooks hooks;
  int calls = 0;
  hooks.standby = [&]() -> Status {
    if (++calls == 1) return Fail("no room for the snapshot");
    return std::unexpected(Error{"the guest did not come back", EIO});
  };
  Make(std::move(hooks));
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  nlohmann::json first = lifecycle_->Handle({{"op", "standby"}});
  EXPECT_EQ(first["ok"], false);
  EXPECT_EQ(first["error"], "no room for the snapshot");
  EXPECT_EQ(Record().state, kRunning);
  EXPECT_FALSE(vm_->Ended());
  EXPECT_EQ(lifecycle_->Handle({{"op", "standby"}})["ok"], false);
  run.get();
  store::SandboxRecord r = Record();
  EXPECT_EQ(r.state, kFailed);
  EXPECT_NE(r.reason.find("the guest did not come back"), std::string::npos) << r.reason;
}

TEST_F(SandboxLifecycleTest, StandbyWithoutAHookIsRefused) {
  Make();
  auto run = RunAsync();
  ASSERT_TRUE(AwaitState(kRunning));
  EXPECT_EQ(lifecycle_->Handle({{"op", "standby"}})["ok"], false);
  EXPECT_EQ(lifecycle_->Handle({{"op", "stop"}})["ok"], true);
  run.get();
  EXPECT_EQ(Record().state, kStopped);
}

}  // namespace
}  // namespace cella::sandbox
