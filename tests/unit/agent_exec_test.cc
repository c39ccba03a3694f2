#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "agent_test_support.h"

namespace cella::testing {
namespace {

using host::ExecCallbacks;

// Every test runs twice: with the loop waiting for each command's exec (a
// vfork), and without (a fork, answered from the loop once the child has
// exec'd or failed: how the agent starts commands once it serves host
// shares). A user must not be able to tell the two apart.
class AgentExec : public AgentTest, public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override {
    AgentTest::SetUp();
    agent_ = StartAgent(AgentArgs());
    ASSERT_TRUE(agent_ && agent_->client);
  }
  std::vector<std::string> AgentArgs(std::vector<std::string> args = {}) const {
    if (GetParam()) args.emplace_back("--as-if-serving-shares");
    return args;
  }
  host::AgentClient& client() { return *agent_->client; }
  std::unique_ptr<AgentProcess> agent_;
};

INSTANTIATE_TEST_SUITE_P(StartModes, AgentExec, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& mode) {
                           return mode.param ? "WithoutWaitingForExec" : "WaitingForExec";
                         });

TEST_P(AgentExec, PropagatesExitCodes) {
  for (int code : {0, 1, 42}) {
    auto r = client().Exec(Sh("exit " + std::to_string(code)));
    ASSERT_TRUE(r.has_value()) << r.error().message;
    ASSERT_TRUE(r->status.exit_code.has_value());
    EXPECT_EQ(*r->status.exit_code, code);
    EXPECT_FALSE(r->status.signal.has_value());
    EXPECT_FALSE(r->status.timed_out);
  }
}

TEST_P(AgentExec, ReportsDeathBySignal) {
  auto r = client().Exec(Sh("kill -9 $$"));
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_FALSE(r->status.exit_code.has_value());
  EXPECT_EQ(r->status.signal, SIGKILL);
  EXPECT_EQ(r->status.ShellCode(), 137);
}

TEST_P(AgentExec, KeepsStdoutAndStderrApart) {
  auto r = client().Exec(Sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2"));
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data, "out1\nout2\n");
  EXPECT_EQ(r->stderr_data, "err1\nerr2\n");
}

TEST_P(AgentExec, StreamsTwentyMegabytesWithBoundedMemory) {
  constexpr int64_t kTotal = 20'000'000;
  int64_t client_peak_before = PeakRssBytes(::getpid());
  int64_t agent_peak_before = PeakRssBytes(agent_->pid);
  ASSERT_GT(agent_peak_before, 0);
  std::atomic<int64_t> counted{0};
  std::atomic<int> chunks{0};
  ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view data) {
    counted += static_cast<int64_t>(data.size());
    // A consumer slower than the producer: without flow control the
    // agent would have to buffer the difference.
    if (chunks++ % 8 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  };
  auto session = client().StartExec(Cmd({"head", "-c", std::to_string(kTotal), "/dev/zero"}), cb);
  ASSERT_TRUE(session.has_value()) << session.error().message;
  auto status = (*session)->Wait();
  ASSERT_TRUE(status.has_value()) << status.error().message;
  EXPECT_EQ(status->exit_code, 0);
  EXPECT_EQ(counted.load(), kTotal);
  int64_t agent_peak = PeakRssBytes(agent_->pid);
  // Under ASan the agent's freed chunks wait in its quarantine as well, and
  // clang's build adds fake stacks: a looser bound, still well below the
  // 20 MB a buffering agent would hold.
  const int64_t agent_bound = kUnderAsan ? 14'000'000 : 8'000'000;
  EXPECT_LT(agent_peak - agent_peak_before, agent_bound)
      << "the agent buffered the output (peak " << agent_peak << " bytes)";
  // Under ASan this process's freed buffers sit in the quarantine, so its
  // peak RSS cannot show buffering; the agent's bound is still checked.
  if (!kUnderAsan) {
    int64_t client_peak_after = PeakRssBytes(::getpid());
    EXPECT_LT(client_peak_after - client_peak_before, 10'000'000)
        << "the client buffered the output";
  }
}

