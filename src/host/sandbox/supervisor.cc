// One piece (~800 lines) on purpose: the Supervisor class owns every
// resource of one running sandbox (store, egress, router, ports, main
// process, machine, snapshots) and the order they are made and released in;
// split, that order would be spread over files that must change together.
#include "host/sandbox/supervisor.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "host/agent/router.h"
#include "host/net/dns.h"
#include "host/net/netns.h"
#include "host/net/policy.h"
#include "host/net/proxy.h"
#include "host/net/resolver.h"
#include "host/net/tls.h"
#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/sandbox/compose.h"
#include "host/sandbox/control.h"
#include "host/sandbox/disk_image.h"
#include "host/sandbox/event_ring.h"
#include "host/sandbox/fuse_share.h"
#include "host/sandbox/layout.h"
#include "host/sandbox/lifecycle.h"
#include "host/sandbox/log_files.h"
#include "host/sandbox/port_forward.h"
#include "host/sandbox/share.h"
#include "host/sandbox/snapshot.h"
#include "host/sandbox/snapshot_stream.h"
#include "host/sandbox/spec.h"
#include "host/store/state_store.h"
#include "host/template/template_store.h"
#include "host/vmm/config_disk.h"
#include "host/vmm/qemu_argv.h"
#include "host/vmm/qemu_backend.h"
#include "protocol/warm.h"

namespace cella::sandbox {
namespace {

using std::chrono::milliseconds;

void SendReady(int& fd, const std::string& line) {
  if (fd < 0) return;
  if (auto st = WriteAll(fd, line + "\n"); !st)
    log::Debug("readiness line not delivered", {{"error", st.error().message}});
  ::close(fd);
  fd = -1;
}

// A line for the user before the readiness line (SpawnSupervisor prints
// it): something worth knowing that does not stop the start.
void SendNotice(int fd, const std::string& text) {
  log::Notice(text);
  if (fd < 0) return;
  if (auto st = WriteAll(fd, "notice: " + OneLine(text) + "\n"); !st)
    log::Debug("notice not delivered", {{"error", st.error().message}});
}

std::vector<VolumeAttachment> Attachments(const SandboxSpec& spec) {
  std::vector<VolumeAttachment> out;
  for (const VolumeSpec& v : spec.volumes)
    out.push_back({v.host_path, v.guest_path, v.mode, v.overlay_path});
  return out;
}

SnapshotLayout DefaultLayout() {
  const char* chosen = std::getenv("CELLA_SNAPSHOT_FORMAT");
  if (chosen && *chosen) {
    if (auto parsed = ParseSnapshotLayout(chosen)) return *parsed;
    log::Warn("ignoring CELLA_SNAPSHOT_FORMAT", {{"value", chosen}});
  }
  return SnapshotLayout::kMemoryFile;
}

// One more word on the guest kernel's command line.
void AddKernelArg(vmm::VMConfig& vm, std::string_view arg) {
  if (!vm.KernelArgs.empty()) vm.KernelArgs += ' ';
  vm.KernelArgs += arg;
}

class Supervisor {
 public:
  explicit Supervisor(const SupervisorArgs& args) : args_(args), ready_fd_(args.ready_fd) {}
  // The host work left running beside QEMU uses the members below.
  ~Supervisor() { (void)JoinDeferred(); }
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  int Run() {
    if (auto prepared = Prepare(); !prepared) {
      std::string message = prepared.error().message;
      log::Warn("sandbox failed to start", {{"id", args_.id}, {"error", OneLine(message)}});
      (void)JoinDeferred();  // its error, if any, is not the first one
      if (control_) control_->Stop();
      lifecycle_.reset();  // closes a machine that was never started
      BeforeClose();
      AfterClose();
      // Recorded before it is reported, as SandboxLifecycle::Run does: the
      // CLI returns on the report, and `inspect` next must say "failed".
      if (store_) {
        if (auto st = store_->Transition(args_.id, store::SandboxState::kFailed, OneLine(message));
            !st)
          log::Warn("could not record the failure", {{"error", st.error().message}});
      }
      SendReady(ready_fd_, "error: " + message);
      if (store_) RemoveIfAuto();
      return 1;
    }
    const auto started = std::chrono::steady_clock::now();
    LifecycleOutcome outcome = lifecycle_->Run();
    if (control_) control_->Stop();
    const bool failed = outcome.state == store::SandboxState::kFailed ||
                        (outcome.exit_code && *outcome.exit_code != 0);
    // A standby ended the VM on purpose, and so did a stop or kill: only
    // an end the sandbox came to by itself is the policy's to undo.
    if (outcome.booted && outcome.state != store::SandboxState::kStandby &&
        !lifecycle_->StopRequested() && ShouldRestart(restart_policy_, failed, restart_count_)) {
      auto ran = std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::steady_clock::now() - started);
      RestartAfterBackoff(outcome, ran);  // returns only when the restart is off
    }
    RemoveIfAuto();
    return outcome.booted ? 0 : 1;
  }

