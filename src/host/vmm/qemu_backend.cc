#include "host/vmm/qemu_backend.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "base/log.h"
#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/vmm/qemu_argv.h"
#include "host/vmm/qmp.h"
#include "host/vmm/restore_kernel.h"
#include "host/vmm/tsc.h"
#include "protocol/warm.h"

namespace cella::vmm {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

static_assert(kQemuTapChildFd == host::kFirstInheritedFd,
              "the TAP is the first descriptor QEMU inherits");

constexpr milliseconds kQmpTimeout{10'000};
constexpr milliseconds kKillWait{5'000};
constexpr size_t kTailBytes = 3000;

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

// The last `max_bytes` of a log file, trimmed to whole lines; empty when
// unreadable (this only decorates an error that is already being reported).
std::string FileTail(const std::string& path, size_t max_bytes) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return {};
  struct stat st {};
  if (::fstat(fd.Get(), &st) != 0) return {};
  off_t start =
      st.st_size > static_cast<off_t>(max_bytes) ? st.st_size - static_cast<off_t>(max_bytes) : 0;
  std::string out(static_cast<size_t>(st.st_size - start), '\0');
  ssize_t n = ::pread(fd.Get(), out.data(), out.size(), start);
  if (n <= 0) return {};
  out.resize(static_cast<size_t>(n));
  if (start > 0) {
    size_t nl = out.find('\n');
    if (nl != std::string::npos) out.erase(0, nl + 1);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

// One non-blocking attempt; nullopt-like ENOENT/ECONNREFUSED mean "not yet".
Result<UniqueFd> ConnectUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return Fail("socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return FailErrno("socket");
  if (::connect(fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return FailErrno("connect " + path);
  }
  return fd;
}

Status UnlinkIfPresent(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return FailErrno("unlink " + path);
  return {};
}

Error NotSupported(std::string_view what) {
  return Error{std::string(what) + " is not supported by the qemu backend", ENOTSUP};
}

class QemuMachine final : public Machine {
 public:
  QemuMachine(VMConfig config, QemuBackendOptions options, StatePaths paths)
      : config_(std::move(config)), options_(std::move(options)), paths_(std::move(paths)) {}
  ~QemuMachine() override {
    if (auto st = Close(); !st)
      log::Warn("closing VM failed", {{"id", config_.ID}, {"error", st.error().message}});
  }

  Status Start() override;
  Status Stop(milliseconds grace) override;
  using Machine::Wait;
  Result<VmExit> Wait(milliseconds timeout, int wake_fd) override;
  Status Kill() override;

  Result<host::ExecResult> Exec(const protocol::ExecRequest& request) override {
    return CELLA_TRY(RequireAgent("exec"))->Exec(request);
  }
  Status WriteFile(const std::string& path, std::string_view content, uint32_t mode) override {
    host::WriteFileOptions opts;
    opts.mode = mode;
    return CELLA_TRY(RequireAgent("write file"))->WriteFile(path, content, opts);
  }
  Result<std::string> ReadFile(const std::string& path) override {
    return CELLA_TRY(RequireAgent("read file"))->ReadFile(path);
  }
  Result<std::vector<protocol::FileInfo>> ListFiles(const std::string& path) override {
    return CELLA_TRY(RequireAgent("list files"))->ListFiles(path);
  }
  host::AgentClient* Agent() override { return agent_.get(); }

  Result<int> NetworkFD() override {
    if (config_.NetworkFD >= 0) return config_.NetworkFD;
    return std::unexpected(NotSupported("NetworkFD (QEMU user-mode networking has no host fd)"));
  }
  Result<int> VsockFD() override {
    return std::unexpected(NotSupported("VsockFD (no vhost-vsock; the agent uses virtio-serial)"));
  }
  int PID() const override {
    std::lock_guard lock(mu_);
    return exit_ ? -1 : process_.pid;
  }
  Status Close() override;
  std::string RootfsPath() const override {
    if (!config_.PrebuiltRootfs.empty()) return config_.PrebuiltRootfs;
    if (!config_.RootfsPath.empty()) return config_.RootfsPath;
    return config_.OverlayLowerPaths.empty() ? std::string() : config_.OverlayLowerPaths.front();
  }
  Status Pause() override { return CELLA_TRY(RequireQmp("pause"))->Stop(); }
  Status ReleaseAgent(const std::function<void()>& close_link, milliseconds timeout) override;
  Status SaveState(const std::string& uri, milliseconds timeout) override;
  Status SaveStateTo(UniqueFd fd, milliseconds timeout) override;
  Status ReconnectAgent() override;
  Status Resume() override { return CELLA_TRY(RequireQmp("resume"))->Cont(); }
  const VMConfig& Config() const override { return config_; }
  milliseconds BootDuration() const override { return boot_duration_; }

 private:
  Result<host::AgentClient*> RequireAgent(std::string_view what) {
    if (!agent_) return Fail(std::string(what) + ": VM " + config_.ID + " is not started");
    return agent_.get();
  }
  Result<QmpClient*> RequireQmp(std::string_view what) {
    if (!qmp_) return Fail(std::string(what) + ": VM " + config_.ID + " is not started");
    return &*qmp_;
  }
  bool Running() const {
    std::lock_guard lock(mu_);
    return started_ && !exit_;
  }
  // Reaps QEMU when it has exited (no waiting). Returns whether it has.
  Result<bool> ReapIfExited();
  Status KillAndReap();
  // The error for a VM that ended while we waited for it to come up.
  Error DiedDuringBoot(std::string_view stage);
  Error WithConsole(std::string message);
  Status BootSequence(Clock::time_point launched);
  // Waits for the agent's first byte on agent_fd (watching QEMU), then
  // wraps the link and runs the handshake: agent_ is set. kFirst (an agent
  // that was released for a snapshot waits for the host's Hello): straight
  // to the handshake, which sends the host's Hello first.
  enum class HostSpeaks { kAfterTheAgent, kFirst };
  Status ConnectAgent(UniqueFd agent_fd, Clock::time_point deadline, HostSpeaks host_speaks);
  // A restore: feeds the snapshot to QEMU waiting with -incoming defer, then
  // lets the vCPUs run.
  Status RestoreState(Clock::time_point deadline);
  // Reads `line` from the agent socket before the agent protocol starts on
  // it (protocol/warm.h), watching QEMU; anything else is refused, as a
  // guest we do not understand.
  Status AwaitGuestLine(int agent_fd, std::string_view line, std::string_view waiting_for,
                        Clock::time_point deadline);
  // kCapture: waits for the guest's template-point line, then freezes the
  // VM and saves its device state (RAM stays in the template's file).
  Status CaptureTemplate(UniqueFd agent_fd, Clock::time_point deadline);
  // kClone: the go line (clock, RNG seed) that lets the restored guest on.
  Status SendWarmGo(int agent_fd, Clock::time_point deadline);

  VMConfig config_;
  QemuBackendOptions options_;
  StatePaths paths_;

  mutable std::mutex mu_;  // guards process_.pid reaping and exit_
  host::SpawnedProcess process_;
  std::optional<host::ExitStatus> exit_;
  bool started_ = false;
  bool killed_ = false;         // Kill was called: a Start still launching must not boot
  UniqueFd wait_fd_;            // a pidfd for QEMU that stays open until destruction
  UniqueFd incoming_fd_;        // IncomingStateFile, open only until QEMU is spawned
  int incoming_child_fd_ = -1;  // its number in QEMU (migrate-incoming "fd:N")

  std::optional<QmpClient> qmp_;
  std::unique_ptr<host::AgentClient> agent_;
  milliseconds boot_duration_{0};
};

Error QemuMachine::WithConsole(std::string message) {
  std::string qemu_tail = FileTail(paths_.qemu_log, 1500);
  std::string console_tail = FileTail(paths_.console_log, kTailBytes);
  // The guest's reason first: what the host saw (a broken pipe, a dead
  // QEMU) is only the consequence of the guest giving up.
  if (std::string reason = GuestBootError(console_tail); !reason.empty())
    message = "VM " + config_.ID + ": " + reason + "\n(" + message + ")";
  if (!qemu_tail.empty()) message += "\nQEMU said:\n" + qemu_tail;
  message += console_tail.empty()
                 ? "\n(guest console is empty: " + paths_.console_log + ")"
                 : "\nguest console (" + paths_.console_log + "), last lines:\n" + console_tail;
  return Error::Msg(std::move(message));
}

Error QemuMachine::DiedDuringBoot(std::string_view stage) {
  std::string how;
  {
    std::lock_guard lock(mu_);
    how = exit_ ? exit_->Describe() : "exited";
  }
  return WithConsole("VM " + config_.ID + ": QEMU ended (" + how + ") while " + std::string(stage));
}

Result<bool> QemuMachine::ReapIfExited() {
  std::lock_guard lock(mu_);
  if (exit_) return true;
  if (!started_) return false;
  bool exited = CELLA_TRY(host::HasExited(process_));
  if (!exited) return false;
  exit_ = CELLA_TRY(host::WaitForExit(process_, kKillWait));
  return true;
}

Status QemuMachine::KillAndReap() {
  std::lock_guard lock(mu_);
  if (!started_ || exit_) return {};
  if (::kill(process_.pid, SIGKILL) != 0 && errno != ESRCH) {
    return FailErrno("kill QEMU pid " + std::to_string(process_.pid));
  }
  exit_ = CELLA_TRY(host::WaitForExit(process_, kKillWait));
  return {};
}

Status QemuMachine::Kill() {
  std::lock_guard lock(mu_);
  killed_ = true;
  if (!started_ || exit_) return {};
  // Reaping stays with Wait/Close; the pid cannot be reused before it.
  if (::kill(process_.pid, SIGKILL) != 0 && errno != ESRCH)
    return FailErrno("kill QEMU pid " + std::to_string(process_.pid));
  return {};
}

Status QemuMachine::Start() {
  {
    std::lock_guard lock(mu_);
    if (started_) return Fail("VM " + config_.ID + " was already started");
    if (killed_) return Fail("VM " + config_.ID + " was killed before it booted");
  }
  CELLA_TRY(host::MakeDirs(config_.StateDir, 0700));
  // Each boot starts a fresh console (QEMU appends to it: the supervisor
  // trims it in place, see host/sandbox/log_files.h).
  for (const std::string& p : {paths_.agent_socket, paths_.qmp_socket, paths_.qemu_log,
                               paths_.console_log, paths_.console_log + ".1"}) {
    CELLA_TRY(UnlinkIfPresent(p));
  }
  QemuLaunch launch;
  launch.qemu_binary = options_.qemu_binary;
  launch.accel = options_.accel.chosen;
  launch.tsc_khz = options_.tsc_khz;
  launch.agent_socket = paths_.agent_socket;
  launch.qmp_socket = paths_.qmp_socket;
  launch.console_log = paths_.console_log;
  if (!config_.IncomingMigration.empty()) {
    std::string stub = config_.StateDir + "/restore-kernel";
    // Only an optimisation: a restore that cannot write it (disk full) reads
    // the real kernel and initrd as before.
    auto wrote = WriteRestoreKernel(config_.KernelPath, stub);
    if (wrote && *wrote)
      launch.restore_kernel = stub;
    else if (!wrote)
      log::Warn("restoring with the whole kernel", {{"error", wrote.error().message}});
  }
  std::vector<std::string> argv = CELLA_TRY(BuildQemuArgv(config_, launch));
  log::Debug("starting QEMU", {{"id", config_.ID}, {"accel", ToString(launch.accel)}});

  auto launched = Clock::now();
  {
    std::lock_guard lock(mu_);
    std::vector<int> child_fds = QemuChildFds(config_);
    if (!config_.IncomingStateFile.empty()) {
      // Read by QEMU on migrate-incoming "fd:N"; our copy closes below.
      incoming_fd_.Reset(::open(config_.IncomingStateFile.c_str(), O_RDONLY | O_CLOEXEC));
      if (!incoming_fd_) return FailErrno("open " + config_.IncomingStateFile);
      incoming_child_fd_ = host::kFirstInheritedFd + static_cast<int>(child_fds.size());
      child_fds.push_back(incoming_fd_.Get());
    }
    process_ =
        CELLA_TRY_CTX(host::SpawnWithOutputFile(argv, paths_.qemu_log, child_fds), "start QEMU");
    incoming_fd_.Reset();  // QEMU holds its own copy now
    started_ = true;
    // Reaping closes process_.pidfd; Wait polls this duplicate without the
    // lock, so it must outlive every reap.
    wait_fd_.Reset(::fcntl(process_.pidfd.Get(), F_DUPFD_CLOEXEC, 0));
    if (!wait_fd_) {
      Error err = Error::FromErrno("dup QEMU pidfd");
      ::kill(process_.pid, SIGKILL);
      exit_ = host::WaitForExit(process_, kKillWait).value_or(host::ExitStatus{});
      return std::unexpected(std::move(err));
    }
    // A Kill that came while QEMU was being launched: the boot sequence
    // below then sees QEMU gone and fails at once.
    if (killed_ && ::kill(process_.pid, SIGKILL) != 0 && errno != ESRCH)
      log::Warn("kill QEMU failed", {{"error", std::strerror(errno)}});
  }
  Status st = BootSequence(launched);
  if (!st) {
    agent_.reset();
    qmp_.reset();
    if (auto killed = KillAndReap(); !killed) {
      log::Warn("killing QEMU after a failed boot", {{"error", killed.error().message}});
    }
    return st;
  }
  boot_duration_ = std::chrono::duration_cast<milliseconds>(Clock::now() - launched);
  return {};
}

Status QemuMachine::BootSequence(Clock::time_point launched) {
  auto deadline = launched + options_.boot_timeout;
  // QEMU creates both sockets before the guest runs; wait for them while
  // watching for an early exit (bad arguments, missing files).
  UniqueFd qmp_fd;
  UniqueFd agent_fd;
  while (!qmp_fd || !agent_fd) {
    if (CELLA_TRY(ReapIfExited())) return std::unexpected(DiedDuringBoot("starting up"));
    if (!qmp_fd) {
      if (auto fd = ConnectUnix(paths_.qmp_socket)) qmp_fd = std::move(*fd);
    }
    if (!agent_fd) {
      if (auto fd = ConnectUnix(paths_.agent_socket)) agent_fd = std::move(*fd);
    }
    if (qmp_fd && agent_fd) break;
    if (Clock::now() >= deadline) {
      return std::unexpected(WithConsole("VM " + config_.ID +
                                         ": QEMU did not open its sockets within " +
                                         std::to_string(options_.boot_timeout.count()) + " ms"));
    }
    // QEMU's start-up (~35 ms) is on every run's critical path: a 1 ms
    // poll (two failed connects) sees the sockets half a millisecond late
    // on average, where 5 ms cost 2.5.
    std::this_thread::sleep_for(milliseconds(1));
  }
  log::Debug("QEMU sockets open", {{"id", config_.ID}});
  qmp_.emplace(
      CELLA_TRY_CTX(QmpClient::Handshake(std::move(qmp_fd), kQmpTimeout), "VM " + config_.ID));
  log::Debug("QMP ready", {{"id", config_.ID}});
  if (config_.Template == TemplateRole::kCapture)
    return CaptureTemplate(std::move(agent_fd), deadline);
  if (!config_.IncomingMigration.empty()) CELLA_TRY(RestoreState(deadline));
  if (!config_.IncomingMigration.empty()) log::Debug("VM state restored", {{"id", config_.ID}});
  if (BootsWithColdGo(config_)) {
    CELLA_TRY(AwaitGuestLine(agent_fd.Get(), protocol::kConfigRequestLine,
                             "booting (before it asked for its config)", deadline));
    log::Debug("guest asked for its config", {{"id", config_.ID}});
  }
  if (config_.Template == TemplateRole::kClone || BootsWithColdGo(config_)) {
    if (options_.before_go) {
      CELLA_TRY(options_.before_go());
      log::Debug("host work beside QEMU's start joined", {{"id", config_.ID}});
    }
    CELLA_TRY(SendWarmGo(agent_fd.Get(), deadline));
  }
  // A snapshot's agent was released (vmm::Machine::ReleaseAgent): it waits
  // for this host to speak first.
  const bool released =
      !config_.IncomingMigration.empty() && config_.Template == TemplateRole::kNone;
  return ConnectAgent(std::move(agent_fd), deadline,
                      released ? HostSpeaks::kFirst : HostSpeaks::kAfterTheAgent);
}

Status QemuMachine::AwaitGuestLine(int agent_fd, std::string_view expected,
                                   std::string_view waiting_for, Clock::time_point deadline) {
  // The guest writes one bounded line and then waits; anything else is a
  // guest we do not understand.
  std::string line;
  while (line.size() < expected.size()) {
    pollfd fds[2] = {{agent_fd, POLLIN, 0}, {wait_fd_.Get(), POLLIN, 0}};
    int rc = ::poll(fds, 2, std::min(RemainingMs(deadline), 1000));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("poll agent socket");
    if (fds[1].revents != 0 || CELLA_TRY(ReapIfExited())) {
      CELLA_TRY(ReapIfExited());
      return std::unexpected(DiedDuringBoot(waiting_for));
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      char buf[64];
      size_t want = std::min(sizeof buf, expected.size() - line.size());
      ssize_t n = ::read(agent_fd, buf, want);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return FailErrno("read agent socket");
      if (n == 0) return std::unexpected(WithConsole("VM " + config_.ID + ": agent link closed"));
      line.append(buf, static_cast<size_t>(n));
      if (!expected.starts_with(line))
        return std::unexpected(WithConsole("VM " + config_.ID + ": the guest did not say \"" +
                                           std::string(expected.substr(0, expected.size() - 1)) +
                                           "\" (is its initramfs older than this cella?)"));
    }
    if (Clock::now() >= deadline)
      return std::unexpected(WithConsole(
          "VM " + config_.ID + ": no \"" + std::string(expected.substr(0, expected.size() - 1)) +
          "\" from the guest within " + std::to_string(options_.boot_timeout.count()) + " ms"));
  }
  return {};
}

Status QemuMachine::CaptureTemplate(UniqueFd agent_fd, Clock::time_point deadline) {
  // Anything but the template-point line is not saved.
  CELLA_TRY(AwaitGuestLine(agent_fd.Get(), protocol::kTemplatePointLine,
                           "booting to the template point", deadline));
  QmpClient* qmp = &*qmp_;
  CELLA_TRY(qmp->Stop());
  Status saved = [&]() -> Status {
    CELLA_TRY(
        qmp->Execute("migrate-set-capabilities",
                     {{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", true}}}}}));
    CELLA_TRY(qmp->Execute("migrate-set-parameters", {{"max-bandwidth", int64_t{1} << 40}}));
    CELLA_TRY(qmp->Execute("migrate", {{"uri", config_.TemplateSaveUri}}));
    auto left = std::max(milliseconds(1000),
                         std::chrono::duration_cast<milliseconds>(deadline - Clock::now()));
    return qmp->AwaitMigration(left);
  }();
  if (!saved)
    return std::unexpected(
        std::move(saved.error()).WithContext("VM " + config_.ID + ": save the template"));
  return {};
}

Status QemuMachine::SendWarmGo(int agent_fd, Clock::time_point deadline) {
  protocol::WarmGo go;
  go.realtime_ns = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                             std::chrono::system_clock::now().time_since_epoch())
                                             .count());
  go.seed.resize(protocol::kWarmSeedBytes);
  size_t filled = 0;
  while (filled < go.seed.size()) {
    ssize_t n = ::getrandom(go.seed.data() + filled, go.seed.size() - filled, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("getrandom for the clone's RNG seed");
    filled += static_cast<size_t>(n);
  }
  // The guest then need not probe and mount its config disk (see warm.h).
  go.config_json = config_.GuestConfigJson;
  std::string line = protocol::FormatWarmGo(go);
  // The line carries the whole config (up to 1 MiB), more than a socket
  // buffer holds: a clone that stops reading must not hold the boot past
  // its deadline.
  size_t sent = 0;
  while (sent < line.size()) {
    ssize_t n =
        ::send(agent_fd, line.data() + sent, line.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return std::unexpected(
          WithConsole("VM " + config_.ID + ": send the warm go line: " + std::strerror(errno)));
    const int left = RemainingMs(deadline);
    if (left == 0)
      return std::unexpected(WithConsole("VM " + config_.ID +
                                         ": the restored guest did not read its warm go line "
                                         "within the boot time-out"));
    pollfd p{agent_fd, POLLOUT, 0};
    if (::poll(&p, 1, std::min(left, 1000)) < 0 && errno != EINTR)
      return FailErrno("VM " + config_.ID + ": poll the agent socket");
  }
  return {};
}

Status QemuMachine::RestoreState(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
  bool gate_checked = false;
  auto restored = [&]() -> Status {
    // The template's RAM is not in the stream: it is the file this QEMU
    // mapped; the capability must match the one it was saved with.
    if (config_.Template == TemplateRole::kClone)
      CELLA_TRY(qmp_->Execute(
          "migrate-set-capabilities",
          {{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", true}}}}}));
    const std::string uri = incoming_child_fd_ >= 0 ? "fd:" + std::to_string(incoming_child_fd_)
                                                    : config_.IncomingMigration;
    CELLA_TRY(qmp_->Execute("migrate-incoming", {{"uri", uri}}));
    log::Debug("state restore started", {{"id", config_.ID}});
    CELLA_TRY(qmp_->AwaitMigration(left));
    // -S: nothing ran yet; the guest runs from where it was saved now.
    std::string status = CELLA_TRY(qmp_->QueryStatus());
    if (status != "paused" && status != "prelaunch")
      return Fail("restored VM is " + status + ", not paused");
    gate_checked = true;
    if (options_.before_cont) CELLA_TRY(options_.before_cont());
    return qmp_->Cont();
  }();
  if (!restored && !gate_checked && options_.before_cont) {
    // A stream QEMU could not read may be a corrupt file: say that.
    if (auto gate = options_.before_cont(); !gate) restored = std::unexpected(gate.error());
  }
  if (!restored) {
    // Tagged whichever way it ended (QEMU may have died of the stream): the
    // caller may drop a template only for a failure of the state itself.
    auto reaped = ReapIfExited();
    Error error = reaped
                      ? WithConsole("VM " + config_.ID +
                                    ": restoring the snapshot failed: " + restored.error().message)
                      : std::move(reaped.error());
    error.errno_value = kStateNotRestoredErrno;
    return std::unexpected(std::move(error));
  }
  return {};
}

Status QemuMachine::ConnectAgent(UniqueFd agent_fd, Clock::time_point deadline,
                                 HostSpeaks host_speaks) {
  // The agent says Hello once the guest has booted; wait for its first byte
  // while watching QEMU, then let AgentClient run the handshake. A released
  // agent waits for the host's Hello instead (the handshake sends it first
  // and waits for the answer, bounded as a boot).
  while (host_speaks == HostSpeaks::kAfterTheAgent) {
    pollfd fds[2] = {{agent_fd.Get(), POLLIN, 0}, {wait_fd_.Get(), POLLIN, 0}};
    int rc = ::poll(fds, 2, std::min(RemainingMs(deadline), 1000));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("poll agent socket");
    if (fds[1].revents != 0 || CELLA_TRY(ReapIfExited())) {
      CELLA_TRY(ReapIfExited());
      return std::unexpected(DiedDuringBoot("booting (before the agent was ready)"));
    }
    if (fds[0].revents & POLLIN) break;
    if (fds[0].revents & (POLLHUP | POLLERR)) {
      // QEMU dropped the link: it is exiting. Give it a moment to be reaped.
      pollfd wait_exit{wait_fd_.Get(), POLLIN, 0};
      ::poll(&wait_exit, 1, static_cast<int>(kKillWait.count()));
      CELLA_TRY(ReapIfExited());
      return std::unexpected(DiedDuringBoot("booting (the agent link closed)"));
    }
    if (Clock::now() >= deadline) {
      return std::unexpected(
          WithConsole("VM " + config_.ID + ": the guest agent was not ready within " +
                      std::to_string(options_.boot_timeout.count()) + " ms (accel " +
                      std::string(ToString(options_.accel.chosen)) + ")"));
    }
  }
  if (options_.wrap_agent_link) {
    auto wrapped = options_.wrap_agent_link(std::move(agent_fd));
    if (!wrapped) {
      return std::unexpected(
          WithConsole("VM " + config_.ID + ": agent link: " + wrapped.error().message));
    }
    agent_fd = std::move(*wrapped);
  }
  log::Debug("guest agent link has data", {{"id", config_.ID}});
  auto agent = host::AgentClient::Connect(std::move(agent_fd), options_.agent_options);
  if (!agent) {
    // QEMU that died under a host-first handshake shows up here (the wait
    // above watched it only for an agent that speaks first): say so,
    // rather than blame the agent. A dying QEMU has closed the link
    // already; a moment is enough for it to be reaped.
    pollfd wait_exit{wait_fd_.Get(), POLLIN, 0};
    if (::poll(&wait_exit, 1, 1000) < 0 && errno != EINTR) return FailErrno("poll QEMU's exit");
    if (CELLA_TRY(ReapIfExited()))
      return std::unexpected(DiedDuringBoot("resuming (before the agent answered)"));
    return std::unexpected(
        WithConsole("VM " + config_.ID + ": agent handshake failed: " + agent.error().message));
  }
  agent_ = std::move(*agent);
  log::Debug("guest agent handshake done", {{"id", config_.ID}});
  return {};
}

Result<VmExit> QemuMachine::Wait(milliseconds timeout, int wake_fd) {
  {
    std::lock_guard lock(mu_);
    if (!started_) return Fail("wait: VM " + config_.ID + " was never started");
  }
  if (!CELLA_TRY(ReapIfExited())) {
    // poll(2) skips a negative descriptor: no wake_fd, no wake.
    pollfd pfds[2] = {{wait_fd_.Get(), POLLIN, 0}, {wake_fd, POLLIN, 0}};
    auto deadline = Clock::now() + timeout;
    while (true) {
      int rc = ::poll(pfds, 2, RemainingMs(deadline));
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0) return FailErrno("poll QEMU pidfd");
      break;
    }
    if (!CELLA_TRY(ReapIfExited())) {
      return std::unexpected(Error{
          "VM " + config_.ID + " still running after " + std::to_string(timeout.count()) + " ms",
          ETIMEDOUT});
    }
  }
  std::lock_guard lock(mu_);
  // ReapIfExited() said true, so exit_ is set and never cleared again.
  if (!exit_) return Fail("wait: VM " + config_.ID + " reaped without an exit status (bug)");
  return VmExit{*exit_, FileTail(paths_.console_log, kTailBytes)};
}

Status QemuMachine::Stop(milliseconds grace) {
  if (!Running()) return {};
  auto deadline = Clock::now() + grace;
  bool asked = false;
  if (agent_ && !agent_->LinkError()) {
    // A stopped or starved agent must not hold stop: it gets as long to
    // accept as the grace (1-5 s), then ACPI and finally SIGKILL follow.
    const auto answer_timeout = std::clamp(grace, milliseconds(1000), milliseconds(5000));
    if (auto st = agent_->Shutdown(grace, answer_timeout); st) {
      asked = true;
      // The guest spends up to `grace` on its processes (TERM, then KILL),
      // then flushes and powers off: leave room for that last part.
      deadline += std::chrono::seconds(5);
      // The link stays open: the main process's last output and its Result
      // still travel on it (the supervisor's attach of it is a stream of
      // this client), and the guest powers off once they are flushed.
      // Close() drops it.
    } else {
      log::Debug("agent shutdown failed; trying ACPI", {{"error", st.error().message}});
    }
  }
  if (!asked && qmp_) {
    if (auto st = qmp_->SystemPowerdown(); !st) {
      log::Debug("ACPI powerdown failed", {{"error", st.error().message}});
    }
  }
  auto exited = Wait(std::chrono::duration_cast<milliseconds>(deadline - Clock::now()));
  if (exited) return {};
  if (exited.error().errno_value != ETIMEDOUT) return std::unexpected(std::move(exited.error()));
  log::Notice("VM did not power off in time; killing it",
              {{"id", config_.ID}, {"grace_ms", grace.count()}});
  return KillAndReap();
}

Status QemuMachine::ReleaseAgent(const std::function<void()>& close_link, milliseconds timeout) {
  host::AgentClient* agent = CELLA_TRY(RequireAgent("release the agent"));
  // The agent's answer says it has let go: it reads nothing more from this
  // link and waits for the next host (this one after the save, or a
  // restored copy's). Asked in the protocol rather than read from QEMU's
  // port events, which QEMU sends at most once a second per port: a save
  // within a second of the last reconnect waited up to that second.
  Status released = agent->Release(timeout);
  // The far end's users next (the router and its clients: the agent no
  // longer acts on what they send), then our own client; also when the
  // agent did not answer, so that a reconnect (the VM running on) finds
  // QEMU's socket, which takes one host at a time, free.
  if (close_link) close_link();
  agent_.reset();
  if (!released)
    return std::unexpected(std::move(released.error()).WithContext("VM " + config_.ID));
  return {};
}

Status QemuMachine::SaveStateTo(UniqueFd fd, milliseconds timeout) {
  QmpClient* qmp = CELLA_TRY(RequireQmp("save state"));
  // QEMU gets its own copy (no shell and no `cat` started for the save);
  // ours closes on return, so the reader sees the end of the stream when
  // QEMU closes its copy.
  constexpr std::string_view kName = "cella-save";
  CELLA_TRY_CTX(qmp->SendFd(kName, fd.Get()), "VM " + config_.ID + ": save");
  fd.Reset();
  return SaveState("fd:" + std::string(kName), timeout);
}

Status QemuMachine::SaveState(const std::string& uri, milliseconds timeout) {
  QmpClient* qmp = CELLA_TRY(RequireQmp("save state"));
  CELLA_TRY(qmp->Stop());
  Status saved = [&]() -> Status {
    // QEMU throttles migration to 128 MiB/s by default (meant for a live
    // VM sharing a network link); a stopped VM going to a local file should
    // go as fast as the disk takes it.
    CELLA_TRY(qmp->Execute("migrate-set-parameters", {{"max-bandwidth", int64_t{1} << 40}}));
    // A template clone was restored with x-ignore-shared on; its snapshot
    // carries all of its (private) RAM and must restore into a plain boot,
    // which expects the capability off.
    if (config_.Template == TemplateRole::kClone)
      CELLA_TRY(qmp->Execute(
          "migrate-set-capabilities",
          {{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", false}}}}}));
    CELLA_TRY(qmp->Execute("migrate", {{"uri", uri}}));
    return qmp->AwaitMigration(timeout);
  }();
  if (!saved) {
    // Stop a migration still writing, so a Resume() does not race it.
    if (auto cancelled = qmp->Execute("migrate_cancel"); !cancelled)
      log::Debug("migrate_cancel failed", {{"error", cancelled.error().message}});
    return std::unexpected(std::move(saved.error()).WithContext("VM " + config_.ID + ": save"));
  }
  return {};
}

Status QemuMachine::ReconnectAgent() {
  QmpClient* qmp = CELLA_TRY(RequireQmp("reconnect the agent"));
  auto deadline = Clock::now() + options_.boot_timeout;
  UniqueFd agent_fd;
  // The released agent waits on its port opened anew for a host's first
  // bytes: this connection's Hello (the host speaks first).
  while (!agent_fd) {
    if (auto fd = ConnectUnix(paths_.agent_socket)) agent_fd = std::move(*fd);
    if (agent_fd) break;
    // A QEMU that died (killed during a save) never brings the socket
    // back: said at once instead of after the whole boot time-out.
    if (CELLA_TRY(ReapIfExited())) return std::unexpected(DiedDuringBoot("reconnecting the agent"));
    if (Clock::now() >= deadline) return Fail("VM " + config_.ID + ": agent socket unreachable");
    std::this_thread::sleep_for(milliseconds(5));
  }
  CELLA_TRY(qmp->Cont());
  return ConnectAgent(std::move(agent_fd), deadline, HostSpeaks::kFirst);
}

Status QemuMachine::Close() {
  agent_.reset();
  Status st = KillAndReap();
  qmp_.reset();
  // The console stays for `cella logs --console` and post-mortems.
  for (const std::string& p : {paths_.agent_socket, paths_.qmp_socket, paths_.qemu_log}) {
    if (auto removed = UnlinkIfPresent(p); !removed && st) st = std::move(removed);
  }
  return st;
}

}  // namespace

std::string GuestBootError(std::string_view console) {
  std::string found;
  size_t start = 0;
  while (start < console.size()) {
    size_t end = console.find('\n', start);
    if (end == std::string_view::npos) end = console.size();
    std::string_view line = console.substr(start, end - start);
    start = end + 1;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.remove_suffix(1);
    constexpr std::string_view kPrefix = "cella-init: error: ";
    if (size_t at = line.find(kPrefix); at != std::string_view::npos) {
      std::string_view reason = line.substr(at + kPrefix.size());
      if (!reason.empty()) found = std::string(reason);
    }
  }
  return found;
}

Result<QemuBackendOptions> DetectQemuHost(AccelMode mode, const std::string& host_root) {
  QemuBackendOptions options;
  options.accel = CELLA_TRY(ChooseAccel(mode, host_root));
  if (!options.accel.notice.empty()) log::Notice(options.accel.notice);
  if (auto khz = HostTscKhz(host_root)) {
    options.tsc_khz = *khz;
  } else {
    log::Warn("booting without tsc_early_khz; TCG guests may hang in TSC calibration",
              {{"error", khz.error().message}});
  }
  return options;
}

Result<std::unique_ptr<Machine>> QemuBackend::Create(const VMConfig& config) {
  if (config.ID.empty()) return Fail("VMConfig.ID: empty");
  StatePaths paths = CELLA_TRY(ResolveStatePaths(config));
  // Validate everything the command line needs now, not at Start.
  QemuLaunch probe;
  probe.agent_socket = paths.agent_socket;
  probe.qmp_socket = paths.qmp_socket;
  probe.console_log = paths.console_log;
  CELLA_TRY_CTX(BuildQemuArgv(config, probe), "VM " + config.ID);
  return std::make_unique<QemuMachine>(config, options_, std::move(paths));
}

}  // namespace cella::vmm
