// `cella run` end to end: each test boots a real VM with the real kernel,
// initramfs, init and agent, under TCG on hosts where KVM cannot run it.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>

#include "host/net/dns.h"
#include "process.h"
#include "support/tcp.h"

namespace cella::test {
namespace {

std::string Describe(const ProcessResult& r) {
  return "exit=" + std::to_string(r.exit_code) + " signal=" + std::to_string(r.signal) +
         (r.timed_out ? " TIMED OUT" : "") + "\nstdout:\n" + r.out + "\nstderr:\n" + r.err;
}

TEST(Run, EchoHelloInTheDefaultImage) {
  auto r = RunCella({"run", "--", "echo", "hello"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "hello\n");
}

TEST(Run, ExitCodeAndStderrPropagate) {
  auto r = RunCella({"run", "--", "sh", "-c", "echo out; echo err >&2; exit 42"});
  EXPECT_EQ(r.exit_code, 42) << Describe(r);
  EXPECT_EQ(r.out, "out\n");
  EXPECT_NE(r.err.find("err\n"), std::string::npos) << Describe(r);
}

TEST(Run, MissingCommandIs127AndSignalDeathIs128PlusN) {
  auto missing = RunCella({"run", "--", "no-such-command"});
  EXPECT_EQ(missing.exit_code, 127) << Describe(missing);
  auto killed = RunCella({"run", "--", "sh", "-c", "kill -9 $$"});
  EXPECT_EQ(killed.exit_code, 128 + 9) << Describe(killed);
}

TEST(Run, EnvWorkdirUserAndStdin) {
  auto r = RunCella({"run", "-i", "-e", "GREETING=hi there", "-w", "/tmp", "-u", "nobody", "--",
                     "sh", "-c", "echo \"$GREETING\"; pwd; id -u; echo \"$HOME\"; cat"},
                    "from stdin\n");
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  // HOME is the user's from the image's passwd, as docker sets it.
  EXPECT_EQ(r.out, "hi there\n/tmp\n65534\n/nonexistent\nfrom stdin\n");
}

// Ctrl-C on `cella run` reaches the guest's main process (QEMU is not in
// the terminal's process group, so it is not killed by it).
TEST(Run, InterruptIsForwardedToTheMainProcess) {
  // `set -m` gives the job its own process group and `kill -- -PID` signals
  // the whole group, as a terminal's Ctrl-C does.
  std::string script =
      std::string("set -m; out=$(mktemp); \"") + CELLA_BINARY +
      "\" run -- sh -c 'trap \"echo got-int; exit 7\" INT; echo ready; "
      "while :; do sleep 1; done' >\"$out\" 2>/dev/null & pid=$!; "
      "for i in $(seq 600); do grep -q ready \"$out\" && break; sleep 0.2; done; "
      "kill -INT -- -$pid; wait $pid; rc=$?; cat \"$out\"; rm -f \"$out\"; exit $rc";
  auto r = RunProcess({"bash", "-c", script}, "", std::chrono::seconds(180));
  EXPECT_EQ(r.exit_code, 7) << Describe(r);
  EXPECT_EQ(r.out, "ready\ngot-int\n") << Describe(r);
}

TEST(Run, HostnameDnsAndExtraHosts) {
  auto r =
      RunCella({"run", "--hostname", "box1", "--dns", "10.0.2.3", "--add-host", "db.test:10.9.8.7",
                "--", "sh", "-c",
                "hostname; cat /etc/resolv.conf; grep db.test /etc/hosts; grep box1 /etc/hosts"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_NE(r.out.find("box1\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("nameserver 10.0.2.3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("10.9.8.7"), std::string::npos) << r.out;
}

TEST(Run, NetworkIsConfiguredAndNoNetworkMeansOnlyLoopback) {
  auto net =
      RunCella({"run", "--mtu", "1400", "--", "sh", "-c",
                "ls /sys/class/net; cat /sys/class/net/eth0/mtu; ip -4 addr show eth0; ip route"});
  ASSERT_EQ(net.exit_code, 0) << Describe(net);
  EXPECT_NE(net.out.find("eth0"), std::string::npos) << net.out;
  EXPECT_NE(net.out.find("1400\n"), std::string::npos) << net.out;
  EXPECT_NE(net.out.find("10.0.2.15/24"), std::string::npos) << net.out;
  EXPECT_NE(net.out.find("default via 10.0.2.2"), std::string::npos) << net.out;

  auto none = RunCella({"run", "--no-network", "--", "ls", "/sys/class/net"});
  ASSERT_EQ(none.exit_code, 0) << Describe(none);
  EXPECT_EQ(none.out, "lo\n");
}

// The default network is sealed like an egress policy, open to every public
// host: the host's loopback is closed, through the gateway 10.0.2.2 (which
// QEMU's user-mode NAT would map to it) or any other way, until
// --allow-host-loopback opens the gateway.
TEST(Run, HostLoopbackIsClosedByDefaultAndOpensWithAllowHostLoopback) {
  cella::testing::HelloHttpServer server;
  const int port = server.port();
  ASSERT_GT(port, 0);
  const std::string url = "http://10.0.2.2:" + std::to_string(port) + "/";
  auto closed = RunCella({"run", "--", "sh", "-c",
                          "wget -q -O - " + url + " 2>&1; echo rc=$?; nc -w 5 10.0.2.2 " +
                              std::to_string(port) + " </dev/null; echo nc=$?"});
  auto open = RunCella({"run", "--allow-host-loopback", "--", "wget", "-q", "-O", "-", url});
  server.Stop();
  EXPECT_EQ(closed.exit_code, 0) << Describe(closed);
  EXPECT_NE(closed.out.find("403"), std::string::npos) << Describe(closed);
  EXPECT_EQ(closed.out.find("rc=0"), std::string::npos) << Describe(closed);
  EXPECT_EQ(closed.out.find("hello guest"), std::string::npos) << Describe(closed);
  ASSERT_EQ(open.exit_code, 0) << Describe(open);
  EXPECT_EQ(open.out, "hello guest\n");
  EXPECT_EQ(server.accepted(), 1);  // only the --allow-host-loopback run got through
}

// A sandbox started without a policy reaches every public host and has no
// list: allow-list refuses it (a first entry would silently close every
// other host), and inspect shows what it was given.
TEST(Run, DefaultSandboxHasNoAllowListAndInspectShowsItsNetwork) {
  auto run = RunCella({"run", "-d", "--allow-host-loopback"});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  std::string id = run.out.substr(0, run.out.find('\n'));
  auto add = RunCella({"allow-list", "add", id, "a.test"});
  auto inspect = RunCella({"inspect", id});
  auto removed = RunCella({"rm", "-f", id});
  EXPECT_NE(add.exit_code, 0) << Describe(add);
  EXPECT_NE(add.err.find("every public host"), std::string::npos) << Describe(add);
  EXPECT_NE(inspect.out.find("\"all_public\": true"), std::string::npos) << inspect.out;
  EXPECT_NE(inspect.out.find("\"host_loopback\": true"), std::string::npos) << inspect.out;
  EXPECT_EQ(removed.exit_code, 0) << Describe(removed);
}

// --dns X: the guest keeps asking cella's DNS (10.0.2.3, the only UDP its
// sealed network lets out) and cella's resolver asks X. X here is a fake
// server on a loopback address that knows one name the real world does not.
TEST(Run, DnsServerIsAskedByCellasResolver) {
  if (::geteuid() != 0) GTEST_SKIP() << "binding port 53 needs root";
  // An address of this process's own (both start modes run this test, maybe
  // at once): all of 127/8 is the loopback.
  const int pid = ::getpid();
  const std::string dns =
      "127.77." + std::to_string((pid / 250) % 250 + 1) + "." + std::to_string(pid % 250 + 1);
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(53);
  ASSERT_EQ(::inet_pton(AF_INET, dns.c_str(), &addr.sin_addr), 1);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const int err = errno;
    ::close(fd);
    // Only a DNS server of this host's own on every address takes it (the
    // address is this process's alone).
    if (err == EADDRINUSE) GTEST_SKIP() << "port 53 is taken on every address of this host";
    FAIL() << "bind " << dns << ":53: " << std::strerror(err);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> asked{0};
  std::thread server([&] {
    while (!stop) {
      pollfd pfd{fd, POLLIN, 0};
      if (::poll(&pfd, 1, 100) <= 0) continue;
      std::byte buffer[512];
      sockaddr_in peer{};
      socklen_t length = sizeof peer;
      ssize_t n =
          ::recvfrom(fd, buffer, sizeof buffer, 0, reinterpret_cast<sockaddr*>(&peer), &length);
      if (n <= 0) continue;
      auto query = net::ParseDnsQuery(std::span(buffer, static_cast<size_t>(n)));
      if (!query) continue;
      std::optional<in_addr> answer;
      auto rcode = net::DnsRcode::kNxDomain;
      if (query->name == "only-here.test") {
        ++asked;
        rcode = net::DnsRcode::kNoError;
        if (query->qtype == static_cast<uint16_t>(net::DnsType::kA)) {
          in_addr a;
          ::inet_pton(AF_INET, "192.0.2.7", &a);
          answer = a;
        }
      }
      auto reply = net::BuildDnsResponse(*query, rcode, answer);
      (void)::sendto(fd, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&peer), length);
    }
  });
  auto r = RunCella({"run", "--dns", dns, "--", "sh", "-c",
                     "cat /etc/resolv.conf; nslookup only-here.test 2>&1; echo rc=$?"});
  stop = true;
  server.join();
  ::close(fd);
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_NE(r.out.find("nameserver 10.0.2.3"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("nameserver " + dns), std::string::npos) << r.out;
  // The guest gets a virtual address for the name: it was answered.
  EXPECT_NE(r.out.find("198.1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rc=0"), std::string::npos) << r.out;
  EXPECT_GE(asked.load(), 1);
}

TEST(Run, CpusMemoryAndHardening) {
  auto r = RunCella({"run", "--cpus", "1.5", "--memory", "384m", "--", "sh", "-c",
                     "nproc; cat /sys/fs/cgroup/sandbox/cpu.max; grep MemTotal /proc/meminfo; "
                     "grep NoNewPrivs /proc/self/status"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out.substr(0, 2), "2\n") << r.out;
  EXPECT_NE(r.out.find("150000 100000"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("NoNewPrivs:\t1"), std::string::npos) << r.out;
  auto mem_pos = r.out.find("MemTotal:");
  ASSERT_NE(mem_pos, std::string::npos);
  long kib = std::stol(r.out.substr(mem_pos + 9));
  EXPECT_GT(kib, 250 * 1024);
  EXPECT_LT(kib, 384 * 1024);

  auto privileged =
      RunCella({"run", "--privileged", "--", "grep", "NoNewPrivs", "/proc/self/status"});
  ASSERT_EQ(privileged.exit_code, 0) << Describe(privileged);
  EXPECT_NE(privileged.out.find("NoNewPrivs:\t0"), std::string::npos) << privileged.out;
}

TEST(Run, WritesGoToAPrivateLayerThatIsDiscarded) {
  auto first =
      RunCella({"run", "--", "sh", "-c", "echo scribble > /etc/marker && cat /etc/marker"});
  ASSERT_EQ(first.exit_code, 0) << Describe(first);
  EXPECT_EQ(first.out, "scribble\n");
  auto second = RunCella({"run", "--", "sh", "-c", "test ! -e /etc/marker && echo clean"});
  ASSERT_EQ(second.exit_code, 0) << Describe(second);
  EXPECT_EQ(second.out, "clean\n");
}

TEST(Run, ForcedKvmRunsWhereUsableAndFailsClearlyWhereNot) {
  auto diag = RunCella({"diagnose"});
  ASSERT_EQ(diag.exit_code, 0) << Describe(diag);
  ASSERT_NE(diag.out.find("accel"), std::string::npos) << diag.out;
  auto r = RunCella({"run", "--accel", "kvm", "--", "echo", "ok"}, "", std::chrono::seconds(90));
  EXPECT_FALSE(r.timed_out);
  if (diag.out.find("kvm usable: yes") != std::string::npos) {
    EXPECT_EQ(r.exit_code, 0) << Describe(r);
    EXPECT_EQ(r.out, "ok\n");
  } else {
    EXPECT_EQ(r.exit_code, 125) << Describe(r);
    EXPECT_NE(r.err.find("kvm"), std::string::npos) << r.err;
  }
}

TEST(Run, BadInputIsRefusedBeforeBooting) {
  auto r = RunCella({"run", "--memory", "lots", "--", "true"}, "", std::chrono::seconds(20));
  EXPECT_EQ(r.exit_code, 125) << Describe(r);
  EXPECT_NE(r.err.find("--memory"), std::string::npos) << r.err;
  auto k = RunCella({"run", "--kernel", "/nonexistent/vmlinuz", "--", "true"}, "",
                    std::chrono::seconds(20));
  EXPECT_EQ(k.exit_code, 125) << Describe(k);
  EXPECT_NE(k.err.find("/nonexistent/vmlinuz"), std::string::npos) << k.err;
}

}  // namespace
}  // namespace cella::test
