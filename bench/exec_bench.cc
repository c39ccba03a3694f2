// exec and cp on a running sandbox, beside what the guest itself pays.
//
// Boots one detached sandbox (own CELLA_SANDBOX_HOME), then in the same run:
//   - `cella exec ID true`, end to end (CLI process start, state store,
//     router, agent, guest fork+exec), median of N;
//   - the client library's Exec over the supervisor's router, median of N;
//   - the guest's own cost of fork+exec+wait of `true`, timed inside the
//     guest over N runs;
//   - `cella cp` of a 100 MB file into the guest beside a local `cp`.
// Prints the overheads in ms and the cp throughput ratio.
// Usage: build/bench/exec_bench [N] [MB]
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "host/agent/client.h"
#include "host/sandbox/control.h"

namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Runs a shell command, returns its stdout (trailing newline stripped) and
// exits on failure: a benchmark with a broken step has no numbers to print.
std::string Shell(const std::string& command) {
  FILE* p = ::popen(command.c_str(), "r");
  if (!p) {
    std::perror("popen");
    std::exit(1);
  }
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = ::pclose(p);
  if (status != 0) {
    std::fprintf(stderr, "exec_bench: failed (%d): %s\n%s\n", status, command.c_str(), out.c_str());
    std::exit(1);
  }
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int runs = argc > 1 ? std::atoi(argv[1]) : 50;
  int megabytes = argc > 2 ? std::atoi(argv[2]) : 100;
  char tmpl[] = "/tmp/cella-exec-bench-XXXXXX";
  if (!::mkdtemp(tmpl)) {
    std::perror("mkdtemp");
    return 1;
  }
  std::string home = tmpl;
  ::setenv("CELLA_SANDBOX_HOME", home.c_str(), 1);
  const std::string cella = CELLA_BINARY;
  std::string id = Shell("'" + cella + "' run -d --name bench");
  std::fprintf(stderr, "sandbox %s running\n", id.c_str());

  // 1. The CLI end to end.
  std::vector<double> cli;
  for (int i = 0; i < runs; ++i) {
    auto t0 = Clock::now();
    Shell("'" + cella + "' exec bench -- true");
    cli.push_back(Ms(Clock::now() - t0));
  }
  // 2. The client library through the supervisor's router.
  auto fd = cella::sandbox::ConnectUnixSocket(home + "/sandboxes/" + id + "/mux.sock");
  if (!fd) {
    std::fprintf(stderr, "exec_bench: %s\n", fd.error().message.c_str());
    return 1;
  }
  auto agent = cella::host::AgentClient::Connect(std::move(*fd));
  if (!agent) {
    std::fprintf(stderr, "exec_bench: %s\n", agent.error().message.c_str());
    return 1;
  }
  std::vector<double> lib;
  cella::protocol::ExecRequest request;
  request.argv = {"/bin/true"};
  for (int i = 0; i < runs; ++i) {
    auto t0 = Clock::now();
    auto r = (*agent)->Exec(request);
    if (!r || r->status.ShellCode() != 0) {
      std::fprintf(stderr, "exec_bench: library exec failed\n");
      return 1;
    }
    lib.push_back(Ms(Clock::now() - t0));
  }
  // 3. The guest's own fork+exec+wait of `true`.
  // busybox date has no %N: /proc/uptime (10 ms resolution) over 4N runs.
  const std::string guest_runs = std::to_string(runs * 4);
  std::string guest_ms_text =
      Shell("'" + cella + "' exec bench -- sh -c 'read s x < /proc/uptime; i=0; while [ $i -lt " +
            guest_runs + " ]; do /bin/true; i=$((i+1)); done; read e x < /proc/uptime; " +
            "awk -v s=$s -v e=$e \"BEGIN { printf \\\"%.3f\\\", (e - s) * 1000 / " + guest_runs +
            " }\"'");
  double guest_ms = std::atof(guest_ms_text.c_str());

  // 4. cp of a file into the guest beside a local cp.
  std::string file = home + "/payload.bin";
  Shell("head -c " + std::to_string(megabytes) + "M /dev/urandom > '" + file + "'");
  auto t0 = Clock::now();
  Shell("cp '" + file + "' '" + home + "/copy.bin' && sync '" + home + "/copy.bin'");
  double local_ms = Ms(Clock::now() - t0);
  t0 = Clock::now();
  Shell("'" + cella + "' cp '" + file + "' bench:/root/payload.bin");
  double cp_ms = Ms(Clock::now() - t0);
  std::string guest_size = Shell("'" + cella + "' exec bench -- stat -c %s /root/payload.bin");
  // What the guest itself pays to write that much to the same disk (under
  // TCG the guest's own I/O path is the ceiling for any copy into it).
  t0 = Clock::now();
  Shell("'" + cella + "' exec bench -- sh -c 'head -c " + std::to_string(megabytes) +
        "m /dev/zero > /root/zero.bin; sync; rm /root/zero.bin'");
  double guest_write_ms = Ms(Clock::now() - t0);

  Shell("'" + cella + "' rm -f bench >/dev/null");
  std::filesystem::remove_all(home);

  double cli_ms = Median(cli);
  double lib_ms = Median(lib);
  std::printf("exec (median of %d)\n", runs);
  std::printf("  guest fork+exec+wait of true:  %8.2f ms\n", guest_ms);
  std::printf("  client library Exec:           %8.2f ms  overhead %.2f ms\n", lib_ms,
              lib_ms - guest_ms);
  std::printf("  cella exec ID true:            %8.2f ms  overhead %.2f ms\n", cli_ms,
              cli_ms - guest_ms);
  double mb = megabytes;
  std::printf("cp of %d MB (guest saw %s bytes)\n", megabytes, guest_size.c_str());
  std::printf("  local cp + sync:               %8.0f ms  %7.1f MB/s\n", local_ms,
              mb / (local_ms / 1000));
  std::printf("  cella cp host -> guest:        %8.0f ms  %7.1f MB/s\n", cp_ms,
              mb / (cp_ms / 1000));
  std::printf("  guest writing it to its own disk:%6.0f ms  %7.1f MB/s\n", guest_write_ms,
              mb / (guest_write_ms / 1000));
  std::printf("  ratio (cella cp / local cp throughput): %.2fx\n", local_ms / cp_ms);
  std::printf("  ratio (cella cp / guest's own write):   %.2fx\n", guest_write_ms / cp_ms);
  return 0;
}
