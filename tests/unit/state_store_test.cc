// The sandbox state store: records, name resolution, the lifecycle rules,
// reconciliation against real processes, volume conflicts, and several
// processes sharing one database.
#include "host/store/state_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "support/temp_dir.h"

namespace cella::store {
namespace {

using namespace std::chrono_literals;
using enum SandboxState;

constexpr SandboxState kAllStates[] = {kCreating, kRunning, kStopping, kStopped,
                                       kExited,   kFailed,  kPaused,   kStandby};

using ::cella::testing::TempDir;

// A distinct valid id per n, with a chosen prefix when asked.
std::string MakeId(int n, std::string prefix = "") {
  char buf[33];
  std::snprintf(buf, sizeof(buf), "%032x", n);
  std::string id = buf;
  return prefix + id.substr(prefix.size());
}

SandboxRecord MakeRecord(const std::string& id, const std::string& name = "") {
  SandboxRecord r;
  r.id = id;
  r.name = name;
  r.image = "alpine:3.19";
  r.command = {"sh", "-c", "echo 'hi there'"};
  r.spec_json = R"({"memory":256})";
  return r;
}

class StateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_path_ = dir_.path() + "/state.db";
    auto s = StateStore::Open(db_path_);
    ASSERT_TRUE(s) << s.error().message;
    store_.emplace(std::move(*s));
  }

  StateStore& store() { return *store_; }

  void CreateOk(const SandboxRecord& r) {
    auto st = store().Create(r);
    ASSERT_TRUE(st) << st.error().message;
  }

  void MoveOk(const std::string& id, SandboxState to, std::optional<int> exit_code = std::nullopt) {
    auto st = store().Transition(id, to, "", exit_code);
    ASSERT_TRUE(st) << st.error().message;
  }

  // Drives a fresh sandbox from creating into `state` along allowed edges.
  void DriveTo(const std::string& id, SandboxState state) {
    switch (state) {
      case kCreating:
        return;
      case kRunning:
        return MoveOk(id, kRunning);
      case kStopping:
        MoveOk(id, kRunning);
        return MoveOk(id, kStopping);
      case kStopped:
        return MoveOk(id, kStopped);
      case kExited:
        MoveOk(id, kRunning);
        return MoveOk(id, kExited, 0);
      case kFailed:
        return MoveOk(id, kFailed);
      case kPaused:
        MoveOk(id, kRunning);
        return MoveOk(id, kPaused);
      case kStandby:
        MoveOk(id, kRunning);
        return MoveOk(id, kStandby);
    }
  }

  void AddVolume(const std::string& name) {
    auto st = store().CreateVolume({name, dir_.path() + "/" + name + ".img", 1 << 20, 0});
    ASSERT_TRUE(st) << st.error().message;
  }

  TempDir dir_;
  std::string db_path_;
  std::optional<StateStore> store_;
};

TEST(SandboxStateNames, RoundTripAndRejectUnknown) {
  for (SandboxState s : kAllStates) {
    auto parsed = ParseSandboxState(ToString(s));
    ASSERT_TRUE(parsed) << ToString(s);
    EXPECT_EQ(*parsed, s);
  }
  EXPECT_EQ(ToString(kRunning), "running");
  EXPECT_EQ(ToString(kExited), "exited");
  EXPECT_FALSE(ParseSandboxState("Running"));
  EXPECT_FALSE(ParseSandboxState(""));
  EXPECT_TRUE(IsActive(kCreating));
  EXPECT_TRUE(IsActive(kRunning));
  EXPECT_TRUE(IsActive(kStopping));
  EXPECT_FALSE(IsActive(kStopped));
  EXPECT_FALSE(IsActive(kExited));
  EXPECT_FALSE(IsActive(kFailed));
  // A paused sandbox keeps its supervisor; a standby one has none.
  EXPECT_TRUE(IsActive(kPaused));
  EXPECT_FALSE(IsActive(kStandby));
}

TEST_F(StateStoreTest, CreateGetListKeepEveryField) {
  SandboxRecord a = MakeRecord(MakeId(1), "web");
  a.auto_remove = true;
  a.ports = {{"127.0.0.1", 8080, 80}, {"", 2222, 22}};
  a.created_ms = 1'700'000'000'000;
  AddVolume("data");
  a.volumes = {{"data", "/srv/data", "rw"}};
  CreateOk(a);
  SandboxRecord b = MakeRecord(MakeId(2));
  b.image = "";
  b.created_ms = 1'700'000'000'500;
  CreateOk(b);

  auto got = store().Get(a.id);
  ASSERT_TRUE(got) << got.error().message;
  EXPECT_EQ(got->id, a.id);
  EXPECT_EQ(got->name, "web");
  EXPECT_EQ(got->created_ms, a.created_ms);
  EXPECT_EQ(got->image, "alpine:3.19");
  EXPECT_EQ(got->command, a.command);
  EXPECT_EQ(got->spec_json, a.spec_json);
  EXPECT_EQ(got->state, kCreating);
  EXPECT_FALSE(got->exit_code);
  EXPECT_TRUE(got->auto_remove);
  EXPECT_EQ(got->supervisor.pid, 0);
  EXPECT_EQ(got->ports, a.ports);
  EXPECT_EQ(got->volumes, a.volumes);
  EXPECT_GT(got->updated_ms, 0);

  MoveOk(b.id, kStopped);
  auto all = store().List(ListScope::kAll);
  ASSERT_TRUE(all) << all.error().message;
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].id, a.id);  // oldest first
  EXPECT_EQ((*all)[1].id, b.id);
  EXPECT_EQ((*all)[1].image, "");
  auto active = store().List(ListScope::kActiveOnly);
  ASSERT_TRUE(active) << active.error().message;
  ASSERT_EQ(active->size(), 1u);
  EXPECT_EQ((*active)[0].id, a.id);

  // A second connection (as another CLI call would open) sees the same.
  auto other = StateStore::Open(db_path_);
  ASSERT_TRUE(other) << other.error().message;
  auto again = other->Get(a.id);
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(again->ports, a.ports);
}

