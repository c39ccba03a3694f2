// `cella fork` of real VMs (TCG): what a user relies on is that every copy
// continues from the source's state at the fork (a process with its memory,
// the files), that the copies and the source then go their own ways (their
// own counters, writable layers, random numbers), and that the source keeps
// running. One source boot; its four copies are resumed at once.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>

#include "counter_fixture.h"

namespace cella::test {
namespace {

using std::chrono::seconds;

using ForkTest = CounterTest;

TEST_F(ForkTest, FourCopiesContinueFromTheForkPointIndependentlyAndTheSourceRunsOn) {
  std::string src =
      RunDetached({"--name", "src", kCounter[0], kCounter[1], kCounter[2], kCounter[3]});
  ASSERT_FALSE(src.empty());
  Exec("src", "echo original > /root/data; sync; echo ram > /dev/shm/in-memory");
  EXPECT_GE(CountAbove("src", 2), 3);
  const std::string pid = Exec("src", "cat /root/pid");
  const std::string hostname = Exec("src", "hostname");
  const long before = Count("src");

  auto forked =
      RunCella({"fork", "src", "--count", "4", "--name", "cp", "--json"}, "", seconds(900));
  ASSERT_EQ(forked.exit_code, 0) << Describe(forked);
  const long after_fork = Count("src");
  auto doc = nlohmann::json::parse(forked.out, nullptr, false);
  ASSERT_TRUE(doc.is_object() && doc.contains("ids") && doc["ids"].is_array()) << forked.out;
  ASSERT_EQ(doc["ids"].size(), 4u) << forked.out;
  std::set<std::string> ids;
  for (const auto& id : doc["ids"]) ids.insert(id.get<std::string>());
  EXPECT_EQ(ids.size(), 4u) << "each copy has its own ID";
  EXPECT_FALSE(ids.contains(src));

  // The source runs on, untouched.
  EXPECT_EQ(State("src"), "running");
  EXPECT_GT(CountAbove("src", after_fork), after_fork) << "the source keeps counting";
  EXPECT_EQ(Exec("src", "cat /run/cella/resume-count 2>/dev/null || echo 0"), "0");

  std::set<std::string> random;
  for (int i = 1; i <= 4; ++i) {
    const std::string name = "cp-" + std::to_string(i);
    SCOPED_TRACE(name);
    EXPECT_EQ(State(name), "running");
    EXPECT_TRUE(ids.contains(Inspect(name).value("id", std::string())));
    // The same process with its memory: its counter started from the fork
    // point (not from 1) and keeps counting on its own.
    EXPECT_EQ(Exec(name, "cat /root/pid"), pid);
    const long at = Count(name);
    EXPECT_GE(at, before);
    EXPECT_GT(CountAbove(name, at), at);
    EXPECT_EQ(Exec(name, "cat /dev/shm/in-memory"), "ram") << "a tmpfs: only memory holds it";
    EXPECT_EQ(Exec(name, "cat /root/data"), "original");
    EXPECT_EQ(Exec(name, "cat /run/cella/resume-count"), "1");
    EXPECT_EQ(Exec(name, "hostname"), hostname) << "a copy keeps the source's hostname";
    // Random numbers of its own: the guest RNG was reseeded from the host.
    random.insert(Exec(name, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"));
  }
  EXPECT_EQ(random.size(), 4u) << "two copies drew the same bytes from /dev/urandom";

  // Their own writable layers.
  Exec("cp-1", "echo changed > /root/data; sync");
  EXPECT_EQ(Exec("cp-2", "cat /root/data"), "original");
  EXPECT_EQ(Exec("src", "cat /root/data"), "original");

  // The fork's own snapshot is gone; nothing shows in snapshot ls.
  EXPECT_EQ(RunCella({"snapshot", "ls", "--json"}).out, "[]\n");
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(home_ + "/snapshots", ec))
    ADD_FAILURE() << "left behind: " << entry.path();

  // Refusals, each naming why, none touching the source.
  auto taken = RunCella({"fork", "src", "--name", "cp", "--count", "2"});
  EXPECT_NE(taken.exit_code, 0);
  EXPECT_NE(taken.err.find("cp-1 exists already"), std::string::npos) << Describe(taken);
  auto zero = RunCella({"fork", "src", "--count", "0"});
  EXPECT_NE(zero.exit_code, 0);
  EXPECT_NE(zero.err.find("--count"), std::string::npos) << Describe(zero);
  auto missing = RunCella({"fork", "no-such-sandbox"});
  EXPECT_NE(missing.exit_code, 0);
  ASSERT_EQ(RunCella({"stop", "cp-4"}, "", seconds(120)).exit_code, 0);
  auto stopped = RunCella({"fork", "cp-4"});
  EXPECT_NE(stopped.exit_code, 0);
  EXPECT_NE(stopped.err.find("fork"), std::string::npos) << Describe(stopped);
  EXPECT_EQ(State("src"), "running");
}

// A fork that fails partway, or is interrupted, removes everything it made
// (its snapshot, every copy, started or not) and the source runs on; a fork
// killed outright (kill -9: no time to clean) leaves a snapshot that the
// next fork removes.
TEST_F(ForkTest, AFailedOrInterruptedForkLeavesNothingAndTheSourceRunsOn) {
  ASSERT_FALSE(RunDetached({"--name", "src", "@builtin", "sh", "-c", kCounter[3]}).empty());
  Exec("src", "while [ ! -f /root/count ]; do sleep 0.1; done");
  const long before = CountAbove("src", 2);
  const std::string snapshots = home_ + "/snapshots";
  std::filesystem::create_directories(snapshots + "/.fork-killedearlier");
  std::ofstream(snapshots + "/.fork-killedearlier/machine.state") << "half";
  auto leftovers = [&] {
    std::vector<std::string> found;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(snapshots, ec))
      found.push_back(entry.path().filename().string());
    return found;
  };
  auto sandboxes = [&] {
    auto doc = nlohmann::json::parse(RunCella({"ps", "-a", "--json"}).out, nullptr, false);
    return doc.is_array() ? doc.size() : size_t{0};
  };

  // The copies' supervisors cannot start QEMU (nor the shell that reads the
  // state): their PATH has neither. Every copy fails; none is kept.
  auto failed = RunProcess({CELLA_BINARY, "fork", "src", "--count", "2", "--name", "bad"}, "",
                           seconds(600), {{"PATH", "/nonexistent"}});
  EXPECT_NE(failed.exit_code, 0) << Describe(failed);
  EXPECT_NE(failed.err.find("not every copy started"), std::string::npos) << Describe(failed);
  EXPECT_NE(failed.err.find("no copy is kept"), std::string::npos) << Describe(failed);
  EXPECT_EQ(sandboxes(), 1u) << RunCella({"ps", "-a"}).out;
  EXPECT_EQ(leftovers(), std::vector<std::string>{}) << "the fork's and a killed fork's snapshot";
  EXPECT_EQ(State("src"), "running");
  EXPECT_GT(CountAbove("src", before), before) << "the source keeps counting";

  // `cella fork src` sent `signal` once the source's save has begun (its
  // snapshot directory is there); returns its wait status (-1: not run).
  auto fork_and_signal = [&](const char* name, int signal) {
    pid_t child = ::fork();
    if (child < 0) return -1;
    if (child == 0) {
      ::execl(CELLA_BINARY, CELLA_BINARY, "fork", "src", "--count", "2", "--name", name,
              static_cast<char*>(nullptr));
      ::_exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + seconds(300);
    bool seen = false;
    while (!seen && std::chrono::steady_clock::now() < deadline) {
      for (const std::string& entry : leftovers()) seen = seen || entry.starts_with(".fork-");
      if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    EXPECT_TRUE(seen) << "the fork's snapshot never appeared";
    EXPECT_EQ(::kill(child, signal), 0);
    int status = -1;
    EXPECT_EQ(::waitpid(child, &status, 0), child);
    return status;
  };

  // Ctrl-C while the source's state is being saved: the fork finishes the
  // step it is in, removes what it made and ends; the source runs on.
  int status = fork_and_signal("int", SIGINT);
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "an interrupted fork failed";
  EXPECT_EQ(sandboxes(), 1u) << RunCella({"ps", "-a"}).out;
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
  EXPECT_EQ(State("src"), "running");
  const long later = Count("src");
  EXPECT_GT(CountAbove("src", later), later) << "the source keeps counting";

  // SIGTERM (as a second Ctrl-C) while the source is being saved: the fork
  // gives up at once, without waiting for the save, and makes no copy; the
  // source's save fails or ends on its own, and the source runs on.
  status = fork_and_signal("term", SIGTERM);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "status " << status;
  EXPECT_EQ(sandboxes(), 1u) << RunCella({"ps", "-a"}).out;
  EXPECT_TRUE(WaitForState("src", "running"));
  const long after_term = Count("src");
  EXPECT_GT(CountAbove("src", after_term), after_term) << "the source keeps counting";
}

}  // namespace
}  // namespace cella::test