TEST_P(AgentExec, PipesStdinAndClosesIt) {
  std::string received;
  std::mutex mu;
  ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view d) {
    std::lock_guard lock(mu);
    received.append(d);
  };
  auto req = Cmd({"cat"});
  req.stdin_open = true;
  auto cat = client().StartExec(req, cb);
  ASSERT_TRUE(cat.has_value()) << cat.error().message;
  // More than the initial window: needs credit to come back.
  std::string payload(1'500'000, 'x');
  for (size_t i = 0; i < payload.size(); i += 997) payload[i] = static_cast<char>('a' + i % 26);
  ASSERT_TRUE((*cat)->WriteStdin(payload).has_value());
  ASSERT_TRUE((*cat)->CloseStdin().has_value());
  auto status = (*cat)->Wait();
  ASSERT_TRUE(status.has_value()) << status.error().message;
  EXPECT_EQ(status->exit_code, 0);
  EXPECT_TRUE(received == payload) << "cat echoed " << received.size() << " bytes";

  std::string count;
  ExecCallbacks wc_cb;
  wc_cb.on_stdout = [&](std::string_view d) { count.append(d); };
  auto wreq = Cmd({"wc", "-c"});
  wreq.stdin_open = true;
  auto wc = client().StartExec(wreq, wc_cb);
  ASSERT_TRUE(wc.has_value()) << wc.error().message;
  ASSERT_TRUE((*wc)->WriteStdin(std::string(12345, 'q')).has_value());
  ASSERT_TRUE((*wc)->CloseStdin().has_value());
  ASSERT_TRUE((*wc)->Wait().has_value());
  EXPECT_EQ(count, "12345\n");
}

TEST_P(AgentExec, TtyModeGivesAPtyThatFollowsResize) {
  auto req = Cmd({"tty"});
  req.tty = true;
  auto r = client().Exec(req);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data.rfind("/dev/pts/", 0), 0u) << r->stdout_data;
  EXPECT_EQ(r->status.exit_code, 0);

  std::string out;
  std::mutex mu;
  std::condition_variable cv;
  ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view d) {
    std::lock_guard lock(mu);
    out.append(d);
    cv.notify_all();
  };
  auto sreq = Sh("stty size; read line; stty size");
  sreq.tty = true;
  sreq.stdin_open = true;
  sreq.rows = 30;
  sreq.cols = 90;
  auto s = client().StartExec(sreq, cb);
  ASSERT_TRUE(s.has_value()) << s.error().message;
  {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return out.find("30 90") != std::string::npos; });  // bounded by alarm()
  }
  ASSERT_TRUE((*s)->Resize(40, 123).has_value());
  // Frames are ordered: the resize is applied before this line arrives.
  ASSERT_TRUE((*s)->WriteStdin("go\n").has_value());
  auto status = (*s)->Wait();
  ASSERT_TRUE(status.has_value()) << status.error().message;
  EXPECT_EQ(status->exit_code, 0);
  EXPECT_NE(out.find("40 123"), std::string::npos) << out;
}

TEST_P(AgentExec, UsesExactlyTheGivenEnvironment) {
  auto req = Cmd({"/usr/bin/env"});
  req.env = {"FOO=bar", "PATH=/usr/bin:/bin"};
  auto r = client().Exec(req);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data, "FOO=bar\nPATH=/usr/bin:/bin\nHOME=/\n");
}

TEST_P(AgentExec, AppliesWorkdirAndUser) {
  auto req = Sh("pwd; id -u; id -g; id -G; echo $HOME");
  req.workdir = "/tmp";
  req.user = "nobody";
  auto r = client().Exec(req);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data, "/tmp\n65534\n65534\n65534\n/nonexistent\n") << r->stderr_data;

  req.user = "65534:100";
  r = client().Exec(req);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data, "/tmp\n65534\n100\n100\n/nonexistent\n") << r->stderr_data;

  // The switch was the child's alone (it runs in the agent's memory until
  // it execs): the agent, and what it starts next, are still root.
  r = client().Exec(Sh("id -u"));
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data, std::to_string(::getuid()) + "\n");

  // Looked up before the exec on the loop, or in the forked child when
  // shares are served: the same answer either way.
  req.user = "no-such-user-here";
  r = client().Exec(req);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().errno_value, ENOENT);
  EXPECT_NE(r.error().message.find("user \"no-such-user-here\" not found in /etc/passwd"),
            std::string::npos)
      << r.error().message;
  req.user = "nobody:";
  r = client().Exec(req);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().errno_value, EINVAL);
  EXPECT_NE(r.error().message.find("malformed"), std::string::npos) << r.error().message;

  auto bad_dir = Sh("true");
  bad_dir.workdir = "/does/not/exist";
  r = client().Exec(bad_dir);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().errno_value, ENOENT);
  EXPECT_NE(r.error().message.find("/does/not/exist"), std::string::npos) << r.error().message;
}