TEST_F(StateStoreTest, CreateRejectsMalformedInput) {
  auto bad_id = store().Create(MakeRecord("ABC"));
  ASSERT_FALSE(bad_id);
  EXPECT_EQ(bad_id.error().errno_value, EINVAL);
  auto bad_name = store().Create(MakeRecord(MakeId(1), "-web"));
  ASSERT_FALSE(bad_name);
  EXPECT_EQ(bad_name.error().errno_value, EINVAL);
  SandboxRecord running = MakeRecord(MakeId(2));
  running.state = kRunning;
  EXPECT_FALSE(store().Create(running));
  CreateOk(MakeRecord(MakeId(3)));
  auto dup = store().Create(MakeRecord(MakeId(3)));
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().errno_value, EEXIST);
  auto list = store().List(ListScope::kAll);
  ASSERT_TRUE(list);
  EXPECT_EQ(list->size(), 1u);
}

TEST_F(StateStoreTest, NameInUseSaysWhoHasItAndWhatToDo) {
  CreateOk(MakeRecord(MakeId(0x1a2b3c), "web"));
  auto second = store().Create(MakeRecord(MakeId(7), "web"));
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().errno_value, EEXIST);
  EXPECT_EQ(second.error().message, "name \"web\" is already in use by sandbox " +
                                        MakeId(0x1a2b3c).substr(0, 12) +
                                        "; remove it (cella rm web) or choose another --name");
  // Still taken when the holder is not running: names live until rm.
  MoveOk(MakeId(0x1a2b3c), kStopped);
  EXPECT_FALSE(store().Create(MakeRecord(MakeId(8), "web")));
  ASSERT_TRUE(store().Remove(MakeId(0x1a2b3c)));
  CreateOk(MakeRecord(MakeId(8), "web"));
  // Unnamed sandboxes never collide with each other.
  CreateOk(MakeRecord(MakeId(9)));
  CreateOk(MakeRecord(MakeId(10)));
}

TEST_F(StateStoreTest, ResolveByNameIdPrefix) {
  const std::string a = MakeId(1, "a1b2c3d4e5f6");
  const std::string b = MakeId(2, "a1f0");
  const std::string c = MakeId(3, "c0ffee");
  CreateOk(MakeRecord(a, "web"));
  CreateOk(MakeRecord(b));
  CreateOk(MakeRecord(c, "db"));

  auto by_name = store().Resolve("web");
  ASSERT_TRUE(by_name) << by_name.error().message;
  EXPECT_EQ(by_name->id, a);
  auto by_id = store().Resolve(b);
  ASSERT_TRUE(by_id) << by_id.error().message;
  EXPECT_EQ(by_id->id, b);
  auto by_prefix = store().Resolve("c0f");
  ASSERT_TRUE(by_prefix) << by_prefix.error().message;
  EXPECT_EQ(by_prefix->id, c);
  EXPECT_EQ(by_prefix->name, "db");
  auto longer_prefix = store().Resolve("a1b");
  ASSERT_TRUE(longer_prefix) << longer_prefix.error().message;
  EXPECT_EQ(longer_prefix->id, a);

  auto ambiguous = store().Resolve("a1");
  ASSERT_FALSE(ambiguous);
  EXPECT_EQ(ambiguous.error().message, "\"a1\" is ambiguous: it matches sandboxes " +
                                           a.substr(0, 12) + ", " + b.substr(0, 12) +
                                           "; give more of the ID");

  auto unknown = store().Resolve("x");
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.error().errno_value, ENOENT);
  EXPECT_EQ(unknown.error().message, "no sandbox \"x\" (see cella ps -a)");
  EXPECT_FALSE(store().Resolve("ff"));
  EXPECT_FALSE(store().Resolve(""));
  // Prefixes are of ids, not of names.
  EXPECT_FALSE(store().Resolve("we"));
}

TEST_F(StateStoreTest, ExactNameBeatsIdPrefixAndFullIdBeatsName) {
  const std::string abc_id = MakeId(1, "abc");
  const std::string named_id = MakeId(2, "ff");
  CreateOk(MakeRecord(abc_id));
  CreateOk(MakeRecord(named_id, "abc"));
  auto r = store().Resolve("abc");
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->id, named_id);

  // A name that spells another sandbox's full id loses to that id.
  const std::string third = MakeId(3);
  CreateOk(MakeRecord(third, abc_id));
  auto full = store().Resolve(abc_id);
  ASSERT_TRUE(full) << full.error().message;
  EXPECT_EQ(full->id, abc_id);
}

TEST_F(StateStoreTest, EveryTransitionFollowsTheLifecycleTable) {
  const std::set<std::pair<SandboxState, SandboxState>> allowed = {
      {kCreating, kRunning},
      {kCreating, kFailed},
      {kCreating, kStopped},
      {kRunning, kStopping},
      {kRunning, kExited},
      {kRunning, kFailed},
      {kRunning, kStopped},
      {kStopping, kStopped},
      {kStopping, kExited},
      {kStopping, kFailed},
      {kStopped, kCreating},
      {kExited, kCreating},
      {kFailed, kCreating},
      // pause / unpause, standby from either, and stop or kill of a paused one
      {kRunning, kPaused},
      {kPaused, kRunning},
      {kPaused, kStopping},
      {kPaused, kExited},
      {kPaused, kFailed},
      {kPaused, kStopped},
      {kRunning, kStandby},
      {kPaused, kStandby},
      // resume, or stop (the snapshot discarded)
      {kStandby, kCreating},
      {kStandby, kStopped},
  };
  int n = 0;
  for (SandboxState from : kAllStates) {
    for (SandboxState to : kAllStates) {
      const bool expect_ok = allowed.contains({from, to});
      EXPECT_EQ(IsTransitionAllowed(from, to), expect_ok)
          << ToString(from) << " -> " << ToString(to);
      const std::string id = MakeId(++n);
      const std::string name = "sb" + std::to_string(n);
      CreateOk(MakeRecord(id, name));
      DriveTo(id, from);
      auto st = store().Transition(id, to, "why", to == kExited ? std::optional(3) : std::nullopt);
      auto now = store().Get(id);
      ASSERT_TRUE(now) << now.error().message;
      if (expect_ok) {
        EXPECT_TRUE(st) << ToString(from) << " -> " << ToString(to) << ": " << st.error().message;
        EXPECT_EQ(now->state, to);
      } else {
        ASSERT_FALSE(st) << ToString(from) << " -> " << ToString(to);
        EXPECT_EQ(st.error().errno_value, EPERM);
        EXPECT_EQ(st.error().message, "sandbox " + name + " is " + std::string(ToString(from)) +
                                          "; cannot go to " + std::string(ToString(to)));
        EXPECT_EQ(now->state, from);
      }
    }
  }
}

