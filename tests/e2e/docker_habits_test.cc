// Docker habits typed as docker users type them (issue 17): options take one
// value each and never the words after them, the image is the first word,
// nothing after it is cella's, failures leave nothing running, `rm -f` of
// what is gone succeeds, parser messages name the flag or command.
// Boots are few: each VM test shares one sandbox across its checks.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <thread>

#include "lifecycle_fixture.h"
#include "support/tcp.h"

namespace cella::test {
namespace {

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

class DockerHabits : public LifecycleTest {
 protected:
  // Whether a process whose argv contains `words` (consecutively) has a
  // file of this test's home whose path ends in `suffix` open (the other
  // start mode's twin may run the same command in its own home).
  bool AProcessHoldsOpen(const std::vector<std::string>& words, const std::string& suffix) const {
    std::string needle;
    for (const auto& w : words) needle += w + std::string(1, '\0');
    for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
      std::string pid = entry.path().filename();
      if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
      std::string cmdline;
      if (FILE* f = std::fopen(("/proc/" + pid + "/cmdline").c_str(), "r")) {
        char buf[4096];
        size_t n = std::fread(buf, 1, sizeof buf, f);
        std::fclose(f);
        cmdline.assign(buf, n);
      }
      if (cmdline.find(needle) == std::string::npos) continue;
      std::error_code ec;
      for (const auto& fd : std::filesystem::directory_iterator("/proc/" + pid + "/fd", ec)) {
        std::string target = std::filesystem::read_symlink(fd.path(), ec).string();
        if (!ec && target.starts_with(home_ + "/") && target.ends_with(suffix)) return true;
      }
    }
    return false;
  }
  size_t CountSandboxes() {
    auto ps = RunCella({"ps", "-a", "--json"});
    auto list = nlohmann::json::parse(ps.out, nullptr, false);
    return list.is_array() ? list.size() : size_t{999};
  }
};

// No VM: what the parser says before anything boots.
TEST_F(DockerHabits, ParserMessagesNameTheFlagOrCommandAndVersionWorks) {
  auto unknown_flag = RunCella({"run", "--foo", "@builtin", "true"});
  EXPECT_EQ(unknown_flag.exit_code, 125) << Describe(unknown_flag);
  EXPECT_TRUE(Contains(unknown_flag.err, "unknown flag --foo (see cella run --help)"))
      << Describe(unknown_flag);

  auto unknown_command = RunCella({"frobnicate"});
  EXPECT_EQ(unknown_command.exit_code, 125) << Describe(unknown_command);
  EXPECT_TRUE(Contains(unknown_command.err, "unknown command frobnicate"))
      << Describe(unknown_command);

  auto version = RunCella({"--version"});
  EXPECT_EQ(version.exit_code, 0) << Describe(version);
  EXPECT_TRUE(version.out.starts_with("cella ")) << Describe(version);

  // More CPUs than the host has: refused before anything boots.
  std::string too_many = std::to_string(std::thread::hardware_concurrency() + 1);
  auto cpus = RunCella({"run", "--cpus", too_many, "@builtin", "true"});
  EXPECT_EQ(cpus.exit_code, 125) << Describe(cpus);
  EXPECT_TRUE(Contains(cpus.err, "this host has only")) << Describe(cpus);

  // docker's rm -f: what is not there is already what was asked for.
  auto gone = RunCella({"rm", "-f", "no-such-sandbox"});
  EXPECT_EQ(gone.exit_code, 0) << Describe(gone);
  auto not_forced = RunCella({"rm", "no-such-sandbox"});
  EXPECT_EQ(not_forced.exit_code, 125) << Describe(not_forced);

  // zsh completion from the CLI definition: valid zsh, every command and
  // its flags with their help texts.
  auto zsh = RunCella({"completion", "zsh"});
  ASSERT_EQ(zsh.exit_code, 0) << Describe(zsh);
  EXPECT_TRUE(zsh.out.starts_with("#compdef cella\n")) << zsh.out.substr(0, 200);
  EXPECT_TRUE(Contains(zsh.out, "'rename:Rename a sandbox'")) << zsh.out;
  EXPECT_TRUE(Contains(zsh.out, "'--entrypoint:")) << zsh.out;
  EXPECT_FALSE(Contains(zsh.out, "__supervise")) << zsh.out;
  auto parsed = RunProcess({"zsh", "-n", "-c", zsh.out}, "", std::chrono::seconds(30));
  EXPECT_EQ(parsed.exit_code, 0) << Describe(parsed);
}

// One foreground boot: repeatable options take one value each, the built-in
// image is named as the first word, and words after it (even `-e`, `-v`,
// `--name`) are the command's.
TEST_F(DockerHabits, OptionsTakeOneValueAndEverythingAfterTheImageIsTheCommand) {
  auto r = RunCella({"run",
                     "-e",
                     "FOO=bar",
                     "-e",
                     "B=2",
                     "-v",
                     "vol1:/d",
                     "-v",
                     "/anon",
                     "--add-host",
                     "db.test:10.9.8.7",
                     "--dns",
                     "10.0.2.3",
                     "--network",
                     "none",
                     "@builtin",
                     "sh",
                     "-c",
                     "echo \"$FOO$B\"; grep -c db.test /etc/hosts; echo \"$0 $1 $2\"; "
                     "touch /d/ok && echo vol; touch /anon/ok && echo anon; ls /sys/class/net",
                     "-v",
                     "--name",
                     "-e"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "bar2\n1\n-v --name -e\nvol\nanon\nlo\n");
  // `-v /anon` made an anonymous volume; a foreground run is removed at its
  // end (docker's --rm) and takes its anonymous volumes along: the named
  // one stays.
  auto volumes = RunCella({"volume", "ls", "--json"});
  auto list = nlohmann::json::parse(volumes.out, nullptr, false);
  ASSERT_TRUE(list.is_array()) << Describe(volumes);
  ASSERT_EQ(list.size(), 1u) << volumes.out;
  EXPECT_EQ(list[0].value("name", ""), "vol1") << volumes.out;
}

// One detached boot: --entrypoint runs that program with the words after
// the image; exec's -e takes one value; rm -f twice succeeds twice.
TEST_F(DockerHabits, EntrypointExecEnvAndRmForceOfAGoneSandbox) {
  std::string id = RunDetached({"--name", "box", "--entrypoint", "sleep", "@builtin", "1000"});
  ASSERT_FALSE(id.empty());
  auto main = RunCella({"exec", "box", "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"});
  EXPECT_TRUE(Contains(main.out, "sleep 1000")) << Describe(main);
  auto exec = RunCella({"exec", "-e", "A=1", "box", "sh", "-c", "echo $A"});
  EXPECT_EQ(exec.exit_code, 0) << Describe(exec);
  EXPECT_EQ(exec.out, "1\n");
  auto quiet = RunCella({"ps", "-q"});
  EXPECT_EQ(quiet.exit_code, 0) << Describe(quiet);
  ASSERT_GT(quiet.out.size(), 8u) << Describe(quiet);
  EXPECT_TRUE(id.starts_with(quiet.out.substr(0, quiet.out.size() - 1))) << Describe(quiet);
  // docker cp with `-`: a tar stream out of the sandbox on stdout, and one
  // into it from stdin; a hostile member ("../x") is refused, nothing lands.
  ASSERT_EQ(RunCella({"exec", "box", "sh", "-c", "mkdir -p /tmp/out/d && echo hi > /tmp/out/d/f"})
                .exit_code,
            0);
  auto out = RunCella({"cp", "box:/tmp/out", "-"});
  ASSERT_EQ(out.exit_code, 0) << Describe(out);
  auto listed = RunProcess({"tar", "-tf", "-"}, out.out, std::chrono::seconds(30));
  EXPECT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_TRUE(Contains(listed.out, "out/d/f")) << listed.out;
  const std::string make_tar =
      "import io, sys, tarfile\n"
      "b = io.BytesIO()\n"
      "with tarfile.open(fileobj=b, mode='w') as t:\n"
      "    for name, data in ((sys.argv[1], b'in tar\\n'),):\n"
      "        i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))\n"
      "sys.stdout.buffer.write(b.getvalue())\n";
  auto tar_in = RunProcess({"python3", "-c", make_tar, "sub/a.txt"}, "", std::chrono::seconds(30));
  ASSERT_EQ(tar_in.exit_code, 0) << Describe(tar_in);
  auto in = RunCella({"cp", "-", "box:/tmp/in"}, tar_in.out);
  EXPECT_EQ(in.exit_code, 0) << Describe(in);
  EXPECT_EQ(RunCella({"exec", "box", "cat", "/tmp/in/sub/a.txt"}).out, "in tar\n");
  auto evil =
      RunProcess({"python3", "-c", make_tar, "../escaped.txt"}, "", std::chrono::seconds(30));
  ASSERT_EQ(evil.exit_code, 0) << Describe(evil);
  auto refused = RunCella({"cp", "-", "box:/tmp/in2"}, evil.out);
  EXPECT_EQ(refused.exit_code, 125) << Describe(refused);
  EXPECT_NE(RunCella({"exec", "box", "ls", "/tmp/escaped.txt"}).exit_code, 0);
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::temp_directory_path() / "escaped.txt"));
  // A tar's hard links are not dropped: each arrives (as its own file) and
  // cp says so. One that points out of the archive ("..") is refused.
  const std::string make_linked_tar =
      "import io, sys, tarfile\n"
      "b = io.BytesIO()\n"
      "with tarfile.open(fileobj=b, mode='w', format=tarfile.PAX_FORMAT) as t:\n"
      "    i = tarfile.TarInfo('h/a'); i.size = 5; t.addfile(i, io.BytesIO(b'link\\n'))\n"
      "    l = tarfile.TarInfo('h/b'); l.type = tarfile.LNKTYPE; l.linkname = sys.argv[1]\n"
      "    t.addfile(l)\n"
      "sys.stdout.buffer.write(b.getvalue())\n";
  auto linked = RunProcess({"python3", "-c", make_linked_tar, "h/a"}, "", std::chrono::seconds(30));
  ASSERT_EQ(linked.exit_code, 0) << Describe(linked);
  auto linked_in = RunCella({"cp", "-", "box:/tmp/linked"}, linked.out);
  EXPECT_EQ(linked_in.exit_code, 0) << Describe(linked_in);
  EXPECT_TRUE(Contains(linked_in.err, "1 hard link(s) in the tar were copied as separate files"))
      << Describe(linked_in);
  EXPECT_EQ(RunCella({"exec", "box", "cat", "/tmp/linked/h/a", "/tmp/linked/h/b"}).out,
            "link\nlink\n");
  auto outward = RunProcess({"python3", "-c", make_linked_tar, "../../etc/passwd"}, "",
                            std::chrono::seconds(30));
  ASSERT_EQ(outward.exit_code, 0) << Describe(outward);
  auto outward_in = RunCella({"cp", "-", "box:/tmp/outward"}, outward.out);
  EXPECT_EQ(outward_in.exit_code, 125) << Describe(outward_in);
  EXPECT_NE(RunCella({"exec", "box", "ls", "/tmp/outward/h/b"}).exit_code, 0);
  // Ctrl-C while `cp -` waits for its tar: the staging directory goes too.
  // (The driver waits until the directory exists before it interrupts, so
  // this fails when it is left behind.)
  char staging_tmp[] = "/tmp/cella-cp-tmpdir-XXXXXX";
  ASSERT_NE(::mkdtemp(staging_tmp), nullptr);
  const std::string interrupt =
      "import glob, os, signal, subprocess, sys, time\n"
      "tmp = sys.argv[2]\n"
      "p = subprocess.Popen([sys.argv[1], 'cp', '-', 'box:/tmp/never'], stdin=subprocess.PIPE,\n"
      "                     env=dict(os.environ, TMPDIR=tmp))\n"
      "deadline = time.time() + 60\n"
      "while not glob.glob(tmp + '/cella-cp-*') and time.time() < deadline: time.sleep(0.05)\n"
      "print('staged' if glob.glob(tmp + '/cella-cp-*') else 'never staged')\n"
      "p.send_signal(signal.SIGINT); p.wait()\n"
      "while glob.glob(tmp + '/cella-cp-*') and time.time() < deadline: time.sleep(0.05)\n"
      "print('left behind' if glob.glob(tmp + '/cella-cp-*') else 'removed')\n";
  auto interrupted = RunProcess({"python3", "-c", interrupt, CELLA_BINARY, staging_tmp}, "",
                                std::chrono::seconds(120));
  EXPECT_EQ(interrupted.out, "staged\nremoved\n") << Describe(interrupted);
  std::filesystem::remove_all(staging_tmp);

