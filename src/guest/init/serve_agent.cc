#include "guest/init/serve_agent.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/reboot.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "base/io.h"
#include "guest/agent/agent.h"
#include "guest/agent/host_wait.h"
#include "guest/agent/resume.h"
#include "guest/init/console.h"
#include "guest/init/format.h"
#include "guest/init/fuse_share.h"
#include "guest/init/workload.h"

namespace cella::init {
namespace {

constexpr unsigned kPowerOffGraceSeconds = 2;

bool g_main_exited = false;
bool g_shutdown_requested = false;
std::chrono::milliseconds g_shutdown_grace{0};
std::chrono::steady_clock::time_point g_shutdown_deadline;

// SIGALRM: the host did not close the link after the main process's Result.
// sync and reboot are plain syscalls, safe in a handler.
void PowerOffFromAlarm(int) {
  ::sync();
  ::reboot(RB_POWER_OFF);
}

// The agent queues the final Result inside Serve(); powering off right away
// would lose it. Serve() returns once it is sent (StopWhenFlushed) and the
// loop powers off; the alarm bounds the wait if the host stops reading.
void ArmPowerOffAlarm() {
  struct sigaction action {};
  action.sa_handler = PowerOffFromAlarm;
  if (::sigaction(SIGALRM, &action, nullptr) != 0) {
    SayError(std::string("sigaction SIGALRM: ") + std::strerror(errno));
    PowerOff();
  }
  ::alarm(kPowerOffGraceSeconds);
}

// Blocks until a host is connected to the agent port, so Serve() neither
// spins on the EOF a port without a host reads nor leaves a Hello queued
// in QEMU for a later host (a resume, a fork copy) to find.
Status WaitForHostLink(int fd) {
  for (;;) {
    auto waited = agent::WaitForHost(fd, std::chrono::seconds(5), std::chrono::milliseconds(200));
    if (!waited) return std::unexpected(std::move(waited.error()).WithContext("agent port"));
    if (waited->connected) return {};
  }
}

// Blocks until the next host has written to the port (after a release).
Status WaitForNextHostData(int fd) {
  for (;;) {
    auto has_data = agent::WaitForHostData(fd, std::chrono::seconds(5));
    if (!has_data) return std::unexpected(std::move(has_data.error()).WithContext("agent port"));
    if (*has_data) return {};
  }
}

std::string Trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

Result<std::string> FindVirtioPort(std::string_view name, Deadline deadline) {
  const std::string dir_path = "/sys/class/virtio-ports";
  for (;;) {
    DIR* dir = ::opendir(dir_path.c_str());
    if (dir != nullptr) {
      std::string found;
      for (;;) {
        // Reset before every call: the name file read below may set errno
        // (a port still being created has none yet).
        errno = 0;
        dirent* entry = ::readdir(dir);
        if (entry == nullptr) break;
        std::string port = entry->d_name;
        if (port == "." || port == "..") continue;
        std::string name_file = dir_path;
        name_file.append("/").append(port).append("/name");
        auto port_name = ReadFileToString(name_file, 4096);
        // A port without a name file was created without name=: not ours.
        if (port_name && Trimmed(*port_name) == name) found = "/dev/" + port;
      }
      int err = errno;
      ::closedir(dir);
      if (err != 0) return FailErrno("readdir " + dir_path, err);
      if (!found.empty()) return found;
    } else if (errno != ENOENT) {
      return FailErrno("opendir " + dir_path);
    }
    if (std::chrono::steady_clock::now() >= deadline)
      return Fail("no virtio-serial port named \"" + std::string(name) +
                  "\" (is virtio_console loaded and the port attached?)");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Status ServeAgent(const protocol::Config& config, const std::string& port_path) {
  agent::AgentOptions options;
  options.hardening = config.privileged ? agent::Hardening::kOff : agent::Hardening::kOn;
  options.answer_release_on_reopened_port = true;
  options.reap = agent::ReapMode::kAllChildren;
  protocol::ExecRequest main;
  main.argv = WorkloadArgv(config);
  for (const auto& [key, value] : config.env) main.env.push_back(EnvEntry(key, value));
  if (!config.env.contains("PATH")) main.env.push_back("PATH=" + std::string(kDefaultPath));
  main.workdir = config.workdir;
  main.user = config.user;
  main.privileged = config.privileged;
  main.tty = config.tty;
  // The host decides: `cella run -i` streams into it, otherwise it closes
  // stdin right after attaching.
  main.stdin_open = true;
  if (!main.argv.empty()) options.main_request = std::move(main);
  const bool keep_alive = config.keep_alive;
  // Set once the agent exists; the callbacks only run inside Serve().
  agent::Agent* serving = nullptr;
  options.on_main_exit = [keep_alive, &serving](int wait_status) {
    Say(MainExitLine(wait_status));
    g_main_exited = true;
    // During a stop the main process's end is what the guest waited for,
    // keep-alive or not.
    if (!keep_alive || g_shutdown_requested) {
      serving->StopWhenFlushed();
      ArmPowerOffAlarm();  // bounds the flush if the host stops reading
    }
  };
  options.on_shutdown = [&serving](const protocol::ShutdownRequest& request) {
    g_shutdown_requested = true;
    g_shutdown_grace = std::chrono::milliseconds(request.grace_ms);
    g_shutdown_deadline = std::chrono::steady_clock::now() + g_shutdown_grace;
    // docker stop: the main process gets SIGTERM while the agent still
    // serves, so what it prints on the way out and its exit status reach
    // the host; on_main_exit then ends serving. SIGKILL after the grace
    // bounds the wait, and the host bounds it again (grace + 5 s).
    if (serving->TerminateMain(g_shutdown_grace)) return;
    serving->StopWhenFlushed();
    ArmPowerOffAlarm();
  };
  options.on_resumed = [](const protocol::ResumedRequest& request) -> Result<uint64_t> {
    auto count = agent::ApplyResume(request);
    // Not on the console unless debugging: a line costs ~5 ms of serial
    // output under TCG on every resume and fork copy.
    if (count) Debug("resumed from a snapshot (resume " + std::to_string(*count) + ")");
    return count;
  };
  options.on_serve_share = [&config](uint32_t index) { return ServeFuseShare(config, index); };
  // The staged shares go in place as soon as the host serves them (their
  // calls wait for it); the host's shares_mounted waits for the outcome.
  CELLA_TRY_CTX(StartPlacingShares(), "host shares");
  options.mounts_result = [] { return SharesPlacedResult(); };
  options.mounts_ready_fd = SharesPlacedFd();
  auto agent = agent::Agent::Create(std::move(options));
  if (!agent) return std::unexpected(std::move(agent.error()).WithContext("agent"));
  serving = agent->get();

  Say("agent serving on " + port_path);
  Debug("agent starts serving");
  bool released = false;
  for (;;) {
    UniqueFd link(::open(port_path.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY));
    if (!link) return FailErrno("open agent port " + port_path);
    if (released) {
      // The port is open anew before the host that asked for the release
      // may save the VM; the next host then speaks first.
      if (auto answered = (*agent)->AnswerRelease(link.Get()); !answered)
        Debug("agent release: " + answered.error().message);
      CELLA_TRY(WaitForNextHostData(link.Get()));
    } else {
      CELLA_TRY(WaitForHostLink(link.Get()));
    }
    auto end = (*agent)->Serve(std::move(link));
    released = end && *end == agent::LinkEnd::kReleased;
    if (!end) Debug("agent link ended: " + end.error().message);
    if (end) Debug("agent link ended (" + std::to_string(static_cast<int>(*end)) + ")");
    if (g_shutdown_requested) {
      // The Result has been flushed (or the link is gone): the alarm that
      // bounded that flush must not cut the workload's grace short.
      ::alarm(0);
      Say("shutdown requested by the host");
      // What the main process left behind gets the rest of the grace (at
      // least a moment to take its SIGTERM).
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          g_shutdown_deadline - std::chrono::steady_clock::now());
      StopAllProcesses(std::max(left, std::chrono::milliseconds(200)));
      PowerOff();
    }
    if (g_main_exited && !keep_alive) PowerOff();
    // The port is closed at the top of the loop and opened again at once:
    // WaitForHostLink blocks until the next host connects (after a release,
    // WaitForNextHostData until it writes).
  }
}

}  // namespace cella::init
