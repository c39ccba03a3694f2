// Long-lived sandboxes end to end: run -d, ps, exec, inspect, logs, stop,
// start, kill, rm, prune, and what a user sees when things go wrong. Every
// test boots real VMs (TCG here) through the `cella` binary.
#include <regex>

#include "lifecycle_fixture.h"

namespace cella::test {
namespace {

TEST_F(LifecycleTest, DetachedSandboxLivesThroughExecStopAndStart) {
  std::string id = RunDetached({"--name", "web", "--", "sh", "-c", "echo started; sleep 100000"});
  ASSERT_TRUE(std::regex_match(id, std::regex("[0-9a-f]{32}"))) << id;
  EXPECT_EQ(State("web"), "running");

  auto ps = RunCella({"ps"});
  EXPECT_NE(ps.out.find("web"), std::string::npos) << ps.out;
  EXPECT_NE(ps.out.find(id.substr(0, 12)), std::string::npos) << ps.out;
  EXPECT_NE(ps.out.find("Up "), std::string::npos) << ps.out;

  auto sum = RunCella({"exec", "web", "--", "sh", "-c", "echo $((6*7))"});
  EXPECT_EQ(sum.exit_code, 0) << Describe(sum);
  EXPECT_EQ(sum.out, "42\n");
  auto failing = RunCella({"exec", id.substr(0, 6), "--", "sh", "-c", "echo oops >&2; exit 3"});
  EXPECT_EQ(failing.exit_code, 3) << Describe(failing);
  EXPECT_NE(failing.err.find("oops"), std::string::npos);
  auto env = RunCella({"exec", "-e", "A=b", "-w", "/tmp", "-u", "nobody", id, "--", "sh", "-c",
                       "echo $A; pwd; id -u"});
  EXPECT_EQ(env.out, "b\n/tmp\n65534\n") << Describe(env);

  // The writable layer persists across stop/start.
  auto wrote = RunCella({"exec", "web", "--", "sh", "-c", "echo kept > /root/note; sync"});
  ASSERT_EQ(wrote.exit_code, 0) << Describe(wrote);

  auto logs = RunCella({"logs", "web"});
  EXPECT_EQ(logs.out, "started\n") << Describe(logs);

  // docker stop: the main process (sh) dies of the SIGTERM, and that is
  // how the sandbox ended.
  auto stop = RunCella({"stop", "-t", "5", "web"});
  ASSERT_EQ(stop.exit_code, 0) << Describe(stop);
  EXPECT_EQ(State("web"), "exited");
  auto ps_running = RunCella({"ps"});
  EXPECT_EQ(ps_running.out.find("web"), std::string::npos) << ps_running.out;
  auto ps_all = RunCella({"ps", "-a"});
  EXPECT_NE(ps_all.out.find("Exited (143)"), std::string::npos) << ps_all.out;

  auto exec_stopped = RunCella({"exec", "web", "--", "true"});
  EXPECT_EQ(exec_stopped.exit_code, 125);
  EXPECT_NE(exec_stopped.err.find("is exited (143)"), std::string::npos) << exec_stopped.err;
  EXPECT_NE(exec_stopped.err.find("cella start web"), std::string::npos) << exec_stopped.err;

  auto start = RunCella({"start", "web"}, "", std::chrono::seconds(300));
  ASSERT_EQ(start.exit_code, 0) << Describe(start);
  EXPECT_EQ(State("web"), "running");
  auto kept = RunCella({"exec", "web", "--", "cat", "/root/note"});
  EXPECT_EQ(kept.out, "kept\n") << Describe(kept);
  // The main process ran again: its output is appended.
  auto logs2 = RunCella({"logs", "--tail", "1", "web"});
  EXPECT_EQ(logs2.out, "started\n") << Describe(logs2);

  auto doc = Inspect("web");
  ASSERT_FALSE(doc.is_null());
  std::vector<std::string> states;
  for (const auto& h : doc["history"]) states.push_back(h["state"]);
  std::vector<std::string> want = {"creating", "running",  "stopping",
                                   "exited",   "creating", "running"};
  EXPECT_EQ(states, want) << doc.dump(2);
  EXPECT_EQ(doc["config"]["guest"]["cmd"][0], "sh");
  int supervisor = doc.value("supervisor_pid", 0);
  int qemu = doc.value("hypervisor_pid", 0);
  EXPECT_TRUE(ProcessAlive(supervisor));
  EXPECT_TRUE(ProcessAlive(qemu));

  auto rm_running = RunCella({"rm", "web"});
  EXPECT_EQ(rm_running.exit_code, 125);
  EXPECT_NE(rm_running.err.find("is running"), std::string::npos) << rm_running.err;
  auto rm = RunCella({"rm", "-f", "web"});
  EXPECT_EQ(rm.exit_code, 0) << Describe(rm);
  EXPECT_TRUE(WaitGone(supervisor));
  EXPECT_TRUE(WaitGone(qemu));
  EXPECT_FALSE(std::filesystem::exists(home_ + "/sandboxes/" + id));
  auto gone = RunCella({"inspect", "web"});
  EXPECT_EQ(gone.exit_code, 125);
  EXPECT_NE(gone.err.find("no sandbox"), std::string::npos) << gone.err;
}

TEST_F(LifecycleTest, ExitKillAndPrune) {
  std::string exits = RunDetached({"--", "sh", "-c", "exit 5"});
  ASSERT_FALSE(exits.empty());
  ASSERT_TRUE(WaitForState(exits, "exited"));
  EXPECT_EQ(Inspect(exits).value("exit_code", -1), 5);
  auto ps = RunCella({"ps", "-a"});
  EXPECT_NE(ps.out.find("Exited (5)"), std::string::npos) << ps.out;

  // No command on the built-in image: a sandbox that stays up to exec into.
  std::string idle = RunDetached({"--name", "idle"});
  ASSERT_FALSE(idle.empty());
  EXPECT_EQ(State("idle"), "running");
  auto kill = RunCella({"kill", "idle"});
  EXPECT_EQ(kill.exit_code, 0) << Describe(kill);
  EXPECT_EQ(State("idle"), "exited");
  EXPECT_EQ(Inspect("idle").value("exit_code", -1), 137);

  auto name_taken = RunCella({"run", "-d", "--name", "idle"});
  EXPECT_EQ(name_taken.exit_code, 125);
  EXPECT_NE(name_taken.err.find("already in use"), std::string::npos) << name_taken.err;

  auto prune = RunCella({"prune"});
  EXPECT_EQ(prune.exit_code, 0) << Describe(prune);
  EXPECT_NE(prune.out.find(exits), std::string::npos) << prune.out;
  EXPECT_NE(prune.out.find(idle), std::string::npos) << prune.out;
  auto empty = RunCella({"ps", "-a", "--json"});
  EXPECT_EQ(nlohmann::json::parse(empty.out, nullptr, false), nlohmann::json::array()) << empty.out;
  EXPECT_TRUE(std::filesystem::is_empty(home_ + "/sandboxes"));

  auto unknown = RunCella({"stop", "nosuch"});
  EXPECT_EQ(unknown.exit_code, 125);
  EXPECT_NE(unknown.err.find("no sandbox"), std::string::npos) << unknown.err;
  auto both = RunCella({"run", "-d", "-i", "--", "true"});
  EXPECT_EQ(both.exit_code, 125);
  EXPECT_NE(both.err.find("-d cannot be combined"), std::string::npos) << both.err;
}

TEST_F(LifecycleTest, LogsFollowSeesLinesWrittenAfterItStarted) {
  std::string id = RunDetached(
      {"--", "sh", "-c",
       "echo first; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo second; sleep 100000"});
  ASSERT_FALSE(id.empty());
  char out_tmpl[] = "/tmp/cella-logs-XXXXXX";
  int out_fd = ::mkstemp(out_tmpl);
  ASSERT_GE(out_fd, 0);
  ::close(out_fd);
  std::string out_path = out_tmpl;
  // `logs -f` in the background; it ends by itself once the sandbox stops.
  std::thread follower([&] {
    RunProcess(
        {"sh", "-c", std::string("\"") + CELLA_BINARY + "\" logs -f " + id + " > " + out_path}, "",
        std::chrono::seconds(200));
  });
  auto read_out = [&] {
    std::string text;
    if (FILE* f = std::fopen(out_path.c_str(), "r")) {
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
      std::fclose(f);
    }
    return text;
  };
  auto wait_for = [&](const std::string& what) {
    for (int i = 0; i < 600; ++i) {
      if (read_out().find(what) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  };
  EXPECT_TRUE(wait_for("first\n")) << read_out();
  EXPECT_EQ(read_out().find("second"), std::string::npos);
  auto go = RunCella({"exec", id, "--", "touch", "/tmp/go"});
  EXPECT_EQ(go.exit_code, 0) << Describe(go);
  EXPECT_TRUE(wait_for("second\n")) << read_out();
  auto stop = RunCella({"stop", "-t", "2", id});
  EXPECT_EQ(stop.exit_code, 0) << Describe(stop);
  follower.join();
  EXPECT_EQ(read_out(), "first\nsecond\n");
  ::unlink(out_path.c_str());
}

// A guest that writes without end fills neither the host's disk nor the
// memory of `cella logs`: each log keeps at most twice its cap, and --tail
// reads only the end.
TEST_F(LifecycleTest, LogFloodsAreCappedAndTailReadsTheEnd) {
  std::string id =
      RunDetached({"--log-max-size", "1m", "--", "sh", "-c",
                   "yes cella-console-flood | head -c 3000000 > /dev/console; echo console-done; "
                   "yes cella-output-flood"});
  ASSERT_FALSE(id.empty());
  auto doc = Inspect(id);
  ASSERT_TRUE(doc.is_object());
  std::string output_log = doc["paths"].value("output_log", std::string());
  std::string console_log = doc["paths"].value("console_log", std::string());
  ASSERT_FALSE(output_log.empty()) << doc.dump();
  auto size = [](const std::string& path) -> uint64_t {
    std::error_code ec;
    auto n = std::filesystem::file_size(path, ec);
    return ec ? 0 : n;
  };
  constexpr uint64_t kCap = 1 << 20;
  constexpr uint64_t kSlack = 1 << 20;  // one write past the cap (a frame at most)
  // Bounded: the output log rotated at least twice (so well over 2 MiB passed).
  bool rotated = false;
  uint64_t max_live = 0;
  uint64_t max_older = 0;
  for (int i = 0; i < 1200 && !rotated; ++i) {
    max_live = std::max(max_live, size(output_log));
    max_older = std::max(max_older, size(output_log + ".1"));
    auto tail = RunCella({"logs", "--tail", "2", id});
    // The flood is cut anywhere in a line: the tail's first whole line is
    // what counts.
    rotated = max_older > kCap / 2 && tail.out.find("cella-output-flood\n") != std::string::npos &&
              tail.out.size() < 64;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(rotated) << "output.log " << size(output_log) << " bytes, .1 "
                       << size(output_log + ".1");
  EXPECT_LE(max_live, kCap + kSlack);
  EXPECT_LE(max_older, kCap + kSlack);
  // The console (written by QEMU, trimmed by the supervisor about once a
  // second) took 3 MB before the output flood began: after a trim, less
  // than that is kept and the live file is within the cap.
  std::this_thread::sleep_for(std::chrono::seconds(3));
  EXPECT_LE(size(console_log), kCap);
  EXPECT_GT(size(console_log + ".1"), 0u);
  EXPECT_LT(size(console_log) + size(console_log + ".1"), 3'000'000u);
  auto all = RunCella({"logs", id});
  EXPECT_EQ(all.exit_code, 0) << all.err;
  EXPECT_LE(all.out.size(), 2 * (kCap + kSlack));
  auto kill = RunCella({"kill", id});
  EXPECT_EQ(kill.exit_code, 0) << Describe(kill);
}

// A bad value is refused by the CLI before anything is recorded or booted
// (it used to surface only inside the supervisor, as a failed sandbox).
TEST_F(LifecycleTest, AnInvalidConfigIsRefusedBeforeAnythingIsRecorded) {
  auto r = RunCella({"run", "-d", "--hostname", "bad!host", "--", "true"});
  EXPECT_EQ(r.exit_code, 125) << Describe(r);
  EXPECT_NE(r.err.find("hostname"), std::string::npos) << Describe(r);
  auto ps = RunCella({"ps", "-a", "--json"});
  EXPECT_EQ(ps.exit_code, 0) << Describe(ps);
  EXPECT_EQ(nlohmann::json::parse(ps.out, nullptr, false), nlohmann::json::array()) << ps.out;
  std::error_code ec;
  auto dir = std::filesystem::path(home_) / "sandboxes";
  size_t left = 0;
  if (std::filesystem::exists(dir, ec))
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir)) ++left;
  EXPECT_EQ(left, 0u);
}

TEST_F(LifecycleTest, KilledSupervisorOrQemuIsReportedAndCleanedUp) {
  std::string a = RunDetached({"--name", "a"});
  std::string b = RunDetached({"--name", "b"});
  ASSERT_FALSE(a.empty());
  ASSERT_FALSE(b.empty());
  auto da = Inspect("a");
  auto db = Inspect("b");
  int a_supervisor = da.value("supervisor_pid", 0);
  int a_qemu = da.value("hypervisor_pid", 0);
  int b_supervisor = db.value("supervisor_pid", 0);
  int b_qemu = db.value("hypervisor_pid", 0);
  ASSERT_TRUE(ProcessAlive(a_supervisor) && ProcessAlive(a_qemu));
  ASSERT_TRUE(ProcessAlive(b_supervisor) && ProcessAlive(b_qemu));

  // kill -9 the supervisor: its QEMU dies with it, and the next call says so.
  ASSERT_EQ(::kill(a_supervisor, SIGKILL), 0);
  ASSERT_TRUE(WaitGone(a_supervisor));
  EXPECT_EQ(State("a"), "failed");
  EXPECT_NE(Inspect("a").value("reason", std::string()).find("exited unexpectedly"),
            std::string::npos);
  EXPECT_TRUE(WaitGone(a_qemu));

  // kill -9 QEMU: the supervisor records the failure and exits.
  ASSERT_EQ(::kill(b_qemu, SIGKILL), 0);
  ASSERT_TRUE(WaitForState("b", "failed", std::chrono::seconds(30)));
  EXPECT_NE(Inspect("b").value("reason", std::string()).find("killed by signal"), std::string::npos)
      << Inspect("b").dump(2);
  EXPECT_TRUE(WaitGone(b_supervisor));

  auto prune = RunCella({"prune"});
  EXPECT_EQ(prune.exit_code, 0) << Describe(prune);
  EXPECT_TRUE(std::filesystem::is_empty(home_ + "/sandboxes"));
}

TEST_F(LifecycleTest, FiveSandboxesAtOnceAnd200Execs) {
  std::vector<std::string> ids(5);
  std::vector<std::thread> threads;
  for (int i = 0; i < 5; ++i) {
    threads.emplace_back([&, i] {
      auto r =
          RunCella({"run", "-d", "--name", "s" + std::to_string(i)}, "", std::chrono::seconds(400));
      EXPECT_EQ(r.exit_code, 0) << Describe(r);
      ids[i] = r.out;
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 5; ++i) {
    auto r = RunCella({"exec", "s" + std::to_string(i), "--", "hostname"});
    EXPECT_EQ(r.exit_code, 0) << Describe(r);
    EXPECT_EQ(r.out.substr(0, 12) + "\n", ids[i].substr(0, 12) + "\n");
  }
  for (int i = 1; i < 5; ++i) RunCella({"rm", "-f", "s" + std::to_string(i)});
  int ok = 0;
  for (int i = 0; i < 200; ++i) {
    auto r = RunCella({"exec", "s0", "--", "echo", std::to_string(i)});
    if (r.exit_code == 0 && r.out == std::to_string(i) + "\n") {
      ++ok;
    } else {
      ADD_FAILURE() << "exec " << i << ": " << Describe(r);
    }
  }
  EXPECT_EQ(ok, 200);
}

}  // namespace
}  // namespace cella::test
