// The QEMU machine's failure paths, with stand-ins for QEMU so no VM runs:
// a hypervisor that dies at once, one that never brings the agent up, and
// the bounded helper-command runner.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "base/io.h"
#include "host/os/process.h"
#include "host/vmm/qemu_backend.h"

namespace cella::vmm {
namespace {

using std::chrono::milliseconds;

class FakeQemuMachine : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cella-machine-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    config_.ID = "t1";
    config_.KernelPath = dir_ + "/vmlinuz";
    config_.InitramfsPath = dir_ + "/initrd";
    config_.RootfsPath = dir_ + "/root.img";
    config_.StateDir = dir_ + "/state";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A script standing in for qemu-system-x86_64.
  std::string Script(const std::string& name, const std::string& body) {
    std::string path = dir_ + "/" + name;
    EXPECT_TRUE(WriteStringToFile(path, "#!/bin/sh\n" + body, 0755));
    EXPECT_EQ(::chmod(path.c_str(), 0755), 0);
    return path;
  }

  std::string dir_;
  VMConfig config_;
};

TEST_F(FakeQemuMachine, EarlyDeathReportsQemuOutput) {
  QemuBackendOptions opts;
  opts.qemu_binary = Script("qemu", "echo 'qemu: could not open kernel file' >&2\nexit 1\n");
  opts.boot_timeout = milliseconds(20'000);
  QemuBackend backend(opts);
  auto machine = backend.Create(config_);
  ASSERT_TRUE(machine) << machine.error().message;
  auto start = std::chrono::steady_clock::now();
  auto st = (*machine)->Start();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("could not open kernel file"), std::string::npos)
      << st.error().message;
  EXPECT_NE(st.error().message.find("exit code 1"), std::string::npos) << st.error().message;
  // Detected from the exit, not by running into the boot timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, opts.boot_timeout);
  EXPECT_EQ((*machine)->PID(), -1);
  EXPECT_TRUE((*machine)->Close());
}

TEST_F(FakeQemuMachine, AgentThatNeverComesUpTimesOutAndIsKilled) {
  // Listens on nothing: the machine waits for sockets that never appear.
  QemuBackendOptions opts;
  opts.qemu_binary = Script("qemu", "echo booting >&2\nexec sleep 60\n");
  // Long enough for a loaded machine to run the stand-in's echo.
  opts.boot_timeout = milliseconds(2'000);
  QemuBackend backend(opts);
  auto machine = backend.Create(config_);
  ASSERT_TRUE(machine) << machine.error().message;
  auto st = (*machine)->Start();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("2000 ms"), std::string::npos) << st.error().message;
  EXPECT_NE(st.error().message.find("booting"), std::string::npos) << st.error().message;
  // The stand-in was killed and reaped.
  EXPECT_EQ((*machine)->PID(), -1);
  auto exit = (*machine)->Wait(milliseconds(0));
  ASSERT_TRUE(exit) << exit.error().message;
  EXPECT_EQ(exit->hypervisor.signal, SIGKILL);
}

// Kill from another thread ends a boot in progress at once (the supervisor's
// `cella kill` while creating), and Wait then reports the killed QEMU.
TEST_F(FakeQemuMachine, KillDuringStartEndsTheBootPromptly) {
  QemuBackendOptions opts;
  opts.qemu_binary = Script("qemu", "exec sleep 60\n");
  opts.boot_timeout = milliseconds(30'000);
  QemuBackend backend(opts);
  auto machine = backend.Create(config_);
  ASSERT_TRUE(machine) << machine.error().message;
  Machine& m = **machine;
  std::thread killer([&] {
    // Once QEMU runs, so the kill lands in the boot and not before it.
    for (int i = 0; i < 10'000 && m.PID() <= 0; ++i) std::this_thread::sleep_for(milliseconds(1));
    EXPECT_TRUE(m.Kill());
  });
  auto start = std::chrono::steady_clock::now();
  auto st = m.Start();
  killer.join();
  ASSERT_FALSE(st);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10))
      << "the boot ran into its timeout: " << st.error().message;
  EXPECT_EQ(m.PID(), -1);
  auto exit = m.Wait(milliseconds(0));
  ASSERT_TRUE(exit) << exit.error().message;
  EXPECT_EQ(exit->hypervisor.signal, SIGKILL);
  EXPECT_TRUE(m.Kill()) << "a no-op once the VM ended";
  EXPECT_TRUE(m.Close());
}

TEST_F(FakeQemuMachine, KillBeforeStartMakesStartFail) {
  QemuBackendOptions opts;
  opts.qemu_binary = Script("qemu", "exec sleep 60\n");
  QemuBackend backend(opts);
  auto machine = backend.Create(config_);
  ASSERT_TRUE(machine) << machine.error().message;
  EXPECT_TRUE((*machine)->Kill());
  auto st = (*machine)->Start();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("killed before it booted"), std::string::npos)
      << st.error().message;
}

