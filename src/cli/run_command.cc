// `cella run`: boot a sandbox from an image (or the built-in one), attach to its main
// process, stream its output, and exit with its code.
#include <poll.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "cli/commands.h"
#include "cli/image_commands.h"
#include "cli/run_options.h"
#include "host/sandbox/compose.h"
#include "host/vmm/paths.h"
#include "host/vmm/qemu_backend.h"
#include "protocol/config.h"

namespace cella::cli {
namespace {

constexpr const char* kDefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const char* HostEnv(const char* name) { return std::getenv(name); }

Result<std::string> NewSandboxId() {
  unsigned char bytes[6];
  size_t got = 0;
  while (got < sizeof bytes) {
    ssize_t n = ::getrandom(bytes + got, sizeof bytes - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno("getrandom");
    }
    got += static_cast<size_t>(n);
  }
  static const char kHex[] = "0123456789abcdef";
  std::string id;
  for (unsigned char b : bytes) {
    id += kHex[b >> 4];
    id += kHex[b & 0xf];
  }
  return id;
}

struct Prepared {
  protocol::Config guest;
  vmm::VMConfig vm;
  vmm::AccelMode accel = vmm::AccelMode::kAuto;
  std::chrono::milliseconds boot_timeout{120'000};
};

Result<Prepared> Prepare(const RunArgs& args, const std::string& home, const std::string& id,
                         const std::string& state_dir) {
  Prepared p;
  protocol::Config& g = p.guest;
  g.env["PATH"] = kDefaultPath;
  g.env["HOME"] = "/root";
  g.workdir = args.workdir;
  g.user = args.user;
  std::string root_image_path;  // empty: the built-in image
  if (!args.image.empty()) {
    RunImage image = CELLA_TRY(
        PrepareRunImage(home, args.image, args.platform, {args.insecure_registries, args.ca_file}));
    root_image_path = image.rootfs_path;
    // Image env lands on top of the defaults and under the user's -e/--env-file.
    CELLA_TRY_CTX(sandbox::ApplyImageDefaults(image.defaults, args.command, g), args.image);
  } else {
    g.cmd = args.command.empty() ? std::vector<std::string>{"sh"} : args.command;
  }
  for (const auto& file : args.env_files) {
    auto text = CELLA_TRY_CTX(ReadFileToString(file, 1 << 20), "--env-file");
    CELLA_TRY(ApplyEnvFile(text, file, &HostEnv, g.env));
  }
  for (const auto& item : args.env_items) CELLA_TRY(ApplyEnvAssignment(item, &HostEnv, g.env));
  g.hostname = args.hostname;
  g.privileged = args.privileged;
  g.no_network = args.no_network;
  g.dns_servers = args.dns;
  if (!args.no_network) g.mtu = args.mtu;
  for (const auto& item : args.add_hosts) {
    HostEntry e = CELLA_TRY(ParseAddHost(item));
    g.extra_hosts.push_back({e.host, e.ip});
  }
  sandbox::MachineShape shape;
  if (!args.cpus.empty()) g.cpus = shape.cpus = CELLA_TRY(ParseCpus(args.cpus));
  if (!args.memory.empty()) shape.memory_mib = CELLA_TRY(ParseMemoryMiB(args.memory));

  std::optional<kernel::KernelOverride> kernel_override;
  std::string kernel_path = args.kernel;
  if (kernel_path.empty())
    if (const char* from_env = std::getenv("CELLA_KERNEL")) kernel_path = from_env;
  if (!kernel_path.empty()) kernel_override = kernel::KernelOverride{kernel_path, ""};
  std::string bin_dir = CELLA_TRY(sandbox::GuestBinaryDir());
  sandbox::GuestAssets assets =
      CELLA_TRY(sandbox::EnsureGuestAssets(home, bin_dir, kernel_override));
  if (!assets.kernel.notice.empty()) log::Notice(assets.kernel.notice);

  p.vm = CELLA_TRY(sandbox::Compose(assets, g, shape, {}, {}, id, state_dir, root_image_path));
  CELLA_TRY(sandbox::WriteGuestConfig(g, p.vm));
  p.accel = CELLA_TRY(vmm::ParseAccelMode(args.accel));
  p.boot_timeout = std::chrono::seconds(args.boot_timeout_s);
  return p;
}

// Forwards SIGINT/SIGTERM/SIGHUP to the guest's main process while it runs.
// The signals are blocked in every thread and collected here with
// sigtimedwait, so no handler runs on an arbitrary thread.
class SignalForwarder {
 public:
  explicit SignalForwarder(host::ExecSession* session) {
    sigemptyset(&set_);
    for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set_, s);
    thread_ = std::thread([this, session] {
      timespec tick{0, 200'000'000};
      while (!done_.load()) {
        int sig = ::sigtimedwait(&set_, nullptr, &tick);
        if (sig <= 0) continue;
        log::Debug("forwarding signal to the guest", {{"signal", sig}});
        if (auto st = session->Signal(sig); !st)
          log::Warn("could not forward signal", {{"error", st.error().message}});
      }
    });
  }
  ~SignalForwarder() {
    done_.store(true);
    thread_.join();
  }
  static void BlockInThisThread() {
    sigset_t set;
    sigemptyset(&set);
    for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, s);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
  }

