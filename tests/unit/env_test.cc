// Crash-safety seam (base/env.h): injected write, fsync and rename failures
// in the atomic file helper and in the state store leave the previous state
// readable, and the error says what failed.
#include "base/env.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <mutex>

#include "base/io.h"
#include "host/store/state_store.h"
#include "support/temp_dir.h"

namespace cella {
namespace {

using namespace std::chrono_literals;

using ::cella::testing::TempDir;

Error Injected(const std::string& what) {
  return Error{what + ": Input/output error (injected)", EIO};
}

// Fails the operations a test arms; everything else is the real call.
class FaultEnv : public Env {
 public:
  std::atomic<bool> fail_write{false};
  std::atomic<bool> fail_sync{false};
  std::atomic<bool> fail_rename{false};
  // For files SQLite writes: fail when the path ends with this.
  std::string foreign_suffix;
  std::atomic<bool> fail_foreign_write{false};
  std::atomic<bool> fail_foreign_sync{false};
  std::atomic<int64_t> fixed_now_ms{0};

  Result<size_t> Write(int fd, std::span<const std::byte> data) override {
    if (fail_write) return std::unexpected(Injected("write"));
    return Env::Write(fd, data);
  }
  Status Sync(int fd, std::string_view what) override {
    if (fail_sync) return std::unexpected(Injected("fsync " + std::string(what)));
    return Env::Sync(fd, what);
  }
  Status Rename(const std::string& from, const std::string& to) override {
    if (fail_rename) return std::unexpected(Injected("rename " + from + " -> " + to));
    return Env::Rename(from, to);
  }
  std::chrono::system_clock::time_point Now() override {
    if (int64_t ms = fixed_now_ms; ms != 0)
      return std::chrono::system_clock::time_point(std::chrono::milliseconds(ms));
    return Env::Now();
  }
  Status CheckForeign(FileOp op, std::string_view path) override {
    if (!path.ends_with(foreign_suffix)) return {};
    if (op == FileOp::kWrite && fail_foreign_write)
      return std::unexpected(Injected("write " + std::string(path)));
    if (op == FileOp::kSync && fail_foreign_sync)
      return std::unexpected(Injected("fsync " + std::string(path)));
    return {};
  }
};

TEST(EnvTest, DefaultIsCurrentUnlessOverridden) {
  EXPECT_EQ(&Env::Current(), &Env::Default());
  FaultEnv fault;
  {
    ScopedEnvOverride scoped(fault);
    EXPECT_EQ(&Env::Current(), &fault);
    fault.fixed_now_ms = 1234;
    EXPECT_EQ(NowMs(), 1234);
  }
  EXPECT_EQ(&Env::Current(), &Env::Default());
}

TEST(EnvTest, AtomicWriteReplacesTheFile) {
  TempDir dir;
  const std::string path = dir.path() + "/state.json";
  ASSERT_TRUE(WriteFileAtomically(path, "old", 0600));
  ASSERT_TRUE(WriteFileAtomically(path, "new", 0600));
  EXPECT_EQ(*ReadFileToString(path, 100), "new");
  EXPECT_EQ(std::filesystem::status(path).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  EXPECT_EQ(dir.Entries(), 1u) << "no temporary left";
}

// Each injected failure: the old content stays, no temporary is left, and
// the error names the failed step.
TEST(EnvTest, AtomicWriteFailuresKeepThePreviousContent) {
  TempDir dir;
  const std::string path = dir.path() + "/state.json";
  ASSERT_TRUE(WriteFileAtomically(path, "previous", 0600));
  struct Case {
    std::atomic<bool> FaultEnv::*flag;
    std::string expect;
  };
  for (const Case& c : {Case{&FaultEnv::fail_write, ": write: Input/output error (injected)"},
                        Case{&FaultEnv::fail_sync, "fsync " + path + ".tmp-"},
                        Case{&FaultEnv::fail_rename, "rename " + path + ".tmp-"}}) {
    FaultEnv fault;
    (fault.*c.flag) = true;
    Status st = WriteFileAtomically(path, "next", 0600, fault);
    ASSERT_FALSE(st) << c.expect;
    EXPECT_NE(st.error().message.find(c.expect), std::string::npos) << st.error().message;
    EXPECT_NE(st.error().message.find("(injected)"), std::string::npos) << st.error().message;
    EXPECT_EQ(*ReadFileToString(path, 100), "previous");
    EXPECT_EQ(dir.Entries(), 1u) << "the temporary was removed: " << c.expect;
  }
}

// ---- the state store, through the SQLite VFS shim ---------------------------

class StoreFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = store::StateStore::Open(db_path());
    ASSERT_TRUE(opened) << opened.error().message;
    store_.emplace(std::move(*opened));
    store::SandboxRecord r;
    r.id = id_;
    r.command = {"true"};
    r.spec_json = "{}";
    ASSERT_TRUE(store_->Create(r));
    ASSERT_TRUE(store_->Transition(id_, store::SandboxState::kRunning, "booted"));
  }
  std::string db_path() const { return dir_.path() + "/state.db"; }
  // What another process would read now.
  store::SandboxRecord ReadFresh() {
    auto other = store::StateStore::Open(db_path());
    EXPECT_TRUE(other) << other.error().message;
    auto r = other->Get(id_);
    EXPECT_TRUE(r) << r.error().message;
    return r ? *r : store::SandboxRecord{};
  }