  auto kill = RunCella({"kill", "box"});
  EXPECT_EQ(kill.exit_code, 0) << Describe(kill);
  auto wait = RunCella({"wait", "box"});
  EXPECT_EQ(wait.exit_code, 0) << Describe(wait);
  EXPECT_EQ(wait.out, "137\n");
  auto first = RunCella({"rm", "-f", "box"});
  EXPECT_EQ(first.exit_code, 0) << Describe(first);
  auto again = RunCella({"rm", "-f", id});
  EXPECT_EQ(again.exit_code, 0) << Describe(again);
  EXPECT_EQ(CountSandboxes(), 0u);
}

// docker stop (issue 17, item 6): the main process gets SIGTERM while the
// guest still serves, so what it prints on the way out reaches `logs` and
// its exit code is how the sandbox ended.
TEST_F(DockerHabits, StopKeepsTheMainProcessesLastWordsAndExitCode) {
  std::string id = RunDetached({"--name", "trap", "--label", "team=infra", "@builtin", "sh", "-c",
                                "trap 'echo bye; exit 3' TERM; echo up; "
                                "while :; do sleep 1; done"});
  ASSERT_FALSE(id.empty());

  // exec -d returns at once, prints nothing, and the process outlives the
  // CLI that started it.
  auto detached = RunCella(
      {"exec", "-d", "trap", "sh", "-c", "echo $$ > /tmp/bg.pid; echo lost; exec sleep 1000"});
  EXPECT_EQ(detached.exit_code, 0) << Describe(detached);
  EXPECT_EQ(detached.out, "") << Describe(detached);
  std::string alive;
  for (int i = 0; i < 100 && alive != "alive\n"; ++i) {
    alive = RunCella({"exec", "trap", "sh", "-c",
                      "test -s /tmp/bg.pid && kill -0 $(cat /tmp/bg.pid) && echo alive"})
                .out;
    if (alive != "alive\n") std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(alive, "alive\n");
  auto refused = RunCella({"exec", "-d", "-t", "trap", "true"});
  EXPECT_EQ(refused.exit_code, 125) << Describe(refused);
  // docker's codes for a detached program that cannot start: 127 when it
  // is missing, 126 when it cannot be executed, and the reason on stderr.
  auto missing = RunCella({"exec", "-d", "trap", "no-such-program", "x"});
  EXPECT_EQ(missing.exit_code, 127) << Describe(missing);
  EXPECT_TRUE(Contains(missing.err, "no-such-program")) << Describe(missing);
  auto not_runnable = RunCella({"exec", "-d", "trap", "/etc/passwd"});
  EXPECT_EQ(not_runnable.exit_code, 126) << Describe(not_runnable);

  // top: the guest's processes (ps -ef by default, or the options given).
  auto top = RunCella({"top", "trap"});
  EXPECT_EQ(top.exit_code, 0) << Describe(top);
  EXPECT_TRUE(Contains(top.out, "PID") && Contains(top.out, "sleep 1000")) << Describe(top);
  auto top_o = RunCella({"top", "trap", "-o", "pid,comm"});
  EXPECT_EQ(top_o.exit_code, 0) << Describe(top_o);
  EXPECT_TRUE(Contains(top_o.out, "COMMAND") && !Contains(top_o.out, "sleep 1000"))
      << Describe(top_o);

  // stats --no-stream: one sample of the running sandbox, from the host.
  auto stats = RunCella({"stats", "--no-stream", "--json", "trap"});
  ASSERT_EQ(stats.exit_code, 0) << Describe(stats);
  auto sample = nlohmann::json::parse(stats.out, nullptr, false);
  ASSERT_TRUE(sample.is_object()) << Describe(stats);
  EXPECT_EQ(sample.value("name", ""), "trap") << stats.out;
  EXPECT_GT(sample.value("memory_bytes", uint64_t{0}), uint64_t{1} << 20) << stats.out;
  EXPECT_GE(sample.value("memory_limit_bytes", uint64_t{0}), uint64_t{64} << 20) << stats.out;
  EXPECT_GE(sample.value("cpu_percent", -1.0), 0.0) << stats.out;
  auto stats_table = RunCella({"stats", "--no-stream"});
  EXPECT_TRUE(stats_table.out.starts_with("SANDBOX ID") && Contains(stats_table.out, "trap"))
      << stats_table.out;

  // rename: the new name resolves, the old one no longer; a taken name is refused.
  ASSERT_EQ(RunCella({"rename", "trap", "trap2"}).exit_code, 0);
  EXPECT_EQ(RunCella({"inspect", "-f", "{{.Name}}", "trap2"}).out, "trap2\n");
  EXPECT_EQ(RunCella({"inspect", "trap"}).exit_code, 125);
  ASSERT_EQ(RunCella({"rename", id, "trap"}).exit_code, 0);
  auto bad_name = RunCella({"rename", "trap", "no/slashes"});
  EXPECT_EQ(bad_name.exit_code, 125) << Describe(bad_name);

  // Scripting: --format, inspect -f, --filter label=.
  auto status = RunCella({"inspect", "-f", "{{.State.Status}} {{.Name}}", "trap"});
  EXPECT_EQ(status.out, "running trap\n") << Describe(status);
  auto formatted = RunCella({"ps", "--format", "{{.ID}}|{{.Names}}|{{.Labels}}"});
  EXPECT_EQ(formatted.out, id.substr(0, 12) + "|trap|team=infra\n") << Describe(formatted);
  auto table = RunCella({"ps", "--format", "table {{.Names}}\\t{{.State}}"});
  EXPECT_EQ(table.out, "NAMES     STATE\ntrap      running\n") << Describe(table);
  auto labelled = RunCella({"ps", "-q", "--filter", "label=team=infra"});
  EXPECT_EQ(labelled.out, id.substr(0, 12) + "\n") << Describe(labelled);
  auto other = RunCella({"ps", "-q", "--filter", "label=team=web"});
  EXPECT_EQ(other.exit_code, 0) << Describe(other);
  EXPECT_EQ(other.out, "") << Describe(other);
  auto bad = RunCella({"inspect", "-f", "{{range .history}}x{{end}}", "trap"});
  EXPECT_EQ(bad.exit_code, 125) << Describe(bad);

  // attach follows the main process's output from now on and exits with
  // its code. It is started first and known to be following (it holds
  // output.rec open) before the stop makes the main process speak.
  ProcessResult attached;
  std::thread attacher([&] {
    attached = RunCella({"attach", "trap"}, "", std::chrono::seconds(120));
  });
  bool following = false;
  for (int i = 0; i < 600 && !following; ++i) {
    following = AProcessHoldsOpen({"attach", "trap"}, "/output.rec");
    if (!following) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(following) << "cella attach never opened the output log";

  auto stop = RunCella({"stop", "-t", "30", "trap"});
  attacher.join();
  ASSERT_EQ(stop.exit_code, 0) << Describe(stop);
  EXPECT_EQ(attached.exit_code, 3) << Describe(attached);
  EXPECT_TRUE(Contains(attached.out, "bye\n") && !Contains(attached.out, "up\n"))
      << Describe(attached);
  auto logs = RunCella({"logs", "trap"});
  // stdout only: busybox sh may also report its `sleep` child as
  // "Terminated", on stderr, which `logs` writes to its own stderr.
  EXPECT_EQ(logs.out, "up\nbye\n") << Describe(logs);
  auto ps = RunCella({"ps", "-a"});
  EXPECT_TRUE(Contains(ps.out, "Exited (3)")) << Describe(ps);
  auto doc = Inspect("trap");
  ASSERT_TRUE(doc.is_object()) << doc.dump();
  EXPECT_EQ(doc.value("state", std::string()), "exited") << doc.dump(2);
  EXPECT_EQ(doc.value("exit_code", -1), 3) << doc.dump(2);
  auto wait = RunCella({"wait", "trap"});
  EXPECT_EQ(wait.out, "3\n") << Describe(wait);
  auto ended = RunCella({"inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "trap"});
  EXPECT_EQ(ended.out, "exited 3\n") << Describe(ended);
  auto exited = RunCella({"ps", "-q", "--filter", "status=exited"});
  EXPECT_EQ(exited.out, id.substr(0, 12) + "\n") << Describe(exited);
  // events: the state changes, as JSON lines, from the history (--until 0s:
  // the past only, then exit).
  auto events = RunCella({"events", "--since", "1h", "--until", "0s"});
  ASSERT_EQ(events.exit_code, 0) << Describe(events);
  std::vector<std::string> states;
  for (size_t at = 0, nl; (nl = events.out.find('\n', at)) != std::string::npos; at = nl + 1) {
    auto line = nlohmann::json::parse(events.out.substr(at, nl - at), nullptr, false);
    ASSERT_TRUE(line.is_object()) << events.out;
    if (line.value("id", "") == id) states.push_back(line.value("state", ""));
  }
  EXPECT_EQ(states, (std::vector<std::string>{"creating", "running", "stopping", "exited"}))
      << events.out;
  EXPECT_EQ(RunCella({"rm", "trap"}).exit_code, 0);
}

// docker restart and docker port, as typed.
TEST_F(DockerHabits, RestartBootsAgainAndPortSaysWhereEachGuestPortIsPublished) {
  const uint16_t host_port = cella::testing::FreePort();
  ASSERT_NE(host_port, 0);
  const std::string published = "127.0.0.1:" + std::to_string(host_port);
  std::string id = RunDetached({"--name", "web", "-p", std::to_string(host_port) + ":80", "--",
                                "sh", "-c", "echo up; sleep 100000"});
  ASSERT_FALSE(id.empty());
  // Each boot says "up" once: counted in its log (bounded wait).
  auto logged_up = [&](const std::string& expected) {
    std::string out;
    for (int i = 0; i < 600 && out != expected; ++i) {  // bounded: 60 s and more
      out = RunCella({"logs", "web"}).out;
      if (out != expected) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return out;
  };
  ASSERT_EQ(logged_up("up\n"), "up\n");

  auto all = RunCella({"port", "web"});
  EXPECT_EQ(all.exit_code, 0) << Describe(all);
  EXPECT_EQ(all.out, "80/tcp -> " + published + "\n") << Describe(all);
  auto one = RunCella({"port", "web", "80/tcp"});
  EXPECT_EQ(one.out, published + "\n") << Describe(one);
  auto unpublished = RunCella({"port", "web", "81"});
  EXPECT_NE(unpublished.exit_code, 0) << Describe(unpublished);
  EXPECT_TRUE(Contains(unpublished.err, "no public port '81/tcp' published for web"))
      << Describe(unpublished);
  EXPECT_NE(RunCella({"port", "web", "80/udp"}).exit_code, 0);  // TCP only

  // A fresh boot of the same sandbox: memory (a tmpfs) is gone; the name,
  // ports and output log stay.
  ExecScript("web", "touch /dev/shm/before-restart");
  auto restarted = RunCella({"restart", "-t", "1", "web"}, "", std::chrono::seconds(300));
  ASSERT_EQ(restarted.exit_code, 0) << Describe(restarted);
  EXPECT_EQ(restarted.out, "web\n");
  ASSERT_TRUE(WaitForState("web", "running"));
  EXPECT_EQ(ExecScript("web", "test -e /dev/shm/before-restart && echo same || echo fresh"),
            "fresh");
  EXPECT_EQ(logged_up("up\nup\n"), "up\nup\n");
  EXPECT_EQ(RunCella({"port", "web", "80"}).out, published + "\n");

  // Stopped: nothing is published; restart then just starts it.
  ASSERT_EQ(RunCella({"stop", "-t", "1", "web"}).exit_code, 0);
  auto stopped = RunCella({"port", "web"});
  EXPECT_EQ(stopped.exit_code, 0) << Describe(stopped);
  EXPECT_EQ(stopped.out, "");
  auto started = RunCella({"restart", "web"}, "", std::chrono::seconds(300));
  EXPECT_EQ(started.exit_code, 0) << Describe(started);
  EXPECT_TRUE(WaitForState("web", "running"));
  EXPECT_EQ(RunCella({"rm", "-f", "web"}).exit_code, 0);

  // A sandbox removed at its end (--rm) is refused before anything stops:
  // its stop would remove it.
  std::string once = RunDetached({"--rm", "--name", "once", "--", "sleep", "100000"});
  ASSERT_FALSE(once.empty());
  auto refused = RunCella({"restart", "once"});
  EXPECT_NE(refused.exit_code, 0) << Describe(refused);
  EXPECT_TRUE(Contains(refused.err, "--rm")) << Describe(refused);
  EXPECT_EQ(State("once"), "running");
  EXPECT_EQ(RunCella({"rm", "-f", "once"}).exit_code, 0);
}

// --read-only: no writable layer and a read-only root; /tmp is still
// writable, and --tmpfs mounts a sized tmpfs anywhere.
TEST_F(DockerHabits, ReadOnlyRootKeepsTmpAndTmpfsWritable) {
  auto r = RunCella({"run", "--read-only", "--tmpfs", "/scratch:size=1m", "@builtin", "sh", "-c",
                     "touch /etc/x 2>/dev/null && echo root-rw || echo root-ro; "
                     "touch /tmp/a && echo tmp; touch /scratch/b && echo scratch; "
                     "df -k /scratch | tail -1 | awk '{print $2}'"},
                    "", std::chrono::seconds(300));
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "root-ro\ntmp\nscratch\n1024\n") << Describe(r);
  auto bad = RunCella({"run", "--tmpfs", "relative", "@builtin", "true"});
  EXPECT_EQ(bad.exit_code, 125) << Describe(bad);
  EXPECT_EQ(CountSandboxes(), 0u);
}

// A foreground run that fails after boot tears its sandbox down.
TEST_F(DockerHabits, FailedForegroundRunLeavesNoSandboxRunning) {
  auto r = RunCella({"run", "-u", "nosuchuser", "--", "true"}, "", std::chrono::seconds(300));
  EXPECT_EQ(r.exit_code, 125) << Describe(r);
  EXPECT_EQ(CountSandboxes(), 0u);

  // A boot the guest gives up on says the guest's reason on its first line.
  auto workdir =
      RunCella({"run", "-w", "/etc/passwd", "@builtin", "true"}, "", std::chrono::seconds(300));
  EXPECT_EQ(workdir.exit_code, 125) << Describe(workdir);
  std::string first_line = workdir.err.substr(0, workdir.err.find('\n'));
  EXPECT_TRUE(Contains(first_line, "workdir")) << Describe(workdir);
  EXPECT_FALSE(Contains(first_line, "Broken pipe")) << Describe(workdir);
  EXPECT_EQ(CountSandboxes(), 0u);
}

// run --restart, logs kept per stream with times, and anonymous volumes,
// on two detached sandboxes: one that fails every time (on-failure:2, so
// three runs in all), one that ends well every time (always) until stopped.
TEST_F(DockerHabits, RestartPolicyLogsStreamsAndAnonymousVolumes) {
  // Refused before anything boots.
  auto bad = RunCella({"run", "-d", "--restart", "sometimes", "@builtin", "true"});
  EXPECT_EQ(bad.exit_code, 125) << Describe(bad);
  EXPECT_TRUE(Contains(bad.err, "on-failure[:N]")) << Describe(bad);
  auto with_rm = RunCella({"run", "-d", "--rm", "--restart", "always", "@builtin", "true"});
  EXPECT_EQ(with_rm.exit_code, 125) << Describe(with_rm);
  auto foreground = RunCella({"run", "--restart", "always", "@builtin", "true"});
  EXPECT_EQ(foreground.exit_code, 125) << Describe(foreground);
  EXPECT_EQ(CountSandboxes(), 0u);

  std::string id = RunDetached({"--name", "flaky", "--restart", "on-failure:2", "-v", "/data",
                                "@builtin", "sh", "-c",
                                "n=$(( $(cat /data/n 2>/dev/null || echo 0) + 1 )); "
                                "echo $n > /data/n; printf out; sleep 0.3; echo \" $n\"; "
                                "echo err $n >&2; exit 1"});
  ASSERT_FALSE(id.empty());
  std::string ended;
  for (int i = 0; i < 1500 && ended != "exited 1 2"; ++i) {
    ended = RunCella({"inspect", "-f", "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}",
                      "flaky"})
                .out;
    if (!ended.empty() && ended.back() == '\n') ended.pop_back();
    if (ended != "exited 1 2") std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ASSERT_EQ(ended, "exited 1 2") << RunCella({"inspect", "flaky"}).out;
  auto policy = RunCella({"inspect", "-f",
                          "{{.HostConfig.RestartPolicy.Name}} "
                          "{{.HostConfig.RestartPolicy.MaximumRetryCount}}",
                          "flaky"});
  EXPECT_EQ(policy.out, "on-failure 2\n") << Describe(policy);
  // No fourth run: the supervisor is gone once the retries are used up.
  auto doc = Inspect("flaky");
  ASSERT_TRUE(doc.is_object());
  EXPECT_TRUE(WaitGone(doc.value("supervisor_pid", 0))) << doc.dump(2);
  EXPECT_EQ(RunCella({"inspect", "-f", "{{.RestartCount}}", "flaky"}).out, "2\n");

  // logs: the three runs, stdout to stdout and stderr to stderr; the
  // anonymous volume outlived each restart (the count went on). Each "out N"
  // line came in two writes ("out", then " N\n"): one line to logs, its
  // time the first piece's, one line to --tail.
  auto logs = RunCella({"logs", "flaky"});
  ASSERT_EQ(logs.exit_code, 0) << Describe(logs);
  EXPECT_EQ(logs.out, "out 1\nout 2\nout 3\n") << Describe(logs);
  EXPECT_EQ(logs.err, "err 1\nerr 2\nerr 3\n") << Describe(logs);
  // -t: docker's RFC 3339 nano prefix; --since/--until with those times.
  auto timed = RunCella({"logs", "-t", "flaky"});
  ASSERT_EQ(timed.exit_code, 0) << Describe(timed);
  const std::regex line_re(R"((\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) out (\d)\n)");
  std::vector<std::string> times;
  for (std::sregex_iterator it(timed.out.begin(), timed.out.end(), line_re), end; it != end; ++it)
    times.push_back((*it)[1]);
  ASSERT_EQ(times.size(), 3u) << Describe(timed);
  EXPECT_EQ(RunCella({"logs", "--since", times[1], "flaky"}).out, "out 2\nout 3\n");
  EXPECT_EQ(RunCella({"logs", "--until", times[1], "flaky"}).out, "out 1\nout 2\n");
  // --tail counts lines of both streams: the last two are "out 3", "err 3".
  EXPECT_EQ(RunCella({"logs", "--since", "1h", "--tail", "2", "flaky"}).out, "out 3\n");
  EXPECT_EQ(RunCella({"logs", "--since", "2200-01-01", "flaky"}).out, "");
  auto bad_time = RunCella({"logs", "--since", "yesterday", "flaky"});
  EXPECT_EQ(bad_time.exit_code, 125) << Describe(bad_time);

  // The anonymous volume: 64 hex digits in `volume ls`, gone with `rm -v`.
  auto volumes = nlohmann::json::parse(RunCella({"volume", "ls", "--json"}).out, nullptr, false);
  ASSERT_TRUE(volumes.is_array() && volumes.size() == 1u) << volumes.dump();
  EXPECT_TRUE(std::regex_match(volumes[0].value("name", ""), std::regex("[0-9a-f]{64}")))
      << volumes.dump();
  auto removed = RunCella({"rm", "-v", "flaky"});
  EXPECT_EQ(removed.exit_code, 0) << Describe(removed);
  EXPECT_EQ(RunCella({"volume", "ls", "--json"}).out, "[]\n");

  // always: restarted after a clean exit too, until `stop`, which no
  // restart undoes (the supervisor, the only restarter, ends).
  std::string steady =
      RunDetached({"--name", "steady", "--restart", "always", "@builtin", "sh", "-c", "echo tick"});
  ASSERT_FALSE(steady.empty());
  std::string count;
  for (int i = 0; i < 1500 && (count.empty() || count == "0\n"); ++i) {
    count = RunCella({"inspect", "-f", "{{.RestartCount}}", "steady"}).out;
    if (count.empty() || count == "0\n")
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ASSERT_NE(count, "0\n");
  auto stop = RunCella({"stop", "steady"});
  EXPECT_EQ(stop.exit_code, 0) << Describe(stop);
  auto stopped = Inspect("steady");
  ASSERT_TRUE(stopped.is_object());
  EXPECT_TRUE(WaitGone(stopped.value("supervisor_pid", 0))) << stopped.dump(2);
  const std::string final_state = State("steady");
  EXPECT_TRUE(final_state == "stopped" || final_state == "exited") << final_state;
  // The first run printed before it ended (the stop may cut a later one
  // short).
  EXPECT_TRUE(RunCella({"logs", "steady"}).out.starts_with("tick\n"));
}

}  // namespace
}  // namespace cella::test
