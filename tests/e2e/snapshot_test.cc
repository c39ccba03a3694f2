// Pause, standby and resume of real VMs (TCG): what a user relies on after
// `cella standby` + `cella resume` is that the sandbox continues where it
// was (a process's memory, its files, exec), with the right wall clock, and
// that a snapshot that is not intact is never resumed from.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>

#include "counter_fixture.h"

namespace cella::test {
namespace {

using std::chrono::seconds;

class SnapshotTest : public CounterTest {
 protected:
  std::string Dir(const std::string& id) {
    auto doc = Inspect(id);
    return doc.is_null() ? "" : doc["paths"].value("dir", std::string());
  }
  static bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }
};

TEST_F(SnapshotTest, PauseUnpauseStandbyResumeContinueWhereTheSandboxWas) {
  std::string id = RunDetached(kCounter);
  ASSERT_FALSE(id.empty());
  Exec(id, "echo kept-bytes > /root/data; sync; echo ram > /dev/shm/in-memory");
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
  // inspect tells what the sleep costs on disk: guest memory in a sparse
  // file, so less than the guest's RAM.
  const auto sleeping = Inspect(id)["standby_snapshot"];
  ASSERT_TRUE(sleeping.is_object()) << Inspect(id).dump();
  EXPECT_EQ(sleeping.value("format", std::string()), "file");
  EXPECT_GT(sleeping.value("size_bytes", int64_t{0}), 0);
  EXPECT_LT(sleeping.value("size_bytes", int64_t{0}), sleeping.value("memory_bytes", int64_t{0}));
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
  EXPECT_EQ(Exec(id, "cat /dev/shm/in-memory"), "ram")
      << "tmpfs lives in RAM: only a resume keeps it";
  EXPECT_EQ(Exec(id, "cat /run/cella/resume-count"), "1");
  EXPECT_FALSE(Exists(dir + "/standby")) << "a used snapshot is gone";
  // The guest's wall clock was set on resume: within a few seconds of the
  // host's (without it, it would lag by the whole sleep and more).
  // Bracketed by the host's clock read before and after the exec, so a slow
  // exec on a loaded host cannot fail it; a clock left unset lags by the
  // 4 s asleep and more.
  const long host_before = static_cast<long>(::time(nullptr));
  const long guest_now = std::stol(Exec(id, "date +%s"));
  const long host_after = static_cast<long>(::time(nullptr));
  // The clock is set from the host's time when `resumed` is sent: a loaded
  // host may take a second or two to deliver it, still far below the 4 s.
  EXPECT_GE(guest_now, host_before - 3) << "guest " << guest_now << " host " << host_before;
  EXPECT_LE(guest_now, host_after + 1) << "guest " << guest_now << " host " << host_after;

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
  // Two bytes in the middle of guest memory (the memory file the resume
  // maps as the guest's RAM).
  ASSERT_EQ(manifest.value("version", 0), 2);
  const std::string memory = dir + "/standby/" + manifest.value("memory_file", std::string());
  {
    std::fstream f(memory, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(f.good()) << memory;
    f.seekp(manifest.value("memory_bytes", 2) / 2);
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

TEST_F(SnapshotTest, NamedSnapshotRestoresIntoANewSandboxAndLeavesTheSourceRunning) {
  // This source's supervisor writes the older layout (the whole migration
  // stream, zstd-compressed): a snapshot of it must still restore.
  ASSERT_EQ(::setenv("CELLA_SNAPSHOT_FORMAT", "zstd", 1), 0);
  std::string src =
      RunDetached({"--name", "src", kCounter[0], kCounter[1], kCounter[2], kCounter[3]});
  ASSERT_EQ(::unsetenv("CELLA_SNAPSHOT_FORMAT"), 0);
  ASSERT_FALSE(src.empty());
  Exec("src", "echo original > /root/data; sync; echo ram > /dev/shm/in-memory");
  auto deadline = std::chrono::steady_clock::now() + seconds(60);
  while (Count("src") < 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const std::string pid = Exec("src", "cat /root/pid");
  auto created = RunCella({"snapshot", "create", "src", "snap1"}, "", seconds(600));
  ASSERT_EQ(created.exit_code, 0) << Describe(created);
  const long at_snapshot = Count("src");
  EXPECT_EQ(State("src"), "running") << "the source runs on";

  auto ls = RunCella({"snapshot", "ls", "--json"});
  auto list = nlohmann::json::parse(ls.out, nullptr, false);
  ASSERT_TRUE(list.is_array() && list.size() == 1) << ls.out;
  EXPECT_EQ(list[0].value("name", std::string()), "snap1");
  EXPECT_EQ(list[0].value("source", std::string()), "src");
  EXPECT_GT(list[0].value("size_bytes", 0), 0);
  EXPECT_EQ(list[0].value("format", std::string()), "zstd");

  auto restored = RunCella({"snapshot", "restore", "snap1", "--name", "copy"}, "", seconds(600));
  ASSERT_EQ(restored.exit_code, 0) << Describe(restored);
  std::string copy_id = restored.out.substr(0, restored.out.find('\n'));
  EXPECT_NE(copy_id, src);
  EXPECT_EQ(State("copy"), "running");
  // The same process, from the snapshot's memory, in a sandbox of its own.
  EXPECT_EQ(Exec("copy", "cat /root/pid"), pid);
  EXPECT_GE(at_snapshot, 3);
  // Only memory holds this (a tmpfs): a cold boot would not have it.
  EXPECT_EQ(Exec("copy", "cat /dev/shm/in-memory"), "ram");
  EXPECT_EQ(Exec("copy", "cat /root/data"), "original");
  EXPECT_EQ(Exec("copy", "cat /run/cella/resume-count"), "1");
  Exec("copy", "echo changed > /root/data; sync");
  EXPECT_EQ(Exec("src", "cat /root/data"), "original") << "its own writable layer";
  EXPECT_NE(Dir("copy"), Dir("src"));

  // A snapshot made for another machine shape is refused, naming the part.
  const std::string manifest_path = home_ + "/snapshots/snap1/manifest.json";
  auto manifest = nlohmann::json::parse(std::ifstream(manifest_path), nullptr, false);
  ASSERT_FALSE(manifest.is_discarded());
  manifest["compat"]["memory_mb"] = 4096;
  std::ofstream(manifest_path) << manifest.dump();
  auto refused = RunCella({"snapshot", "restore", "snap1", "--name", "bad"}, "", seconds(600));
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.err.find("the memory size differs"), std::string::npos) << Describe(refused);

  auto rm = RunCella({"snapshot", "rm", "snap1"});
  ASSERT_EQ(rm.exit_code, 0) << Describe(rm);
  EXPECT_FALSE(Exists(home_ + "/snapshots/snap1"));
  EXPECT_EQ(RunCella({"snapshot", "ls", "--json"}).out, "[]\n");
}

TEST_F(SnapshotTest, AStandbyWhoseQemuOrSupervisorIsKilledMidSaveLeavesNoSnapshotButTheDisks) {
  // 32 MiB of random bytes in RAM: a save long enough (a second or more
  // here) to be caught mid-way by a poll every 5 ms.
  std::string id = RunDetached({"@builtin", "sh", "-c",
                                "head -c 33554432 /dev/urandom > /dev/shm/blob; "
                                "echo ready > /root/ready; sleep 100000"});
  ASSERT_FALSE(id.empty());
  Exec(id, "echo survives > /root/note; sync");
  auto deadline = std::chrono::steady_clock::now() + seconds(300);
  while (Exec(id, "cat /root/ready 2>/dev/null || true") != "ready" &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::string dir = Dir(id);
  const int qemu_pid = Inspect(id).value("hypervisor_pid", 0);
  ASSERT_GT(qemu_pid, 0);

  ProcessResult standby;
  std::thread saver([&] { standby = RunCella({"standby", id}, "", seconds(600)); });
  // QEMU has started writing guest memory: kill it there. (The memory
  // file is sized when the save starts; its blocks come with the pages.)
  const std::string tmp = dir + "/standby/memory.raw.tmp";
  deadline = std::chrono::steady_clock::now() + seconds(120);
  struct stat st {};
  while (!(::stat(tmp.c_str(), &st) == 0 && st.st_blocks > 0) &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  // Stopped first, so the save cannot finish between the check and the kill.
  ASSERT_EQ(::kill(qemu_pid, SIGSTOP), 0);
  const bool caught = !Exists(dir + "/standby/manifest.json");
  ASSERT_EQ(::kill(qemu_pid, SIGKILL), 0);
  saver.join();
  ASSERT_TRUE(caught) << "the save finished before QEMU could be killed during it";
  EXPECT_NE(standby.exit_code, 0) << Describe(standby);
  EXPECT_FALSE(Exists(dir + "/standby/manifest.json")) << "a half-written snapshot was committed";
  EXPECT_TRUE(WaitForState(id, "failed")) << State(id);
  auto resumed = RunCella({"resume", id}, "", seconds(120));
  EXPECT_NE(resumed.exit_code, 0) << "nothing to resume from: " << Describe(resumed);
  // The disks are kept: a cold start has what was written before.
  auto started = RunCella({"start", id}, "", seconds(600));
  ASSERT_EQ(started.exit_code, 0) << Describe(started);
  EXPECT_EQ(Exec(id, "cat /root/note"), "survives");
  EXPECT_FALSE(Exists(dir + "/standby")) << "a cold boot drops the leftovers";

  // Now kill -9 the supervisor mid-save. QEMU is its child and dies with it
  // (PDEATHSIG): the memory is lost, so the truthful state is failed with
  // the disks kept; nothing half-written is resumable.
  Exec(id, "head -c 33554432 /dev/urandom > /dev/shm/blob; echo again > /root/note2; sync");
  auto doc = Inspect(id);
  const int supervisor_pid = doc.value("supervisor_pid", 0);
  const int qemu_pid2 = doc.value("hypervisor_pid", 0);
  ASSERT_GT(supervisor_pid, 0);
  ASSERT_GT(qemu_pid2, 0);
  ProcessResult standby2;
  std::thread saver2([&] { standby2 = RunCella({"standby", id}, "", seconds(600)); });
  deadline = std::chrono::steady_clock::now() + seconds(120);
  while (!(::stat(tmp.c_str(), &st) == 0 && st.st_blocks > 0) &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(::kill(supervisor_pid, SIGSTOP), 0);  // it commits the manifest
  const bool caught2 = !Exists(dir + "/standby/manifest.json");
  ASSERT_EQ(::kill(supervisor_pid, SIGKILL), 0);
  saver2.join();
  ASSERT_TRUE(caught2) << "the save finished before the supervisor could be killed during it";
  EXPECT_NE(standby2.exit_code, 0) << Describe(standby2);
  EXPECT_TRUE(WaitGone(qemu_pid2)) << "QEMU outlived its supervisor";
  EXPECT_FALSE(Exists(dir + "/standby/manifest.json")) << "a half-written snapshot was committed";
  auto ps = RunCella({"ps", "-a"});
  EXPECT_NE(ps.out.find("supervisor"), std::string::npos) << ps.out;
  EXPECT_EQ(State(id), "failed");
  auto resumed2 = RunCella({"resume", id}, "", seconds(120));
  EXPECT_NE(resumed2.exit_code, 0) << "nothing to resume from: " << Describe(resumed2);
  EXPECT_NE(resumed2.err.find("not in standby"), std::string::npos) << Describe(resumed2);
  auto started2 = RunCella({"start", id}, "", seconds(600));
  ASSERT_EQ(started2.exit_code, 0) << Describe(started2);
  EXPECT_EQ(Exec(id, "cat /root/note /root/note2"), "survives\nagain");
  EXPECT_FALSE(Exists(dir + "/standby")) << "a cold boot drops the leftovers";
}

}  // namespace
}  // namespace cella::test