TEST_F(StateStoreTest, ExpectedFromGuardsAgainstStaleWriters) {
  const std::string id = MakeId(1);
  CreateOk(MakeRecord(id, "web"));
  MoveOk(id, kRunning);
  MoveOk(id, kStopping);
  // The supervisor saw "running" earlier; a stop moved it on meanwhile.
  auto st = store().Transition(id, kExited, "", 0, kRunning);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().errno_value, ESTALE);
  EXPECT_NE(st.error().message.find("is stopping, not running"), std::string::npos)
      << st.error().message;
  EXPECT_EQ(store().Get(id)->state, kStopping);
  auto ok = store().Transition(id, kStopped, "stopped by user", std::nullopt, kStopping);
  EXPECT_TRUE(ok) << ok.error().message;
}

TEST_F(StateStoreTest, HistoryIsOrderedWithTimestamps) {
  const std::string id = MakeId(1);
  const int64_t before = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
  CreateOk(MakeRecord(id));
  ASSERT_TRUE(store().Transition(id, kRunning, "booted"));
  ASSERT_TRUE(store().Transition(id, kStopping, "cella stop"));
  ASSERT_TRUE(store().Transition(id, kStopped, ""));
  ASSERT_TRUE(store().Transition(id, kCreating, "cella start"));
  ASSERT_TRUE(store().Transition(id, kFailed, "qemu: could not open disk"));
  auto h = store().History(id);
  ASSERT_TRUE(h) << h.error().message;
  std::vector<SandboxState> states;
  std::vector<std::string> details;
  for (const StateChange& c : *h) {
    states.push_back(c.state);
    details.push_back(c.detail);
  }
  EXPECT_EQ(states, (std::vector<SandboxState>{kCreating, kRunning, kStopping, kStopped, kCreating,
                                               kFailed}));
  EXPECT_EQ(details, (std::vector<std::string>{"created", "booted", "cella stop", "", "cella start",
                                               "qemu: could not open disk"}));
  EXPECT_GE(h->front().at_ms, before);
  for (size_t i = 1; i < h->size(); ++i) EXPECT_GE((*h)[i].at_ms, (*h)[i - 1].at_ms);
  EXPECT_EQ(store().Get(id)->reason, "qemu: could not open disk");
  auto none = store().History(MakeId(99));
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().errno_value, ENOENT);
}

TEST_F(StateStoreTest, ExitCodeKeptForExitedAndClearedOnRestart) {
  const std::string id = MakeId(1);
  CreateOk(MakeRecord(id));
  MoveOk(id, kRunning);
  ASSERT_TRUE(store().SetSupervisor(id, {4242, 77}));
  ASSERT_TRUE(store().SetHypervisor(id, {4243, 78}));
  // An exit code belongs to exited only.
  auto wrong = store().Transition(id, kFailed, "", 1);
  ASSERT_FALSE(wrong);
  EXPECT_EQ(wrong.error().errno_value, EINVAL);
  MoveOk(id, kExited, 42);
  auto exited = store().Get(id);
  ASSERT_TRUE(exited);
  ASSERT_TRUE(exited->exit_code);
  EXPECT_EQ(*exited->exit_code, 42);
  EXPECT_EQ(exited->supervisor, (ProcessIdentity{4242, 77}));
  EXPECT_EQ(exited->hypervisor, (ProcessIdentity{4243, 78}));

  MoveOk(id, kCreating);
  auto restarted = store().Get(id);
  ASSERT_TRUE(restarted);
  EXPECT_EQ(restarted->state, kCreating);
  EXPECT_FALSE(restarted->exit_code);
  EXPECT_EQ(restarted->reason, "");
  EXPECT_EQ(restarted->supervisor.pid, 0);
  EXPECT_EQ(restarted->hypervisor.pid, 0);

  // Failed keeps its reason until the restart clears it too.
  ASSERT_TRUE(store().Transition(id, kFailed, "kernel panic"));
  EXPECT_EQ(store().Get(id)->reason, "kernel panic");
  MoveOk(id, kCreating);
  EXPECT_EQ(store().Get(id)->reason, "");
}

TEST_F(StateStoreTest, SetProcessAndRemoveNeedAnExistingSandbox) {
  auto sup = store().SetSupervisor(MakeId(5), {1, 1});
  ASSERT_FALSE(sup);
  EXPECT_EQ(sup.error().errno_value, ENOENT);
  auto rm = store().Remove(MakeId(5));
  ASSERT_FALSE(rm);
  EXPECT_EQ(rm.error().errno_value, ENOENT);
  auto tr = store().Transition(MakeId(5), kRunning);
  ASSERT_FALSE(tr);
  EXPECT_EQ(tr.error().errno_value, ENOENT);
}