 private:
  // Everything up to a machine that is ready to boot, and the control
  // socket (so stop and kill reach a sandbox that is still booting).
  Status Prepare() {
    sandbox_home_ = CELLA_TRY(SandboxHome());
    paths_ = PathsFor(sandbox_home_, args_.id);
    auto opened = store::StateStore::Open(StateDbPath(sandbox_home_));
    if (!opened) return std::unexpected(opened.error());
    store_.emplace(std::move(*opened));
    store::SandboxRecord record = CELLA_TRY(store_->Get(args_.id));
    auto_remove_ = record.auto_remove;
    spec_json_ = record.spec_json;
    store::ProcessIdentity self = CELLA_TRY(store::IdentifyProcess(::getpid()));
    CELLA_TRY(store_->SetSupervisor(args_.id, self));
    SandboxSpec spec = CELLA_TRY(DecodeSpec(record.spec_json));
    CELLA_TRY(ReadSecrets(spec));
    LoadRestartState(spec);
    // A --kernel given relative to the caller's directory means that one.
    if (!spec.kernel_path.empty()) {
      std::error_code ec;
      auto absolute = std::filesystem::absolute(spec.kernel_path, ec);
      if (ec) return Fail("kernel " + spec.kernel_path + ": " + ec.message());
      spec.kernel_path = absolute.string();
    }
    // From here on nothing of the caller's (a directory it may want to
    // unmount) stays pinned by a process that lives as long as the sandbox.
    if (::chdir(paths_.dir.c_str()) != 0) return FailErrno("chdir " + paths_.dir);

    log_max_bytes_ = spec.log_max_bytes;
    output_log_.emplace(CELLA_TRY(CappedLogWriter::Open(paths_.output_log, log_max_bytes_)));

    std::string cella_home = CELLA_TRY(host::CellaHome());
    std::optional<kernel::KernelOverride> kernel_override;
    if (!spec.kernel_path.empty()) kernel_override = kernel::KernelOverride{spec.kernel_path, ""};
    std::string binary_dir = CELLA_TRY(GuestBinaryDir());
    log::Debug("supervisor: record read", {{"id", args_.id}});
    GuestAssets assets = CELLA_TRY(EnsureGuestAssets(cella_home, binary_dir, kernel_override));
    log::Debug("supervisor: guest assets checked", {{"id", args_.id}});
    for (const VolumeSpec& v : spec.volumes) {
      if (v.mode != protocol::MountMode::kReadWrite)
        CELLA_TRY_CTX(RecoverExt4Image(v.host_path), "volume " + v.name);
    }
    protocol::Config guest = spec.guest;
    vmm::VMConfig vm = CELLA_TRY(Compose(assets, guest, spec.shape, Attachments(spec), {}, args_.id,
                                         paths_.dir, spec.root_image_path, spec.upper_image));
    // A debug supervisor (cella --debug / CELLA_DEBUG=1) boots a guest that
    // logs its steps with timestamps on the console (its own template key).
    // CELLA_DEBUG=host keeps the guest quiet.
    const char* debug_env = std::getenv("CELLA_DEBUG");
    if (log::CurrentLevel() == log::Level::kDebug &&
        !(debug_env != nullptr && std::string_view(debug_env) == "host"))
      AddKernelArg(vm, "cella.debug=1");
    if (!spec.shares.empty()) CELLA_TRY(StartShares(spec, guest, vm));
    vmm::AccelMode accel = CELLA_TRY(vmm::ParseAccelMode(spec.accel));
    vmm::QemuBackendOptions options = CELLA_TRY(vmm::DetectQemuHost(accel));
    options.boot_timeout = std::chrono::seconds(spec.boot_timeout_s);
    has_volumes_ = !spec.volumes.empty();
    spec_upper_image_ = spec.upper_image;
    memory_mib_ = spec.shape.memory_mib;
    // Only a snapshot needs it (QEMU's version costs a process spawn): a
    // cold boot does not pay for it.
    compat_inputs_ = [this, vm, options, spec, assets, cache = cella_home + "/cache/qemu"] {
      return CurrentCompat(vm, options, spec, assets, cache);
    };
    standby_dir_ = paths_.dir + "/standby";
    if (args_.resume) {
      CELLA_TRY_CTX(PrepareResume(vm, options), "resume");
    } else {
      // A boot changes the disks under any snapshot of the sandbox's past.
      CELLA_TRY(RemoveSnapshot(standby_dir_));
    }

    // The sealed network up to its TAP (what QEMU needs at launch).
    if (spec.egress.enabled) CELLA_TRY_CTX(StartEgress(spec, cella_home, guest, vm), "egress");
    if (args_.resume) {
      CELLA_TRY_CTX(FinishEgress(), "egress");
      log::Debug("supervisor: network ready", {{"id", args_.id}});
      CELLA_TRY_CTX(CheckResumeCompat(), "resume");
      // A restored guest has its configuration mounted already: the disk
      // stays exactly as it was.
    } else {
      CELLA_TRY(vmm::ReserveGuestConfigDisk(guest, vm));
      if (!spec.cold) PrepareWarmStart(cella_home, guest, options, vm);
      if (warm_template_ || vmm::BootsWithColdGo(vm)) {
        // A clone's guest waits for its go line before it reads a disk or
        // has a network address, and a cold guest asks for it before either:
        // the network's ruleset, DNS server and proxy and the config disk
        // are finished while QEMU starts (and a cold kernel boots), and
        // joined before the go line.
        deferred_ = std::async(std::launch::async,
                               [this, json = vm.GuestConfigJson, disk = vm.ConfigDiskPath] {
                                 return FinishHostWork(json, disk);
                               });
        options.before_go = [this] { return JoinDeferred(); };
      } else {
        CELLA_TRY(FinishHostWork(vm.GuestConfigJson, vm.ConfigDiskPath));
      }
    }
    has_main_ = guest.init_mode == protocol::InitMode::kExec &&
                !(guest.entrypoint.empty() && guest.cmd.empty());
    ports_ = spec.ports;

    // The handshake is where a restored guest is first waited for (after a
    // release the host speaks first): as long as a boot may take.
    const auto handshake_timeout = std::max<std::chrono::milliseconds>(
        std::chrono::seconds(10), std::chrono::seconds(spec.boot_timeout_s));
    options.wrap_agent_link = [this, handshake_timeout](UniqueFd link) -> Result<UniqueFd> {
      host::RouterHooks hooks;
      hooks.on_main_output = [this](protocol::Channel channel, std::span<const std::byte> bytes) {
        const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count();
        std::string records = EncodeLogRecords(
            now, channel == protocol::Channel::kStderr,
            std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
        if (auto st = output_log_->Write(std::as_bytes(std::span(records))); !st)
          log::Debug("output log write failed", {{"error", st.error().message}});
      };
      hooks.on_main_result = [this](std::string_view json) {
        auto outcome = protocol::DecodeExecOutcome(json);
        if (!outcome) return;
        host::ExecStatus status;
        status.exit_code = outcome->exit_code;
        status.signal = outcome->signal;
        status.timed_out = outcome->timed_out;
        lifecycle_->SetMainStatus(status);
      };
      auto router = host::Router::Start(std::move(link), std::move(hooks), handshake_timeout);
      if (!router) return std::unexpected(std::move(router.error()));
      router_ = std::move(*router);
      return router_->ConnectLocal();
    };
    cella_home_ = cella_home;
    if (warm_template_) cold_options_ = options;
    vmm::QemuBackend backend(std::move(options));
    std::unique_ptr<vmm::Machine> machine = CELLA_TRY(backend.Create(vm));

    LifecycleOptions lifecycle_options;
    lifecycle_options.id = args_.id;
    // Removed at its end, and nothing the guest writes outlives it on the
    // host (tmpfs upper, no volume, no share, no writable disk): the guest's
    // own power-off and sync after the main process are not waited for.
    // Volumes, shares and writable disks keep the guest's orderly sync.
    lifecycle_options.end_at_main_result = auto_remove_ && has_main_ && !guest.keep_alive &&
                                           spec.upper_image.empty() && spec.volumes.empty() &&
                                           spec.shares.empty() && !args_.resume;
    LifecycleHooks hooks;
    hooks.after_boot = [this] { return AfterBoot(); };
    hooks.on_boot_result = [this](const Status& st) {
      SendReady(ready_fd_, st ? std::string("ok") : "error: " + st.error().message);
    };
    hooks.before_close = [this] { BeforeClose(); };
    hooks.after_close = [this] { AfterClose(); };
    hooks.on_tick = [this] { TrimConsole(); };
    hooks.retry_boot = [this](const Error& error) { return ColdAfterWarmFailure(error); };
    hooks.standby = [this] { return Standby(); };
    hooks.snapshot = [this](const std::string& dir) { return Snapshot(dir); };
    hooks.link_drained = [this] { return router_ && router_->UpstreamError().has_value(); };
    hooks.link_error = [this]() -> std::optional<Error> {
      // A share whose daemon died leaves the guest's file calls hanging:
      // treated as a closed link (the sandbox fails unless the VM ends by
      // itself within the grace: virtiofsd also ends when QEMU does).
      for (size_t i = 0; i < shares_.size(); ++i) {
        if (auto how = shares_[i]->Exited())
          return Error{"virtiofsd for share " + std::to_string(i) + " ended (" + *how +
                           "); see virtiofsd" + std::to_string(i) + ".log",
                       ECONNRESET};
      }
      if (!router_) return std::nullopt;
      return router_->UpstreamError();
    };
    lifecycle_ = std::make_unique<SandboxLifecycle>(std::move(lifecycle_options), *store_,
                                                    std::move(machine), std::move(hooks));
    control_ = CELLA_TRY(ControlServer::Start(
        paths_.control_socket, [this](const nlohmann::json& request) { return Handle(request); }));
    return {};
  }

  // Makes `vm` a clone of the memory template of its shape, building the
  // template first when there is none (the first run of a shape pays one
  // boot to the template point plus the save, then starts warm like every
  // later run). Anything in the way only costs the warm start: the
  // sandbox boots cold, with a notice saying why.
  void PrepareWarmStart(const std::string& cella_home, const protocol::Config& guest,
                        const vmm::QemuBackendOptions& options, vmm::VMConfig& vm) {
    std::string why = warm::WhyCold(vm, guest.init_mode == protocol::InitMode::kSystemd);
    if (!why.empty()) {
      // Host shares are the one case a user did not choose knowingly (the
      // others are --cold-like choices: systemd, a writable root, a
      // resume): said once, on stderr, like docker's warnings.
      if (!vm.Shares.empty())
        SendNotice(ready_fd_, "sandbox boots cold (no warm start): " + why);
      else
        log::Debug("booting cold: " + why, {{"id", args_.id}});
      return;
    }
    // A writable layer never mounted yet (the sandbox's first boot) comes
    // with the template: the template's own upper disk, with the root made
    // on it, copied for this clone (no ext4 mount, overlay or copy-up in
    // the clone: ~18 MiB less memory per idle clone, docs/performance.md).
    // A layer that holds the sandbox's files (a restart) is attached as it
    // is, to a template that left it unread.
    vmm::VMConfig shape_vm = vm;
    uint64_t upper_bytes = 0;
    if (!vm.OverlayUpperPath.empty()) {
      auto fresh = Ext4NeverMounted(vm.OverlayUpperPath);
      struct stat upper {};
      if (fresh && *fresh && ::stat(vm.OverlayUpperPath.c_str(), &upper) != 0)
        fresh = FailErrno("stat " + vm.OverlayUpperPath);
      if (!fresh) log::Warn("writable layer not checked", {{"error", fresh.error().message}});
      if (fresh && *fresh) {
        upper_bytes = static_cast<uint64_t>(upper.st_size);
        AddKernelArg(shape_vm, protocol::kSeededUpperCmdlineFlag);
      }
    }
    auto chosen = [&]() -> Result<warm::TemplateInfo> {
      std::string shape = CELLA_TRY(warm::ShapeText(shape_vm, options));
      std::string key = warm::KeyOf(shape);
      if (auto found = CELLA_TRY(warm::Find(cella_home, key))) return std::move(*found);
      log::Debug("building the memory template of this machine shape", {{"key", key}});
      return warm::Create(cella_home, shape_vm, options, [upper_bytes](const std::string& path) {
        return MakeExt4Image(path, upper_bytes, "cella-upper");
      });
    }();
    if (!chosen) {
      if (chosen.error().errno_value == EWOULDBLOCK)  // a parallel first run builds it
        log::Debug("booting cold: " + chosen.error().message, {{"id", args_.id}});
      else
        SendNotice(ready_fd_, "sandbox boots cold: no memory template: " + chosen.error().message);
      return;
    }
    if (!chosen->upper_seed.empty()) {
      // Beside the layer first, then over it: a failed copy leaves the
      // fresh layer in place for a cold boot.
      const std::string copy = vm.OverlayUpperPath + ".seed";
      (void)::unlink(copy.c_str());
      auto copied = CloneOrCopySparse(chosen->upper_seed, copy);
      if (copied && ::rename(copy.c_str(), vm.OverlayUpperPath.c_str()) != 0)
        copied = FailErrno("rename " + copy);
      if (copied) {
        if (auto st = FsyncDirectory(paths_.dir); !st) copied = std::unexpected(st.error());
      }
      if (!copied) {
        (void)::unlink(copy.c_str());
        SendNotice(ready_fd_, "sandbox boots cold: the template's writable layer was not copied: " +
                                  copied.error().message);
        return;
      }
    }
    cold_vm_ = vm;
    warm_template_ = *chosen;
    vm = shape_vm;
    warm::MakeClone(*chosen, vm);
    log::Debug("starting from memory template", {{"id", args_.id}, {"key", chosen->key}});
  }

  // The clone's restore failed (a template file unreadable or damaged in a
  // way its manifest cannot see, QEMU refusing the state): the template is
  // dropped, so no later run trusts it, and this sandbox boots cold. Null
  // when the failed boot was not a warm one (the failure stands).
  std::unique_ptr<vmm::Machine> ColdAfterWarmFailure(const Error& error) {
    if (!warm_template_ || !cold_options_) return nullptr;
    // Only a template whose state QEMU could not restore is dropped and the
    // sandbox booted again, cold. Any other failure of a clone (the guest
    // refused its config, a time-out on a loaded host, memory) would fail
    // a cold boot the same way, and says nothing against the template.
    if (error.errno_value != vmm::kStateNotRestoredErrno) return nullptr;
    // The cold boot asks for its config (the go line joins the deferred
    // work too) and uses the network: joined here for its verdict.
    if (auto joined = JoinDeferred(); !joined) {
      log::Warn("no cold boot after the failed restore", {{"error", joined.error().message}});
      return nullptr;
    }
    warm::TemplateInfo t = std::move(*warm_template_);
    warm_template_.reset();
    SendNotice(ready_fd_, "sandbox boots cold: memory template " + t.key +
                              " could not be restored and was removed (" + OneLine(error.message) +
                              ")");
    if (auto st = warm::Remove(cella_home_, t.key); !st && st.error().errno_value != ENOENT)
      log::Warn("could not remove the template", {{"error", st.error().message}});
    router_.reset();  // the failed clone's, if its link came up at all
    vmm::QemuBackend backend(*cold_options_);
    auto machine = backend.Create(cold_vm_);
    if (!machine) {
      log::Warn("cold machine not made", {{"error", machine.error().message}});
      return nullptr;
    }
    return std::move(*machine);
  }

  // The VM is up: CLI processes may now reach it.
  Status AfterBoot() {
    if (!router_) return Fail("the VM booted without an agent router");
    host::AgentClient* agent = lifecycle_->machine().Agent();
    if (args_.resume && !resume_announced_) {
      // Before anyone else reaches the guest: its clock stood still while
      // it slept, and its programs may want to know they were asleep. Its
      // RNG is reseeded from fresh host bytes: another copy of the same
      // snapshot (fork, restore) must not draw the same numbers.
      resume_announced_ = true;
      std::vector<uint8_t> seed = CELLA_TRY(FreshRngSeed());
      auto count = agent->Resumed(std::chrono::system_clock::now(), seed);
      if (!count)
        return std::unexpected(
            std::move(count.error()).WithContext("set the guest clock and reseed its RNG"));
      log::Debug("guest told it resumed", {{"id", args_.id}});
      // The guest ran on from it and its disks change from here: the
      // snapshot can never be resumed from again. Its manifest (the commit)
      // goes first and for sure: a supervisor that dies later must not leave
      // a snapshot that looks resumable (see Reconcile).
      std::string manifest = standby_dir_ + "/" + kManifestName;
      if (::unlink(manifest.c_str()) != 0 && errno != ENOENT)
        return FailErrno("remove the used snapshot's " + manifest);
      if (auto st = FsyncDirectory(standby_dir_); !st)
        return std::unexpected(std::move(st.error()).WithContext("the used snapshot"));
      if (auto st = RemoveSnapshot(standby_dir_); !st)
        log::Warn("could not remove the used snapshot", {{"error", st.error().message}});
      log::Notice("resumed from the standby snapshot",
                  {{"id", args_.id}, {"resume_count", std::to_string(*count)}});
    }
    // Before anything else runs in the guest: the shares' mounts answer
    // nothing until they are served, and the guest puts them (with their
    // overlays and what lies beneath them) in place only then.
    CELLA_TRY(ServeFuseShares(*agent));
    if (!fuse_servers_.empty())
      CELLA_TRY_CTX(agent->SharesMounted(kSharesMountedTimeout), "mount the host shares");
    CELLA_TRY(router_->Listen(paths_.mux_socket));
    for (const PortSpec& p : ports_) {
      auto forwarder =
          PortForwarder::Start(p.host_ip, p.host_port, p.guest_port,
                               [agent](uint16_t port) { return agent->OpenPort(port); });
      if (!forwarder) return std::unexpected(std::move(forwarder.error()));
      forwarders_.push_back(std::move(*forwarder));
    }
    if (has_main_ && args_.main_attach == MainAttach::kBySupervisor) {
      main_ = CELLA_TRY_CTX(agent->AttachMain({}), "start the main process");
      CELLA_TRY_CTX(main_->CloseStdin(), "close the main process's stdin");
    }
    return {};
  }

  // Host shares: over FUSE on the agent link (served from AfterBoot),
  // unless CELLA_SHARE_TRANSPORT=virtiofs: then one virtiofsd each,
  // children of this process (they die with it), started before QEMU so
  // their sockets exist when it connects.
  Status StartShares(const SandboxSpec& spec, protocol::Config& guest, vmm::VMConfig& vm) {
    bool fuse_allowed = CELLA_TRY(FuseSharesWanted());
    // Under init_mode systemd the agent is the image's own service (the
    // standalone cella-agent), which has no FUSE relay: the init mounts the
    // shares over virtiofs before systemd starts (such a sandbox boots cold
    // anyway; it cannot standby, snapshot or fork).
    if (fuse_allowed && guest.init_mode == protocol::InitMode::kSystemd && !args_.resume) {
      fuse_allowed = false;
      SendNotice(ready_fd_,
                 "host directories of a systemd sandbox are served over virtiofs (no standby, "
                 "snapshot or fork)");
    }
    // A restored guest has its FUSE mounts in its memory: they stay FUSE.
    if (args_.resume) fuse_allowed = true;
    std::optional<nlohmann::json> saved;
    if (args_.resume) {
      // standby_dir_ is set later in Start; the same directory.
      std::string file = paths_.dir + "/standby/" + kShareStatesFile;
      if (::access(file.c_str(), F_OK) == 0) {
        saved = nlohmann::json::parse(CELLA_TRY(ReadFileToString(file, size_t{256} << 20)), nullptr,
                                      false);
        if (!saved->is_object()) return Fail("the snapshot's " + file + " is damaged");
      }
    }
    std::string virtiofsd;
    std::vector<ShareAttachment> attachments;
    for (size_t i = 0; i < spec.shares.size(); ++i) {
      const ShareSpec& s = spec.shares[i];
      struct stat st {};
      if (::stat(s.host_path.c_str(), &st) != 0)
        return FailErrno("share " + s.host_path + " (for " + s.guest_path + ")");
      if (s.is_file ? !S_ISREG(st.st_mode) : !S_ISDIR(st.st_mode))
        return Fail("share " + s.host_path + ": was a " + (s.is_file ? "file" : "directory") +
                    " when the sandbox was created, and is not any more");
      std::string n = std::to_string(i);
      std::string file;
      if (s.is_file) file = s.host_path.substr(s.host_path.rfind('/') + 1);
      if (fuse_allowed) {
        std::shared_ptr<share::FuseServer> server =
            CELLA_TRY_CTX(OpenFuseServer({s.host_path, s.is_file, s.mode}), "share " + n);
        if (saved && saved->contains(n) && (*saved)[n].is_string())
          CELLA_TRY_CTX(server->LoadState((*saved)[n].get<std::string>()), "share " + n);
        fuse_servers_.push_back({static_cast<uint32_t>(i), std::move(server)});
        attachments.push_back({"", s.guest_path, s.mode, file, true});
        continue;
      }
      // QEMU 7.2's virtiofsd needs CAP_SYS_ADMIN for its namespace sandbox,
      // and creates files as the guest's uid/gid (only root may do that).
      if (::geteuid() != 0)
        return Fail(
            "host directories over virtiofs (CELLA_SHARE_TRANSPORT=virtiofs, or a systemd "
            "sandbox) need cella to run as root");
      if (virtiofsd.empty()) virtiofsd = CELLA_TRY(ResolveVirtiofsd());
      ShareDaemonOptions options;
      options.virtiofsd = virtiofsd;
      options.host_path = s.host_path;
      options.is_file = s.is_file;
      options.mode = s.mode;
      options.stage_dir = paths_.dir + "/share" + n;
      options.socket_path = paths_.dir + "/fs" + n + ".sock";
      options.log_path = paths_.dir + "/virtiofsd" + n + ".log";
      CELLA_TRY(host::MakeDirs(options.stage_dir, 0700));
      share_logs_.push_back(options.log_path);
      shares_.push_back(CELLA_TRY(ShareDaemon::Start(options)));
      attachments.push_back({options.socket_path, s.guest_path, s.mode, file});
    }
    return AttachShares(attachments, guest, vm);
  }

  // CELLA_SHARE_TRANSPORT: "fuse" (the default) or "virtiofs".
  static Result<bool> FuseSharesWanted() {
    const char* env = std::getenv("CELLA_SHARE_TRANSPORT");
    std::string_view value = env ? env : "";
    if (value.empty() || value == "fuse") return true;
    if (value == "virtiofs") return false;
    return Fail("CELLA_SHARE_TRANSPORT=" + std::string(value) + ": want fuse or virtiofs");
  }

  // (Re)serves every FUSE share on the current agent link: after boot, after
  // a resume and after a snapshot let the VM run again.
  Status ServeFuseShares(host::AgentClient& agent) {
    fuse_shares_.clear();  // the previous link's threads ended with it
    for (auto& [index, server] : fuse_servers_)
      fuse_shares_.push_back(
          CELLA_TRY_CTX(FuseShare::Start(agent, index, server), "serve host share"));
    return {};
  }

  // The FUSE servers' states into `dir` (the machine is frozen, the link
  // released: no request is being answered).
  Status SaveShareStates(const std::string& dir) {
    if (fuse_servers_.empty()) return {};
    fuse_shares_.clear();
    nlohmann::json states = nlohmann::json::object();
    for (auto& [index, server] : fuse_servers_) states[std::to_string(index)] = server->SaveState();
    std::string file = dir + "/" + kShareStatesFile;
    CELLA_TRY(WriteStringToFile(file, states.dump(), 0600));
    return FsyncFile(file);
  }

  // What a snapshot of this machine must match, computed once on first use.
  Result<SnapshotCompat> Compat() {
    if (!compat_) {
      if (compat_prefetch_.valid()) {
        compat_ = CELLA_TRY(compat_prefetch_.get());
      } else {
        compat_ = CELLA_TRY(compat_inputs_());
      }
    }
    return *compat_;
  }

  // A resume computes Compat() (QEMU's version is a process spawn: 0.3-0.4 s
  // on a loaded host) beside the network's set-up instead of before it.
  void PrefetchCompat() {
    if (!compat_ && !compat_prefetch_.valid())
      compat_prefetch_ = std::async(std::launch::async, compat_inputs_);
  }

  // Refuses a snapshot this host cannot restore, before QEMU starts.
  Status CheckResumeCompat() {
    SnapshotCompat compat = CELLA_TRY(Compat());
    if (std::string mismatch = CompatMismatch(resume_manifest_compat_, compat); !mismatch.empty())
      return Fail("the snapshot cannot be restored here: " + mismatch +
                  "; start it cold instead (cella stop, then cella start: its memory is lost, "
                  "its disks are kept)");
    return {};
  }

  Result<SnapshotCompat> CurrentCompat(const vmm::VMConfig& vm,
                                       const vmm::QemuBackendOptions& options,
                                       const SandboxSpec& spec, const GuestAssets& assets,
                                       const std::string& qemu_version_cache) {
    SnapshotCompat c;
    c.qemu_version = CELLA_TRY(CachedQemuVersion(options.qemu_binary, qemu_version_cache));
    c.kernel = CELLA_TRY(FileIdentity(vm.KernelPath));
    c.initramfs = CELLA_TRY(FileIdentity(vm.InitramfsPath));
    c.memory_mb = vm.MemoryMB;
    c.cpus = vm.CPUs;
    c.accel = std::string(vmm::ToString(options.accel.chosen));
    c.root_image = spec.root_image_path.empty()
                       ? "built-in " + CELLA_TRY(FileIdentity(assets.default_rootfs_path))
                       : spec.root_image_path;
    return c;
  }

  // The VM comes from the standby snapshot, checked before QEMU reads it.
  Status PrepareResume(vmm::VMConfig& vm, vmm::QemuBackendOptions& options) {
    SnapshotManifest manifest = CELLA_TRY(ReadSnapshotManifest(standby_dir_));
    StartChecksum(manifest, options);
    // Checked once the network is up (CheckResumeCompat), before QEMU starts.
    resume_manifest_compat_ = manifest.compat;
    PrefetchCompat();
    vm.ConfigDiskPath = vm.StateDir + "/config.img";
    if (::access(vm.ConfigDiskPath.c_str(), R_OK) != 0)
      return FailErrno("the config disk of the snapshot " + vm.ConfigDiskPath);
    vm.IncomingMigration = LoadUri(standby_dir_, manifest);
    // A raw stream is read by QEMU from an inherited descriptor: no shell
    // and no `cat` forked by QEMU.
    if (manifest.compression == SnapshotCompression::kNone)
      vm.IncomingStateFile = standby_dir_ + "/" + manifest.state_file;
    // Format 2: guest RAM is the memory file, mapped privately (it stays
    // mapped after the used snapshot is removed below, in AfterBoot).
    if (!manifest.memory_file.empty())
      vm.SnapshotMemoryPath = standby_dir_ + "/" + manifest.memory_file;
    // Written before the manifest's commit, so present whenever the
    // snapshot had a DNS server; checked strictly when loaded.
    std::string names = standby_dir_ + "/" + kDnsNamesFile;
    if (::access(names.c_str(), F_OK) == 0)
      restored_dns_names_ = CELLA_TRY(ReadFileToString(names, net::FakeIpTable::kMaxExportBytes));
    return {};
  }

  // cella standby, on the lifecycle's thread (see LifecycleHooks::standby).
  // The snapshot's checksum is computed on a thread of its own while the
  // network comes up and QEMU starts and reads the stream; the guest runs
  // only once it matched (QemuBackendOptions::before_cont). QEMU reads
  // the file as it is: a corrupt one fails its restore or the checksum,
  // and either way the guest never runs it.
  void StartChecksum(const SnapshotManifest& manifest, vmm::QemuBackendOptions& options) {
    auto checked = std::make_shared<std::future<Status>>(std::async(
        std::launch::async,
        [dir = standby_dir_, manifest] { return VerifySnapshotChecksum(dir, manifest); }));
    auto result = std::make_shared<std::optional<Status>>();
    options.before_cont = [checked, result]() -> Status {
      if (!*result) *result = checked->get();
      return **result;
    };
  }

  Status Standby() {
    CELLA_TRY(CheckSnapshottable("standby"));
    CELLA_TRY(RemoveSnapshot(standby_dir_));
    return SaveMachine(standby_dir_, AfterSave::kStayFrozen, nullptr);
  }

  // cella snapshot create: the machine into `dir` (with copies of the
  // writable layer and the config disk, taken while it is frozen, and the
  // record it can be restored from), then running again.
  Status Snapshot(const std::string& dir) {
    CELLA_TRY(CheckSnapshottable("snapshot"));
    if (spec_upper_image_.empty())
      return Fail("snapshot: this sandbox has no writable layer on disk to copy");
    if (::access(dir.c_str(), F_OK) == 0) return Fail("snapshot " + dir + " exists already");
    std::string partial = dir + ".partial";
    CELLA_TRY(RemoveSnapshot(partial));
    store::SandboxRecord record = CELLA_TRY(store_->Get(args_.id));
    auto copy_disks = [&](const std::string& into) -> Status {
      const std::pair<std::string, std::string> disks[] = {
          {spec_upper_image_, "upper.img"}, {paths_.dir + "/config.img", "config.img"}};
      // While the VM is frozen: a clone where the filesystem can, else
      // only the data extents are copied.
      for (const auto& [from, name] : disks) CELLA_TRY(CloneOrCopySparse(from, into + "/" + name));
      nlohmann::json meta = {{"source_id", record.id},
                             {"source_name", record.name},
                             {"image", record.image},
                             {"command", record.command},
                             {"spec_json", record.spec_json}};
      return WriteStringToFile(into + "/sandbox.json", meta.dump(2) + "\n", 0600);
    };
    CELLA_TRY(SaveMachine(partial, AfterSave::kRunAgain, copy_disks));
    if (::rename(partial.c_str(), dir.c_str()) != 0) {
      Error err = Error::FromErrno("rename " + partial);
      (void)RemoveSnapshot(partial);  // best effort: the error above is what counts
      return std::unexpected(std::move(err));
    }
    // The name is the commit of a named snapshot: make it durable.
    return FsyncDirectory(dir.substr(0, dir.rfind('/')));
  }

  Status CheckSnapshottable(std::string_view what) {
    if (auto_remove_ || args_.main_attach == MainAttach::kByClient)
      return Fail(std::string(what) +
                  " needs a sandbox that outlives its supervisor; this one ends with its "
                  "foreground run or was started with --rm (use cella run -d)");
    if (!shares_.empty())
      return Fail(std::string(what) +
                  " of a sandbox with virtiofs host directories (CELLA_SHARE_TRANSPORT=virtiofs) "
                  "is not supported: QEMU cannot save a virtiofs device; shares over FUSE (the "
                  "default) can");
    if (has_volumes_)
      return Fail(std::string(what) +
                  " of a sandbox with volumes is not supported: a volume can change while the "
                  "snapshot waits");
    // The stream holds at most the guest's RAM and a little device state.
    uint64_t need = (uint64_t(memory_mib_) + 64) << 20;
    struct statvfs fs {};
    if (::statvfs(paths_.dir.c_str(), &fs) != 0) return FailErrno("statvfs " + paths_.dir);
    if (uint64_t(fs.f_bavail) * fs.f_frsize < need)
      return Fail("not enough free space in " + paths_.dir + " for the snapshot (up to " +
                  std::to_string(need >> 20) + " MiB)");
    return {};
  }

  enum class AfterSave { kStayFrozen, kRunAgain };

  // Saves the machine into `dir` (created here) and commits it. With
  // kRunAgain, and whenever the save fails, the VM runs on afterwards and
  // its agent link, forwards and main process are back; when that fails
  // too the error has errno_value EIO.
  Status SaveMachine(const std::string& dir, AfterSave after,
                     const std::function<Status(const std::string&)>& while_frozen) {
    if (::mkdir(dir.c_str(), 0700) != 0) return FailErrno("mkdir " + dir);
    SnapshotManifest manifest;
    // A fork's snapshot is read once, at once, by its copies: compressing
    // it would only add time on both sides while the source is frozen.
    const std::string base = dir.substr(dir.rfind('/') + 1);
    const bool fork = base.starts_with(kForkDirPrefix);
    SnapshotLayout layout = layout_;
    if (fork && layout == SnapshotLayout::kZstdStream) layout = SnapshotLayout::kRawStream;
    manifest.compression = layout == SnapshotLayout::kZstdStream ? SnapshotCompression::kZstd
                                                                 : SnapshotCompression::kNone;
    manifest.state_file =
        manifest.compression == SnapshotCompression::kZstd ? "machine.state.zst" : "machine.state";
    if (layout == SnapshotLayout::kMemoryFile) manifest.memory_file = kMemoryFileName;
    manifest.created_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::system_clock::now().time_since_epoch())
                              .count();
    manifest.memory_bytes = uint64_t(memory_mib_) << 20;
    manifest.compat = CELLA_TRY(Compat());
    manifest.transient = fork;

    // Everything that uses the link goes first; the agent's op release
    // makes the guest agent let go of its link (the main process keeps
    // running, detached, and is attached again afterwards).
    for (auto& f : forwarders_) f->Stop();
    forwarders_.clear();
    vmm::Machine& machine = lifecycle_->machine();
    auto started = std::chrono::steady_clock::now();
    Status saved = [&]() -> Status {
      CELLA_TRY(machine.ReleaseAgent(
          [this] {
            if (router_) router_->Stop();
            main_.reset();  // its Close goes nowhere: the link is already down
          },
          std::chrono::seconds(15)));
      log::Debug("snapshot: guest agent let go of its link", {{"id", args_.id}});
      CELLA_TRY(SaveMachineState(machine, dir, manifest, std::chrono::minutes(10)));
      // Host state the guest relies on: the names behind the virtual
      // addresses it has cached (durable before the manifest commits).
      if (fake_ips_) {
        std::string names = dir + "/" + kDnsNamesFile;
        CELLA_TRY(WriteStringToFile(names, fake_ips_->Export(), 0600));
        CELLA_TRY(FsyncFile(names));
      }
      CELLA_TRY(SaveShareStates(dir));
      if (while_frozen) {
        CELLA_TRY(while_frozen(dir));
        log::Debug("snapshot: disks copied", {{"id", args_.id}});
      }
      manifest = CELLA_TRY(CommitSnapshot(dir, manifest, FsyncDirectory,
                                          fork ? Durability::kTransient : Durability::kDurable));
      return {};
    }();
    if (saved) {
      log::Notice("snapshot committed",
                  {{"id", args_.id},
                   {"dir", dir},
                   {"bytes", std::to_string(manifest.size_bytes)},
                   {"format", std::string(ToString(layout))},
                   {"ms", std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                             std::chrono::steady_clock::now() - started)
                                             .count())}});
      if (after == AfterSave::kStayFrozen) return {};
    } else {
      log::Warn("snapshot failed; resuming the VM", {{"error", OneLine(saved.error().message)}});
      if (auto st = RemoveSnapshot(dir); !st)
        log::Warn("could not remove the partial snapshot", {{"error", st.error().message}});
    }
    Status back = [&]() -> Status {
      CELLA_TRY(machine.ReconnectAgent());
      return AfterBoot();
    }();
    if (!back) {
      std::string why = saved ? "the snapshot was saved" : saved.error().message;
      return std::unexpected(
          Error{why + "; and the VM could not be resumed: " + back.error().message, EIO});
    }
    return saved;
  }

  // The sealed network: a namespace whose only exits are our DNS server and
  // our proxy, a TAP for QEMU, and the policy both consult.
  Status StartEgress(const SandboxSpec& spec, const std::string& cella_home,
                     protocol::Config& guest, vmm::VMConfig& vm) {
    const EgressSpec& egress = spec.egress;
    net::PolicyConfig config;
    config.allow = egress.allow;
    config.allow_private = egress.allow_private;
    config.intercept = egress.intercept;
    config.allow_all_public = egress.all_public;
    config.allow_host_loopback = egress.host_loopback;
    for (const SecretSpec& secret : egress.secrets) {
      net::Secret s;
      s.name = secret.name;
      s.placeholder = secret.placeholder;
      s.value = secret_values_.at(secret.name);
      for (const std::string& host : secret.hosts)
        s.hosts.push_back(CELLA_TRY_CTX(net::HostPattern::Parse(host), "secret " + secret.name));
      config.secrets.push_back(std::move(s));
    }
    for (const PinSpec& pin : egress.pins) {
      auto address = net::IpAddress::Parse(pin.address);
      if (!address) return Fail("pin " + pin.name + ": bad address " + pin.address);
      config.pins.push_back({pin.name, pin.port, net::Endpoint{*address, pin.address_port}});
    }
    policy_ = CELLA_TRY(net::Policy::Create(std::move(config)));
    net::IsolatedNetworkOptions options;
    if (guest.mtu > 0) options.mtu = guest.mtu;
    PendingEgress pending;
    pending.network = CELLA_TRY(net::StartIsolatedNetwork(options));
    auto fake_ips = std::make_shared<net::FakeIpTable>();
    // A resumed guest still holds the virtual addresses it was answered
    // before the snapshot: the same names must stand behind them.
    if (!restored_dns_names_.empty())
      CELLA_TRY_CTX(fake_ips->Import(restored_dns_names_), "the snapshot's DNS names");
    fake_ips_ = fake_ips;
    net::DnsServerOptions dns_options;
    dns_options.policy = policy_;
    dns_options.table = fake_ips;
    if (!egress.dns_servers.empty())
      dns_options.resolver = CELLA_TRY_CTX(net::UpstreamResolverFor(egress.dns_servers), "--dns");
    net::ProxyOptions proxy_options;
    proxy_options.policy = policy_;
    proxy_options.fake_ips = fake_ips;
    proxy_options.resolver = dns_options.resolver;
    proxy_options.host_gateway = net::IpAddress::Parse(net::kGatewayAddress);
    proxy_options.on_event = [events = events_](net::EgressEvent event) {
      events->Push(NetworkEventJson(event));
    };
    if (egress.intercept) {
      auto ca = CELLA_TRY(net::CertificateAuthority::LoadOrCreate(cella_home + "/egress-ca"));
      guest.ca_certificates = ca->CaCertificatePem();
      proxy_options.tls = net::MakeTlsProvider(ca, egress.upstream_ca);
    }
    // QEMU's NIC is a copy held until the sandbox ends: the pending
    // network's own TAP descriptor is closed when its Finish fails, on a
    // warm clone's background thread and possibly before QEMU launches, and
    // by then its number could name another file.
    tap_ = UniqueFd(::fcntl(pending.network.tap(), F_DUPFD_CLOEXEC, 0));
    if (!tap_) return FailErrno("duplicate the sandbox's TAP");
    vm.NetworkFD = tap_.Get();
    pending.dns = std::move(dns_options);
    pending.proxy = std::move(proxy_options);
    pending_egress_ = std::move(pending);
    return {};
  }

  // The rest of the sealed network: its ruleset and sockets, the DNS server
  // and the proxy on them.
  Status FinishEgress() {
    if (!pending_egress_) return {};
    PendingEgress pending = std::move(*pending_egress_);
    pending_egress_.reset();
    net::IsolatedNetwork network = CELLA_TRY(pending.network.Finish());
    // network.tap closes at the end of this scope: QEMU's is tap_ (above).
    netns_ = std::move(network.netns);  // `nsenter --net=/proc/<pid>/fd/N` for diagnosis
    dns_ = CELLA_TRY(net::DnsServer::Start(std::move(network.dns_socket), std::move(pending.dns)));
    proxy_ = CELLA_TRY(
        net::TransparentProxy::Start(std::move(network.proxy_listener), std::move(pending.proxy)));
    return {};
  }

  // What a boot needs of the host before its guest runs, after QEMU has
  // what it opens at launch: the network finished, the config disk filled.
  Status FinishHostWork(const std::string& config_json, const std::string& config_disk) {
    CELLA_TRY_CTX(FinishEgress(), "egress");
    log::Debug("supervisor: network ready", {{"id", args_.id}});
    CELLA_TRY(vmm::FillConfigDisk(config_json, config_disk));
    log::Debug("supervisor: config disk written", {{"id", args_.id}});
    return {};
  }

  // Waits for the host work a warm clone's start left running beside QEMU
  // (once; later calls return the same verdict). Thread-safe.
  Status JoinDeferred() {
    std::lock_guard lock(deferred_mu_);
    if (deferred_.valid()) deferred_result_ = deferred_.get();
    return deferred_result_;
  }

  // `restart.json` in the sandbox directory: {"count":N,"delay_ms":D}, the
  // restarts the policy made since the last start by a user (`inspect`'s
  // RestartCount) and the last back-off. A user's start (not --restarted)
  // begins a new series, as docker's does.
  void LoadRestartState(const SandboxSpec& spec) {
    restart_policy_ = spec.restart;
    const std::string path = RestartStatePath(paths_.dir);
    if (!args_.restarted) {
      if (::unlink(path.c_str()) != 0 && errno != ENOENT)
        log::Warn("could not reset the restart count", {{"error", std::strerror(errno)}});
      return;
    }
    auto text = ReadFileToString(path, 4096);
    if (!text) return;
    auto doc = nlohmann::json::parse(*text, nullptr, false);
    if (!doc.is_object()) return;
    restart_count_ = std::max(0, doc.value("count", 0));
    restart_delay_ = std::chrono::milliseconds(std::max<int64_t>(0, doc.value("delay_ms", 0)));
  }

  // The policy said restart: records the sandbox as creating ("restarting
  // in D ms"), waits out the back-off with a control socket that answers
  // stop and kill by calling the restart off, then execs this binary again
  // as `__supervise ID --restarted`: the new process boots the sandbox
  // through the same path as `cella start`. Returns only when the restart
  // was called off or could not be made (the end recorded stays).
  void RestartAfterBackoff(const LifecycleOutcome& ended, std::chrono::milliseconds ran) {
    const std::chrono::milliseconds delay = NextRestartDelay(restart_delay_, ran);
    const int attempt = restart_count_ + 1;
    const std::string why = ended.detail + "; restarting (--restart " + ToString(restart_policy_) +
                            ", restart " + std::to_string(attempt) + ", in " +
                            std::to_string(delay.count()) + " ms)";
    if (auto st = store_->Transition(args_.id, store::SandboxState::kCreating, OneLine(why),
                                     std::nullopt, ended.state);
        !st) {
      // Someone else changed it meanwhile (a removal): leave it be.
      log::Notice("no restart: " + st.error().message, {{"id", args_.id}});
      return;
    }
    // The transition to creating forgets the supervisor: it is still us.
    if (auto self = store::IdentifyProcess(::getpid()); self) {
      if (auto st = store_->SetSupervisor(args_.id, *self); !st)
        log::Warn("could not record the supervisor", {{"error", st.error().message}});
    }
    const std::string last_end =
        ended.exit_code ? " (last exit code " + std::to_string(*ended.exit_code) + ")" : "";
    // The count after the state: whoever sees the new count sees the
    // sandbox restarting, never "exited" with the next run's count.
    nlohmann::json counted = {{"count", attempt}, {"delay_ms", delay.count()}};
    if (auto st = WriteFileAtomically(RestartStatePath(paths_.dir), counted.dump(), 0600); !st) {
      log::Warn("no restart: could not record the restart count", {{"error", st.error().message}});
      (void)store_->Transition(args_.id, ended.state, ended.detail, ended.exit_code);
      return;
    }
    std::mutex mu;
    std::condition_variable cv;
    bool called_off = false;
    std::string how;
    auto server = ControlServer::Start(
        paths_.control_socket, [&](const nlohmann::json& request) -> nlohmann::json {
          const std::string op = request.value("op", std::string());
          if (op == "status") return {{"ok", true}, {"finished", false}, {"restarting", true}};
          if (op == "stop" || op == "kill") {
            std::lock_guard lock(mu);
            called_off = true;
            how = (op == "stop" ? "stopped while waiting to restart (cella stop)"
                                : "killed while waiting to restart (cella kill)") +
                  last_end;
            cv.notify_all();
            return {{"ok", true}};
          }
          return {{"ok", false}, {"error", "the sandbox is waiting to restart"}};
        });
    if (!server) {
      log::Warn("no restart: control socket", {{"error", server.error().message}});
      (void)store_->Transition(args_.id, ended.state, ended.detail, ended.exit_code);
      return;
    }
    // SIGTERM/SIGINT (blocked; Run collects them with sigtimedwait) call it
    // off too: the supervisor was asked to end.
    sigset_t signals;
    sigemptyset(&signals);
    for (int s : {SIGTERM, SIGINT}) sigaddset(&signals, s);
    const auto deadline = std::chrono::steady_clock::now() + delay;
    for (;;) {
      {
        std::unique_lock lock(mu);
        if (called_off) break;
        if (std::chrono::steady_clock::now() >= deadline) break;
        cv.wait_until(lock, std::min(deadline, std::chrono::steady_clock::now() +
                                                   std::chrono::milliseconds(100)));
        if (called_off) break;
      }
      timespec no_wait{0, 0};
      if (::sigtimedwait(&signals, nullptr, &no_wait) > 0) {
        std::lock_guard lock(mu);
        called_off = true;
        how = "stopped while waiting to restart (signal)" + last_end;
      }
    }
    (*server)->Stop();  // waits for its handlers: a stop it answered is seen below
    bool off = false;
    {
      std::lock_guard lock(mu);
      off = called_off;
    }
    if (off) {
      if (auto st = store_->Transition(args_.id, store::SandboxState::kStopped, how); !st)
        log::Warn("could not record the stop", {{"error", st.error().message}});
      return;
    }
    log::Notice("restarting the sandbox", {{"id", args_.id}, {"restart", attempt}});
    auto failed = ExecRestart();
    // Only an error comes back.
    log::Warn("restart failed", {{"error", failed.error().message}});
    (void)store_->Transition(args_.id, store::SandboxState::kFailed,
                             OneLine("restart failed: " + failed.error().message));
  }

  // Replaces this process with `cella __supervise ID --restarted`, the
  // secrets on its stdin again (a memfd: read to its end like the CLI's
  // pipe). Same PID and start time, so the store's record of the
  // supervisor stays true throughout. Returns only on failure.
  Status ExecRestart() {
    std::string self = CELLA_TRY(SelfExecutablePath());
    UniqueFd secrets(::memfd_create("cella-secrets", MFD_CLOEXEC));
    if (!secrets) return FailErrno("memfd_create");
    CELLA_TRY(WriteAll(secrets.Get(), secrets_text_));
    if (::lseek(secrets.Get(), 0, SEEK_SET) < 0) return FailErrno("lseek");
    std::vector<std::string> argv_storage = {self, "__supervise", args_.id, "--restarted"};
    std::vector<char*> argv;
    for (auto& a : argv_storage) argv.push_back(a.data());
    argv.push_back(nullptr);
    // The store connection, QEMU's leftovers, every socket: closed by the
    // exec (and kept usable here should it fail).
    if (::dup2(secrets.Get(), STDIN_FILENO) < 0) return FailErrno("dup2");
    // Nothing but stdio crosses into the new image.
    if (::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) return FailErrno("close_range");
    ::execv(self.c_str(), argv.data());
    return FailErrno("exec " + self);
  }

  // The CLI writes {"NAME":"value"} to our stdin and closes it; the values
  // live in this process's memory only.
  Status ReadSecrets(const SandboxSpec& spec) {
    std::string text;
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(STDIN_FILENO, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return FailErrno("read secrets from stdin");
      if (n == 0) break;
      text.append(buf, static_cast<size_t>(n));
      if (text.size() > (1u << 20)) return Fail("secrets on stdin: more than 1 MiB");
    }
    // Read once: stdin (a pipe, or on a restart a memfd holding the secrets)
    // is not kept open for the supervisor's whole life.
    UniqueFd null_in(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (!null_in) return FailErrno("open /dev/null");
    if (::dup2(null_in.Get(), STDIN_FILENO) < 0) return FailErrno("replace stdin after secrets");
    if (text.empty()) text = "{}";
    secrets_text_ = text;  // handed to the next process on a restart
    nlohmann::json doc = nlohmann::json::parse(text, nullptr, false);
    if (doc.is_discarded() || !doc.is_object()) return Fail("secrets on stdin: not a JSON object");
    for (const SecretSpec& secret : spec.egress.secrets) {
      auto it = doc.find(secret.name);
      if (it == doc.end() || !it->is_string() || it->get<std::string>().empty())
        return Fail("secret " + secret.name + ": no value was handed over");
      secret_values_[secret.name] = it->get<std::string>();
    }
    return {};
  }

  nlohmann::json Handle(const nlohmann::json& request) {
    if (request.value("op", std::string()) == "allow-list") return EditAllowList(request);
    if (request.value("op", std::string()) == "events") return ReadEvents(request);
    return lifecycle_->Handle(request);
  }

  // {"op":"events","from":N,"wait_ms":M}: the events numbered N and later
  // (event_ring.h), waiting at most M ms (capped at 2 s, well inside the
  // caller's time-out) for one. A negative or absent `from` means "from
  // now on". Replies {"ok":true,"next","dropped","events":[...]}.
  nlohmann::json ReadEvents(const nlohmann::json& request) {
    uint64_t from = std::numeric_limits<uint64_t>::max();
    auto f = request.find("from");
    if (f != request.end() && f->is_number_unsigned()) from = f->get<uint64_t>();
    int64_t wait_ms = 0;
    auto w = request.find("wait_ms");
    if (w != request.end() && w->is_number_integer())
      wait_ms = std::clamp<int64_t>(w->get<int64_t>(), 0, 2000);
    // A waiting reader holds one of the control server's connection slots
    // for up to 2 s: at most half of them may wait, so stop and kill always
    // find one however many rpc clients follow this sandbox's events. The
    // others are told "busy" at once (rpc retries after a pause).
    if (wait_ms > 0) {
      if (event_waiters_.fetch_add(1) >= kMaxEventWaiters) {
        event_waiters_.fetch_sub(1);
        return {{"ok", false}, {"error", "busy: too many readers are waiting for events"}};
      }
    }
    EventRing::Batch batch = events_->Read(from, std::chrono::milliseconds(wait_ms));
    if (wait_ms > 0) event_waiters_.fetch_sub(1);
    return {{"ok", true},
            {"next", batch.next},
            {"dropped", batch.dropped},
            {"events", std::move(batch.events)}};
  }

  // {"op":"allow-list","add":[...],"remove":[...]}: one atomic edit, stored
  // before it takes effect, so concurrent edits all land and a failed one
  // changes nothing. Replies with the list now in force.
  nlohmann::json EditAllowList(const nlohmann::json& request) {
    auto fail = [](const std::string& message) {
      return nlohmann::json{{"ok", false}, {"error", message}};
    };
    if (!policy_) return fail("this sandbox has no egress policy");
    std::vector<std::string> add;
    std::vector<std::string> remove;
    for (auto [key, out] : {std::pair{"add", &add}, std::pair{"remove", &remove}}) {
      if (!request.contains(key)) continue;
      if (!request[key].is_array())
        return fail(std::string("allow-list: \"") + key + "\" is not an array");
      for (const auto& item : request[key]) {
        if (!item.is_string()) return fail("allow-list: entries are strings");
        out->push_back(item.get<std::string>());
      }
    }
    // The control thread has its own connection: the main thread's is not
    // shared across threads.
    auto store = store::StateStore::Open(StateDbPath(sandbox_home_));
    if (!store) return fail(store.error().message);
    auto persist = [&](const std::vector<std::string>& entries) -> Status {
      return store->EditSpec(args_.id,
                             [&](const store::SandboxRecord& current) -> Result<std::string> {
                               SandboxSpec spec = CELLA_TRY(DecodeSpec(current.spec_json));
                               spec.egress.allow = entries;
                               return EncodeSpec(spec);
                             });
    };
    auto edited = policy_->EditAllowed(add, remove, persist);
    if (!edited) return fail(edited.error().message);
    log::Notice("allow-list changed", {{"entries", std::to_string(edited->size())}});
    return {{"ok", true}, {"allow", *edited}};
  }

  // QEMU appends the guest console to a file we do not write; the guest
  // can fill it at will. Looked at about once a second.
  void TrimConsole() {
    if (++ticks_ % 5 != 0) return;
    auto trimmed = TrimAppendedLog(paths_.console_log, log_max_bytes_);
    if (!trimmed) log::Warn("console log trim failed", {{"error", trimmed.error().message}});
    // virtiofsd logs what the guest makes it warn about: capped the same way.
    for (const std::string& log : share_logs_) {
      if (auto t = TrimAppendedLog(log, log_max_bytes_); !t)
        log::Warn("share log trim failed", {{"error", t.error().message}});
    }
  }

  void BeforeClose() {
    (void)JoinDeferred();  // a boot that failed before the go line
    if (proxy_) proxy_->Stop();
    events_->Close();  // a reader waiting for events learns at once
    if (dns_) dns_->Stop();
    for (auto& f : forwarders_) f->Stop();
    forwarders_.clear();
    main_.reset();
  }

  void AfterClose() {
    if (router_) router_->Stop();
    shares_.clear();       // QEMU is gone: nothing is served any more
    fuse_shares_.clear();  // their link is closed: the threads have ended
    for (const std::string& p : {paths_.mux_socket}) {
      if (!p.empty() && ::unlink(p.c_str()) != 0 && errno != ENOENT)
        log::Warn("could not remove socket", {{"path", p}, {"error", std::strerror(errno)}});
    }
  }

  void RemoveIfAuto() {
    if (!auto_remove_ || !store_) return;
    // A foreground run's caller waits for this process to end. Closing the
    // last copy of the TAP unregisters the device (~10 ms of the kernel's,
    // mostly waiting): on a second thread, beside the removal below (which
    // mostly waits on the disk). Files before the record, as before: a
    // supervisor killed in between leaves a record that `rm` cleans up.
    std::thread tap_closer;
    try {
      tap_closer = std::thread([this] { tap_.Reset(); });
    } catch (const std::system_error& e) {
      log::Debug("the TAP is closed at exit", {{"error", e.what()}});
    }
    std::error_code ec;
    std::filesystem::remove_all(paths_.dir, ec);
    if (ec) log::Warn("could not remove sandbox files", {{"path", paths_.dir}});
    if (auto st = store_->Remove(args_.id); !st) {
      log::Warn("could not remove the sandbox record", {{"error", st.error().message}});
    } else if (auto removed = RemoveAnonymousVolumes(*store_, sandbox_home_, spec_json_);
               !removed) {
      // docker's --rm takes the anonymous volumes (`-v /path`) along.
      log::Warn("could not remove anonymous volumes", {{"error", removed.error().message}});
    }
    if (tap_closer.joinable()) tap_closer.join();
  }

  SupervisorArgs args_;
  int ready_fd_;
  std::string sandbox_home_;
  SandboxPaths paths_;
  std::optional<store::StateStore> store_;
  bool auto_remove_ = false;
  std::string spec_json_;  // the record's, for RemoveIfAuto
  std::string secrets_text_;
  RestartPolicy restart_policy_;
  int restart_count_ = 0;
  std::chrono::milliseconds restart_delay_{0};
  bool has_main_ = false;
  bool has_volumes_ = false;
  std::string spec_upper_image_;
  int memory_mib_ = 0;
  std::shared_ptr<net::FakeIpTable> fake_ips_;
  std::string restored_dns_names_;  // from the snapshot being resumed
  std::function<Result<SnapshotCompat>()> compat_inputs_;
  std::optional<SnapshotCompat> compat_;
  std::future<Result<SnapshotCompat>> compat_prefetch_;
  SnapshotCompat resume_manifest_compat_;  // what the snapshot being resumed needs
  std::string standby_dir_;
  bool resume_announced_ = false;
  std::string cella_home_;
  // A warm start's template, and what the cold boot after a failed restore
  // uses instead (the VM as it was before it became a clone).
  std::optional<warm::TemplateInfo> warm_template_;
  vmm::VMConfig cold_vm_;
  std::optional<vmm::QemuBackendOptions> cold_options_;
  // $CELLA_SNAPSHOT_FORMAT (file|zstd|raw, see snapshot.h) picks it for
  // measurements.
  SnapshotLayout layout_ = DefaultLayout();
  std::vector<PortSpec> ports_;
  uint64_t log_max_bytes_ = kDefaultLogMaxBytes;
  std::optional<CappedLogWriter> output_log_;  // written by the router thread only
  unsigned ticks_ = 0;                         // lifecycle thread only
  std::unique_ptr<host::Router> router_;
  std::unique_ptr<host::ExecSession> main_;
  std::vector<std::unique_ptr<PortForwarder>> forwarders_;
  std::map<std::string, std::string> secret_values_;  // never logged, never written
  std::shared_ptr<net::Policy> policy_;
  std::unique_ptr<net::DnsServer> dns_;
  std::unique_ptr<net::TransparentProxy> proxy_;
  // The proxy's decisions for `cella rpc` (shared: the proxy's sink holds it).
  std::shared_ptr<EventRing> events_ = std::make_shared<EventRing>();
  static constexpr int kMaxEventWaiters = static_cast<int>(ControlServer::kMaxConnections / 2);
  std::atomic<int> event_waiters_{0};
  // The sealed network between StartEgress and FinishEgress.
  struct PendingEgress {
    net::PendingIsolatedNetwork network;
    net::DnsServerOptions dns;
    net::ProxyOptions proxy;
  };
  std::optional<PendingEgress> pending_egress_;
  // A warm clone's FinishHostWork, running while QEMU starts (JoinDeferred).
  std::mutex deferred_mu_;
  std::future<Status> deferred_;
  Status deferred_result_;
  UniqueFd tap_;  // QEMU's NIC (set by StartEgress); QEMU got its own copy at launch
  UniqueFd netns_;
  std::vector<std::unique_ptr<ShareDaemon>> shares_;  // main thread only
  // FUSE shares: (config index, server), and the threads serving them on
  // the current link. Main thread only; a server is touched here only
  // while no FuseShare serves it.
  std::vector<std::pair<uint32_t, std::shared_ptr<share::FuseServer>>> fuse_servers_;
  std::vector<std::unique_ptr<FuseShare>> fuse_shares_;
  std::vector<std::string> share_logs_;
  std::unique_ptr<SandboxLifecycle> lifecycle_;
  std::unique_ptr<ControlServer> control_;
};

}  // namespace

