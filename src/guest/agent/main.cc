// cella-agent: serves the agent protocol on an inherited fd, a Unix socket,
// or a virtio-serial port. The CLI is hand-parsed: the binary is static and
// runs inside arbitrary guest images.
#include <dirent.h>
#include <fcntl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "guest/agent/agent.h"
#include "guest/agent/host_wait.h"
#include "guest/agent/resume.h"

namespace {

using cella::Result;
using cella::UniqueFd;
using cella::agent::Agent;

constexpr const char* kUsage =
    "usage: cella-agent (--fd N | --listen PATH | --device PATH | --virtio-port NAME)\n"
    "                   [--harden] [--on-shutdown exit|poweroff] [--as-if-serving-shares]\n"
    "                   [--debug]\n"
    "  --on-shutdown exit      the shutdown op syncs and stops serving (default)\n"
    "  --on-shutdown poweroff  the shutdown op also asks PID 1 (systemd) to power off\n"
    "  --as-if-serving-shares  start commands and run file operations as the agent\n"
    "                          does once it serves a host share (off its loop)\n";

// Returns the exit code for a bad command line. If stderr itself is broken
// there is no one left to tell.
int UsageError(const std::string& problem) {
  (void)std::fprintf(stderr, "cella-agent: %s\n%s", problem.c_str(), kUsage);
  return 2;
}

enum class Mode { kNone, kFd, kListen, kDevice, kVirtioPort };

// What the host's `shutdown` op does beyond syncing. In systemd mode the
// agent is a service, not PID 1: the VM only goes down if it asks systemd.
enum class ShutdownAction { kStopServing, kPowerOffThroughInit };

struct Args {
  Mode mode = Mode::kNone;
  std::string value;
  ShutdownAction on_shutdown = ShutdownAction::kStopServing;
  bool harden = false;
  bool as_if_serving_shares = false;
  bool debug = false;
};

Result<Args> ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto take = [&](Mode mode) -> cella::Status {
      if (i + 1 >= argc) return cella::Fail(std::string(a) + " needs a value");
      if (args.mode != Mode::kNone)
        return cella::Fail("give only one of --fd/--listen/--device/--virtio-port");
      args.mode = mode;
      args.value = argv[++i];
      return {};
    };
    if (a == "--fd") {
      CELLA_TRY(take(Mode::kFd));
    } else if (a == "--listen") {
      CELLA_TRY(take(Mode::kListen));
    } else if (a == "--device") {
      CELLA_TRY(take(Mode::kDevice));
    } else if (a == "--virtio-port") {
      CELLA_TRY(take(Mode::kVirtioPort));
    } else if (a == "--on-shutdown") {
      if (i + 1 >= argc) return cella::Fail("--on-shutdown needs a value");
      std::string_view action = argv[++i];
      if (action == "exit") {
        args.on_shutdown = ShutdownAction::kStopServing;
      } else if (action == "poweroff") {
        args.on_shutdown = ShutdownAction::kPowerOffThroughInit;
      } else {
        return cella::Fail("--on-shutdown: unknown action " + std::string(action) +
                           " (want exit or poweroff)");
      }
    } else if (a == "--harden") {
      args.harden = true;
    } else if (a == "--as-if-serving-shares") {
      args.as_if_serving_shares = true;
    } else if (a == "--debug") {
      args.debug = true;
    } else {
      return cella::Fail("unknown argument " + std::string(a));
    }
  }
  if (args.mode == Mode::kNone) return cella::Fail("no link given");
  return args;
}

Result<std::string> FindVirtioPort(const std::string& name) {
  const char* dir_path = "/sys/class/virtio-ports";
  DIR* dir = ::opendir(dir_path);
  if (!dir) return cella::FailErrno(std::string("open ") + dir_path);
  std::string found;
  for (;;) {
    errno = 0;
    dirent* ent = ::readdir(dir);
    if (!ent) break;
    std::string entry = ent->d_name;
    if (entry == "." || entry == "..") continue;
    auto port_name = cella::ReadFileToString(std::string(dir_path) + "/" + entry + "/name", 4096);
    if (!port_name) continue;  // ports without a name file are not ours
    std::string n = *port_name;
    while (!n.empty() && (n.back() == '\n' || n.back() == ' ')) n.pop_back();
    if (n == name) {
      found = "/dev/" + entry;
      break;
    }
  }
  int err = errno;
  ::closedir(dir);
  if (found.empty()) {
    if (err != 0) return cella::FailErrno(std::string("readdir ") + dir_path, err);
    return cella::FailErrno("no virtio port named " + name, ENOENT);
  }
  return found;
}

