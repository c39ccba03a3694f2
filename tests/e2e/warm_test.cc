// Warm starts end to end: sandboxes started from a memory template behave
// as cold ones (every flag), clones are independent (RNG, clock, disks read
// fresh), --cold and CELLA_COLD bypass templates, a changed key part makes a
// new template, and a template build killed half-way is never trusted.
//
// Templates live in the shared cella home; each test uses a memory size no
// other test uses, so its templates are its own.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "lifecycle_fixture.h"
#include "support/tcp.h"

namespace cella::test {
namespace {

using cella::testing::EchoThrough;
using cella::testing::FreePort;

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string TemplatesDir() {
  const char* home = std::getenv("CELLA_HOME");
  return std::string(home != nullptr && *home ? home : "/var/lib/cella") + "/templates";
}

class WarmTest : public LifecycleTest {
 protected:
  // Keys of the committed templates of `memory_mb`.
  std::vector<std::string> TemplatesOf(int memory_mb) {
    auto r = RunCella({"template", "ls", "--json"});
    EXPECT_EQ(r.exit_code, 0) << Describe(r);
    std::vector<std::string> keys;
    auto doc = nlohmann::json::parse(r.out, nullptr, false);
    if (!doc.is_array()) return keys;
    for (const auto& t : doc)
      if (t.value("memory_mb", 0) == memory_mb) keys.push_back(t.value("key", std::string()));
    // Sorted: the listing's order among templates of one second is not fixed.
    std::sort(keys.begin(), keys.end());
    return keys;
  }
  void RemoveTemplatesOf(int memory_mb) {
    for (const std::string& key : TemplatesOf(memory_mb)) RunCella({"template", "rm", key});
  }
  std::string Exec(const std::string& id, const std::string& script) {
    return Trim(ExecScript(id, script));
  }
};

TEST_F(WarmTest, WarmSandboxesHonourEveryFlagAndAreIndependent) {
  constexpr int kMemory = 304;
  const std::string memory = std::to_string(kMemory) + "m";
  RemoveTemplatesOf(kMemory);
  ASSERT_EQ(RunCella({"volume", "create", "--size", "48m", "warmvol"}).exit_code, 0);

  // A host server on the host's loopback: closed to the sandbox unless
  // --allow-host-loopback, on the warm path as on the cold one.
  cella::testing::HelloHttpServer server;
  ASSERT_GT(server.port(), 0);
  const std::string url = "http://10.0.2.2:" + std::to_string(server.port()) + "/";

  // The first run of the shape builds its template and starts from it.
  std::string first = RunDetached({"--memory", memory, "-v", "warmvol:/data", "--", "sh", "-c",
                                   "echo fresh-volume > /data/f; sync; exec sleep 3600"});
  ASSERT_FALSE(first.empty());
  EXPECT_EQ(TemplatesOf(kMemory).size(), 1u);
  EXPECT_EQ(Exec(first, "cat /run/cella/start"), "warm");
  std::string closed = Exec(first, "wget -q -O - " + url + " 2>&1; echo rc=$?");
  EXPECT_NE(closed.find("403"), std::string::npos) << closed;
  EXPECT_EQ(closed.find("hello guest"), std::string::npos) << closed;
  std::string first_random = Exec(first, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'");
  std::string first_mac = Exec(first, "cat /sys/class/net/eth0/address");
  ASSERT_EQ(RunCella({"rm", "-f", first}).exit_code, 0);  // frees the rw volume

  // A warm clone with every kind of flag.
  uint16_t published = FreePort();
  std::string id = RunDetached(
      {"--memory", memory, "-v", "warmvol:/data", "-p", std::to_string(published) + ":7000",
       "--hostname", "warmbox", "-e", "GREETING=hello warm", "-w", "/srv/wd", "-u", "nobody",
       "--allow-host-loopback", "--", "sh", "-c",
       "hostname; echo \"$GREETING\"; pwd; id -un; exec busybox nc -ll -p 7000 -e cat"});
  ASSERT_FALSE(id.empty());
  EXPECT_EQ(TemplatesOf(kMemory).size(), 1u) << "the second run must reuse the template";
  EXPECT_EQ(Exec(id, "cat /run/cella/start"), "warm");
  EXPECT_EQ(EchoThrough(published, "ping warm\n"), "ping warm\n");
  auto logs = RunCella({"logs", id});
  EXPECT_EQ(logs.out, "warmbox\nhello warm\n/srv/wd\nnobody\n") << Describe(logs);
  // The volume is this sandbox's file, not the template's 1 MiB placeholder.
  EXPECT_EQ(Exec(id, "cat /data/f"), "fresh-volume");
  long kib = std::atol(Exec(id, "df -Pk /data | tail -1 | awk '{print $2}'").c_str());
  EXPECT_GT(kib, 20 * 1024) << "the volume's size must be read afresh";
  EXPECT_EQ(Exec(id, "wget -q -O - " + url), "hello guest");
  // Its own RNG and the host's clock; it was never resumed.
  std::string random = Exec(id, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'");
  EXPECT_EQ(random.size(), 64u);
  EXPECT_NE(random, first_random) << "two clones of one template read the same random bytes";
  // Its own MAC address: the template's NIC was probed with another.
  std::string mac = Exec(id, "cat /sys/class/net/eth0/address");
  EXPECT_EQ(mac.size(), 17u) << mac;
  EXPECT_EQ(first_mac.size(), 17u) << first_mac;
  EXPECT_NE(mac, first_mac) << "two clones of one template have the same MAC address";
  long guest_now = std::atol(Exec(id, "date +%s").c_str());
  long host_now = static_cast<long>(std::time(nullptr));
  EXPECT_LE(std::labs(host_now - guest_now), 5) << "guest " << guest_now << " host " << host_now;
  EXPECT_EQ(Exec(id, "cat /run/cella/resume-count 2>/dev/null || echo 0"), "0");
  // The template loaded every module a clone may need (NIC, FUSE shares).
  EXPECT_EQ(Exec(id, "grep -c -E '^(virtio_net|fuse) ' /proc/modules"), "2");
  ASSERT_EQ(RunCella({"rm", "-f", id}).exit_code, 0);
  server.Stop();
  EXPECT_EQ(server.accepted(), 1) << "only the --allow-host-loopback clone got through";

  // --cold and CELLA_COLD=1 boot the kernel, loading only the modules the
  // sandbox needs: the NIC driver with a network, no FUSE without shares,
  // never vsock or virtio_pci (microvm has neither device).
  const std::string modules =
      "cat /run/cella/start; grep -c '^virtio_net ' /proc/modules; "
      "grep -c -E '^(fuse|virtiofs|vsock|virtio_pci) ' /proc/modules; true";
  auto cold = RunCella({"run", "--memory", memory, "--cold", "--", "sh", "-c", modules});
  EXPECT_EQ(cold.exit_code, 0) << Describe(cold);
  EXPECT_EQ(cold.out, "cold\n1\n0\n");
  auto env_cold = RunProcess(
      {CELLA_BINARY, "run", "--memory", memory, "--no-network", "--", "sh", "-c", modules}, "",
      std::chrono::seconds(300), {{"CELLA_COLD", "1"}});
  EXPECT_EQ(env_cold.exit_code, 0) << Describe(env_cold);
  EXPECT_EQ(env_cold.out, "cold\n0\n0\n");
  RemoveTemplatesOf(kMemory);
}

// A sandbox's first boot takes its writable layer from the template (the
// template's own ext4 upper, with the root made on it, copied for each
// clone); a restart attaches the layer as it is, to a template that left it
// unread. Either way each sandbox keeps its own files, and the layer is a
// sound filesystem.
TEST_F(WarmTest, AFirstBootTakesItsWritableLayerFromTheTemplateAndKeepsItsOwnFiles) {
  constexpr int kMemory = 308;
  const std::string memory = std::to_string(kMemory) + "m";
  RemoveTemplatesOf(kMemory);
  std::string a = RunDetached({"--memory", memory, "--", "sleep", "3600"});
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(TemplatesOf(kMemory).size(), 1u) << "the first run builds the seeded template";
  std::string b = RunDetached({"--memory", memory, "--", "sleep", "3600"});
  ASSERT_FALSE(b.empty());
  EXPECT_EQ(TemplatesOf(kMemory).size(), 1u) << "the second run reuses it";
  EXPECT_EQ(Exec(b, "cat /run/cella/start"), "warm");
  EXPECT_EQ(Exec(a, "echo from-a > /root/mine; echo a > /etc/which; cat /root/mine"), "from-a");
  EXPECT_EQ(Exec(b, "echo from-b > /root/mine; cat /root/mine; cat /etc/which 2>/dev/null; true"),
            "from-b")
      << "one clone's writes must not show in another";
  EXPECT_EQ(Exec(a, "cat /root/mine /etc/which"), "from-a\na");
  // The layer is the sandbox's own file, and a sound ext4 once stopped.
  ASSERT_EQ(RunCella({"stop", b}).exit_code, 0);
  const std::string upper = home_ + "/sandboxes/" + b + "/upper.img";
  // The journal replayed (a guest's power-off leaves it to the next
  // mount), then a full check that may change nothing.
  auto replay =
      RunProcess({"e2fsck", "-E", "journal_only", "-y", upper}, "", std::chrono::seconds(120));
  EXPECT_LE(replay.exit_code, 1) << Describe(replay);
  auto fsck = RunProcess({"e2fsck", "-f", "-n", upper}, "", std::chrono::seconds(120));
  EXPECT_EQ(fsck.exit_code, 0) << "the clone's layer is not a sound ext4\n" << Describe(fsck);
  // A restart keeps its files: its layer is attached as it is (another
  // template: one that leaves the layer unread).
  ASSERT_EQ(RunCella({"start", b}).exit_code, 0);
  EXPECT_EQ(Exec(b, "cat /root/mine; cat /etc/which 2>/dev/null; true"), "from-b");
  EXPECT_EQ(TemplatesOf(kMemory).size(), 2u);
  ASSERT_EQ(RunCella({"rm", "-f", a, b}).exit_code, 0);
  RemoveTemplatesOf(kMemory);
}

// `template create` builds ahead of time what a foreground run and a
// detached run's first boot of the shape start from: neither builds one.
TEST_F(WarmTest, TemplateCreateBuildsWhatRunAndDetachedRunStartFrom) {
  constexpr int kMemory = 324;
  const std::string memory = std::to_string(kMemory) + "m";
  RemoveTemplatesOf(kMemory);
  auto created =
      RunCella({"template", "create", "--memory", memory}, "", std::chrono::seconds(300));
  ASSERT_EQ(created.exit_code, 0) << Describe(created);
  std::vector<std::string> keys = TemplatesOf(kMemory);
  ASSERT_EQ(keys.size(), 2u) << Describe(created);
  for (const std::string& key : keys)
    EXPECT_NE(created.out.find(key + "\n"), std::string::npos) << created.out;
  auto run = RunCella({"run", "--memory", memory, "--", "cat", "/run/cella/start"});
  EXPECT_EQ(run.exit_code, 0) << Describe(run);
  EXPECT_EQ(run.out, "warm\n");
  std::string id = RunDetached({"--memory", memory, "--", "sleep", "3600"});
  ASSERT_FALSE(id.empty());
  EXPECT_EQ(Exec(id, "cat /run/cella/start"), "warm");
  EXPECT_EQ(TemplatesOf(kMemory), keys) << "the runs built no template of their own";
  // Nothing new to build a second time: said, and a failure.
  auto again = RunCella({"template", "create", "--memory", memory}, "", std::chrono::seconds(300));
  EXPECT_NE(again.exit_code, 0) << Describe(again);
  ASSERT_EQ(RunCella({"rm", "-f", id}).exit_code, 0);
  RemoveTemplatesOf(kMemory);
}

TEST_F(WarmTest, KilledTemplateBuildIsNeverTrustedAndNewKeyPartsMakeNewTemplates) {
  constexpr int kMemory = 312;
  const std::string memory = std::to_string(kMemory) + "m";
  RemoveTemplatesOf(kMemory);

  // Kill -9 the supervisor while it builds the template (its .partial
  // directory carries its pid; ours is the one with this test's home).
  std::atomic<bool> done{false};
  ProcessResult killed_run;
  std::thread runner([&] {
    killed_run = RunCella({"run", "--memory", memory, "--", "true"}, "", std::chrono::seconds(300));
    done = true;
  });
  pid_t builder = 0;
  std::string partial;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  while (builder == 0 && !done && std::chrono::steady_clock::now() < deadline) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(TemplatesDir(), ec)) {
      std::string name = entry.path().filename().string();
      size_t at = name.find(".partial.");
      if (at == std::string::npos) continue;
      pid_t pid = static_cast<pid_t>(std::atol(name.c_str() + at + 9));
      std::ifstream environ("/proc/" + std::to_string(pid) + "/environ");
      std::stringstream text;
      text << environ.rdbuf();
      if (text.str().find("CELLA_SANDBOX_HOME=" + home_ + '\0') == std::string::npos) continue;
      // Wait until QEMU has started writing the memory file.
      if (!std::filesystem::exists(entry.path() / "memory")) continue;
      builder = pid;
      partial = entry.path().string();
    }
    if (builder == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_NE(builder, 0) << "never saw this test's template being built";
  ASSERT_EQ(::kill(builder, SIGKILL), 0);
  runner.join();
  EXPECT_NE(killed_run.exit_code, 0) << Describe(killed_run);
  EXPECT_TRUE(TemplatesOf(kMemory).empty()) << "a killed build must leave no template";

  // The next run builds a good one (removing the dead builder's leftovers).
  auto next = RunCella({"run", "--memory", memory, "--", "cat", "/run/cella/start"}, "",
                       std::chrono::seconds(300));
  EXPECT_EQ(next.exit_code, 0) << Describe(next);
  EXPECT_EQ(next.out, "warm\n");
  EXPECT_EQ(TemplatesOf(kMemory).size(), 1u);
  EXPECT_FALSE(std::filesystem::exists(partial)) << partial;

  // A rebuilt cella guest (init and agent: a new initramfs) is a new key,
  // and so is rebuilding it again.
  std::string libexec = home_ + "/libexec";
  std::filesystem::create_directory(libexec);
  std::string built = std::filesystem::path(CELLA_BINARY).parent_path().string();
  for (const char* name : {"cella-init", "cella-agent"})
    std::filesystem::copy_file(built + "/" + name, libexec + "/" + name);
  // Bytes after the end of a static ELF change its content, not its code.
  auto rebuild = [&](const std::string& mark) {
    std::ofstream(libexec + "/cella-init", std::ios::app) << mark;
  };
  auto run_with = [&]() {
    return RunProcess({CELLA_BINARY, "run", "--memory", memory, "--", "cat", "/run/cella/start"},
                      "", std::chrono::seconds(300), {{"CELLA_LIBEXEC_DIR", libexec}});
  };
  rebuild("rebuild-1");
  auto other = run_with();
  EXPECT_EQ(other.exit_code, 0) << Describe(other);
  EXPECT_EQ(other.out, "warm\n");
  EXPECT_EQ(TemplatesOf(kMemory).size(), 2u);
  rebuild("rebuild-2");
  auto rebuilt = run_with();
  EXPECT_EQ(rebuilt.exit_code, 0) << Describe(rebuilt);
  EXPECT_EQ(rebuilt.out, "warm\n");
  EXPECT_EQ(TemplatesOf(kMemory).size(), 3u);
  RemoveTemplatesOf(kMemory);
  EXPECT_TRUE(TemplatesOf(kMemory).empty());
}

// A template whose state QEMU refuses (damaged in a way its manifest's
// sizes cannot show) costs one cold boot, said in one notice: the run
// succeeds, the template is dropped, and the next run builds a good one.
TEST_F(WarmTest, ATemplateThatCannotBeRestoredIsDroppedAndTheRunBootsCold) {
  constexpr int kMemory = 316;
  const std::string memory = std::to_string(kMemory) + "m";
  RemoveTemplatesOf(kMemory);
  auto first = RunCella({"run", "--memory", memory, "--", "true"}, "", std::chrono::seconds(300));
  ASSERT_EQ(first.exit_code, 0) << Describe(first);
  auto keys = TemplatesOf(kMemory);
  ASSERT_EQ(keys.size(), 1u);
  const std::string state = TemplatesDir() + "/" + keys[0] + "/state";
  const auto size = std::filesystem::file_size(state);
  std::ofstream(state, std::ios::binary | std::ios::trunc) << std::string(size, 'x');
  ASSERT_EQ(std::filesystem::file_size(state), size);

  auto run = RunCella({"run", "--memory", memory, "--", "cat", "/run/cella/start"}, "",
                      std::chrono::seconds(300));
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  EXPECT_EQ(run.out, "cold\n");
  EXPECT_NE(run.err.find("could not be restored and was removed"), std::string::npos)
      << Describe(run);
  EXPECT_EQ(std::count(run.err.begin(), run.err.end(), '\n'), 1) << "one line: " << run.err;
  EXPECT_TRUE(TemplatesOf(kMemory).empty()) << "the damaged template is dropped";

  auto next = RunCella({"run", "--memory", memory, "--", "cat", "/run/cella/start"}, "",
                       std::chrono::seconds(300));
  EXPECT_EQ(next.exit_code, 0) << Describe(next);
  EXPECT_EQ(next.out, "warm\n");
  EXPECT_TRUE(next.err.empty()) << next.err;
  RemoveTemplatesOf(kMemory);
}

}  // namespace
}  // namespace cella::test