// The agent ignores SIGPIPE and blocks SIGCHLD for itself; what it starts
// gets the defaults: no signal blocked, none ignored.
TEST_P(AgentExec, ACommandStartsWithDefaultSignals) {
  auto r = client().Exec(Sh("grep -E '^Sig(Blk|Ign):' /proc/self/status"));
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n")
      << r->stderr_data;
}

TEST_P(AgentExec, MissingBinaryIs127AndNotExecutableIs126) {
  auto r = client().Exec(Cmd({"no-such-program-xyz"}));
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->status.exit_code, 127);
  EXPECT_NE(r->stderr_data.find("cella-agent: no-such-program-xyz: No such file or directory\n"),
            std::string::npos)
      << r->stderr_data;

  std::string path = "/tmp/cella-agent-test-noexec-" + std::to_string(::getpid());
  ASSERT_TRUE(WriteStringToFile(path, "#!/bin/sh\necho hi\n", 0644).has_value());
  r = client().Exec(Cmd({path}));
  ::unlink(path.c_str());
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->status.exit_code, 126);
  EXPECT_NE(r->stderr_data.find("Permission denied"), std::string::npos) << r->stderr_data;
}

// exec -d: answered once the command runs (or could not be run, as a
// shell would say), and the command runs on with nobody reading it.
TEST_P(AgentExec, ADetachedCommandRunsOnAndOneThatCannotRunIsAnsweredAsAShellWould) {
  std::string mark =
      "/tmp/cella-agent-detach-" + std::to_string(::getpid()) + "-" + std::to_string(GetParam());
  ::unlink(mark.c_str());
  auto req = Sh("sleep 0.2; echo ran > " + mark);
  req.detach = true;
  auto r = client().Exec(req);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->status.exit_code, 0);
  std::optional<std::string> text;
  for (int i = 0; i < 200 && (!text || *text != "ran\n"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (auto read = ReadFileToString(mark, 64)) text = *read;
  }
  ::unlink(mark.c_str());
  EXPECT_EQ(text.value_or(""), "ran\n");

  auto missing = Cmd({"no-such-program-xyz"});
  missing.detach = true;
  r = client().Exec(missing);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->status.exit_code, 127);
  EXPECT_NE(r->stderr_data.find("cella-agent: no-such-program-xyz: No such file or directory"),
            std::string::npos)
      << r->stderr_data;

  auto bad_dir = Sh("true");
  bad_dir.detach = true;
  bad_dir.workdir = "/does/not/exist";
  r = client().Exec(bad_dir);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().errno_value, ENOENT);
  EXPECT_NE(r.error().message.find("change to the working directory /does/not/exist"),
            std::string::npos)
      << r.error().message;
}

// Live (non-zombie) processes whose process group is pgid.
std::vector<pid_t> LiveGroupMembers(pid_t pgid) {
  std::vector<pid_t> out;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    auto stat = ReadFileToString("/proc/" + name + "/stat", 4096);
    if (!stat) continue;
    auto close_paren = stat->rfind(')');
    if (close_paren == std::string::npos) continue;
    std::istringstream rest(stat->substr(close_paren + 2));
    char state;
    pid_t ppid, pgrp;
    rest >> state >> ppid >> pgrp;
    if (pgrp == pgid && state != 'Z') out.push_back(std::stoi(name));
  }
  return out;
}