 private:
  sigset_t set_{};
  std::atomic<bool> done_{false};
  std::thread thread_;
};

// Copies our stdin to the main process until EOF or until stopped.
class StdinPump {
 public:
  explicit StdinPump(host::ExecSession* session) {
    thread_ = std::thread([this, session] {
      char buf[65536];
      while (!done_.load()) {
        pollfd pfd{STDIN_FILENO, POLLIN, 0};
        int n = ::poll(&pfd, 1, 200);
        if (n < 0 && errno != EINTR) break;
        if (n <= 0) continue;
        auto got = ReadSome(STDIN_FILENO, std::as_writable_bytes(std::span(buf)));
        if (!got || *got == 0) break;
        if (!session->WriteStdin(std::string_view(buf, *got))) return;
      }
      if (auto st = session->CloseStdin(); !st)
        log::Debug("closing guest stdin failed", {{"error", st.error().message}});
    });
  }
  ~StdinPump() {
    done_.store(true);
    thread_.join();
  }

 private:
  std::atomic<bool> done_{false};
  std::thread thread_;
};

// A systemd image has no main process to attach to: the VM is the workload.
// It runs until the guest powers off, or until SIGINT/SIGTERM/SIGHUP asks
// for a graceful stop (systemd powers off; the VM is killed after the grace).
Result<int> RunUntilPowerOff(vmm::Machine& machine) {
  log::Notice("systemd image: the sandbox runs until it powers off; Ctrl-C stops it");
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, s);
  for (;;) {
    auto exited = machine.Wait(std::chrono::milliseconds(200));
    if (exited) return 0;
    if (exited.error().errno_value != ETIMEDOUT) return std::unexpected(exited.error());
    timespec no_wait{0, 0};
    int sig = ::sigtimedwait(&set, nullptr, &no_wait);
    if (sig > 0) {
      log::Notice("stopping the sandbox", {{"signal", sig}});
      CELLA_TRY_CTX(machine.Stop(std::chrono::seconds(30)), "stop");
      return 128 + sig;
    }
  }
}

Result<int> RunInSandbox(const RunArgs& args, const std::string& state_dir) {
  std::string home = CELLA_TRY(host::CellaHome());
  std::string id = std::filesystem::path(state_dir).filename().string();
  Prepared prepared = CELLA_TRY(Prepare(args, home, id, state_dir));

  vmm::QemuBackendOptions options = CELLA_TRY(vmm::DetectQemuHost(prepared.accel));
  options.boot_timeout = prepared.boot_timeout;
  log::Debug("accelerator", {{"chosen", std::string(vmm::ToString(options.accel.chosen))},
                             {"reason", options.accel.reason}});
  vmm::QemuBackend backend(std::move(options));
  std::unique_ptr<vmm::Machine> machine = CELLA_TRY(backend.Create(prepared.vm));
  CELLA_TRY_CTX(machine->Start(), "boot");
  log::Debug("sandbox booted", {{"id", id}, {"boot_ms", machine->BootDuration().count()}});
  if (prepared.guest.init_mode == protocol::InitMode::kSystemd) {
    int code = CELLA_TRY(RunUntilPowerOff(*machine));
    if (auto closed = machine->Close(); !closed)
      log::Warn("sandbox cleanup failed", {{"error", closed.error().message}});
    return code;
  }

  host::ExecCallbacks callbacks;
  callbacks.on_stdout = [](std::string_view bytes) {
    if (auto st = WriteAll(STDOUT_FILENO, bytes); !st)
      log::Debug("stdout write failed", {{"error", st.error().message}});
  };
  callbacks.on_stderr = [](std::string_view bytes) {
    if (auto st = WriteAll(STDERR_FILENO, bytes); !st)
      log::Debug("stderr write failed", {{"error", st.error().message}});
  };
  std::unique_ptr<host::ExecSession> main =
      CELLA_TRY_CTX(machine->Agent()->AttachMain(std::move(callbacks)), "attach main process");
  host::ExecStatus status;
  {
    SignalForwarder signals(main.get());
    std::optional<StdinPump> stdin_pump;
    if (args.interactive) {
      stdin_pump.emplace(main.get());
    } else {
      CELLA_TRY_CTX(main->CloseStdin(), "close guest stdin");
    }
    status = CELLA_TRY_CTX(main->Wait(), "main process");
  }
  // The guest powers itself off once the main process is gone; give it a
  // moment to flush and go, then make sure it is gone.
  if (auto exited = machine->Wait(std::chrono::seconds(10)); !exited)
    log::Debug("guest did not power off by itself", {{"error", exited.error().message}});
  if (auto closed = machine->Close(); !closed)
    log::Warn("sandbox cleanup failed", {{"error", closed.error().message}});
  if (status.timed_out) log::Notice("main process timed out");
  return status.ShellCode();
}

// cella's own failure: one line on stderr, docker's exit code 125.
int ReportFailure(const Error& error) {
  std::string line = "cella: " + error.message + "\n";
  // Nothing useful is left to do if stderr itself is gone.
  (void)WriteAll(STDERR_FILENO, line);
  return kExitCellaError;
}

}  // namespace

int RunCommand(const RunArgs& args) {
  SignalForwarder::BlockInThisThread();
  auto home = host::CellaHome();
  if (!home) return ReportFailure(home.error());
  auto id = NewSandboxId();
  if (!id) return ReportFailure(id.error());
  std::string state_dir = *home + "/run/" + *id;
  if (auto made = host::MakeDirs(state_dir, 0700); !made) return ReportFailure(made.error());
  auto code = RunInSandbox(args, state_dir);
  // Foreground runs are --rm: nothing of the sandbox stays behind.
  std::error_code ec;
  std::filesystem::remove_all(state_dir, ec);
  if (ec)
    log::Warn("could not remove sandbox state", {{"path", state_dir}, {"error", ec.message()}});
  if (!code) return ReportFailure(code.error());
  return *code;
}

}  // namespace cella::cli