TEST_F(StateStoreTest, SpecEditsNeitherResetTheAgeNorLoseEachOther) {
  SandboxRecord r = MakeRecord(MakeId(9));
  CreateOk(r);
  MoveOk(r.id, kRunning);
  auto before = store().Get(r.id);
  ASSERT_TRUE(before);
  std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(store().UpdateSpec(r.id, "[]"));
  auto after = store().Get(r.id);
  ASSERT_TRUE(after);
  EXPECT_EQ(after->updated_ms, before->updated_ms);  // still "Up <since the start>"
  EXPECT_EQ(after->spec_json, "[]");

  // 20 writers, each on its own connection (as 20 `cella allow-list add`
  // processes are), append one element by read-modify-write.
  std::vector<std::thread> writers;
  std::atomic<int> failures{0};
  for (int i = 0; i < 20; ++i) {
    writers.emplace_back([&, i] {
      auto mine = StateStore::Open(db_path_);
      if (!mine) {
        ++failures;
        return;
      }
      auto st = mine->EditSpec(r.id, [&](const SandboxRecord& current) -> Result<std::string> {
        std::string text = current.spec_json;
        text.insert(text.size() - 1, (text.size() > 2 ? "," : "") + std::to_string(i));
        return text;
      });
      if (!st) ++failures;
    });
  }
  for (auto& t : writers) t.join();
  EXPECT_EQ(failures.load(), 0);
  auto edited = store().Get(r.id);
  ASSERT_TRUE(edited);
  std::set<std::string> seen;
  std::string body = edited->spec_json.substr(1, edited->spec_json.size() - 2);
  for (size_t start = 0; start <= body.size();) {
    size_t comma = body.find(',', start);
    if (comma == std::string::npos) comma = body.size();
    seen.insert(body.substr(start, comma - start));
    start = comma + 1;
  }
  EXPECT_EQ(seen.size(), 20u) << edited->spec_json;

  // A failed edit changes nothing.
  auto refused = store().EditSpec(
      r.id, [](const SandboxRecord&) -> Result<std::string> { return Fail("no"); });
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().message, "no");
  EXPECT_EQ(store().Get(r.id)->spec_json, edited->spec_json);
  EXPECT_FALSE(store().EditSpec(
      MakeId(10), [](const SandboxRecord&) -> Result<std::string> { return std::string("{}"); }));
}

TEST_F(StateStoreTest, RemoveDeletesHistoryAndVolumeUses) {
  AddVolume("data");
  SandboxRecord r = MakeRecord(MakeId(1), "web");
  r.volumes = {{"data", "/data", "rw"}};
  CreateOk(r);
  ASSERT_TRUE(store().Remove(r.id));
  EXPECT_FALSE(store().Get(r.id));
  EXPECT_FALSE(store().History(r.id));
  auto users = store().VolumeUsers("data");
  ASSERT_TRUE(users) << users.error().message;
  EXPECT_TRUE(users->empty());
}

TEST_F(StateStoreTest, ReconcileFailsSandboxesWhoseSupervisorDied) {
  const std::string alive_id = MakeId(1);
  const std::string dead_id = MakeId(2);
  const std::string young_id = MakeId(3);
  const std::string stopped_id = MakeId(4);
  const std::string stopping_id = MakeId(5);
  CreateOk(MakeRecord(alive_id));
  MoveOk(alive_id, kRunning);
  ASSERT_TRUE(store().SetSupervisor(alive_id, {100, 1}));
  CreateOk(MakeRecord(dead_id, "web"));
  MoveOk(dead_id, kRunning);
  ASSERT_TRUE(store().SetSupervisor(dead_id, {200, 2}));
  ASSERT_TRUE(store().SetHypervisor(dead_id, {201, 3}));
  CreateOk(MakeRecord(young_id));  // creating, no supervisor yet
  CreateOk(MakeRecord(stopped_id));
  ASSERT_TRUE(store().SetSupervisor(stopped_id, {300, 4}));
  MoveOk(stopped_id, kStopped);
  CreateOk(MakeRecord(stopping_id));
  MoveOk(stopping_id, kRunning);
  MoveOk(stopping_id, kStopping);
  ASSERT_TRUE(store().SetSupervisor(stopping_id, {400, 5}));

  std::vector<ProcessIdentity> asked;
  auto alive = [&](const ProcessIdentity& p) {
    asked.push_back(p);
    return p.pid == 100;
  };
  auto dead = store().Reconcile(alive, 1h);
  ASSERT_TRUE(dead) << dead.error().message;
  ASSERT_EQ(dead->size(), 2u);
  // Returned as they were, so the caller can kill the leftover QEMU.
  EXPECT_EQ((*dead)[0].id, dead_id);
  EXPECT_EQ((*dead)[0].state, kRunning);
  EXPECT_EQ((*dead)[0].hypervisor, (ProcessIdentity{201, 3}));
  EXPECT_EQ((*dead)[1].id, stopping_id);
  EXPECT_EQ((*dead)[1].state, kStopping);
  // Inactive sandboxes are not asked about.
  for (const ProcessIdentity& p : asked) EXPECT_NE(p.pid, 300);

  auto now_dead = store().Get(dead_id);
  ASSERT_TRUE(now_dead);
  EXPECT_EQ(now_dead->state, kFailed);
  EXPECT_EQ(now_dead->reason, "supervisor (pid 200) exited unexpectedly");
  auto h = store().History(dead_id);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->back().state, kFailed);
  EXPECT_EQ(h->back().detail, "supervisor (pid 200) exited unexpectedly");
  EXPECT_EQ(store().Get(alive_id)->state, kRunning);
  EXPECT_EQ(store().Get(young_id)->state, kCreating);  // within its grace
  EXPECT_EQ(store().Get(stopped_id)->state, kStopped);

  // Nothing left to do the second time.
  auto again = store().Reconcile(alive, 1h);
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->empty());
}