TEST_P(AgentExec, TimeoutKillsTheWholeProcessTree) {
  auto req = Sh("sleep 100 & sleep 100");
  req.timeout_ms = 300;
  int64_t pid = 0;
  ExecCallbacks cb;
  auto s = client().StartExec(req, cb);
  ASSERT_TRUE(s.has_value()) << s.error().message;
  pid = (*s)->pid();
  auto status = (*s)->Wait();
  ASSERT_TRUE(status.has_value()) << status.error().message;
  EXPECT_TRUE(status->timed_out);
  EXPECT_EQ(status->signal, SIGTERM);
  // Killed processes may need a moment to finish exiting; bounded wait.
  std::vector<pid_t> survivors;
  for (int i = 0; i < 200; ++i) {
    survivors = LiveGroupMembers(static_cast<pid_t>(pid));
    if (survivors.empty()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  EXPECT_TRUE(survivors.empty()) << survivors.size() << " processes of the group survived";
}

TEST_P(AgentExec, SignalReachesTheProcess) {
  auto s = client().StartExec(Cmd({"sleep", "100"}), {});
  ASSERT_TRUE(s.has_value()) << s.error().message;
  ASSERT_TRUE((*s)->Signal(SIGUSR1).has_value());
  auto status = (*s)->Wait();
  ASSERT_TRUE(status.has_value()) << status.error().message;
  EXPECT_EQ(status->signal, SIGUSR1);
  EXPECT_FALSE(status->timed_out);
}

TEST_P(AgentExec, FiftyConcurrentExecsOnOneLink) {
  constexpr int kCount = 50;
  std::vector<std::thread> threads;
  std::vector<std::string> outputs(kCount);
  std::vector<int> codes(kCount, -1);
  for (int i = 0; i < kCount; ++i) {
    threads.emplace_back([&, i] {
      auto r =
          client().Exec(Sh("echo job" + std::to_string(i) + "; exit " + std::to_string(i % 7)));
      if (r) {
        outputs[i] = r->stdout_data;
        codes[i] = r->status.exit_code.value_or(-2);
      } else {
        outputs[i] = "error: " + r.error().message;
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kCount; ++i) {
    EXPECT_EQ(outputs[i], "job" + std::to_string(i) + "\n");
    EXPECT_EQ(codes[i], i % 7);
  }
}

TEST_P(AgentExec, ExecOutputBeyondTheCapFailsClearly) {
  agent_.reset();
  host::AgentClientOptions options;
  options.max_exec_output = 100'000;
  agent_ = StartAgent(AgentArgs(), options);
  ASSERT_TRUE(agent_ && agent_->client);
  auto r = client().Exec(Cmd({"head", "-c", "1000000", "/dev/zero"}));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().errno_value, EFBIG);
  // The link is still usable afterwards.
  EXPECT_TRUE(client().Ping(std::chrono::seconds(5)).has_value());
}

TEST_P(AgentExec, PingAnswers) {
  auto p = client().Ping(std::chrono::seconds(5));
  EXPECT_TRUE(p.has_value()) << p.error().message;
}

uint64_t ParseHexField(const std::string& status, const std::string& field) {
  auto pos = status.find(field + ":");
  if (pos == std::string::npos) return ~0ull;
  return std::stoull(status.substr(pos + field.size() + 1), nullptr, 16);
}

TEST_P(AgentExec, HardeningSetsNoNewPrivsDropsCapsAndBlocksPtrace) {
  agent_.reset();
  agent_ = StartAgent(AgentArgs({"--harden"}));
  ASSERT_TRUE(agent_ && agent_->client);
  const uint64_t dropped = (1ull << 21) | (1ull << 16) | (1ull << 17) | (1ull << 19) | (1ull << 22);
  // PTRACE_TRACEME (request 0) succeeds for any unhardened process.
  const std::string ptrace_probe =
      "$r = syscall(101, 0, 0, 0, 0); print(($r == 0 ? \"ok\" : \"$!\"), \"\\n\");";

  auto hardened = client().Exec(Cmd({"cat", "/proc/self/status"}));
  ASSERT_TRUE(hardened.has_value()) << hardened.error().message;
  EXPECT_NE(hardened->stdout_data.find("NoNewPrivs:\t1"), std::string::npos);
  EXPECT_EQ(ParseHexField(hardened->stdout_data, "CapBnd") & dropped, 0u);
  auto probe = client().Exec(Cmd({"perl", "-e", ptrace_probe}));
  ASSERT_TRUE(probe.has_value()) << probe.error().message;
  EXPECT_EQ(probe->stdout_data, "Operation not permitted\n") << probe->stderr_data;

  auto privileged_req = Cmd({"cat", "/proc/self/status"});
  privileged_req.privileged = true;
  auto privileged = client().Exec(privileged_req);
  ASSERT_TRUE(privileged.has_value()) << privileged.error().message;
  EXPECT_NE(privileged->stdout_data.find("NoNewPrivs:\t0"), std::string::npos);
  EXPECT_EQ(ParseHexField(privileged->stdout_data, "CapBnd") & dropped, dropped);
  auto privileged_probe = Cmd({"perl", "-e", ptrace_probe});
  privileged_probe.privileged = true;
  probe = client().Exec(privileged_probe);
  ASSERT_TRUE(probe.has_value()) << probe.error().message;
  EXPECT_EQ(probe->stdout_data, "ok\n") << probe->stderr_data;
}

}  // namespace
}  // namespace cella::testing