TEST_F(FakeQemuMachine, OperationsBeforeStartAreErrors) {
  QemuBackend backend(QemuBackendOptions{});
  auto machine = backend.Create(config_);
  ASSERT_TRUE(machine);
  EXPECT_FALSE((*machine)->ReadFile("/etc/passwd"));
  EXPECT_FALSE((*machine)->Pause());
  EXPECT_EQ((*machine)->Agent(), nullptr);
  EXPECT_EQ((*machine)->NetworkFD().error().errno_value, ENOTSUP);
  EXPECT_EQ((*machine)->VsockFD().error().errno_value, ENOTSUP);
  EXPECT_EQ((*machine)->RootfsPath(), config_.RootfsPath);
  EXPECT_TRUE((*machine)->Stop(milliseconds(100)));  // nothing to stop
}

TEST_F(FakeQemuMachine, CreateValidatesConfig) {
  QemuBackend backend(QemuBackendOptions{});
  config_.StateDir.clear();
  auto machine = backend.Create(config_);
  ASSERT_FALSE(machine);
  EXPECT_NE(machine.error().message.find("StateDir"), std::string::npos);
}

// A stand-in for a restoring QEMU: answers QMP as a restore that completes
// at once, and records what arrives on the agent socket in agent.bytes.
constexpr const char* kRestoringQemu = R"PY(#!/usr/bin/env python3
import json, os, socket, sys
args = sys.argv[1:]
paths = {}
for i, a in enumerate(args):
    if a == "-chardev" and args[i + 1].startswith("socket,"):
        opts = dict(kv.split("=", 1) for kv in args[i + 1].split(",")[1:] if "=" in kv)
        paths[opts["id"]] = opts["path"]
def listen(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    return s
qmp_l, agent_l = listen(paths["qmp"]), listen(paths["agent"])
record = os.path.join(os.path.dirname(paths["qmp"]), "agent.bytes")
open(record, "wb").close()
if os.fork() == 0:
    conn, _ = agent_l.accept()
    with open(record, "ab") as out:
        while True:
            data = conn.recv(65536)
            if not data:
                os._exit(0)
            out.write(data)
            out.flush()
conn, _ = qmp_l.accept()
f = conn.makefile("rwb")
f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n'); f.flush()
for line in f:
    req = json.loads(line)
    cmd = req.get("execute")
    ret = {}
    if cmd == "query-migrate": ret = {"status": "completed"}
    if cmd == "query-status": ret = {"status": "paused", "running": False}
    f.write((json.dumps({"return": ret, "id": req.get("id")}) + "\n").encode()); f.flush()
)PY";

// A resumed standby's agent waits for the host's Hello; a QEMU that dies
// as the restored guest starts (here: at `cont`) is reported as QEMU's
// death with what it printed, not as the agent failing its handshake.
TEST_F(FakeQemuMachine, AResumeWhoseQemuDiesSaysSoAndNotThatTheAgentFailed) {
  if (::access("/usr/bin/python3", X_OK) != 0) GTEST_FAIL() << "python3 is needed for this test";
  config_.IncomingMigration = "exec:cat " + dir_ + "/state-file";
  config_.NoNetwork = true;
  // The stand-in answers `cont`, then dies with its agent socket's reader.
  std::string dying = kRestoringQemu;
  const std::string fork_line = "if os.fork() == 0:";
  auto fork_at = dying.find(fork_line);
  ASSERT_NE(fork_at, std::string::npos);
  dying.replace(fork_at, fork_line.size(), "reader = os.fork()\nif reader == 0:");
  dying +=
      "    if cmd == \"cont\":\n"
      "        sys.stderr.write(\"qemu: guest memory could not be mapped\\n\")\n"
      "        os.kill(reader, 9)\n"
      "        os._exit(3)\n";
  const std::string qemu = dir_ + "/qemu";
  ASSERT_TRUE(WriteStringToFile(qemu, dying, 0755));
  ASSERT_EQ(::chmod(qemu.c_str(), 0755), 0);
  QemuBackendOptions opts;
  opts.qemu_binary = qemu;
  opts.boot_timeout = milliseconds(20'000);
  auto machine = QemuBackend(opts).Create(config_);
  ASSERT_TRUE(machine) << machine.error().message;
  auto start = std::chrono::steady_clock::now();
  auto st = (*machine)->Start();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("QEMU ended (exit code 3)"), std::string::npos)
      << st.error().message;
  EXPECT_NE(st.error().message.find("guest memory could not be mapped"), std::string::npos)
      << st.error().message;
  EXPECT_LT(std::chrono::steady_clock::now() - start, opts.boot_timeout);
  EXPECT_TRUE((*machine)->Close());
}