// A supervisor killed after it committed a standby snapshot but before it
// recorded standby: the sandbox is standby (resumable), not failed; one
// without a committed snapshot, or not running, fails as before.
TEST_F(StateStoreTest, ReconcileKeepsACommittedStandbyResumable) {
  const std::string saved_id = MakeId(1);
  const std::string unsaved_id = MakeId(2);
  const std::string stopping_id = MakeId(3);
  for (const auto& id : {saved_id, unsaved_id, stopping_id}) {
    CreateOk(MakeRecord(id));
    MoveOk(id, kRunning);
    ASSERT_TRUE(store().SetSupervisor(id, {200, 2}));
  }
  MoveOk(stopping_id, kStopping);
  auto dead = store().Reconcile([](const ProcessIdentity&) { return false; }, 1h,
                                [&](const SandboxRecord& r) { return r.id != unsaved_id; });
  ASSERT_TRUE(dead) << dead.error().message;
  EXPECT_EQ(dead->size(), 3u);
  auto saved = store().Get(saved_id);
  ASSERT_TRUE(saved);
  EXPECT_EQ(saved->state, kStandby);
  EXPECT_NE(saved->reason.find("after the snapshot was committed"), std::string::npos)
      << saved->reason;
  EXPECT_EQ(store().History(saved_id)->back().state, kStandby);
  EXPECT_EQ(store().Get(unsaved_id)->state, kFailed);
  EXPECT_EQ(store().Get(stopping_id)->state, kFailed);
  // A standby sandbox can be resumed from there.
  EXPECT_TRUE(store().Transition(saved_id, kCreating, "resuming"));
}

TEST_F(StateStoreTest, ReconcileFailsCreatingSandboxPastItsGraceWithoutSupervisor) {
  const std::string id = MakeId(1);
  CreateOk(MakeRecord(id));
  // Wait until the clock has moved past the creation instant.
  const int64_t created = store().Get(id)->updated_ms;
  while (std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
             .count() <= created + 2)
    std::this_thread::sleep_for(1ms);
  auto never_called = [](const ProcessIdentity&) {
    ADD_FAILURE() << "alive() asked about a sandbox without supervisor";
    return true;
  };
  auto dead = store().Reconcile(never_called, 1ms);
  ASSERT_TRUE(dead) << dead.error().message;
  ASSERT_EQ(dead->size(), 1u);
  EXPECT_EQ((*dead)[0].id, id);
  EXPECT_EQ(store().Get(id)->state, kFailed);
}

// A child that sleeps until killed; bounded by alarm() if the test dies.
pid_t SpawnSleeper() {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::alarm(60);
    for (;;) ::pause();
  }
  return pid;
}

TEST_F(StateStoreTest, RealProcessesAliveDeadZombieAndPidReuse) {
  pid_t child = SpawnSleeper();
  ASSERT_GT(child, 0);
  auto id = IdentifyProcess(child);
  ASSERT_TRUE(id) << id.error().message;
  EXPECT_EQ(id->pid, child);
  EXPECT_GT(id->start_ticks, 0u);
  EXPECT_TRUE(IsAlive(*id));
  // Same pid, different start time: another process got the pid.
  EXPECT_FALSE(IsAlive({child, id->start_ticks + 1}));
  EXPECT_FALSE(IsAlive({0, 0}));

  const std::string sandbox = MakeId(1);
  CreateOk(MakeRecord(sandbox));
  MoveOk(sandbox, kRunning);
  ASSERT_TRUE(store().SetSupervisor(sandbox, *id));
  auto real_alive = [](const ProcessIdentity& p) { return IsAlive(p); };
  auto none = store().Reconcile(real_alive, 1h);
  ASSERT_TRUE(none) << none.error().message;
  EXPECT_TRUE(none->empty());

  ASSERT_EQ(::kill(child, SIGKILL), 0);
  // Until reaped the child is a zombie, which counts as gone. Poll (bounded)
  // for the kernel to finish turning it into one.
  bool zombie_seen_gone = false;
  for (int i = 0; i < 5000 && !zombie_seen_gone; ++i) {
    auto z = IdentifyProcess(child);
    if (!z && z.error().errno_value == ESRCH)
      zombie_seen_gone = true;
    else
      std::this_thread::sleep_for(1ms);
  }
  EXPECT_TRUE(zombie_seen_gone);
  EXPECT_FALSE(IsAlive(*id));
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  auto gone = IdentifyProcess(child);
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().errno_value, ESRCH);
  EXPECT_FALSE(IsAlive(*id));

  auto dead = store().Reconcile(real_alive, 1h);
  ASSERT_TRUE(dead) << dead.error().message;
  ASSERT_EQ(dead->size(), 1u);
  EXPECT_EQ(store().Get(sandbox)->reason,
            "supervisor (pid " + std::to_string(child) + ") exited unexpectedly");
}

TEST(ProcessIdentityTest, ParsesStatWithAwkwardCommandNames) {
  TempDir proc;
  ASSERT_TRUE(std::filesystem::create_directory(proc.path() + "/123"));
  // comm may hold ") " and spaces; starttime is field 22.
  std::string stat =
      "123 (a) b (c) S 1 123 123 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 "
      "12345 67 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
  ASSERT_TRUE(WriteStringToFile(proc.path() + "/123/stat", stat, 0644));
  auto id = IdentifyProcess(123, proc.path());
  ASSERT_TRUE(id) << id.error().message;
  EXPECT_EQ(id->start_ticks, 987654u);
  EXPECT_TRUE(IsAlive({123, 987654}, proc.path()));
  EXPECT_FALSE(IsAlive({123, 987655}, proc.path()));

  ASSERT_TRUE(std::filesystem::create_directory(proc.path() + "/124"));
  std::string zombie = "124 (z) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0\n";
  ASSERT_TRUE(WriteStringToFile(proc.path() + "/124/stat", zombie, 0644));
  auto z = IdentifyProcess(124, proc.path());
  ASSERT_FALSE(z);
  EXPECT_EQ(z.error().errno_value, ESRCH);

  ASSERT_TRUE(std::filesystem::create_directory(proc.path() + "/125"));
  ASSERT_TRUE(WriteStringToFile(proc.path() + "/125/stat", "125 (short) S 1 2\n", 0644));
  EXPECT_FALSE(IdentifyProcess(125, proc.path()));

  auto missing = IdentifyProcess(126, proc.path());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().errno_value, ESRCH);
  EXPECT_FALSE(IdentifyProcess(0));
  EXPECT_FALSE(IdentifyProcess(-5));
}

