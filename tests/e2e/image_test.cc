// Images end to end through the `cella` binary: pull from local registries
// (plain HTTP, TLS + basic auth, bearer tokens), run with the image's config,
// layer semantics, refusal of corrupt and hostile content, import, gc.
// Fixtures: tests/fixtures (registry.sh), see image_fixture.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "image_fixture.h"

namespace cella::test {
namespace {

class Image : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fixture().ok()) << "image fixtures unavailable (see the failure above)";
    home_ = FreshCellaHome();
  }
  void TearDown() override {
    if (!HasFailure()) RemoveCellaHomes();
  }
  static const ImageFixture& fixture() { return ImageFixture::Get(); }
  std::string Plain(const std::string& name) const {
    return fixture().Value("PLAIN_REGISTRY") + "/test/" + name;
  }
  ProcessResult Cella(const std::vector<std::string>& args, const std::string& input = "") {
    return CellaIn(home_, args, input);
  }
  std::string home_;
};

std::vector<std::string> SplitCommas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(item);
  return out;
}

// Stored blobs: files named by their 64-hex digest (the store may keep
// other files, e.g. per-blob locks, beside them).
size_t CountBlobs(const std::filesystem::path& dir) {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string name = e.path().filename().string();
    if (e.is_regular_file() && name.size() == 64 &&
        name.find_first_not_of("0123456789abcdef") == std::string::npos)
      ++n;
  }
  return n;
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST_F(Image, DebianImageRunsPython) {
  auto r = Cella({"run", "--image", Plain("debian"), "--", "python3", "-c", "print(6*7)"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "42\n");
}

// A privileged guest program freezes PID 1 (and with it the agent) with
// ptrace, then says so on the console. The host must not wait on it.
class FrozenAgent : public Image {
 protected:
  std::string RunFrozen() {
    auto run =
        Cella({"run", "-d", "--privileged", "--image", Plain("debian"), "--", "sleep", "100000"});
    EXPECT_EQ(run.exit_code, 0) << Describe(run);
    std::string id = run.out;
    while (!id.empty() && id.back() == '\n') id.pop_back();
    if (id.empty()) return id;
    // Perl's syscall() needs no libc wrapper (the image's python3 has no
    // ctypes): PTRACE_SEIZE + PTRACE_INTERRUPT stop PID 1 and leave it so.
    const char* freeze = R"PL(
sleep 1;  # let this exec's answer get out first
my $ok = syscall(101, 0x4206, 1, 0, 0) == 0 && syscall(101, 0x4207, 1, 0, 0) == 0;
my $why = $ok ? "frozen" : "not frozen " . ($! + 0);
if (open(my $c, '>', '/dev/console')) {
  print $c "cella-test: pid 1 $why\n";
  close $c;
}
sleep 100000;
)PL";
    auto exec = Cella({"exec", "-i", id, "--", "sh", "-c",
                       "cat > /tmp/freeze.pl && setsid -f perl /tmp/freeze.pl "
                       "</dev/null >/dev/null 2>&1"},
                      freeze);
    EXPECT_EQ(exec.exit_code, 0) << Describe(exec);
    std::string console = home_ + "/sandboxes/" + id + "/console.log";
    for (int i = 0; i < 1200; ++i) {  // bounded: 120 s (perl in a loaded TCG guest)
      std::ifstream in(console);
      std::stringstream text;
      text << in.rdbuf();
      if (Contains(text.str(), "cella-test: pid 1 frozen")) return id;
      if (Contains(text.str(), "cella-test: pid 1 not frozen")) {
        ADD_FAILURE() << "freeze failed: " << text.str();
        return id;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ADD_FAILURE() << "the guest never reported pid 1 frozen (" << console << ")";
    return id;
  }

  std::string State(const std::string& id) {
    auto r = Cella({"inspect", id});
    auto doc = nlohmann::json::parse(r.out, nullptr, false);
    if (doc.is_array() && !doc.empty()) doc = doc[0];
    return doc.is_object() ? doc.value("state", std::string()) : r.out;
  }
};

TEST_F(FrozenAgent, StopEndsWithinItsGraceAndKillOvertakesALongStop) {
  std::string short_stop = RunFrozen();
  ASSERT_FALSE(short_stop.empty());
  std::string long_stop = RunFrozen();
  ASSERT_FALSE(long_stop.empty());

  // stop -t 5: the agent never answers; ACPI finds no listener; SIGKILL
  // ends it within the grace plus a small fixed bound.
  auto start = std::chrono::steady_clock::now();
  auto stop = Cella({"stop", "-t", "5", short_stop});
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(stop.exit_code, 0) << Describe(stop);
  EXPECT_LT(took, std::chrono::seconds(15));
  EXPECT_EQ(State(short_stop), "stopped");

  // A stop with a long grace is under way; kill wins at once.
  std::thread stopper([&] { Cella({"stop", "-t", "600", long_stop}); });
  std::this_thread::sleep_for(std::chrono::seconds(2));
  start = std::chrono::steady_clock::now();
  auto kill = Cella({"kill", long_stop});
  took = std::chrono::steady_clock::now() - start;
  stopper.join();
  EXPECT_EQ(kill.exit_code, 0) << Describe(kill);
  EXPECT_LT(took, std::chrono::seconds(15));
  EXPECT_EQ(State(long_stop), "exited");
}

// A privileged guest program makes PID 1 (where the agent runs) write
// garbage on the agent link: ptrace injects one write(2) on the port's fd.
// The host can no longer control that VM: the sandbox must say failed and
// why, and its VM must be gone, instead of "Up" with exec failing.
TEST_F(FrozenAgent, GarbageOnTheAgentLinkFailsTheSandboxVisibly) {
  auto run =
      Cella({"run", "-d", "--privileged", "--image", Plain("debian"), "--", "sleep", "100000"});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  std::string id = run.out;
  while (!id.empty() && id.back() == '\n') id.pop_back();
  ASSERT_FALSE(id.empty());
  // Stops PID 1 (PTRACE_SEIZE + INTERRUPT), points it at `syscall; int3`
  // with write(port fd, 64 garbage bytes below its stack pointer), runs
  // that, restores code and registers and detaches; says what happened on
  // the console. Perl, whose syscall() needs no libc wrapper: the image's
  // python3 has no ctypes.
  const char* inject = R"PL(
use strict;
use warnings;
no warnings "portable";
sub say_console {
  open(my $c, '>', '/dev/console') or return;
  print $c "cella-test: $_[0]\n";
  close $c;
}
my $pid = 1;
# ptrace(2) without a libc wrapper: PEEKTEXT stores the word at `data`.
sub pt {
  my $r = syscall(101, $_[0], $pid, $_[1], $_[2]);
  die "ptrace $_[0]: $!\n" if $r == -1;
  return $r;
}
eval {
  sleep 1;  # let this exec's answer get out first
  my $port;
  opendir(my $d, "/proc/$pid/fd") or die "opendir: $!\n";
  for my $n (readdir $d) {
    my $l = readlink("/proc/$pid/fd/$n");
    $port = $n + 0 if defined $l && $l =~ m{^/dev/vport};
  }
  die "no agent port among pid 1's fds\n" unless defined $port;
  pt(0x4206, 0, 0);  # SEIZE
  pt(0x4207, 0, 0);  # INTERRUPT
  waitpid($pid, 0x40000000) == $pid or die "waitpid: $!\n";
  my $saved = "\0" x 216;
  pt(12, 0, $saved);  # GETREGS
  my @r = unpack('Q<27', $saved);
  my ($rip, $rsp) = ($r[16], $r[19]);
  my $word = "\0" x 8;
  pt(1, $rip, $word);  # PEEKTEXT
  my $code = unpack('Q<', $word);
  my $buf = ($rsp - 512) & ~0xf;  # below the red zone, surely mapped
  pt(5, $buf + 8 * $_, 0x7f7f7f7f7f7f7f7f) for 0 .. 7;  # POKEDATA garbage
  pt(4, $rip, ($code & ~0xffffff) | 0xcc050f);  # POKETEXT: syscall; int3
  my @n = @r;
  @n[10, 14, 13, 12, 15] = (1, $port, $buf, 64, 0xffffffffffffffff);  # write(port, buf, 64)
  my $regs = pack('Q<27', @n);
  pt(13, 0, $regs);  # SETREGS
  pt(7, 0, 0);       # CONT to the int3
  waitpid($pid, 0x40000000) == $pid or die "waitpid: $!\n";
  pt(13, 0, $saved);   # restore registers
  pt(4, $rip, $code);  # and code
  pt(17, 0, 0);        # DETACH
  say_console('garbage written');
};
say_console("inject failed: $@") if $@;
)PL";
  auto exec = Cella({"exec", "-i", id, "--", "sh", "-c",
                     "cat > /tmp/inject.pl && setsid -f perl /tmp/inject.pl "
                     "</dev/null >/dev/null 2>&1"},
                    inject);
  EXPECT_EQ(exec.exit_code, 0) << Describe(exec);
  std::string state;
  for (int i = 0; i < 1200; ++i) {  // bounded: 120 s (perl in a loaded TCG guest)
    state = State(id);
    if (state == "failed") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::ifstream in(home_ + "/sandboxes/" + id + "/console.log");
  std::stringstream console;
  console << in.rdbuf();
  ASSERT_EQ(state, "failed") << "console:\n" << console.str();
  auto inspect = Cella({"inspect", id});
  EXPECT_TRUE(Contains(inspect.out, "the guest agent link failed (guest agent broke the protocol"))
      << inspect.out;
  EXPECT_TRUE(Contains(inspect.out, "can no longer be controlled")) << inspect.out;
  auto ps = Cella({"ps", "-a", "--json"});
  EXPECT_TRUE(Contains(ps.out, "the guest agent link failed")) << ps.out;
  EXPECT_TRUE(Contains(Cella({"ps", "-a"}).out, "Failed: the guest agent lin"));
  auto again = Cella({"exec", id, "--", "true"});
  EXPECT_NE(again.exit_code, 0);
  EXPECT_TRUE(Contains(again.err, "is failed")) << Describe(again);
}

TEST_F(Image, ConfigEnvWorkdirUserApplyAndShadowKeepsModeAndOwner) {
  auto r = Cella({"run", "--image", Plain("busybox"), "--", "sh", "-c",
                  "echo \"$GREETING\"; pwd; id -u; id -g; stat -c '%a %u %g' /etc/shadow"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "from-image\n/srv\n1000\n1000\n640 0 0\n");
}

TEST_F(Image, ImageCmdRunsWhenNoCommandIsGiven) {
  auto r = Cella({"run", "--image", Plain("busybox")});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "from-image\n");
}

// The docker form: IMAGE is the first word, the command follows; rmi of an
// image a sandbox uses is refused, rmi -f only untags it, and gc keeps what
// the sandbox boots from, so it starts again (issue 17, items 2 and 4).
TEST_F(Image, ImageIsPositionalAndRmiGcKeepWhatASandboxUses) {
  auto run = Cella({"run", "-d", "--name", "u", Plain("busybox"), "sleep", "1000"});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  auto ps = Cella({"ps", "--json"});
  EXPECT_TRUE(Contains(ps.out, "sleep")) << Describe(ps);
  auto stop = Cella({"stop", "-t", "0", "u"});
  ASSERT_EQ(stop.exit_code, 0) << Describe(stop);
  auto refused = Cella({"rmi", Plain("busybox")});
  EXPECT_EQ(refused.exit_code, 125) << Describe(refused);
  EXPECT_TRUE(Contains(refused.err, "is used by sandbox u")) << Describe(refused);
  auto forced = Cella({"rmi", "-f", Plain("busybox")});
  EXPECT_EQ(forced.exit_code, 0) << Describe(forced);
  auto gc = Cella({"image", "gc"});
  EXPECT_EQ(gc.exit_code, 0) << Describe(gc);
  auto start = Cella({"start", "u"});
  ASSERT_EQ(start.exit_code, 0) << Describe(start);
  auto exec = Cella({"exec", "u", "echo", "back"});
  EXPECT_EQ(exec.out, "back\n") << Describe(exec);
  auto rm = Cella({"rm", "-f", "u"});
  EXPECT_EQ(rm.exit_code, 0) << Describe(rm);
}

TEST_F(Image, UserFlagsOverrideTheImageConfig) {
  auto r = Cella({"run", "--image", Plain("busybox"), "-u", "0", "-w", "/tmp", "-e",
                  "GREETING=from-user", "--", "sh", "-c", "echo \"$GREETING\"; pwd; id -u"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "from-user\n/tmp\n0\n");
}

TEST_F(Image, WhiteoutsDeleteAndOpaqueDirsHideLowerContent) {
  auto r = Cella({"run", "--image", Plain("layers"), "--", "sh", "-c",
                  "ls -A /data; echo --; ls -A /opq; cat /data/keep"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "keep\n--\nnew\nkept\n");
}

TEST_F(Image, PullPrintsDigestAndImagesRmiGcManageTheStore) {
  // docker's run --pull never: an image not in the store is an error, and
  // nothing is pulled (nor booted).
  auto never = Cella({"run", "--pull", "never", Plain("busybox"), "true"});
  EXPECT_EQ(never.exit_code, 125) << Describe(never);
  EXPECT_TRUE(Contains(never.err, "--pull never")) << Describe(never);
  EXPECT_EQ(Cella({"run", "--pull", "sometimes", Plain("busybox"), "true"}).exit_code, 125);
  auto pull = Cella({"pull", Plain("busybox")});
  ASSERT_EQ(pull.exit_code, 0) << Describe(pull);
  EXPECT_EQ(pull.out, fixture().Value("BUSYBOX_MANIFEST_DIGEST") + "\n");
  // Piped stderr: one summary line, no per-layer redraws.
  EXPECT_EQ(std::count(pull.err.begin(), pull.err.end(), '\n'), 1) << pull.err;

  auto listed = Cella({"images", "--json"});
  ASSERT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_TRUE(Contains(listed.out, fixture().Value("BUSYBOX_MANIFEST_DIGEST"))) << listed.out;
  EXPECT_TRUE(Contains(listed.out, Plain("busybox"))) << listed.out;

  // docker's `rmi ID`: by the digest `images` shows, or an unambiguous
  // prefix of it (with or without sha256:).
  std::string digest = fixture().Value("BUSYBOX_MANIFEST_DIGEST");  // sha256:...
  auto no_match = Cella({"rmi", "0000ffff"});
  EXPECT_EQ(no_match.exit_code, 125) << Describe(no_match);
  auto rmi = Cella({"rmi", digest.substr(7, 12)});
  ASSERT_EQ(rmi.exit_code, 0) << Describe(rmi);
  EXPECT_TRUE(Contains(rmi.out, Plain("busybox"))) << Describe(rmi);
  auto after = Cella({"images", "--json"});
  EXPECT_FALSE(Contains(after.out, Plain("busybox"))) << after.out;
  auto again = Cella({"rmi", Plain("busybox")});
  EXPECT_EQ(again.exit_code, 125) << Describe(again);
  EXPECT_TRUE(Contains(again.err, "no such image")) << again.err;

  std::filesystem::path blobs = std::filesystem::path(home_) / "images/blobs/sha256";
  ASSERT_GT(CountBlobs(blobs), 0u);
  auto gc = Cella({"image", "gc"});
  ASSERT_EQ(gc.exit_code, 0) << Describe(gc);
  EXPECT_EQ(CountBlobs(blobs), 0u) << gc.out;
}

TEST_F(Image, TwoImagesSharingABaseLayerStoreItOnce) {
  for (const char* name : {"busybox", "layers"}) {
    auto r = Cella({"pull", Plain(name)});
    ASSERT_EQ(r.exit_code, 0) << Describe(r);
  }
  std::set<std::string> layers;
  for (const char* key : {"BUSYBOX_LAYER_DIGESTS", "LAYERS_LAYER_DIGESTS"})
    for (const auto& d : SplitCommas(fixture().Value(key))) layers.insert(d);
  ASSERT_EQ(layers.size(), 3u) << "fixture: the two images should share one layer";
  // Each image adds its manifest and config; the shared layer counts once.
  EXPECT_EQ(CountBlobs(std::filesystem::path(home_) / "images/blobs/sha256"), layers.size() + 4);
}

TEST_F(Image, PlatformFlagPicksTheManifestFromAnIndex) {
  auto arm = Cella({"pull", "--platform", "linux/arm64", Plain("multi")});
  ASSERT_EQ(arm.exit_code, 0) << Describe(arm);
  EXPECT_EQ(arm.out, fixture().Value("MULTI_ARM64_DIGEST") + "\n");
  auto amd = CellaIn(FreshCellaHome("-amd64"), {"pull", Plain("multi")});
  ASSERT_EQ(amd.exit_code, 0) << Describe(amd);
  EXPECT_EQ(amd.out, fixture().Value("MULTI_AMD64_DIGEST") + "\n");
  auto none = Cella({"pull", "--platform", "linux/s390x", Plain("multi")});
  EXPECT_EQ(none.exit_code, 125) << Describe(none);
  EXPECT_TRUE(Contains(none.err, "linux/arm64")) << "the error should list what is offered\n"
                                                 << none.err;
}

TEST_F(Image, CorruptBlobIsRefused) {
  auto r = Cella({"pull", Plain("corrupt")});
  EXPECT_EQ(r.exit_code, 125) << Describe(r);
  EXPECT_TRUE(Contains(r.err, fixture().Value("CORRUPT_BLOB_DIGEST"))) << r.err;
  auto listed = Cella({"images", "--json"});
  EXPECT_FALSE(Contains(listed.out, Plain("corrupt"))) << listed.out;
  // The same pull through `run` fails before any VM boots.
  auto run = Cella({"run", "--image", Plain("corrupt"), "--", "true"});
  EXPECT_EQ(run.exit_code, 125) << Describe(run);
}

TEST_F(Image, HostileLayersAreRefusedAndTouchNothingOnTheHost) {
  struct Case {
    const char* tag;
    const char* expected_in_error;  // the entry the error must name
  };
  for (const Case& c :
       {Case{"hostile-dotdot", "cella-fixture-pwned-dotdot"}, Case{"hostile-symlink", "escape"},
        Case{"hostile-hardlink", "passwd-of-host"}, Case{"hostile-huge", "huge.bin"}}) {
    auto r = Cella({"run", "--image", Plain(c.tag), "--", "true"});
    EXPECT_EQ(r.exit_code, 125) << c.tag << ": " << Describe(r);
    EXPECT_TRUE(Contains(r.err, c.expected_in_error)) << c.tag << ": " << r.err;
  }
  EXPECT_FALSE(std::filesystem::exists("/tmp/cella-fixture-pwned-dotdot"));
  EXPECT_FALSE(std::filesystem::exists("/tmp/cella-fixture-pwned-symlink"));
}

TEST_F(Image, TlsRegistryWithBasicAuthNeedsLogin) {
  const std::string ref = fixture().Value("TLS_REGISTRY") + "/test/busybox";
  const std::string ca = fixture().Value("CA_FILE");
  auto before = Cella({"pull", "--ca-file", ca, ref});
  EXPECT_EQ(before.exit_code, 125) << Describe(before);
  EXPECT_TRUE(Contains(before.err, "cella login")) << "the error should say what to do\n"
                                                   << before.err;

  auto login = Cella({"login", "-u", fixture().Value("REGISTRY_USER"), "--password-stdin",
                      fixture().Value("TLS_REGISTRY")},
                     fixture().Value("REGISTRY_PASSWORD") + "\n");
  ASSERT_EQ(login.exit_code, 0) << Describe(login);
  auto after = Cella({"pull", "--ca-file", ca, ref});
  ASSERT_EQ(after.exit_code, 0) << Describe(after);
  EXPECT_EQ(after.out, fixture().Value("BUSYBOX_MANIFEST_DIGEST") + "\n");

  // Without the test CA the server certificate is not trusted.
  auto untrusted = CellaIn(FreshCellaHome("-noca"), {"pull", ref});
  EXPECT_EQ(untrusted.exit_code, 125) << Describe(untrusted);
}

int TokensIssued() {
  std::ifstream in(ImageFixture::Get().dir() + "/token-server/tokens-issued");
  int n = 0;
  in >> n;
  return n;
}

TEST_F(Image, TokenAuthRegistryWorks) {
  int before = TokensIssued();
  auto r = Cella({"pull", fixture().Value("TOKEN_REGISTRY") + "/test/busybox"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, fixture().Value("BUSYBOX_MANIFEST_DIGEST") + "\n");
  // The registry only answers with a token from the token server.
  EXPECT_GT(TokensIssued(), before);
}

TEST_F(Image, ImportOciLayoutThenRunIt) {
  auto imported = Cella({"import", fixture().Value("OCI_LAYOUT"), "example.test/imported:import"});
  ASSERT_EQ(imported.exit_code, 0) << Describe(imported);
  EXPECT_TRUE(Contains(imported.out, fixture().Value("IMPORT_MANIFEST_DIGEST"))) << imported.out;
  auto r = Cella(
      {"run", "--image", "example.test/imported:import", "--", "head", "-n", "1", "/unique.txt"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "imported from an OCI layout\n");
}

TEST_F(Image, CellaOwnFailuresExit125WithAClearMessage) {
  auto bad = Cella({"run", "--image", "Not A Reference!", "--", "true"});
  EXPECT_EQ(bad.exit_code, 125) << Describe(bad);
  EXPECT_TRUE(Contains(bad.err, "reference")) << bad.err;

  auto unreachable = Cella({"pull", "127.0.0.1:1/test/busybox"});
  EXPECT_EQ(unreachable.exit_code, 125) << Describe(unreachable);
  EXPECT_TRUE(Contains(unreachable.err, "127.0.0.1:1")) << unreachable.err;

  auto missing = Cella({"pull", Plain("no-such-image")});
  EXPECT_EQ(missing.exit_code, 125) << Describe(missing);
  EXPECT_TRUE(Contains(missing.err, "no-such-image")) << missing.err;
}

}  // namespace
}  // namespace cella::test
