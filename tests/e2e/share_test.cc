// Host directories and files in the sandbox (-v /host:/guest[:ro|rw|overlay]),
// served over FUSE on the agent link: every mode in one boot (with live
// visibility both ways, ownership and modes, a single file, a relative
// path, a volume and a share inside shares, stop/start, then a start with
// CELLA_SHARE_TRANSPORT=virtiofs keeping the overlay's writes and a dead
// virtiofsd), the escape attempts of a hostile guest in another, shares
// (overlay too) across standby, snapshot restore and fork in a third, and a
// missing share refused before anything boots.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "lifecycle_fixture.h"

namespace cella::test {
namespace {

namespace fs = std::filesystem;

void WriteFile(const std::string& path, const std::string& text, mode_t mode = 0644) {
  std::ofstream(path) << text;
  ASSERT_EQ(::chmod(path.c_str(), mode), 0) << path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The root directory of the virtiofsd serving `stage` (the process that
// pivoted into it: its / is not the host's), as a sorted list of names.
std::vector<std::string> ShareRootEntries(const std::string& stage) {
  for (const auto& proc : fs::directory_iterator("/proc")) {
    std::string name = proc.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string cmdline = ReadFile(proc.path().string() + "/cmdline");
    if (cmdline.find("virtiofsd") == std::string::npos ||
        cmdline.find("source=" + stage + std::string(1, '\0')) == std::string::npos)
      continue;
    std::error_code ec;
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(proc.path() / "root", ec))
      names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    if (!ec && std::find(names.begin(), names.end(), "proc") == names.end()) return names;
  }
  return {"(no virtiofsd found for " + stage + ")"};
}

// The pid of the supervisor's virtiofsd child serving `stage`; 0 if none.
int ChildServing(int supervisor, const std::string& stage) {
  for (const auto& proc : fs::directory_iterator("/proc")) {
    std::string name = proc.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string stat = ReadFile(proc.path().string() + "/stat");
    auto paren = stat.rfind(')');
    if (paren == std::string::npos) continue;
    int ppid = 0;
    char state = 0;
    if (std::sscanf(stat.c_str() + paren + 1, " %c %d", &state, &ppid) != 2) continue;
    std::string cmdline = ReadFile(proc.path().string() + "/cmdline");
    if (ppid == supervisor &&
        cmdline.find("source=" + stage + std::string(1, '\0')) != std::string::npos)
      return std::stoi(proc.path().filename());
  }
  return 0;
}

class ShareTest : public LifecycleTest {
 protected:
  void SetUp() override {
    LifecycleTest::SetUp();
    host_ = home_ + "/host";
    ASSERT_TRUE(fs::create_directories(host_));
  }

  // `cella exec ID -- sh -c SCRIPT`
  ProcessResult Sh(const std::string& id, const std::string& script,
                   const std::vector<std::string>& exec_flags = {}) {
    std::vector<std::string> argv = {"exec"};
    argv.insert(argv.end(), exec_flags.begin(), exec_flags.end());
    argv.insert(argv.end(), {id, "--", "sh", "-c", script});
    return RunCella(argv);
  }

  std::string host_;
};

TEST_F(ShareTest, EveryModeLiveWithOwnershipAcrossStopStart) {
  for (const char* d : {"rw", "ro", "ov", "rel", "inner"}) fs::create_directories(host_ + "/" + d);
  WriteFile(host_ + "/rw/a.txt", "hello\n", 0640);
  WriteFile(host_ + "/ro/r.txt", "read me\n");
  WriteFile(host_ + "/ov/o.txt", "original\n");
  WriteFile(host_ + "/rel/x.txt", "relative\n");
  WriteFile(host_ + "/inner/i.txt", "inner share\n");
  WriteFile(host_ + "/single.txt", "one file\n", 0600);
  WriteFile(host_ + "/ov-single.txt", "host copy\n", 0644);
  WriteFile(host_ + "/ro-single.txt", "look only\n", 0666);
  WriteFile(host_ + "/sibling.txt", "never visible\n");

  // Made beforehand: its "created volume" notice is not the point here.
  ASSERT_EQ(RunCella({"volume", "create", "innervol"}).exit_code, 0);
  // A relative host path resolves against the caller's directory.
  fs::path saved = fs::current_path();
  fs::current_path(host_);
  auto started =
      RunCella({"run", "-d", "-v", host_ + "/rw:/mnt/rw", "-v", host_ + "/ro:/mnt/ro:ro", "-v",
                host_ + "/ov:/mnt/ov:overlay", "-v", host_ + "/single.txt:/etc/single.txt", "-v",
                "./rel:/mnt/rel:ro", "-v", host_ + "/ov-single.txt:/etc/ov-single.txt:overlay",
                "-v", host_ + "/ro-single.txt:/etc/ro-single.txt:ro",
                // Mounts inside shares: a named volume in the rw share, and
                // a share inside the overlay share (listed first: the guest
                // orders them by path).
                "-v", "innervol:/mnt/rw/vol", "-v", host_ + "/inner:/mnt/ov/inner"},
               "", std::chrono::seconds(300));
  fs::current_path(saved);
  ASSERT_EQ(started.exit_code, 0) << Describe(started);
  std::string id = started.out.substr(0, started.out.find('\n'));
  ASSERT_FALSE(id.empty());
  // Every share (overlay ones and ones with mounts inside too) is served
  // over FUSE: the sandbox starts warm, nothing is said.
  EXPECT_EQ(started.err, "");
  auto kinds = Sh(
      id, "grep -E ' /mnt/(rw|ro|ov|rel|rw/vol|ov/inner) ' /proc/mounts | cut -d' ' -f2,3 | sort");
  EXPECT_EQ(kinds.out,
            "/mnt/ov overlay\n/mnt/ov/inner fuse\n/mnt/rel fuse\n/mnt/ro fuse\n/mnt/rw fuse\n"
            "/mnt/rw/vol ext4\n")
      << Describe(kinds);

  // rw: modes kept, guest writes land on the host at once, owned by the
  // guest user (cella runs as root here, so the uid passes through).
  auto r = Sh(id, "stat -c '%a' /mnt/rw/a.txt; cat /mnt/rw/a.txt; cat /mnt/rel/x.txt");
  EXPECT_EQ(r.out, "640\nhello\nrelative\n") << Describe(r);
  r = Sh(id, "echo from-guest > /mnt/rw/b.txt && chmod 751 /mnt/rw/b.txt");
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(ReadFile(host_ + "/rw/b.txt"), "from-guest\n");
  struct stat st {};
  ASSERT_EQ(::stat((host_ + "/rw/b.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0751u);
  EXPECT_EQ(st.st_uid, 0u);
  r = Sh(id, "echo user > /mnt/rw/u.txt", {"-u", "1234:2345"});
  // The directory is root's 0755 on the host: the guest user is refused, as
  // it would be on the host.
  EXPECT_NE(r.exit_code, 0) << Describe(r);
  ASSERT_EQ(::chmod((host_ + "/rw").c_str(), 0777), 0);
  r = Sh(id,
         "for i in $(seq 50); do echo user > /mnt/rw/u.txt 2>/dev/null && exit 0; sleep 0.1; done; "
         "exit 1",
         {"-u", "1234:2345"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  ASSERT_EQ(::stat((host_ + "/rw/u.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 1234u);
  EXPECT_EQ(st.st_gid, 2345u);
  // Host writes show up in the guest (bounded wait: attributes are cached
  // for up to a second).
  WriteFile(host_ + "/rw/a.txt", "changed on host\n", 0640);
  WriteFile(host_ + "/rw/new.txt", "new on host\n");
  r = Sh(id,
         "for i in $(seq 50); do grep -q changed /mnt/rw/a.txt && test -e /mnt/rw/new.txt && "
         "cat /mnt/rw/new.txt && exit 0; sleep 0.1; done; exit 1");
  EXPECT_EQ(r.out, "new on host\n") << Describe(r);

  // ro: readable; not writable, even after the guest remounts it rw (the
  // host exports it read-only).
  r = Sh(id, "cat /mnt/ro/r.txt; echo x > /mnt/ro/n.txt");
  EXPECT_EQ(r.out, "read me\n");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Read-only"), std::string::npos) << Describe(r);
  r = Sh(id, "mount -o remount,rw /mnt/ro; echo x > /mnt/ro/n.txt || echo refused");
  EXPECT_NE(r.out.find("refused"), std::string::npos) << Describe(r);
  EXPECT_FALSE(fs::exists(host_ + "/ro/n.txt"));
  EXPECT_EQ(ReadFile(host_ + "/ro/r.txt"), "read me\n");

  // overlay: the guest writes freely; the host tree never changes.
  r = Sh(id, "echo mine > /mnt/ov/o.txt && echo more > /mnt/ov/p.txt && cat /mnt/ov/o.txt");
  EXPECT_EQ(r.out, "mine\n") << Describe(r);
  EXPECT_EQ(ReadFile(host_ + "/ov/o.txt"), "original\n");
  EXPECT_FALSE(fs::exists(host_ + "/ov/p.txt"));
  // Inside shares: the volume shows at its path over the rw share (its
  // writes stay in the volume), and the inner share over the overlay one
  // (its writes reach its own host directory; its mount point was made in
  // the overlay's layer, not on the host).
  r = Sh(id,
         "echo v > /mnt/rw/vol/v.txt && cat /mnt/rw/vol/v.txt && cat /mnt/ov/inner/i.txt && "
         "echo w > /mnt/ov/inner/w.txt");
  EXPECT_EQ(r.out, "v\ninner share\n") << Describe(r);
  EXPECT_FALSE(fs::exists(host_ + "/rw/vol/v.txt"));
  EXPECT_TRUE(fs::is_directory(host_ + "/rw/vol"));  // made through the share, as docker does
  EXPECT_EQ(ReadFile(host_ + "/inner/w.txt"), "w\n");
  EXPECT_FALSE(fs::exists(host_ + "/ov/inner"));

  // A single file: its content and mode, writes both ways, no sibling.
  r = Sh(id,
         "stat -c '%a' /etc/single.txt; cat /etc/single.txt; echo guest-edit >> /etc/single.txt");
  EXPECT_EQ(r.out, "600\none file\n") << Describe(r);
  EXPECT_EQ(ReadFile(host_ + "/single.txt"), "one file\nguest-edit\n");
  // Over FUSE the share's root is the file itself: nothing beside it.
  r = Sh(id, "ls /etc/single.txt/ 2>&1; grep ' /etc/single.txt ' /proc/mounts | cut -d' ' -f3");
  EXPECT_NE(r.out.find("Not a directory"), std::string::npos) << Describe(r);
  EXPECT_NE(r.out.find("fuse"), std::string::npos) << Describe(r);

  // A single file in overlay mode: the guest may change it; the host's copy
  // stays as it was.
  r = Sh(id, "cat /etc/ov-single.txt; echo guest > /etc/ov-single.txt && cat /etc/ov-single.txt");
  EXPECT_EQ(r.out, "host copy\nguest\n") << Describe(r);
  EXPECT_EQ(ReadFile(host_ + "/ov-single.txt"), "host copy\n");

  // A single file read-only: readable, and not writable even with mode 0666.
  r = Sh(id, "cat /etc/ro-single.txt; echo x >> /etc/ro-single.txt");
  EXPECT_EQ(r.out, "look only\n") << Describe(r);
  EXPECT_NE(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(ReadFile(host_ + "/ro-single.txt"), "look only\n");

  // inspect shows the shares; they come back after stop/start, the overlay
  // layer with them (it is discarded with the sandbox, not with the VM).
  auto doc = Inspect(id);
  ASSERT_FALSE(doc.is_null());
  ASSERT_TRUE(doc.contains("shares")) << doc.dump();
  EXPECT_EQ(doc["shares"].size(), 8u) << doc.dump();
  EXPECT_EQ(doc["shares"][1].value("mode", ""), "ro") << doc.dump();
  EXPECT_EQ(doc["shares"][4].value("source", ""), host_ + "/rel") << doc.dump();
  ASSERT_EQ(RunCella({"stop", id}).exit_code, 0);
  ASSERT_EQ(RunCella({"start", id}, "", std::chrono::seconds(300)).exit_code, 0);
  r = Sh(id,
         "cat /mnt/rw/b.txt /mnt/ov/o.txt /mnt/ro/r.txt /etc/single.txt /mnt/rw/vol/v.txt "
         "/etc/ov-single.txt");
  EXPECT_EQ(r.out, "from-guest\nmine\nread me\none file\nguest-edit\nv\nguest\n") << Describe(r);

  // CELLA_SHARE_TRANSPORT=virtiofs still serves them (virtiofsd, a cold
  // boot said on stderr), the overlay's layer is the same one.
  ASSERT_EQ(RunCella({"stop", id}).exit_code, 0);
  ASSERT_EQ(::setenv("CELLA_SHARE_TRANSPORT", "virtiofs", 1), 0);
  auto virtiofs = RunCella({"start", id}, "", std::chrono::seconds(300));
  ::unsetenv("CELLA_SHARE_TRANSPORT");
  ASSERT_EQ(virtiofs.exit_code, 0) << Describe(virtiofs);
  const char* cold = std::getenv("CELLA_COLD");
  if (cold == nullptr || std::string(cold) != "1") {
    EXPECT_NE(virtiofs.err.find("sandbox boots cold (no warm start): host directory shares"),
              std::string::npos)
        << Describe(virtiofs);
  }
  r = Sh(id, "cat /mnt/ov/o.txt /mnt/rw/a.txt; grep ' /mnt/rw ' /proc/mounts | cut -d' ' -f3");
  EXPECT_EQ(r.out, "mine\nchanged on host\nvirtiofs\n") << Describe(r);
  // What the guest can reach through the single-file overlay share is what
  // its virtiofsd sees as "/" after pivoting into it: the one file.
  EXPECT_EQ(ShareRootEntries(home_ + "/sandboxes/" + id + "/share5"),
            std::vector<std::string>{"ov-single.txt"});

  // A share whose virtiofsd dies would leave the guest's file calls
  // hanging: the sandbox fails, saying why.
  int supervisor = Inspect(id).value("supervisor_pid", 0);
  int daemon = ChildServing(supervisor, home_ + "/sandboxes/" + id + "/share2");
  ASSERT_GT(daemon, 0);
  ASSERT_EQ(::kill(daemon, SIGKILL), 0);
  ASSERT_TRUE(WaitForState(id, "failed", std::chrono::seconds(60)));
  EXPECT_NE(Inspect(id).value("reason", "").find("virtiofsd"), std::string::npos)
      << Inspect(id).dump();
  ASSERT_EQ(RunCella({"rm", "-f", id}).exit_code, 0);
  EXPECT_EQ(ReadFile(host_ + "/ov/o.txt"), "original\n");
  EXPECT_EQ(ReadFile(host_ + "/ov-single.txt"), "host copy\n");
}

TEST_F(ShareTest, HostileGuestStaysInsideTheShare) {
  std::string share = host_ + "/share";
  fs::create_directories(share);
  WriteFile(host_ + "/secret", "host secret\n", 0644);
  // Planted on the host: links that point out of the share.
  fs::create_symlink(host_ + "/secret", share + "/abs-link");
  fs::create_symlink("../secret", share + "/rel-link");
  // --cold: the user chose the cold boot, so nothing is said about it.
  auto started =
      RunCella({"run", "-d", "--cold", "-v", share + ":/mnt/s"}, "", std::chrono::seconds(300));
  ASSERT_EQ(started.exit_code, 0) << Describe(started);
  EXPECT_EQ(started.err, "");
  std::string id = started.out.substr(0, started.out.find('\n'));
  ASSERT_FALSE(id.empty());

  // The guest follows links in its own namespace: nothing of the host's.
  auto r = Sh(id, "cat /mnt/s/abs-link /mnt/s/rel-link /mnt/s/../secret /mnt/s/../../secret 2>&1");
  EXPECT_EQ(r.out.find("host secret"), std::string::npos) << Describe(r);
  // Links the guest makes point into the guest too.
  r = Sh(id,
         "ln -s ../secret /mnt/s/g-link; ln -s /etc/shadow /mnt/s/g-shadow; "
         "cat /mnt/s/g-link 2>&1; head -c 5 /mnt/s/g-shadow; echo");
  EXPECT_EQ(r.out.find("host secret"), std::string::npos) << Describe(r);
  // Renames racing path walks (a directory moved up and back while other
  // walks climb out of it with "..") never reach a host file: the guest
  // resolves ".." in its own tree, and the daemon sees only the share.
  r = Sh(id,
         "mkdir -p /mnt/s/a/b/c; end=$(( $(date +%s) + 3 )); "
         "( while [ $(date +%s) -lt $end ]; do mv /mnt/s/a/b /mnt/s/b2; mv /mnt/s/b2 /mnt/s/a/b; "
         "done ) & "
         "n=0; while [ $(date +%s) -lt $end ]; do n=$((n+1)); "
         "cat /mnt/s/a/b/c/../../../../secret /mnt/s/b2/c/../../../secret "
         "/mnt/s/a/b/../../../secret 2>/dev/null; done; wait; echo walks=$n");
  EXPECT_EQ(r.out.find("host secret"), std::string::npos) << Describe(r);
  EXPECT_NE(r.out.find("walks="), std::string::npos) << Describe(r);
  // A hardlink to a file outside the share cannot be made.
  r = Sh(id, "ln /etc/hostname /mnt/s/hard 2>&1 && echo linked");
  EXPECT_EQ(r.out.find("linked"), std::string::npos) << Describe(r);
  EXPECT_FALSE(fs::exists(share + "/hard"));

  // Device nodes and setuid/setgid bits never reach the host.
  r = Sh(id,
         "mknod /mnt/s/mem c 1 1; mknod /mnt/s/disk b 8 0; touch /mnt/s/su /mnt/s/sg; "
         "chmod 4755 /mnt/s/su; chmod 2755 /mnt/s/sg; chmod u+s /mnt/s/sg; "
         "cp /bin/busybox /mnt/s/bb && chmod 6755 /mnt/s/bb; true");
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  for (const char* node : {"mem", "disk"}) {
    struct stat st {};
    if (::lstat((share + "/" + node).c_str(), &st) == 0) {
      EXPECT_FALSE(S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) << node;
    }
  }
  for (const char* file : {"su", "sg", "bb"}) {
    struct stat st {};
    ASSERT_EQ(::stat((share + "/" + file).c_str(), &st), 0) << file;
    EXPECT_EQ(st.st_mode & (S_ISUID | S_ISGID), 0u) << file;
  }
  // The host secret and the rest of the host tree are untouched.
  EXPECT_EQ(ReadFile(host_ + "/secret"), "host secret\n");
  std::vector<std::string> outside;
  for (const auto& e : fs::directory_iterator(host_)) outside.push_back(e.path().filename());
  std::sort(outside.begin(), outside.end());
  EXPECT_EQ(outside, (std::vector<std::string>{"secret", "share"}));
}

// Wait (bounded) until `path` on the host has more than `lines` lines;
// returns the count seen last.
size_t WaitForLines(const std::string& path, size_t lines) {
  size_t n = 0;
  for (int i = 0; i < 300; ++i) {
    std::string text = ReadFile(path);
    n = static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
    if (n > lines) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return n;
}

// A FUSE share keeps working where virtiofs could not: the sandbox starts
// warm, and a process holding a file open on the share keeps writing
// through standby/resume, a snapshot restored into a new sandbox and a fork;
// the host sees every write and the guest sees host writes after each. An
// overlay share keeps the guest's writes (in its layer) through all of it,
// and its host directory never changes.
TEST_F(ShareTest, FuseSharesSurviveStandbySnapshotAndFork) {
  std::string rw = host_ + "/rw";
  fs::create_directories(rw);
  fs::create_directories(host_ + "/ov");
  WriteFile(host_ + "/ov/o.txt", "original\n");
  fs::create_directories(host_ + "/ov/sub/deeper");
  WriteFile(host_ + "/ov/tool.sh", "#!/bin/sh\necho tool ran in $(pwd)\n", 0755);
  // `docker run -v $PWD:/src -w /src ...`: the main process's working
  // directory and program on a share (its chdir and exec wait for the
  // agent's loop to relay their lookups to the host).
  auto habit = RunCella({"run", "-v", host_ + "/ov:/src", "-w", "/src/sub/deeper", "--", "sh", "-c",
                         "pwd && ../../tool.sh"},
                        "", std::chrono::seconds(120));
  EXPECT_EQ(habit.exit_code, 0) << Describe(habit);
  EXPECT_EQ(habit.out, "/src/sub/deeper\ntool ran in /src/sub/deeper\n") << Describe(habit);
  // `-v /etc/passwd:/etc/passwd:ro -u NAME`: the user is looked up in a
  // file on a share (that read waits for the loop too). And `-w` names a
  // directory on a share that does not exist yet: made there, as docker
  // does, not in the image under the share.
  WriteFile(host_ + "/passwd",
            "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1234:1234::/home/builder:/bin/sh\n");
  fs::create_directories(host_ + "/work");
  auto as_user =
      RunCella({"run", "-v", host_ + "/passwd:/etc/passwd:ro", "-v", host_ + "/work:/work", "-w",
                "/work/build/out", "-u", "builder", "--", "sh", "-c", "id -u; echo $HOME; pwd"},
               "", std::chrono::seconds(120));
  EXPECT_EQ(as_user.exit_code, 0) << Describe(as_user);
  EXPECT_EQ(as_user.out, "1234\n/home/builder\n/work/build/out\n") << Describe(as_user);
  EXPECT_TRUE(fs::is_directory(host_ + "/work/build/out"));
  auto started = RunCella({"run", "-d", "-v", rw + ":/mnt/rw", "-v", host_ + "/ov:/mnt/ov:overlay"},
                          "", std::chrono::seconds(300));
  ASSERT_EQ(started.exit_code, 0) << Describe(started);
  EXPECT_EQ(started.err, "");  // no cold-boot notice: FUSE shares start warm
  std::string id = started.out.substr(0, started.out.find('\n'));
  ASSERT_FALSE(id.empty());
  // The same for exec: a working directory on a share and a program there.
  auto in_share =
      RunCella({"exec", "-w", "/mnt/rw", id, "--", "pwd"}, "", std::chrono::seconds(60));
  EXPECT_EQ(in_share.out, "/mnt/rw\n") << Describe(in_share);
  auto tool = RunCella({"exec", "-w", "/mnt/ov/sub/deeper", id, "--", "/mnt/ov/tool.sh"}, "",
                       std::chrono::seconds(60));
  EXPECT_EQ(tool.out, "tool ran in /mnt/ov/sub/deeper\n") << Describe(tool);
  // cp in and out of a share: the agent's file operations wait on the
  // share as well.
  WriteFile(host_ + "/to-copy.txt", "copied in\n");
  auto cp_in = RunCella({"cp", host_ + "/to-copy.txt", id + ":/mnt/ov/sub/copied.txt"}, "",
                        std::chrono::seconds(60));
  EXPECT_EQ(cp_in.exit_code, 0) << Describe(cp_in);
  auto cp_out = RunCella({"cp", id + ":/mnt/ov/sub/copied.txt", host_ + "/copied-back.txt"}, "",
                         std::chrono::seconds(60));
  EXPECT_EQ(cp_out.exit_code, 0) << Describe(cp_out);
  EXPECT_EQ(ReadFile(host_ + "/copied-back.txt"), "copied in\n");
  EXPECT_FALSE(fs::exists(host_ + "/ov/sub/copied.txt"));  // overlay: the host's side stays
  auto writer = RunCella({"exec", "-d", id, "--", "sh", "-c",
                          "exec 3>>/mnt/rw/log; i=0; while :; do i=$((i+1)); echo tick$i >&3; "
                          "sleep 0.2; done"});
  ASSERT_EQ(writer.exit_code, 0) << Describe(writer);
  size_t before = WaitForLines(rw + "/log", 2);
  ASSERT_GT(before, 2u);
  auto r = Sh(id, "echo guest > /mnt/ov/o.txt && echo new > /mnt/ov/n.txt");
  ASSERT_EQ(r.exit_code, 0) << Describe(r);

  ASSERT_EQ(RunCella({"standby", id}, "", std::chrono::seconds(600)).exit_code, 0);
  EXPECT_EQ(State(id), "standby");
  WriteFile(rw + "/host.txt", "written while asleep\n");
  auto resumed = RunCella({"resume", id}, "", std::chrono::seconds(600));
  ASSERT_EQ(resumed.exit_code, 0) << Describe(resumed);
  size_t asleep = WaitForLines(rw + "/log", 0);
  // The same open descriptor goes on writing after the resume.
  EXPECT_GT(WaitForLines(rw + "/log", asleep + 2), asleep + 2);
  r = Sh(id, "cat /mnt/rw/host.txt && echo after > /mnt/rw/after.txt && ls /mnt/rw");
  EXPECT_EQ(r.out, "written while asleep\nafter.txt\nhost.txt\nlog\n") << Describe(r);
  r = Sh(id, "cat /mnt/ov/o.txt /mnt/ov/n.txt");
  EXPECT_EQ(r.out, "guest\nnew\n") << Describe(r);
  EXPECT_EQ(ReadFile(rw + "/after.txt"), "after\n");

  // A named snapshot restored into a new sandbox, and a fork: each serves
  // the same host directory with the guest's open files intact.
  ASSERT_EQ(RunCella({"snapshot", "create", id, "snap"}, "", std::chrono::seconds(600)).exit_code,
            0);
  auto restored = RunCella({"snapshot", "restore", "snap"}, "", std::chrono::seconds(600));
  ASSERT_EQ(restored.exit_code, 0) << Describe(restored);
  std::string copy = restored.out.substr(0, restored.out.find('\n'));
  r = Sh(copy, "cat /mnt/rw/host.txt /mnt/ov/o.txt && echo restored > /mnt/rw/restored.txt");
  EXPECT_EQ(r.out, "written while asleep\nguest\n") << Describe(r);
  EXPECT_EQ(ReadFile(rw + "/restored.txt"), "restored\n");
  auto forked = RunCella({"fork", id}, "", std::chrono::seconds(600));
  ASSERT_EQ(forked.exit_code, 0) << Describe(forked);
  std::string fork = forked.out.substr(0, forked.out.find('\n'));
  WriteFile(rw + "/late.txt", "for the fork\n");
  r = Sh(fork, "cat /mnt/rw/late.txt /mnt/ov/n.txt");
  EXPECT_EQ(r.out, "for the fork\nnew\n") << Describe(r);
  tool = RunCella({"exec", "-w", "/mnt/rw", fork, "--", "/mnt/ov/tool.sh"}, "",
                  std::chrono::seconds(60));
  EXPECT_EQ(tool.out, "tool ran in /mnt/rw\n") << Describe(tool);
  auto cp_rw = RunCella({"cp", host_ + "/to-copy.txt", fork + ":/mnt/rw/cp-in.txt"}, "",
                        std::chrono::seconds(60));
  EXPECT_EQ(cp_rw.exit_code, 0) << Describe(cp_rw);
  EXPECT_EQ(ReadFile(rw + "/cp-in.txt"), "copied in\n");
  // Three writers now (source, restored copy, fork) on one open file each.
  size_t now = WaitForLines(rw + "/log", 0);
  EXPECT_GT(WaitForLines(rw + "/log", now + 6), now + 6);
  for (const std::string& s : {fork, copy, id}) ASSERT_EQ(RunCella({"rm", "-f", s}).exit_code, 0);
  EXPECT_EQ(ReadFile(host_ + "/ov/o.txt"), "original\n");
  EXPECT_FALSE(fs::exists(host_ + "/ov/n.txt"));
  ASSERT_EQ(RunCella({"snapshot", "rm", "snap"}).exit_code, 0);
}

TEST_F(ShareTest, MissingHostPathIsRefusedBeforeBoot) {
  auto r = RunCella({"run", "-v", host_ + "/nope:/data", "--", "true"});
  EXPECT_EQ(r.exit_code, 125) << Describe(r);
  EXPECT_NE(r.err.find(host_ + "/nope does not exist"), std::string::npos) << Describe(r);
  auto rel = RunCella({"run", "-v", "./surely-missing-dir:/data:ro", "--", "true"});
  EXPECT_EQ(rel.exit_code, 125) << Describe(rel);
  EXPECT_NE(rel.err.find("surely-missing-dir does not exist"), std::string::npos) << Describe(rel);
  // Nothing was recorded.
  auto ps = RunCella({"ps", "-a", "-q"});
  EXPECT_EQ(ps.out, "") << Describe(ps);
}

}  // namespace
}  // namespace cella::test
