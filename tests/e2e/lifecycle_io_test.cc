// Getting data and people into long-lived sandboxes: -it through a real
// PTY, cp both ways, published ports and port-forward, named volumes in
// their three modes.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pty.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <fstream>
#include <thread>

#include "lifecycle_fixture.h"
#include "support/tcp.h"

namespace cella::test {
namespace {

using cella::testing::EchoThrough;
using cella::testing::FreePort;

// Runs `cella ARGS` on a new PTY (window rows x cols), types `input` once
// `wait_for` has appeared, and returns everything printed plus the exit code.
struct PtyRun {
  std::string out;
  int exit_code = -1;
};
PtyRun RunOnPty(const std::vector<std::string>& args, const std::string& wait_for,
                const std::string& input, unsigned short rows, unsigned short cols) {
  PtyRun result;
  winsize ws{};
  ws.ws_row = rows;
  ws.ws_col = cols;
  int master = -1;
  std::vector<std::string> storage = {CELLA_BINARY};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = ::forkpty(&master, nullptr, nullptr, &ws);
  if (pid < 0) return result;
  if (pid == 0) {
    ::execv(CELLA_BINARY, argv.data());
    ::_exit(127);
  }
  bool typed = false;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  for (;;) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      break;
    }
    pollfd pfd{master, POLLIN, 0};
    int rc = ::poll(&pfd, 1, 100);
    if (rc > 0) {
      char buf[4096];
      ssize_t n = ::read(master, buf, sizeof buf);
      if (n <= 0) break;  // EIO: the child side closed
      result.out.append(buf, static_cast<size_t>(n));
    }
    if (!typed && result.out.find(wait_for) != std::string::npos) {
      typed = true;
      if (::write(master, input.data(), input.size()) != static_cast<ssize_t>(input.size())) break;
    }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ::close(master);
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  return result;
}

TEST_F(LifecycleTest, InteractiveTtyThroughARealPty) {
  // `run -it`: the main process has a terminal of our window's size.
  auto run = RunOnPty({"run", "-it", "--", "sh"}, "#", "stty size; tty; exit 7\r", 40, 100);
  EXPECT_EQ(run.exit_code, 7) << run.out;
  EXPECT_NE(run.out.find("40 100"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("/dev/pts/"), std::string::npos) << run.out;

  std::string id = RunDetached({"--name", "t"});
  ASSERT_FALSE(id.empty());
  auto exec =
      RunOnPty({"exec", "-it", "t", "--", "sh"}, "#", "echo $((2+3)); stty size; exit 4\r", 30, 90);
  EXPECT_EQ(exec.exit_code, 4) << exec.out;
  EXPECT_NE(exec.out.find("5\r\n"), std::string::npos) << exec.out;
  EXPECT_NE(exec.out.find("30 90"), std::string::npos) << exec.out;
  // -i without -t: stdin is a plain pipe.
  auto piped = RunCella({"exec", "-i", "t", "--", "sh", "-c", "tr a-z A-Z"}, "shout\n");
  EXPECT_EQ(piped.out, "SHOUT\n") << Describe(piped);
}

TEST_F(LifecycleTest, CopyBothWaysKeepsModesOwnersContentAndLeavesNoTemp) {
  std::string id = RunDetached({"--name", "cp"});
  ASSERT_FALSE(id.empty());
  std::string src = home_ + "/src";
  std::filesystem::create_directories(src + "/tree/sub");
  {
    std::ofstream(src + "/tree/hello.txt") << "hello\n";
    std::ofstream big(src + "/tree/sub/big.bin", std::ios::binary);
    for (int i = 0; i < 200000; ++i) big << static_cast<char>(i * 7 % 251);
  }
  ASSERT_EQ(::chmod((src + "/tree/hello.txt").c_str(), 0640), 0);
  ASSERT_EQ(::chown((src + "/tree/hello.txt").c_str(), 1234, 5678), 0);
  ASSERT_EQ(::chmod((src + "/tree/sub").c_str(), 0750), 0);
  ASSERT_EQ(::symlink("hello.txt", (src + "/tree/link").c_str()), 0);

  // -a keeps the source's owners both ways (docker cp -a).
  auto in = RunCella({"cp", "-a", src + "/tree", "cp:/root/"});
  ASSERT_EQ(in.exit_code, 0) << Describe(in);
  auto check = RunCella({"exec", "cp", "--", "sh", "-c",
                         "cd /root/tree && stat -c '%n %a %u %g' hello.txt sub && "
                         "readlink link && md5sum sub/big.bin | cut -c1-32"});
  ASSERT_EQ(check.exit_code, 0) << Describe(check);
  auto host_md5 = RunProcess({"sh", "-c", "md5sum " + src + "/tree/sub/big.bin | cut -c1-32"});
  EXPECT_EQ(check.out, "hello.txt 640 1234 5678\nsub 750 0 0\nhello.txt\n" + host_md5.out);

  auto out = RunCella({"cp", "-a", "cp:/root/tree", home_ + "/back"});
  ASSERT_EQ(out.exit_code, 0) << Describe(out);
  struct stat st {};
  ASSERT_EQ(::stat((home_ + "/back/hello.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_EQ(st.st_uid, 1234u);
  EXPECT_EQ(st.st_gid, 5678u);
  auto diff = RunProcess({"diff", "-r", src + "/tree", home_ + "/back"});
  EXPECT_EQ(diff.exit_code, 0) << Describe(diff);

  // Without -a, a guest's setuid file lands as the caller's, bits dropped:
  // the guest must not plant setuid binaries on the host.
  auto planted = RunCella({"exec", "cp", "--", "sh", "-c",
                           "echo x > /root/suid && chown 0:0 /root/suid && chmod 6777 /root/suid"});
  ASSERT_EQ(planted.exit_code, 0) << Describe(planted);
  auto suid = RunCella({"cp", "cp:/root/suid", home_ + "/suid"});
  ASSERT_EQ(suid.exit_code, 0) << Describe(suid);
  ASSERT_EQ(::stat((home_ + "/suid").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0777u);
  EXPECT_EQ(st.st_uid, ::geteuid());

  // A single file out of the guest into an existing directory.
  auto one = RunCella({"cp", "cp:/etc/hostname", home_ + "/"});
  EXPECT_EQ(one.exit_code, 0) << Describe(one);
  EXPECT_TRUE(std::filesystem::exists(home_ + "/hostname"));
  auto no_side = RunCella({"cp", src, home_ + "/x"});
  EXPECT_EQ(no_side.exit_code, 125);

  // A copy in cut short by the VM's death leaves no temp file behind once
  // the sandbox boots again. The temp is synced to the disk before the kill,
  // so only the guest's clean-up at boot can make it disappear.
  {
    std::ofstream huge(src + "/huge.bin", std::ios::binary);
    huge.seekp((std::streamoff{512} << 20) - 1);
    huge.put('\0');
  }
  std::thread copier([&] {
    (void)RunCella({"cp", src + "/huge.bin", "cp:/root/huge.bin"}, "", std::chrono::seconds(120));
  });
  bool seen = false;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!seen && std::chrono::steady_clock::now() < deadline) {
    auto ls = RunCella({"exec", "cp", "--", "sh", "-c", "ls -a /root | grep -c 'cella-' && sync"});
    seen = ls.exit_code == 0 && ls.out.rfind("1\n", 0) == 0;
  }
  auto kill = RunCella({"kill", "cp"});
  copier.join();
  ASSERT_TRUE(seen) << "the upload's temp file never appeared in /root";
  ASSERT_EQ(kill.exit_code, 0) << Describe(kill);
  auto start = RunCella({"start", "cp"}, "", std::chrono::seconds(300));
  ASSERT_EQ(start.exit_code, 0) << Describe(start);
  auto after = RunCella({"exec", "cp", "--", "ls", "-a", "/root"});
  ASSERT_EQ(after.exit_code, 0) << Describe(after);
  EXPECT_EQ(after.out.find("cella-"), std::string::npos) << after.out;
  EXPECT_NE(after.out.find("tree"), std::string::npos) << after.out;
}

TEST_F(LifecycleTest, PublishedPortAndPortForwardReachAGuestServer) {
  uint16_t published = FreePort();
  std::string id = RunDetached({"-p", std::to_string(published) + ":7000", "--", "busybox", "nc",
                                "-ll", "-p", "7000", "-e", "cat"});
  ASSERT_FALSE(id.empty());
  EXPECT_EQ(EchoThrough(published, "ping over -p\n"), "ping over -p\n");
  auto ps = RunCella({"ps"});
  EXPECT_NE(ps.out.find("127.0.0.1:" + std::to_string(published) + "->7000/tcp"), std::string::npos)
      << ps.out;

  uint16_t forwarded = FreePort();
  std::thread forwarder([&] {
    auto r = RunProcess({CELLA_BINARY, "port-forward", id, std::to_string(forwarded) + ":7000"}, "",
                        std::chrono::seconds(120));
    EXPECT_EQ(r.exit_code, 0) << Describe(r);
    EXPECT_NE(r.out.find("Forwarding"), std::string::npos) << r.out;
  });
  EXPECT_EQ(EchoThrough(forwarded, "ping over port-forward\n"), "ping over port-forward\n");
  // Interrupt it as Ctrl-C would.
  RunProcess({"pkill", "-INT", "-f", "port-forward " + id});
  forwarder.join();
}

TEST_F(LifecycleTest, VolumesPersistAndFollowTheirModes) {
  auto create = RunCella({"volume", "create", "--size", "64m", "data"});
  ASSERT_EQ(create.exit_code, 0) << Describe(create);
  std::string writer = RunDetached({"--name", "writer", "-v", "data:/data"});
  ASSERT_FALSE(writer.empty());
  auto wrote = RunCella({"exec", "writer", "--", "sh", "-c", "echo one > /data/f; sync"});
  ASSERT_EQ(wrote.exit_code, 0) << Describe(wrote);

  // rw is exclusive: neither another rw nor a ro user while it runs.
  auto second_rw = RunCella({"run", "-d", "-v", "data:/data"});
  EXPECT_EQ(second_rw.exit_code, 125);
  EXPECT_NE(second_rw.err.find("writer"), std::string::npos) << second_rw.err;
  auto ro_while_rw = RunCella({"run", "-d", "-v", "data:/data:ro"});
  EXPECT_EQ(ro_while_rw.exit_code, 125) << Describe(ro_while_rw);
  auto rm_used = RunCella({"volume", "rm", "data"});
  EXPECT_EQ(rm_used.exit_code, 125);
  EXPECT_NE(rm_used.err.find("in use"), std::string::npos) << rm_used.err;

  // Survives stop/start of its sandbox.
  ASSERT_EQ(RunCella({"stop", "writer"}).exit_code, 0);
  ASSERT_EQ(RunCella({"start", "writer"}, "", std::chrono::seconds(300)).exit_code, 0);
  EXPECT_EQ(RunCella({"exec", "writer", "--", "cat", "/data/f"}).out, "one\n");
  ASSERT_EQ(RunCella({"stop", "writer"}).exit_code, 0);

  // ro to many at once; overlay gives each its own throwaway layer.
  std::string r1 = RunDetached({"--name", "r1", "-v", "data:/data:ro"});
  std::string o1 = RunDetached({"--name", "o1", "-v", "data:/data:overlay"});
  std::string o2 = RunDetached({"--name", "o2", "-v", "data:/data:overlay"});
  ASSERT_FALSE(r1.empty() || o1.empty() || o2.empty());
  EXPECT_EQ(RunCella({"exec", "r1", "--", "cat", "/data/f"}).out, "one\n");
  auto ro_write = RunCella({"exec", "r1", "--", "sh", "-c", "echo x > /data/g"});
  EXPECT_NE(ro_write.exit_code, 0);
  EXPECT_EQ(RunCella({"exec", "o1", "--", "sh", "-c", "echo mine > /data/f; cat /data/f"}).out,
            "mine\n");
  EXPECT_EQ(RunCella({"exec", "o2", "--", "cat", "/data/f"}).out, "one\n");
  auto writer_again = RunCella({"start", "writer"});
  EXPECT_EQ(writer_again.exit_code, 125) << Describe(writer_again);

  for (const char* s : {"r1", "o1", "o2"}) RunCella({"rm", "-f", s});
  // A sandbox after all of them still sees the original, not o1's change.
  auto reader = RunCella({"run", "-v", "data:/data:ro", "--", "cat", "/data/f"});
  EXPECT_EQ(reader.out, "one\n") << Describe(reader);

  // Data survives a crash of the host side once the guest flushed it.
  ASSERT_EQ(RunCella({"start", "writer"}, "", std::chrono::seconds(300)).exit_code, 0);
  ASSERT_EQ(RunCella({"exec", "writer", "--", "sh", "-c", "echo two > /data/f; sync"}).exit_code,
            0);
  int supervisor = Inspect("writer").value("supervisor_pid", 0);
  ASSERT_EQ(::kill(supervisor, SIGKILL), 0);
  ASSERT_TRUE(WaitGone(supervisor));
  EXPECT_EQ(State("writer"), "failed");
  auto after_crash = RunCella({"run", "-v", "data:/data:ro", "--", "cat", "/data/f"});
  EXPECT_EQ(after_crash.out, "two\n") << Describe(after_crash);

  auto ls = RunCella({"volume", "ls"});
  EXPECT_NE(ls.out.find("data"), std::string::npos) << ls.out;
  RunCella({"rm", "-f", "writer"});
  auto rm = RunCella({"volume", "rm", "data"});
  EXPECT_EQ(rm.exit_code, 0) << Describe(rm);
  EXPECT_FALSE(std::filesystem::exists(home_ + "/volumes/data"));
}

}  // namespace
}  // namespace cella::test