  TempDir dir_;
  const std::string id_ = "0000000000000000000000000000f00d";
  std::optional<store::StateStore> store_;
};

TEST_F(StoreFaultTest, FailedFsyncOfTheCommitKeepsThePreviousState) {
  FaultEnv fault;
  fault.foreign_suffix = "state.db-wal";
  fault.fail_foreign_sync = true;
  {
    ScopedEnvOverride scoped(fault);
    Status st = store_->Transition(id_, store::SandboxState::kStopped, "stopped (cella stop)");
    ASSERT_FALSE(st) << "a commit that is not durable must not report success";
    EXPECT_NE(st.error().message.find("fsync " + db_path() + "-wal"), std::string::npos)
        << st.error().message;
    EXPECT_NE(st.error().message.find("(injected)"), std::string::npos) << st.error().message;
  }
  EXPECT_EQ(ReadFresh().state, store::SandboxState::kRunning);
  EXPECT_EQ(ReadFresh().reason, "booted");
  auto same = store_->Get(id_);
  ASSERT_TRUE(same) << same.error().message;
  EXPECT_EQ(same->state, store::SandboxState::kRunning);
  // The store recovers once the disk does.
  ASSERT_TRUE(store_->Transition(id_, store::SandboxState::kStopped, "stopped (cella stop)"));
  EXPECT_EQ(ReadFresh().state, store::SandboxState::kStopped);
}

TEST_F(StoreFaultTest, FailedWriteKeepsThePreviousState) {
  FaultEnv fault;
  fault.foreign_suffix = "state.db-wal";
  fault.fail_foreign_write = true;
  {
    ScopedEnvOverride scoped(fault);
    Status st = store_->Transition(id_, store::SandboxState::kFailed, "boom");
    ASSERT_FALSE(st);
    EXPECT_NE(st.error().message.find("write " + db_path() + "-wal"), std::string::npos)
        << st.error().message;
    EXPECT_NE(st.error().message.find("disk I/O error"), std::string::npos) << st.error().message;
  }
  store::SandboxRecord r = ReadFresh();
  EXPECT_EQ(r.state, store::SandboxState::kRunning);
  EXPECT_EQ(r.reason, "booted");
  auto history = store_->History(id_);
  ASSERT_TRUE(history) << history.error().message;
  EXPECT_EQ(history->size(), 2u) << "no half-recorded change";
  ASSERT_TRUE(store_->Transition(id_, store::SandboxState::kFailed, "boom"));
  EXPECT_EQ(ReadFresh().state, store::SandboxState::kFailed);
}

TEST_F(StoreFaultTest, TimestampsComeFromTheEnvClock) {
  FaultEnv fault;
  fault.fixed_now_ms = 1'700'000'000'000;
  ScopedEnvOverride scoped(fault);
  ASSERT_TRUE(store_->Transition(id_, store::SandboxState::kStopping, "x"));
  auto history = store_->History(id_);
  ASSERT_TRUE(history);
  // Clamped never to run backwards: the Env's clock is far in the past.
  EXPECT_GE(history->back().at_ms, (*history)[1].at_ms);
  auto r = store_->Get(id_);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->updated_ms, 1'700'000'000'000);
}

}  // namespace
}  // namespace cella
