// Shared by tests/unit/agent_*_test.cc: runs the real cella-agent binary as
// a subprocess over a socket pair (--fd 3) and connects an AgentClient.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "base/sanitizers.h"
#include "host/agent/client.h"

namespace cella::testing {

// Waits up to 5 s for an agent that saw its link close to exit, then kills it.
inline void ReapAgent(pid_t pid) {
  if (pid <= 0) return;
  for (int i = 0; i < 500; ++i) {
    if (::waitpid(pid, nullptr, WNOHANG) != 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

class AgentProcess {
 public:
  ~AgentProcess() {
    client.reset();  // the agent sees EOF and exits
    ReapAgent(pid);
  }
  pid_t pid = -1;
  std::unique_ptr<host::AgentClient> client;
};

// Starts cella-agent with the other end of a socket pair; returns that end
// unconnected (no handshake) so tests can speak raw frames.
inline std::pair<pid_t, UniqueFd> SpawnAgentRaw(std::vector<std::string> extra_args = {}) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return {-1, UniqueFd()};
  std::vector<std::string> args = {CELLA_AGENT_PATH, "--fd", "3"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // A sanitizer build of the agent would otherwise hold freed buffers in
  // ASan's quarantine and its peak RSS would say nothing about buffering.
  std::vector<std::string> env = {"ASAN_OPTIONS=quarantine_size_mb=0"};
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::dup2(sv[1], 3) < 0) _exit(126);
    ::execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  ::close(sv[1]);
  return {pid, UniqueFd(sv[0])};
}

inline std::unique_ptr<AgentProcess> StartAgent(std::vector<std::string> extra_args = {},
                                                host::AgentClientOptions options = {}) {
  auto [pid, fd] = SpawnAgentRaw(std::move(extra_args));
  auto proc = std::make_unique<AgentProcess>();
  proc->pid = pid;
  if (pid < 0) {
    ADD_FAILURE() << "could not start the agent";
    return nullptr;
  }
  options.handshake_timeout = std::chrono::seconds(10);
  auto client = host::AgentClient::Connect(std::move(fd), options);
  if (!client) {
    ADD_FAILURE() << "connect: " << client.error().message;
    return nullptr;
  }
  proc->client = std::move(*client);
  return proc;
}

inline protocol::ExecRequest Cmd(std::vector<std::string> argv) {
  protocol::ExecRequest r;
  r.argv = std::move(argv);
  r.env = {"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"};
  r.timeout_ms = 20'000;  // backstop: no test can hang on a stuck child
  return r;
}

inline protocol::ExecRequest Sh(const std::string& script) {
  return Cmd({"/bin/sh", "-c", script});
}

// "VmHWM:   1234 kB" -> bytes; -1 when unreadable.
inline int64_t PeakRssBytes(pid_t pid) {
  auto status = ReadFileToString("/proc/" + std::to_string(pid) + "/status", 1 << 20);
  if (!status) return -1;
  auto pos = status->find("VmHWM:");
  if (pos == std::string::npos) return -1;
  return std::stoll(status->substr(pos + 6)) * 1024;
}

using cella::kUnderAsan;

// Sends `sent` through a port forward to an echo server (from a second
// thread, then half-closes) and expects every byte back, then the stream's
// clean end.
inline void ExpectEchoedThrough(host::PortStream& port, const std::string& sent) {
  std::thread writer([&] {
    EXPECT_TRUE(port.Write(sent).has_value());
    EXPECT_TRUE(port.ShutdownWrite().has_value());
  });
  std::string got;
  std::vector<std::byte> buf(10'000);
  for (;;) {
    auto n = port.Read(buf);
    EXPECT_TRUE(n.has_value()) << n.error().message;
    if (!n || *n == 0) break;
    got.append(reinterpret_cast<const char*>(buf.data()), *n);
  }
  writer.join();
  EXPECT_TRUE(got == sent) << "echoed " << got.size() << " of " << sent.size() << " bytes";
  auto done = port.Wait();
  EXPECT_TRUE(done.has_value()) << done.error().message;
}

// Every test process gets a hard bound: a hang becomes a SIGALRM failure.
class AgentTest : public ::testing::Test {
 protected:
  void SetUp() override { ::alarm(60); }
  void TearDown() override { ::alarm(0); }
};

}  // namespace cella::testing