// A warm clone's before_go runs after the restore and before the go line:
// its failure fails the boot without the go line ever sent, and is not
// taken for a failure of the template's state; once it passed, the go line
// goes out.
TEST_F(FakeQemuMachine, CloneJoinsBeforeGoBeforeItsGoLine) {
  if (::access("/usr/bin/python3", X_OK) != 0) GTEST_FAIL() << "python3 is needed for this test";
  config_.Template = TemplateRole::kClone;
  config_.TemplateMemoryPath = dir_ + "/memory";
  config_.IncomingMigration = "exec:cat " + dir_ + "/state-file";
  config_.NoNetwork = true;
  const std::string qemu = dir_ + "/qemu";
  ASSERT_TRUE(WriteStringToFile(qemu, kRestoringQemu, 0755));
  ASSERT_EQ(::chmod(qemu.c_str(), 0755), 0);
  const std::string record = config_.StateDir + "/agent.bytes";
  auto go_line_sent = [&] {
    auto bytes = ReadFileToString(record, 1 << 20);
    return bytes && bytes->find("cella-go") != std::string::npos;
  };

  int calls = 0;
  QemuBackendOptions failing;
  failing.qemu_binary = qemu;
  failing.boot_timeout = milliseconds(20'000);
  failing.before_go = [&]() -> Status {
    ++calls;
    return Fail("the sealed network could not be finished");
  };
  auto first = QemuBackend(failing).Create(config_);
  ASSERT_TRUE(first) << first.error().message;
  auto st = (*first)->Start();
  ASSERT_FALSE(st);
  EXPECT_EQ(calls, 1);
  EXPECT_NE(st.error().message.find("sealed network"), std::string::npos) << st.error().message;
  EXPECT_NE(st.error().errno_value, kStateNotRestoredErrno)
      << "a host failure must not condemn the template";
  EXPECT_FALSE(go_line_sent()) << "the go line went out although before_go failed";
  EXPECT_TRUE((*first)->Close());

  QemuBackendOptions passing = failing;
  // The stand-in's agent never says Hello; the bound covers its start under load.
  passing.boot_timeout = milliseconds(5'000);
  bool joined_before_go = false;
  passing.before_go = [&]() -> Status {
    ++calls;
    joined_before_go = !go_line_sent();
    return {};
  };
  auto second = QemuBackend(passing).Create(config_);
  ASSERT_TRUE(second) << second.error().message;
  auto timed_out = (*second)->Start();
  EXPECT_FALSE(timed_out);  // no agent: the boot times out after the go line
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(joined_before_go);
  // The go line reached the agent socket (the stand-in records it as it reads).
  for (int i = 0; i < 100 && !go_line_sent(); ++i) std::this_thread::sleep_for(milliseconds(20));
  EXPECT_TRUE(go_line_sent()) << "no go line after before_go passed";
  EXPECT_TRUE((*second)->Close());
}

TEST(RunCommand, CapturesOutputAndExitCode) {
  auto r =
      host::RunCommand({"/bin/sh", "-c", "echo out; echo err >&2; exit 3"}, milliseconds(10'000));
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->exit_code, 3);
  EXPECT_NE(r->output.find("out"), std::string::npos);
  EXPECT_NE(r->output.find("err"), std::string::npos);
  auto checked =
      host::CheckCommand({"/bin/sh", "-c", "echo bad thing >&2; exit 3"}, milliseconds(10'000));
  ASSERT_FALSE(checked);
  EXPECT_NE(checked.error().message.find("bad thing"), std::string::npos);
}

TEST(RunCommand, TimeoutKills) {
  auto r = host::RunCommand({"sleep", "30"}, milliseconds(200));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().errno_value, ETIMEDOUT);
}

TEST(RunCommand, MissingProgram) {
  auto r = host::RunCommand({"/nonexistent/prog"}, milliseconds(10'000));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->exit_code, 127);
}

}  // namespace
}  // namespace cella::vmm