TEST(ProcessIdentityTest, IdentifiesItself) {
  auto self = IdentifyProcess(::getpid());
  ASSERT_TRUE(self) << self.error().message;
  EXPECT_TRUE(IsAlive(*self));
}

// holder mode x asker mode, holder active or not.
TEST_F(StateStoreTest, VolumeConflictsForEveryModePair) {
  const std::vector<std::string> modes = {"ro", "rw", "overlay"};
  int n = 0;
  for (const std::string& held : modes) {
    for (const std::string& asked : modes) {
      for (bool holder_active : {true, false}) {
        const std::string volume = "v" + std::to_string(++n);
        AddVolume(volume);
        SandboxRecord holder = MakeRecord(MakeId(1000 + n), "holder" + std::to_string(n));
        holder.volumes = {{volume, "/mnt", held}};
        CreateOk(holder);
        if (holder_active)
          MoveOk(holder.id, kRunning);
        else
          MoveOk(holder.id, kStopped);

        SandboxRecord asker = MakeRecord(MakeId(2000 + n));
        asker.volumes = {{volume, "/data", asked}};
        auto st = store().Create(asker);
        const bool conflict = holder_active && (held == "rw" || asked == "rw");
        SCOPED_TRACE(held + " held, " + asked + " asked, holder " +
                     (holder_active ? "running" : "stopped"));
        if (!conflict) {
          EXPECT_TRUE(st) << st.error().message;
          continue;
        }
        ASSERT_FALSE(st);
        EXPECT_EQ(st.error().errno_value, EBUSY);
        const std::string& msg = st.error().message;
        EXPECT_NE(msg.find("volume \"" + volume + "\" is attached"), std::string::npos) << msg;
        EXPECT_NE(msg.find("running sandbox " + holder.name + " (" + holder.id.substr(0, 12) + ")"),
                  std::string::npos)
            << msg;
        EXPECT_NE(msg.find("attaching it " + asked + " needs it detached"), std::string::npos)
            << msg;
        EXPECT_NE(msg.find("cella stop " + holder.name), std::string::npos) << msg;
        EXPECT_FALSE(store().Get(asker.id)) << "a refused sandbox must not be stored";
      }
    }
  }
}

TEST_F(StateStoreTest, VolumeConflictMessageNamesModeHolderAndRemedy) {
  AddVolume("data");
  SandboxRecord web = MakeRecord(MakeId(0xabc), "web");
  web.volumes = {{"data", "/var/lib/data", "rw"}};
  CreateOk(web);
  MoveOk(web.id, kRunning);
  SandboxRecord reader = MakeRecord(MakeId(2));
  reader.volumes = {{"data", "/data", "ro"}};
  auto st = store().Create(reader);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().message,
            "volume \"data\" is attached read-write to running sandbox web (" +
                web.id.substr(0, 12) +
                "); attaching it ro needs it detached (stop that sandbox: cella stop web)");
}

TEST_F(StateStoreTest, VolumeConflictsRecheckedOnRestart) {
  AddVolume("data");
  SandboxRecord a = MakeRecord(MakeId(1), "a");
  a.volumes = {{"data", "/data", "rw"}};
  CreateOk(a);
  MoveOk(a.id, kRunning);
  MoveOk(a.id, kStopped);
  // a is stopped: b may take the volume.
  SandboxRecord b = MakeRecord(MakeId(2), "b");
  b.volumes = {{"data", "/data", "overlay"}};
  CreateOk(b);
  MoveOk(b.id, kRunning);

  auto restart = store().Transition(a.id, kCreating);
  ASSERT_FALSE(restart);
  EXPECT_EQ(restart.error().errno_value, EBUSY);
  EXPECT_NE(restart.error().message.find("attached as an overlay base to running sandbox b"),
            std::string::npos)
      << restart.error().message;
  EXPECT_NE(restart.error().message.find("attaching it rw"), std::string::npos);
  EXPECT_EQ(store().Get(a.id)->state, kStopped);

  MoveOk(b.id, kExited, 0);
  auto again = store().Transition(a.id, kCreating);
  EXPECT_TRUE(again) << again.error().message;
  // Now a holds it rw; b's restart is refused in turn.
  auto b_restart = store().Transition(b.id, kCreating);
  ASSERT_FALSE(b_restart);
  EXPECT_NE(b_restart.error().message.find("attached read-write to creating sandbox a"),
            std::string::npos)
      << b_restart.error().message;
}

TEST_F(StateStoreTest, VolumeUseChecksInsideOneSandbox) {
  AddVolume("data");
  SandboxRecord twice = MakeRecord(MakeId(1));
  twice.volumes = {{"data", "/a", "rw"}, {"data", "/b", "ro"}};
  auto st = store().Create(twice);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().errno_value, EBUSY);
  SandboxRecord two_readers = MakeRecord(MakeId(2));
  two_readers.volumes = {{"data", "/a", "ro"}, {"data", "/b", "overlay"}};
  CreateOk(two_readers);

  SandboxRecord unknown = MakeRecord(MakeId(3));
  unknown.volumes = {{"nope", "/x", "ro"}};
  auto missing = store().Create(unknown);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().errno_value, ENOENT);
  EXPECT_EQ(missing.error().message,
            "no volume \"nope\" (create it with cella volume create nope)");

  SandboxRecord bad_mode = MakeRecord(MakeId(4));
  bad_mode.volumes = {{"data", "/x", "rwx"}};
  EXPECT_FALSE(store().Create(bad_mode));
  SandboxRecord relative = MakeRecord(MakeId(5));
  relative.volumes = {{"data", "x", "ro"}};
  EXPECT_FALSE(store().Create(relative));
}

