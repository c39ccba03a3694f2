// Pause, standby and resume of real VMs (TCG): what a user relies on after
// `cella standby` + `cella resume` is that the sandbox continues where it
// was (a process's memory, its files, exec), with the right wall clock, and
// that a snapshot that is not intact is never resumed from.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>

#include "lifecycle_fixture.h"

namespace cella::test {
namespace {

using std::chrono::seconds;

// The main process: a counter held in a shell variable (memory that only a
// resumed VM still has; a cold boot would start again at 1), written out
// every tenth of a second.
const std::vector<std::string> kCounter = {
    "@builtin", "sh", "-c",
    "echo $$ > /root/pid; n=0; while :; do n=$((n+1)); echo $n > /root/count.new; "
    "mv /root/count.new /root/count; sleep 0.1; done"};

class SnapshotTest : public LifecycleTest {
 protected:
  std::string Exec(const std::string& id, const std::string& script) {
    auto r = RunCella({"exec", id, "--", "sh", "-c", script});
    EXPECT_EQ(r.exit_code, 0) << script << "\n" << Describe(r);
    std::string out = r.out;
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }
  long Count(const std::string& id) { return std::stol("0" + Exec(id, "cat /root/count")); }
  std::string Dir(const std::string& id) {
    auto doc = Inspect(id);
    return doc.is_null() ? "" : doc["paths"].value("dir", std::string());
  }
  static bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }
};

TEST_F(SnapshotTest, PauseUnpauseStandbyResumeContinueWhereTheSandboxWas) {
  std::string id = RunDetached(kCounter);
  ASSERT_FALSE(id.empty());
  Exec(id, "echo kept-bytes > /root/data; sync");
  // The loop has started counting.
  auto deadline = std::chrono::steady_clock::now() + seconds(60);
  while (Count(id) < 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const std::string pid = Exec(id, "cat /root/pid");

  // pause: frozen, recorded, and exec is refused at once, not hung.
  auto paused = RunCella({"pause", id});
  ASSERT_EQ(paused.exit_code, 0) << Describe(paused);
  EXPECT_EQ(State(id), "paused");
  auto ps = RunCella({"ps"});
  EXPECT_NE(ps.out.find("Paused"), std::string::npos) << ps.out;
  auto refused = RunCella({"exec", id, "--", "true"}, "", seconds(30));
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.err.find("paused"), std::string::npos) << Describe(refused);
  EXPECT_NE(refused.err.find("cella unpause"), std::string::npos) << Describe(refused);
  auto cp = RunCella({"cp", id + ":/root/data", home_ + "/x"}, "", seconds(30));
  EXPECT_NE(cp.exit_code, 0);
  EXPECT_NE(RunCella({"pause", id}).exit_code, 0) << "already paused";
  auto unpaused = RunCella({"unpause", id});
  ASSERT_EQ(unpaused.exit_code, 0) << Describe(unpaused);
  EXPECT_EQ(State(id), "running");
  const long before = Count(id);

  // standby: QEMU and the supervisor are gone, the snapshot is on disk.
  auto doc = Inspect(id);
  const int qemu_pid = doc.value("hypervisor_pid", 0);
  const int supervisor_pid = doc.value("supervisor_pid", 0);
  auto standby = RunCella({"standby", id}, "", seconds(600));
  ASSERT_EQ(standby.exit_code, 0) << Describe(standby);
  EXPECT_EQ(State(id), "standby");
  EXPECT_TRUE(WaitGone(qemu_pid));
  EXPECT_TRUE(WaitGone(supervisor_pid));
  const std::string dir = Dir(id);
  EXPECT_TRUE(Exists(dir + "/standby/manifest.json"));
  auto refused_standby = RunCella({"exec", id, "--", "true"}, "", seconds(30));
  EXPECT_NE(refused_standby.err.find("cella resume"), std::string::npos)
      << Describe(refused_standby);
  // Asleep for a while: the guest clock must not lag by this much after.
  std::this_thread::sleep_for(seconds(4));

  auto resumed = RunCella({"resume", id}, "", seconds(600));
  ASSERT_EQ(resumed.exit_code, 0) << Describe(resumed);
  EXPECT_EQ(State(id), "running");
  // The same process, its variable intact: the count went on from where it
  // was, and keeps going.
  EXPECT_EQ(Exec(id, "cat /root/pid"), pid);
  const long after = Count(id);
  EXPECT_GE(after, before);
  deadline = std::chrono::steady_clock::now() + seconds(60);
  long later = after;
  while (later <= after && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    later = Count(id);
  }
  EXPECT_GT(later, after) << "the counter keeps counting after the resume";
  EXPECT_EQ(Exec(id, "cat /root/data"), "kept-bytes");
  EXPECT_EQ(Exec(id, "cat /run/cella/resume-count"), "1");
  // The guest's wall clock was set on resume: within a few seconds of the
  // host's (without it, it would lag by the whole sleep and more).
  const long guest_now = std::stol(Exec(id, "date +%s"));
  const long host_now = static_cast<long>(::time(nullptr));
  EXPECT_LE(std::labs(host_now - guest_now), 3) << "guest " << guest_now << " host " << host_now;

  // rm of a standby sandbox takes its snapshot with it.
  ASSERT_EQ(RunCella({"standby", id}, "", seconds(600)).exit_code, 0);
  EXPECT_EQ(State(id), "standby");
  auto removed = RunCella({"rm", id});
  ASSERT_EQ(removed.exit_code, 0) << Describe(removed);
  EXPECT_FALSE(Exists(dir + "/standby"));
  EXPECT_FALSE(Exists(dir));
}

TEST_F(SnapshotTest, ACorruptSnapshotFailsTheResumeAndKeepsTheDisks) {
  std::string id = RunDetached({"@builtin"});
  ASSERT_FALSE(id.empty());
  Exec(id, "echo survives > /root/note; sync");
  ASSERT_EQ(RunCella({"standby", id}, "", seconds(600)).exit_code, 0);
  const std::string dir = Dir(id);
  auto manifest =
      nlohmann::json::parse(std::ifstream(dir + "/standby/manifest.json"), nullptr, false);
  ASSERT_FALSE(manifest.is_discarded());
  const std::string state = dir + "/standby/" + manifest.value("state_file", std::string());
  {
    std::fstream f(state, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(f.good()) << state;
    f.seekp(manifest.value("size_bytes", 2) / 2);
    f.put('\x5a');
    f.put('\xa5');
  }
  auto resumed = RunCella({"resume", id}, "", seconds(600));
  EXPECT_NE(resumed.exit_code, 0);
  EXPECT_NE(resumed.err.find("checksum mismatch"), std::string::npos) << Describe(resumed);
  EXPECT_EQ(State(id), "failed");
  EXPECT_NE(Inspect(id).value("reason", std::string()).find("corrupt"), std::string::npos);
  // The disks are kept: a cold start has the file written before.
  auto started = RunCella({"start", id}, "", seconds(600));
  ASSERT_EQ(started.exit_code, 0) << Describe(started);
  EXPECT_EQ(Exec(id, "cat /root/note"), "survives");
  EXPECT_FALSE(Exists(dir + "/standby")) << "a cold boot drops the stale snapshot";
}

}  // namespace
}  // namespace cella::test
