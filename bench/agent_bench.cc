// Agent link throughput and latency against a baseline measured in the same
// run: exec round trips of `true` vs local fork+exec+wait, and file write/
// read over the socket pair vs a plain pipe copy of the same bytes.
// Usage: agent_bench [file_megabytes=256] [exec_iterations=300]
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "host/agent/client.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int Die(const std::string& what) {
  std::fprintf(stderr, "agent_bench: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  size_t megabytes = argc > 1 ? std::stoul(argv[1]) : 256;
  int iterations = argc > 2 ? std::stoi(argv[2]) : 300;
  size_t bytes = megabytes << 20;

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return Die("socketpair");
  pid_t agent = ::fork();
  if (agent < 0) return Die("fork");
  if (agent == 0) {
    if (::dup2(sv[1], 3) < 0) _exit(126);
    ::execl(CELLA_AGENT_PATH, "cella-agent", "--fd", "3", static_cast<char*>(nullptr));
    _exit(127);
  }
  ::close(sv[1]);
  auto client = cella::host::AgentClient::Connect(cella::UniqueFd(sv[0]));
  if (!client) return Die("connect: " + client.error().message);

  // Exec round trips.
  cella::protocol::ExecRequest req;
  req.argv = {"true"};
  req.env = {"PATH=/usr/bin:/bin"};
  auto start = Clock::now();
  for (int i = 0; i < iterations; ++i) {
    auto r = (*client)->Exec(req);
    if (!r || r->status.exit_code != 0) return Die("exec true failed");
  }
  double agent_rate = iterations / Seconds(start);
  start = Clock::now();
  for (int i = 0; i < iterations; ++i) {
    pid_t pid = ::fork();
    if (pid < 0) return Die("fork");
    if (pid == 0) {
      ::execlp("true", "true", static_cast<char*>(nullptr));
      _exit(127);
    }
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid) return Die("waitpid");
  }
  double local_rate = iterations / Seconds(start);
  std::printf("exec true:   agent %.0f/s   local fork+exec+wait %.0f/s   ratio %.2f\n", agent_rate,
              local_rate, agent_rate / local_rate);

  // Baseline: the same bytes through a plain pipe.
  std::string data(bytes, '\0');
  for (size_t i = 0; i < bytes; i += 4096) data[i] = static_cast<char>(i / 4096);
  int p[2];
  if (::pipe(p) != 0) return Die("pipe");
  start = Clock::now();
  std::thread writer([&] {
    (void)cella::WriteAll(p[1], data);
    ::close(p[1]);
  });
  std::vector<std::byte> buf(1 << 16);
  size_t got = 0;
  for (;;) {
    auto n = cella::ReadSome(p[0], buf);
    if (!n || *n == 0) break;
    got += *n;
  }
  writer.join();
  ::close(p[0]);
  double pipe_mbps = megabytes / Seconds(start);
  if (got != bytes) return Die("pipe copy lost bytes");

  std::string path = "/tmp/cella-agent-bench-" + std::to_string(::getpid());
  start = Clock::now();
  if (auto w = (*client)->WriteFile(path, data); !w) return Die("write_file: " + w.error().message);
  double write_mbps = megabytes / Seconds(start);
  cella::UniqueFd devnull(::open("/dev/null", O_WRONLY | O_CLOEXEC));
  start = Clock::now();
  auto n = (*client)->ReadFileTo(path, devnull.Get());
  double read_mbps = megabytes / Seconds(start);
  ::unlink(path.c_str());
  if (!n || *n != bytes) return Die("read_file failed");
  std::printf(
      "write_file:  %.0f MB/s (temp file + fsync + rename)   pipe copy %.0f MB/s   ratio %.2f\n",
      write_mbps, pipe_mbps, write_mbps / pipe_mbps);
  std::printf("read_file:   %.0f MB/s   pipe copy %.0f MB/s   ratio %.2f\n", read_mbps, pipe_mbps,
              read_mbps / pipe_mbps);

  client->reset();
  int status = 0;
  ::waitpid(agent, &status, 0);
  return 0;
}