TEST_F(StateStoreTest, VolumeLifecycle) {
  AddVolume("data");
  auto dup = store().CreateVolume({"data", "/elsewhere.img", 1, 0});
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().message, "volume \"data\" already exists");
  AddVolume("cache");
  auto list = store().ListVolumes();
  ASSERT_TRUE(list) << list.error().message;
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].name, "cache");
  EXPECT_EQ((*list)[1].name, "data");
  EXPECT_EQ((*list)[1].size_bytes, 1 << 20);
  EXPECT_GT((*list)[1].created_ms, 0);
  auto missing = store().GetVolume("x");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().message, "no volume \"x\" (create it with cella volume create x)");
  EXPECT_FALSE(store().CreateVolume({"../etc", "/x.img", 1, 0}));
  EXPECT_FALSE(store().CreateVolume({"rel", "x.img", 1, 0}));

  SandboxRecord web = MakeRecord(MakeId(0x1a2b), "web");
  web.volumes = {{"data", "/data", "ro"}, {"cache", "/cache", "rw"}};
  CreateOk(web);
  MoveOk(web.id, kStopped);  // stopped still counts as using it
  auto users = store().VolumeUsers("data");
  ASSERT_TRUE(users) << users.error().message;
  ASSERT_EQ(users->size(), 1u);
  EXPECT_EQ((*users)[0].first, web.id);
  EXPECT_EQ((*users)[0].second, (VolumeUse{"data", "/data", "ro"}));

  auto refused = store().RemoveVolume("data");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().errno_value, EBUSY);
  EXPECT_EQ(refused.error().message, "volume \"data\" is in use by sandbox web (" +
                                         web.id.substr(0, 12) +
                                         "); remove the sandbox first (cella rm web)");
  ASSERT_TRUE(store().GetVolume("data"));

  ASSERT_TRUE(store().Remove(web.id));
  auto removed = store().RemoveVolume("data");
  EXPECT_TRUE(removed) << removed.error().message;
  EXPECT_FALSE(store().GetVolume("data"));
  EXPECT_FALSE(store().RemoveVolume("data"));
}

TEST_F(StateStoreTest, RefusesDatabaseFromNewerSchema) {
  store_.reset();
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(db_path_.c_str(), &raw), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(raw, "PRAGMA user_version = 99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(raw);
  auto s = StateStore::Open(db_path_);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message.find("newer cella"), std::string::npos) << s.error().message;
  EXPECT_NE(s.error().message.find(db_path_), std::string::npos) << s.error().message;
}

TEST(StateStoreOpen, FailsClearlyWhenTheDirectoryIsMissing) {
  auto s = StateStore::Open("/nonexistent-cella-dir/state.db");
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message.find("/nonexistent-cella-dir/state.db"), std::string::npos)
      << s.error().message;
}

// Forks `n` children running `body(i)` (its return value is the exit code),
// released together through a pipe. Returns their exit codes; a child still
// running after the deadline is killed and reported as -1.
std::vector<int> RunChildren(int n, const std::function<int(int)>& body) {
  int gate[2];
  if (::pipe(gate) != 0) return {};
  std::vector<pid_t> pids;
  for (int i = 0; i < n; ++i) {
    pid_t pid = ::fork();
    if (pid == 0) {
      ::alarm(120);  // last resort should the parent be gone
      ::close(gate[1]);
      char c;
      while (::read(gate[0], &c, 1) < 0 && errno == EINTR) {
      }
      ::_exit(body(i));
    }
    pids.push_back(pid);
  }
  ::close(gate[0]);
  ::close(gate[1]);  // EOF releases every child at once
  std::vector<int> codes(pids.size(), -1);
  std::vector<bool> done(pids.size(), false);
  const auto deadline = std::chrono::steady_clock::now() + 90s;
  size_t remaining = pids.size();
  while (remaining > 0 && std::chrono::steady_clock::now() < deadline) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i] || pids[i] <= 0) continue;
      int status = 0;
      if (::waitpid(pids[i], &status, WNOHANG) == pids[i]) {
        done[i] = true;
        --remaining;
        codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
    }
    if (remaining > 0) std::this_thread::sleep_for(5ms);
  }
  for (size_t i = 0; i < pids.size(); ++i) {
    if (done[i] || pids[i] <= 0) continue;
    ::kill(pids[i], SIGKILL);
    ::waitpid(pids[i], nullptr, 0);
  }
  return codes;
}

// Exit codes of the concurrency children.
constexpr int kChildOk = 0;
constexpr int kChildNameTaken = 1;
constexpr int kChildOtherError = 2;

