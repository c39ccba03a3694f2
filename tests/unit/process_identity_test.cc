// Signalling a recorded process only once it is proven to be that process,
// and the CLI's reconcile cleaning up after a supervisor that died.
#include "host/store/process_identity.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "base/io.h"
#include "cli/sandbox_context.h"
#include "host/os/paths.h"
#include "host/sandbox/layout.h"
#include "support/temp_dir.h"

namespace cella::store {
namespace {

using namespace std::chrono_literals;

using ::cella::testing::TempDir;

// A child that sleeps until killed (bounded by alarm), reaped by the test.
class Sleeper {
 public:
  Sleeper() {
    pid_ = ::fork();
    if (pid_ == 0) {
      ::alarm(60);
      for (;;) ::pause();
    }
  }
  ~Sleeper() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }
  // True when it died of `sig` within the timeout (and reaps it).
  bool DiedOf(int sig, std::chrono::milliseconds timeout = 5s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return WIFSIGNALED(status) && WTERMSIG(status) == sig;
      }
      std::this_thread::sleep_for(5ms);
    }
    return false;
  }
  bool Running() { return ::waitpid(pid_, nullptr, WNOHANG) == 0; }

 private:
  pid_t pid_ = -1;
};

TEST(SignalIfSameTest, SignalsOnlyAVerifiedProcess) {
  Sleeper child;
  ASSERT_GT(child.pid(), 0);
  auto id = IdentifyProcess(child.pid());
  ASSERT_TRUE(id) << id.error().message;

  // Another process has the pid now (different start time): left alone.
  auto other = SignalIfSame({child.pid(), id->start_ticks + 1}, SIGKILL);
  ASSERT_TRUE(other) << other.error().message;
  EXPECT_FALSE(*other);
  EXPECT_TRUE(child.Running());

  // /proc cannot be read: not proven ours, so never signalled.
  TempDir proc;
  std::string pid_dir = proc.path() + "/" + std::to_string(child.pid());
  ASSERT_TRUE(std::filesystem::create_directories(pid_dir + "/stat"));  // read() fails: EISDIR
  EXPECT_EQ(CheckProcess(*id, proc.path()), Liveness::kUnknown);
  EXPECT_TRUE(IsAlive(*id, proc.path())) << "reconcile must not call it dead either";
  auto unverified = SignalIfSame(*id, SIGKILL, proc.path());
  ASSERT_FALSE(unverified);
  EXPECT_NE(unverified.error().message.find("cannot verify"), std::string::npos)
      << unverified.error().message;
  std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(child.Running());

  auto sent = SignalIfSame(*id, SIGKILL);
  ASSERT_TRUE(sent) << sent.error().message;
  EXPECT_TRUE(*sent);
  EXPECT_TRUE(child.DiedOf(SIGKILL));

  // Gone (reaped): nothing to signal, not an error.
  auto gone = SignalIfSame(*id, SIGKILL);
  ASSERT_TRUE(gone) << gone.error().message;
  EXPECT_FALSE(*gone);
  EXPECT_FALSE(*SignalIfSame({0, 0}, SIGKILL));
}

// A supervisor that died (SIGKILL, OOM) leaves its VM's runtime files: the
// next CLI call's reconcile kills the verified QEMU and removes them, but
// keeps the logs.
TEST(ReconcileTest, CleansUpAfterADeadSupervisor) {
  TempDir home;
  ASSERT_EQ(::setenv("CELLA_SANDBOX_HOME", home.path().c_str(), 1), 0);
  struct Unset {
    ~Unset() { ::unsetenv("CELLA_SANDBOX_HOME"); }
  } unset_at_exit;
  const std::string id = "00000000000000000000000000000abc";
  {
    ASSERT_TRUE(host::MakeDirs(home.path() + "/sandboxes", 0700));
    auto store = StateStore::Open(sandbox::StateDbPath(home.path()));
    ASSERT_TRUE(store) << store.error().message;
    SandboxRecord r;
    r.id = id;
    r.command = {"sleep", "1"};
    r.spec_json = "{}";
    ASSERT_TRUE(store->Create(r));
    ASSERT_TRUE(store->Transition(id, SandboxState::kRunning));
  }
  Sleeper qemu;
  auto qemu_id = IdentifyProcess(qemu.pid());
  ASSERT_TRUE(qemu_id);
  {
    auto store = StateStore::Open(sandbox::StateDbPath(home.path()));
    ASSERT_TRUE(store);
    // No supervisor recorded while running: dead at once.
    ASSERT_TRUE(store->SetHypervisor(id, *qemu_id));
  }
  sandbox::SandboxPaths paths = sandbox::PathsFor(home.path(), id);
  ASSERT_TRUE(host::MakeDirs(paths.dir, 0700));
  for (const char* name : {"qemu.log", "mux.sock", "control.sock", "console.log"})
    ASSERT_TRUE(WriteStringToFile(paths.dir + "/" + name, "x", 0600));

  auto ctx = cli::OpenSandboxes();
  ASSERT_TRUE(ctx) << ctx.error().message;
  auto record = ctx->store.Get(id);
  ASSERT_TRUE(record);
  EXPECT_EQ(record->state, SandboxState::kFailed);
  EXPECT_TRUE(qemu.DiedOf(SIGKILL)) << "the verified leftover QEMU is killed";
  for (const char* name : {"qemu.log", "mux.sock", "control.sock"})
    EXPECT_FALSE(std::filesystem::exists(paths.dir + "/" + name)) << name;
  EXPECT_TRUE(std::filesystem::exists(paths.dir + "/console.log")) << "kept for cella logs";
}

}  // namespace
}  // namespace cella::store