int RunSupervisor(const SupervisorArgs& args) {
  // First, before any secret is read: no core dump, no ptrace attach and no
  // /proc/<pid>/mem for others of our uid. QEMU is unaffected (execve
  // resets it).
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    log::Warn("prctl(PR_SET_DUMPABLE) failed", {{"error", std::strerror(errno)}});
    return 1;
  }
  // Stop requests by signal are collected by the main loop (sigtimedwait);
  // threads started later inherit the mask.
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGTERM, SIGINT}) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  if (::signal(SIGHUP, SIG_IGN) == SIG_ERR) return 1;
  // QEMU must not inherit the readiness pipe: the CLI reads it to EOF.
  if (args.ready_fd >= 0 && ::fcntl(args.ready_fd, F_SETFD, FD_CLOEXEC) != 0) return 1;
  Supervisor supervisor(args);
  return supervisor.Run();
}

Status SpawnSupervisor(const std::string& self_exe, const std::string& id, MainAttach attach,
                       const std::string& log_path, std::chrono::milliseconds ready_timeout,
                       const std::string& secrets_json, bool resume) {
  int secret_fds[2];
  if (::pipe2(secret_fds, O_CLOEXEC) != 0) return FailErrno("pipe2");
  UniqueFd secrets_read(secret_fds[0]);
  UniqueFd secrets_write(secret_fds[1]);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return FailErrno("pipe2");
  UniqueFd read_end(pipe_fds[0]);
  UniqueFd write_end(pipe_fds[1]);
  UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (!devnull) return FailErrno("open /dev/null");
  UniqueFd log_fd(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!log_fd) return FailErrno("open " + log_path);
  // Everything the child needs is prepared before fork: after it, only
  // async-signal-safe calls.
  std::string ready_arg = "--ready-fd=3";
  std::vector<std::string> argv_storage = {self_exe, "__supervise", id, ready_arg};
  if (attach == MainAttach::kByClient) argv_storage.push_back("--client-attaches");
  if (resume) argv_storage.push_back("--resume");
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  // The supervisor (and QEMU after it) would otherwise carry a secret taken
  // from our environment (NAME@host) in its own /proc/<pid>/environ for the
  // sandbox's life: every variable holding a secret value stays behind.
  std::vector<std::string> secret_values;
  if (!secrets_json.empty()) {
    nlohmann::json doc = nlohmann::json::parse(secrets_json, nullptr, false);
    if (doc.is_object()) {
      for (const auto& [name, value] : doc.items())
        if (value.is_string()) secret_values.push_back(value.get<std::string>());
    }
  }
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string_view entry(*e);
    auto eq = entry.find('=');
    std::string_view value = eq == std::string_view::npos ? "" : entry.substr(eq + 1);
    bool holds_secret = std::any_of(secret_values.begin(), secret_values.end(),
                                    [&](const std::string& v) { return v == value; });
    if (!holds_secret) envp.push_back(*e);
  }
  envp.push_back(nullptr);
  // The supervisor outlives this CLI, so it must not inherit our blocked
  // signals or die with us.
  pid_t middle = ::fork();
  if (middle < 0) return FailErrno("fork");
  if (middle == 0) {
    if (::setsid() < 0) ::_exit(120);
    pid_t child = ::fork();
    if (child < 0) ::_exit(121);
    if (child > 0) ::_exit(0);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (::dup2(secrets_read.Get(), 0) < 0 || ::dup2(devnull.Get(), 1) < 0 ||
        ::dup2(log_fd.Get(), 2) < 0 || ::dup2(write_end.Get(), 3) < 0)
      ::_exit(122);
    // Nothing else of ours (or of whoever ran us, e.g. a pipe a test reads
    // to EOF) may stay open in a process that lives on.
    if (::close_range(4, ~0U, 0) != 0) ::_exit(123);
    ::execve(self_exe.c_str(), argv.data(), envp.data());
    ::_exit(127);
  }
  write_end.Reset();
  secrets_read.Reset();
  // Small (a pipe buffer holds 64 KiB); the supervisor reads it first thing.
  auto sent = WriteAll(secrets_write.Get(), secrets_json);
  secrets_write.Reset();
  int status = 0;
  while (::waitpid(middle, &status, 0) < 0) {
    if (errno != EINTR) return FailErrno("waitpid supervisor launcher");
  }
  if (!sent)
    return std::unexpected(std::move(sent.error()).WithContext("hand secrets to the supervisor"));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return Fail("could not start the sandbox supervisor (launcher status " +
                std::to_string(status) + ")");
  auto deadline = std::chrono::steady_clock::now() + ready_timeout;
  std::string line;
  char buf[4096];
  for (;;) {
    auto left =
        std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      return Fail("the sandbox supervisor did not report ready in time; see " + log_path);
    pollfd pfd{read_end.Get(), POLLIN, 0};
    int rc = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("poll supervisor readiness");
    if (rc == 0) continue;
    ssize_t n = ::read(read_end.Get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("read supervisor readiness");
    if (n == 0) break;  // the supervisor closes it right after its one message
    if (line.size() < 64 * 1024) line.append(buf, static_cast<size_t>(n));
  }
  // Zero or more "notice: ..." lines (shown here, where a user sees them),
  // then the one "ok" or "error: ..." (whose message may run over several
  // lines: a failed boot carries the guest console's last lines).
  std::string_view rest = line;
  while (rest.starts_with("notice: ")) {
    size_t nl = rest.find('\n');
    log::Notice(rest.substr(8, nl == std::string_view::npos ? std::string_view::npos : nl - 8));
    rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
  }
  while (rest.ends_with('\n')) rest.remove_suffix(1);
  if (rest == "ok") return {};
  if (rest.starts_with("error: ")) return Fail(std::string(rest.substr(7)));
  return Fail("the sandbox supervisor exited before it was ready; see " + log_path);
}

}  // namespace cella::sandbox