Result<UniqueFd> Listen(const std::string& path) {
  UniqueFd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock) return cella::FailErrno("socket(AF_UNIX)");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return cella::Fail("socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return cella::FailErrno("unlink " + path);
  if (::bind(sock.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return cella::FailErrno("bind " + path);
  if (::listen(sock.Get(), 4) != 0) return cella::FailErrno("listen " + path);
  return sock;
}

void Report(const Result<cella::agent::LinkEnd>& end) {
  if (end && *end == cella::agent::LinkEnd::kReleased) {
    cella::log::Info("agent: released the link for a snapshot");
  } else if (end) {
    cella::log::Info("agent: host closed the link");
  } else {
    cella::log::Warn("agent: link ended", {{"error", end.error().message}});
  }
}

bool g_shutdown_requested = false;

// systemd(1): SIGRTMIN+4 starts poweroff.target (job mode
// replace-irreversibly), i.e. `systemctl poweroff` without needing systemctl
// or D-Bus. Only when PID 1 cannot be signalled does the agent cut the power
// itself, because a shutdown the host asked for must not be lost.
void PowerOffThroughInit() {
  if (::kill(1, SIGRTMIN + 4) == 0) {
    cella::log::Info("agent: asked PID 1 to power off");
    return;
  }
  cella::log::Error("agent: cannot signal PID 1 to power off; powering off directly",
                    {{"error", std::strerror(errno)}});
  ::sync();
  if (::reboot(RB_POWER_OFF) != 0)
    cella::log::Error("agent: reboot(RB_POWER_OFF) failed", {{"error", std::strerror(errno)}});
}

int Run(const Args& args) {
  cella::agent::AgentOptions options;
  options.hardening = args.harden ? cella::agent::Hardening::kOn : cella::agent::Hardening::kOff;
  options.as_if_serving_shares = args.as_if_serving_shares;
  // The grace is not used here: in systemd mode systemd's own stop timeouts
  // apply, and without --on-shutdown poweroff nothing is stopped.
  options.on_shutdown = [action = args.on_shutdown](const cella::protocol::ShutdownRequest&) {
    ::sync();
    g_shutdown_requested = true;
    if (action == ShutdownAction::kPowerOffThroughInit) PowerOffThroughInit();
  };
  options.answer_release_on_reopened_port =
      args.mode == Mode::kDevice || args.mode == Mode::kVirtioPort;
  options.on_resumed = [](const cella::protocol::ResumedRequest& request) {
    return cella::agent::ApplyResume(request);
  };
  auto agent = Agent::Create(std::move(options));
  if (!agent) {
    cella::log::Error("agent: cannot start", {{"error", agent.error().message}});
    return 1;
  }
  switch (args.mode) {
    case Mode::kFd: {
      int fd = 0;
      auto [ptr, ec] =
          std::from_chars(args.value.data(), args.value.data() + args.value.size(), fd);
      if (ec != std::errc() || ptr != args.value.data() + args.value.size() || fd < 0) {
        return UsageError("--fd needs a descriptor number");
      }
      auto end = (*agent)->Serve(UniqueFd(fd));
      Report(end);
      return end ? 0 : 1;
    }
    case Mode::kListen: {
      auto sock = Listen(args.value);
      if (!sock) {
        cella::log::Error("agent: cannot listen", {{"error", sock.error().message}});
        return 1;
      }
      while (!g_shutdown_requested) {
        int conn = ::accept4(sock->Get(), nullptr, nullptr, SOCK_CLOEXEC);
        if (conn < 0) {
          if (errno == EINTR || errno == ECONNABORTED) continue;
          cella::log::Error("agent: accept failed", {{"error", std::strerror(errno)}});
          return 1;
        }
        Report((*agent)->Serve(UniqueFd(conn)));
      }
      return 0;
    }
    case Mode::kDevice:
    case Mode::kVirtioPort: {
      std::string path = args.value;
      if (args.mode == Mode::kVirtioPort) {
        auto found = FindVirtioPort(args.value);
        if (!found) {
          cella::log::Error("agent: cannot find the port", {{"error", found.error().message}});
          return 1;
        }
        path = *found;
      }
      bool released = false;
      while (!g_shutdown_requested) {
        UniqueFd dev(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY));
        if (!dev) {
          cella::log::Warn("agent: cannot open the port",
                           {{"path", path}, {"error", std::strerror(errno)}});
          // The host side may reconnect later; do not spin while it is away.
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
          continue;
        }
        if (released) {
          // Opened anew before the host that asked for the release may save
          // the VM; the next host speaks first.
          if (auto answered = (*agent)->AnswerRelease(dev.Get()); !answered)
            cella::log::Warn("agent: release", {{"error", answered.error().message}});
          released = false;
          bool has_data = false;
          while (!has_data && !g_shutdown_requested) {
            auto waited = cella::agent::WaitForHostData(dev.Get(), std::chrono::seconds(5));
            if (!waited) {
              cella::log::Warn("agent: waiting for the next host failed",
                               {{"error", waited.error().message}});
              std::this_thread::sleep_for(std::chrono::milliseconds(200));
            }
            has_data = waited && *waited;
          }
          if (!has_data) continue;
        } else {
          // Serve only once a host is there (a virtio port raises SIGIO when
          // it connects); a device without that is tried every 200 ms.
          auto waited = cella::agent::WaitForHost(dev.Get(), std::chrono::seconds(5),
                                                  std::chrono::milliseconds(200));
          if (!waited) {
            cella::log::Warn("agent: waiting for the host failed",
                             {{"error", waited.error().message}});
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
          }
          if (waited && !waited->connected) continue;
        }
        auto began = std::chrono::steady_clock::now();
        auto end = (*agent)->Serve(std::move(dev));
        Report(end);
        released = end && *end == cella::agent::LinkEnd::kReleased;
        // A link that ended at once (a device that reads EOF without a host
        // and cannot say so) must not make this loop spin; a release is the
        // host's own doing and its next host is waited for at once.
        if (!released && std::chrono::steady_clock::now() - began < std::chrono::milliseconds(50))
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
      return 0;
    }
    case Mode::kNone:
      break;
  }
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    auto args = ParseArgs(argc, argv);
    if (!args) return UsageError(args.error().message);
    if (args->debug) cella::log::SetLevel(cella::log::Level::kDebug);
    return Run(*args);
  } catch (const std::exception& e) {
    // Errors are values here: only the standard library (bad_alloc...) throws.
    (void)std::fprintf(stderr, "cella-agent: fatal: %s\n", e.what());
    return 1;
  }
}