TEST(StateStoreConcurrency, SameNameFromManyProcessesExactlyOneWins) {
  TempDir dir;
  const std::string db = dir.path() + "/state.db";
  constexpr int kChildren = 6;
  constexpr int kExtraPerChild = 15;
  // The database does not exist yet: the children also race to create it.
  std::vector<int> codes = RunChildren(kChildren, [&](int i) {
    auto store = StateStore::Open(db);
    if (!store) {
      std::fprintf(stderr, "child %d: %s\n", i, store.error().message.c_str());
      return kChildOtherError;
    }
    // Unnamed creates around the contested one keep the writers busy.
    for (int k = 0; k < kExtraPerChild; ++k) {
      auto st = store->Create(MakeRecord(MakeId(10000 + i * 100 + k)));
      if (!st) {
        std::fprintf(stderr, "child %d: %s\n", i, st.error().message.c_str());
        return kChildOtherError;
      }
      if (k == kExtraPerChild / 2) {
        auto named = store->Create(MakeRecord(MakeId(i + 1), "web"));
        if (!named) {
          if (named.error().errno_value == EEXIST &&
              named.error().message.find("name \"web\" is already in use by sandbox") == 0)
            return kChildNameTaken;
          std::fprintf(stderr, "child %d: %s\n", i, named.error().message.c_str());
          return kChildOtherError;
        }
      }
    }
    return kChildOk;
  });
  ASSERT_EQ(codes.size(), static_cast<size_t>(kChildren));
  int winners = 0;
  int losers = 0;
  for (int c : codes) {
    EXPECT_TRUE(c == kChildOk || c == kChildNameTaken) << "child exit " << c;
    winners += c == kChildOk;
    losers += c == kChildNameTaken;
  }
  EXPECT_EQ(winners, 1);
  EXPECT_EQ(losers, kChildren - 1);

  auto store = StateStore::Open(db);
  ASSERT_TRUE(store) << store.error().message;
  auto web = store->Resolve("web");
  ASSERT_TRUE(web) << web.error().message;
  auto all = store->List(ListScope::kAll);
  ASSERT_TRUE(all) << all.error().message;
  int named = 0;
  for (const SandboxRecord& r : *all) named += r.name == "web";
  EXPECT_EQ(named, 1);
}

TEST(StateStoreConcurrency, ReaderSeesConsistentStateWhileAnotherProcessWrites) {
  TempDir dir;
  const std::string db = dir.path() + "/state.db";
  auto reader = StateStore::Open(db);
  ASSERT_TRUE(reader) << reader.error().message;
  constexpr int kSandboxes = 40;
  int gate[2];
  ASSERT_EQ(::pipe(gate), 0);
  pid_t writer = ::fork();
  ASSERT_GE(writer, 0);
  if (writer == 0) {
    ::alarm(120);
    ::close(gate[0]);
    auto store = StateStore::Open(db);
    if (!store) ::_exit(kChildOtherError);
    for (int i = 0; i < kSandboxes; ++i) {
      const std::string id = MakeId(i + 1);
      if (!store->Create(MakeRecord(id)) || !store->Transition(id, kRunning) ||
          !store->Transition(id, kExited, "", i))
        ::_exit(kChildOtherError);
      if (i == 0) {
        // Tell the parent writing has begun.
        if (::write(gate[1], "x", 1) != 1) ::_exit(kChildOtherError);
      }
    }
    ::_exit(kChildOk);
  }
  ::close(gate[1]);
  char c;
  ASSERT_EQ(::read(gate[0], &c, 1), 1);
  ::close(gate[0]);

  size_t last_seen = 0;
  int reads = 0;
  const auto deadline = std::chrono::steady_clock::now() + 90s;
  int status = 0;
  bool writer_done = false;
  while (!writer_done && std::chrono::steady_clock::now() < deadline) {
    writer_done = ::waitpid(writer, &status, WNOHANG) == writer;
    auto all = reader->List(ListScope::kAll);
    ASSERT_TRUE(all) << all.error().message;  // never "database is locked"
    ++reads;
    EXPECT_GE(all->size(), last_seen);  // nothing seen vanishes
    last_seen = all->size();
    for (const SandboxRecord& r : *all) {
      // Each write is atomic: an exited record always carries its code.
      if (r.state == kExited)
        EXPECT_TRUE(r.exit_code) << r.id;
      else
        EXPECT_FALSE(r.exit_code) << r.id;
    }
  }
  if (!writer_done) {
    ::kill(writer, SIGKILL);
    ::waitpid(writer, &status, 0);
    FAIL() << "writer did not finish";
  }
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kChildOk);
  EXPECT_GT(reads, 0);
  auto all = reader->List(ListScope::kAll);
  ASSERT_TRUE(all);
  EXPECT_EQ(all->size(), static_cast<size_t>(kSandboxes));
}

TEST(StateStoreConcurrency, ReadsProceedAndWritesWaitWhileAnotherTransactionIsOpen) {
  TempDir dir;
  const std::string db = dir.path() + "/state.db";
  auto store = StateStore::Open(db);
  ASSERT_TRUE(store) << store.error().message;
  ASSERT_TRUE(store->Create(MakeRecord(MakeId(1), "web")));

  // Another process holds the write lock for a while, mid-transaction.
  // It commits only 300 ms after the go, which comes after the read below:
  // however late this process runs, the read happens while it holds.
  int ready[2];
  int go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    ::alarm(60);
    ::close(ready[0]);
    ::close(go[1]);
    sqlite3* raw = nullptr;
    if (sqlite3_open(db.c_str(), &raw) != SQLITE_OK) ::_exit(2);
    if (sqlite3_exec(raw, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) != SQLITE_OK) ::_exit(2);
    if (sqlite3_exec(raw, "UPDATE sandboxes SET reason = 'held'", nullptr, nullptr, nullptr) !=
        SQLITE_OK)
      ::_exit(2);
    if (::write(ready[1], "x", 1) != 1) ::_exit(2);
    char g;
    if (::read(go[0], &g, 1) != 1) ::_exit(2);
    ::usleep(300 * 1000);
    if (sqlite3_exec(raw, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) ::_exit(2);
    sqlite3_close(raw);
    ::_exit(0);
  }
  ::close(ready[1]);
  ::close(go[0]);
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ::close(ready[0]);
  // WAL: a reader is not blocked by the open write, and sees the old state.
  auto seen = store->Resolve("web");
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  ::close(go[1]);
  ASSERT_TRUE(seen) << seen.error().message;
  EXPECT_EQ(seen->reason, "");
  // A writer waits for the lock (busy timeout) instead of failing.
  auto st = store->Create(MakeRecord(MakeId(2), "db"));
  EXPECT_TRUE(st) << st.error().message;
  int status = 0;
  ASSERT_EQ(::waitpid(holder, &status, 0), holder);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(store->Resolve("web")->reason, "held");
}

}  // namespace
}  // namespace cella::store
