// `cella run`: create a sandbox from an image (or the built-in one), start its
// supervisor, and either print its ID (-d) or attach to its main process,
// stream its output and exit with its code (foreground runs are --rm).
#include <poll.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "cli/attach.h"
#include "cli/commands.h"
#include "cli/image_commands.h"
#include "cli/run_options.h"
#include "cli/sandbox_context.h"
#include "host/os/paths.h"
#include "host/sandbox/control.h"
#include "host/sandbox/disk_image.h"
#include "host/sandbox/port_forward.h"
#include "host/sandbox/spec.h"
#include "host/sandbox/supervisor.h"
#include "protocol/config.h"
#include "protocol/network.h"

namespace cella::cli {
namespace {

// Sparse: a writable layer only takes what the guest writes.
constexpr uint64_t kDefaultDiskSize = uint64_t{8} << 30;
constexpr uint64_t kDefaultVolumeSize = uint64_t{1} << 30;

const char* HostEnv(const char* name) { return std::getenv(name); }

Result<std::string> NewSandboxId() {
  unsigned char bytes[16];
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

// Docker creates a named volume on first use; so do we.
Result<store::VolumeRecord> EnsureVolume(SandboxContext& ctx, const std::string& name) {
  auto existing = ctx.store.GetVolume(name);
  if (existing) return *existing;
  if (existing.error().errno_value != ENOENT) return std::unexpected(existing.error());
  CELLA_TRY(CreateVolume(ctx, name, kDefaultVolumeSize));
  log::Notice("created volume", {{"name", name}});
  return ctx.store.GetVolume(name);
}

Result<std::string> NewPlaceholder() {
  std::string hex = CELLA_TRY(NewSandboxId());  // 32 random hex digits
  return "CELLA_SECRET_" + hex;
}

struct Prepared {
  sandbox::SandboxSpec spec;
  nlohmann::json secret_values = nlohmann::json::object();  // name -> value; never stored
  std::vector<store::VolumeUse> volume_uses;
  std::vector<store::PortPublish> ports;
};

// Anonymous volumes it makes are added to `anonymous_made` as they are
// made, so that a caller whose run fails later can remove them.
Result<Prepared> Prepare(const RunArgs& args, SandboxContext& ctx, const std::string& cella_home,
                         const sandbox::SandboxPaths& paths, bool detached,
                         std::vector<std::string>& anonymous_made) {
  Prepared p;
  sandbox::SandboxSpec& spec = p.spec;
  protocol::Config& g = spec.guest;
  g.env["PATH"] = protocol::kDefaultPath;
  // No HOME here: the guest takes it from the user's passwd entry (or the
  // image's Env), as docker does.
  g.workdir = args.workdir;
  g.user = args.user;
  spec.image = args.image;
  if (!args.image.empty()) {
    RunImage image =
        CELLA_TRY(PrepareRunImage(cella_home, args.image, args.platform,
                                  {args.insecure_registries, args.ca_file}, args.pull));
    spec.root_image_path = image.rootfs_path;
    if (args.entrypoint) {
      // docker's --entrypoint: replaces the image's ENTRYPOINT ("" removes
      // it) and drops its CMD, so only the words after the image follow.
      image.defaults.entrypoint.clear();
      if (!args.entrypoint->empty()) image.defaults.entrypoint.push_back(*args.entrypoint);
      image.defaults.cmd.clear();
    }
    // Image env lands on top of the defaults and under the user's -e/--env-file.
    if (args.no_main) {
      // The image's env, workdir and user still apply; its entrypoint does
      // not run (a placeholder command satisfies ApplyImageDefaults).
      CELLA_TRY_CTX(sandbox::ApplyImageDefaults(image.defaults, {"true"}, g), args.image);
      g.cmd.clear();
      g.keep_alive = true;
    } else {
      CELLA_TRY_CTX(sandbox::ApplyImageDefaults(image.defaults, args.command, g), args.image);
      // `cella rpc` with launch_entrypoint: the VM outlives the entrypoint.
      if (args.keep_alive) g.keep_alive = true;
    }
  } else if (args.entrypoint && !args.entrypoint->empty()) {
    g.cmd = {*args.entrypoint};
    g.cmd.insert(g.cmd.end(), args.command.begin(), args.command.end());
  } else if (!args.command.empty()) {
    g.cmd = args.command;
  } else if (detached || args.no_main) {
    // `cella run -d` with nothing to run: a sandbox to exec into, up until
    // stopped.
    g.keep_alive = true;
  } else {
    g.cmd = {"sh"};
  }
  // docker gives a terminal a TERM (-e TERM=... still wins).
  if (args.tty) g.env["TERM"] = "xterm";
  for (const auto& file : args.env_files) {
    auto text = CELLA_TRY_CTX(ReadFileToString(file, 1 << 20), "--env-file");
    CELLA_TRY(ApplyEnvFile(text, file, &HostEnv, g.env));
  }
  for (const auto& item : args.env_items) CELLA_TRY(ApplyEnvAssignment(item, &HostEnv, g.env));
  g.hostname = args.hostname;
  g.privileged = args.privileged;
  g.no_network = args.no_network;
  g.tty = args.tty;
  if (!args.no_network) g.mtu = args.mtu;
  for (const auto& item : args.add_hosts) {
    HostEntry e = CELLA_TRY(ParseAddHost(item));
    g.extra_hosts.push_back({e.host, e.ip});
  }
  if (!args.cpus.empty()) {
    g.cpus = spec.shape.cpus = CELLA_TRY(ParseCpus(args.cpus));
    // docker's rule: a VM cannot be given CPUs the host does not have.
    unsigned host_cpus = std::thread::hardware_concurrency();
    if (host_cpus > 0 && g.cpus > host_cpus) {
      return Fail("--cpus " + args.cpus + ": this host has only " + std::to_string(host_cpus) +
                  " CPUs (use at most " + std::to_string(host_cpus) + ")");
    }
  }
  if (!args.memory.empty()) spec.shape.memory_mib = CELLA_TRY(ParseMemoryMiB(args.memory));
  spec.restart = CELLA_TRY(sandbox::ParseRestartPolicy(args.restart));
  if (spec.restart.kind != sandbox::RestartPolicy::Kind::kNo) {
    if (args.rm) return Fail("--restart and --rm conflict (docker's rule): choose one");
    // A foreground run is removed when its process ends: nothing to restart.
    if (!detached) return Fail("--restart needs -d (a foreground run ends with its process)");
  }
  spec.kernel_path = args.kernel;
  if (spec.kernel_path.empty())
    if (const char* from_env = std::getenv("CELLA_KERNEL")) spec.kernel_path = from_env;
  spec.accel = args.accel;
  spec.boot_timeout_s = args.boot_timeout_s;
  // CELLA_COLD=1 lets a whole test suite (or a user) run cold without flags.
  const char* cold_env = std::getenv("CELLA_COLD");
  spec.cold = args.cold || (cold_env != nullptr && std::string_view(cold_env) == "1");

  for (const std::string& item : args.publish) {
    sandbox::PortMapping m = CELLA_TRY(sandbox::ParsePortMapping(item));
    spec.ports.push_back({m.host_ip, m.host_port, m.guest_port});
    p.ports.push_back({m.host_ip, m.host_port, m.guest_port});
  }
  std::error_code cwd_error;
  std::string cwd = std::filesystem::current_path(cwd_error).string();
  for (const std::string& item : args.volumes) {
    MountFlag flag = CELLA_TRY(ParseMountFlag(item, cwd));
    if (flag.is_host) {
      // Served while the sandbox runs (FUSE, host/sandbox/fuse_share.h);
      // the host path is checked again at every start.
      spec.shares.push_back({flag.host_path, flag.guest_path, flag.mode, flag.is_file});
      continue;
    }
    sandbox::VolumeSpec v;
    v.name = flag.name;
    v.guest_path = flag.guest_path;
    v.mode = flag.mode;
    if (flag.anonymous) {
      // docker's anonymous volume: a fresh one under 64 random hex digits,
      // removed with the sandbox by `rm -v` and by any automatic removal.
      v.name = CELLA_TRY(NewSandboxId()) + CELLA_TRY(NewSandboxId());
      v.anonymous = true;
      CELLA_TRY(CreateVolume(ctx, v.name, kDefaultVolumeSize));
      anonymous_made.push_back(v.name);
    }
    store::VolumeRecord volume = CELLA_TRY(EnsureVolume(ctx, v.name));
    v.host_path = volume.path;
    if (v.mode == protocol::MountMode::kOverlay) {
      v.overlay_path = paths.OverlayLayer(v.name);
      CELLA_TRY(sandbox::MakeExt4Image(v.overlay_path, static_cast<uint64_t>(volume.size_bytes),
                                       "cella-overlay"));
    }
    p.volume_uses.push_back({v.name, v.guest_path, std::string(protocol::ToString(v.mode))});
    spec.volumes.push_back(std::move(v));
  }
  sandbox::EgressSpec& egress = spec.egress;
  egress.allow = CELLA_TRY(SplitHostList(args.allow_hosts));
  egress.allow_private = args.allow_private;
  egress.host_loopback = args.allow_host_loopback;
  egress.intercept = args.network_intercept || !args.secrets.empty();
  egress.upstream_ca = args.upstream_ca;
  if (!egress.upstream_ca.empty()) {
    std::error_code ec;
    auto absolute = std::filesystem::absolute(egress.upstream_ca, ec);
    if (ec || !std::filesystem::is_regular_file(absolute, ec))
      return Fail("--upstream-ca " + egress.upstream_ca + ": not a readable file");
    egress.upstream_ca = absolute.string();
  }
  for (const std::string& item : args.resolves) {
    ResolveFlag pin = CELLA_TRY(ParseResolveFlag(item));
    egress.pins.push_back({pin.name, pin.port, pin.address, pin.address_port});
  }
  for (const std::string& item : args.secrets) {
    SecretFlag secret = CELLA_TRY(ParseSecretFlag(item, &HostEnv));
    std::string placeholder = CELLA_TRY(NewPlaceholder());
    g.env[secret.name] = placeholder;
    p.secret_values[secret.name] = secret.value;
    egress.secrets.push_back(
        {secret.name, placeholder, secret.hosts, secret.from_env ? secret.name : std::string()});
  }
  CELLA_TRY(PlanNetwork(args.no_network, args.dns, egress, g.dns_servers));
  if (egress.intercept) {
    // Where the usual TLS stacks look for extra trust (protocol/network.h);
    // the init appends cella's CA to those bundles.
    for (const auto& [key, value] : protocol::kTrustEnvironment) g.env.try_emplace(key, value);
  }

  // Foreground runs are thrown away at the end: a tmpfs upper is enough and
  // free. Detached sandboxes keep their writable layer across stop/start.
  g.read_only_root = args.read_only;
  for (const std::string& item : args.tmpfs) {
    // docker's PATH[:OPTIONS]; cella takes size= (bytes, k, m, g) only.
    size_t colon = item.find(':');
    protocol::TmpfsMount mount{item.substr(0, colon), 0};
    if (mount.path.empty() || mount.path.front() != '/')
      return Fail("--tmpfs " + item + ": want an absolute PATH[:size=N]");
    if (colon != std::string::npos) {
      std::string option = item.substr(colon + 1);
      if (!option.starts_with("size="))
        return Fail("--tmpfs " + item + ": only size=N is supported after the path");
      uint64_t bytes = CELLA_TRY_CTX(sandbox::ParseByteSize(option.substr(5)), "--tmpfs " + item);
      mount.size_mib = static_cast<int>(std::min<uint64_t>((bytes + (1 << 20) - 1) >> 20, 1 << 20));
    }
    g.tmpfs.push_back(std::move(mount));
  }
  for (const std::string& label : args.labels) {
    size_t eq = label.find('=');
    std::string key = label.substr(0, eq);
    if (key.empty()) return Fail("--label " + label + ": want KEY=VALUE (or KEY)");
    spec.labels[key] = eq == std::string::npos ? std::string() : label.substr(eq + 1);
  }
  if (!args.log_max_size.empty()) {
    uint64_t cap = CELLA_TRY_CTX(sandbox::ParseByteSize(args.log_max_size), "--log-max-size");
    if (cap < sandbox::kMinLogMaxBytes)
      return Fail("--log-max-size " + args.log_max_size + ": at least 4k");
    spec.log_max_bytes = cap;
  }
  if (args.read_only && !args.disk_size.empty())
    return Fail("--read-only has no writable layer: --disk-size does not apply");
  if ((detached && !args.read_only) || !args.disk_size.empty()) {
    uint64_t size = args.disk_size.empty() ? kDefaultDiskSize
                                           : CELLA_TRY(sandbox::ParseDiskSize(args.disk_size));
    spec.upper_image = paths.upper_image;
    CELLA_TRY(sandbox::MakeExt4Image(spec.upper_image, size, "cella-upper"));
  }
  return p;
}

// A systemd image has no main process to attach to: the VM is the workload.
// It runs until the guest powers off, or until a signal asks for a graceful
// stop through the supervisor.
Result<int> WaitForPowerOff(SandboxContext& ctx, const store::SandboxRecord& record) {
  log::Notice("systemd image: the sandbox runs until it powers off; Ctrl-C stops it");
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, s);
  std::string control = sandbox::PathsFor(ctx.home, record.id).control_socket;
  for (;;) {
    timespec tick{0, 200'000'000};
    int sig = ::sigtimedwait(&set, nullptr, &tick);
    if (sig > 0) {
      log::Notice("stopping the sandbox", {{"signal", sig}});
      CELLA_TRY_CTX(sandbox::ControlCall(control, {{"op", "stop"}, {"grace_ms", 30'000}},
                                         std::chrono::minutes(2)),
                    "stop");
      return 128 + sig;
    }
    auto now = ctx.store.Get(record.id);
    if (!now || !store::IsActive(now->state)) return 0;
  }
}

// Makes the sandbox (directory, record, disks) and starts its supervisor.
// `persistent` sandboxes get a writable layer on disk (detached runs);
// others keep it in guest RAM unless --disk-size asks for one.
Result<std::string> CreateAndSpawn(const RunArgs& args, SandboxContext& ctx,
                                   sandbox::MainAttach attach, bool persistent,
                                   Prepared* prepared_out,
                                   const std::function<Status(const std::string&)>& on_record) {
  std::string cella_home = CELLA_TRY(host::CellaHome());
  std::string id = CELLA_TRY(NewSandboxId());
  sandbox::SandboxPaths paths = sandbox::PathsFor(ctx.home, id);
  CELLA_TRY(host::MakeDirs(paths.dir, 0700));
  std::vector<std::string> anonymous_made;
  auto cleanup_dir = [&] {
    std::error_code ec;
    std::filesystem::remove_all(paths.dir, ec);
    for (const std::string& name : anonymous_made) {
      if (auto st = ctx.store.RemoveVolume(name); !st)
        log::Warn("could not remove an anonymous volume", {{"error", st.error().message}});
      std::filesystem::remove_all(sandbox::VolumesDir(ctx.home) + "/" + name, ec);
    }
  };
  auto prepared = Prepare(args, ctx, cella_home, paths, persistent, anonymous_made);
  if (!prepared) {
    cleanup_dir();
    return std::unexpected(prepared.error());
  }
  // Like docker: the short ID is the default hostname (the only place that
  // picks one).
  if (prepared->spec.guest.hostname.empty()) prepared->spec.guest.hostname = store::ShortId(id);
  // Validated at the edge, before anything is recorded or started: a typo in
  // --hostname or --add-host is the caller's error, said as such.
  if (auto valid = protocol::ValidateConfig(prepared->spec.guest); !valid) {
    cleanup_dir();
    return std::unexpected(std::move(valid.error()).WithContext("invalid sandbox configuration"));
  }
  store::SandboxRecord record;
  record.id = id;
  record.name = args.name;
  record.image = args.image;
  record.command = args.command;
  record.spec_json = sandbox::EncodeSpec(prepared->spec);
  record.auto_remove = !args.detach || args.rm;
  record.volumes = prepared->volume_uses;
  record.ports = prepared->ports;
  if (auto created = ctx.store.Create(record); !created) {
    cleanup_dir();
    return std::unexpected(created.error());
  }
  if (on_record) {
    if (auto st = on_record(id); !st) {
      if (auto left = ctx.store.Get(id); left) (void)RemoveSandboxCompletely(ctx, *left);
      return std::unexpected(st.error());
    }
  }
  std::string self = CELLA_TRY(SelfExecutablePath());
  auto spawned = sandbox::SpawnSupervisor(self, id, attach, paths.supervisor_log,
                                          std::chrono::seconds(args.boot_timeout_s + 120),
                                          prepared->secret_values.dump());
  if (!spawned) {
    if (auto left = ctx.store.Get(id); left && left->auto_remove)
      (void)RemoveSandboxCompletely(ctx, *left);
    return std::unexpected(spawned.error());
  }
  if (prepared_out) *prepared_out = std::move(*prepared);
  return id;
}

// Attaches to a foreground run's main process (or waits for a systemd
// guest to power off) and returns the exit code to report.
Result<int> AttachForeground(SandboxContext& ctx, const std::string& id,
                             protocol::InitMode init_mode, const RunArgs& args) {
  store::SandboxRecord record = CELLA_TRY(ctx.store.Get(id));
  if (init_mode == protocol::InitMode::kSystemd) return WaitForPowerOff(ctx, record);
  auto agent = CELLA_TRY(ConnectAgent(ctx, record));
  host::ExecStatus status = CELLA_TRY(AttachToTerminal(
      [&](host::ExecCallbacks callbacks) { return agent->AttachMain(std::move(callbacks)); },
      {args.interactive, args.tty}));
  if (status.timed_out) log::Notice("main process timed out");
  return status.ShellCode();
}

Result<int> Run(const RunArgs& args) {
  const bool detached = args.detach;
  if (detached && (args.interactive || args.tty)) {
    return Fail(
        "-d cannot be combined with -i or -t: a detached sandbox has no terminal; "
        "run it with -d, then: cella exec -it ID sh");
  }
  log::Debug("run: start");
  SandboxContext ctx = CELLA_TRY(OpenSandboxes());
  Prepared prepared;
  std::string id = CELLA_TRY(CreateAndSpawn(
      args, ctx, detached ? sandbox::MainAttach::kBySupervisor : sandbox::MainAttach::kByClient,
      detached, &prepared, nullptr));
  if (detached) {
    if (auto st = WriteAll(STDOUT_FILENO, id + "\n"); !st) return std::unexpected(st.error());
    return 0;
  }
  log::Debug("run: supervisor ready", {{"id", id}});
  auto code = AttachForeground(ctx, id, prepared.spec.guest.init_mode, args);
  log::Debug("run: main process ended", {{"id", id}});
  if (!code) {
    // The main process never ran (a user the image lacks, an agent that
    // refused): nothing will end this VM, so end it here rather than leave
    // a sandbox up that no one asked to keep.
    std::string control = sandbox::PathsFor(ctx.home, id).control_socket;
    if (auto reply = sandbox::ControlCall(control, {{"op", "kill"}}, std::chrono::seconds(10));
        !reply)
      log::Debug("kill through the supervisor failed", {{"error", reply.error().message}});
  }
  FinishForegroundRun(ctx, id);
  log::Debug("run: sandbox removed", {{"id", id}});
  return code;
}

}  // namespace

void FinishForegroundRun(SandboxContext& ctx, const std::string& id) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  // The supervisor removes the record and exits: its exit wakes the wait
  // below at once (a pidfd), the 50 ms tick only covers a pidfd that could
  // not be opened or a process that is not the recorded one.
  UniqueFd supervisor;
  bool pidfd_tried = false;
  std::optional<bool> anonymous_volumes;
  while (std::chrono::steady_clock::now() < deadline) {
    auto now = ctx.store.Get(id);
    if (!now) {
      // Removed. Its anonymous volumes go after the record (a record in use
      // holds them): wait for the supervisor's exit, so that a `volume ls`
      // typed next no longer lists them.
      if (anonymous_volumes.value_or(false) && supervisor) {
        pollfd p{supervisor.Get(), POLLIN, 0};
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        while (::poll(&p, 1, static_cast<int>(std::max<int64_t>(left.count(), 0))) < 0 &&
               errno == EINTR) {
        }
      }
      return;
    }
    if (!anonymous_volumes) {
      auto spec = sandbox::DecodeSpec(now->spec_json);
      anonymous_volumes =
          spec && std::ranges::any_of(spec->volumes, [](const auto& v) { return v.anonymous; });
    }
    if (!store::IsActive(now->state) && !store::IsAlive(now->supervisor)) break;
    if (!pidfd_tried && now->supervisor.pid > 0) {
      pidfd_tried = true;
      supervisor.Reset(static_cast<int>(::syscall(SYS_pidfd_open, now->supervisor.pid, 0)));
      // Opened after the pid was read: it must still be the recorded process.
      if (supervisor && !store::IsAlive(now->supervisor)) supervisor.Reset();
    }
    if (supervisor) {
      pollfd p{supervisor.Get(), POLLIN, 0};
      int rc = ::poll(&p, 1, 50);
      // Exited (readable from now on) or unusable: ticks from here on.
      if (rc > 0 || (rc < 0 && errno != EINTR)) supervisor.Reset();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  auto left = ctx.store.Get(id);
  if (!left) return;
  if (auto st = RemoveSandboxCompletely(ctx, *left); !st)
    log::Warn("could not remove the sandbox", {{"error", st.error().message}});
}

Result<std::string> StartOwnedSandbox(const RunArgs& args, SandboxContext& ctx,
                                      const std::function<Status(const std::string&)>& on_record) {
  RunArgs owned = args;
  owned.detach = false;  // removed when it stops, as a foreground run
  return CreateAndSpawn(owned, ctx, sandbox::MainAttach::kBySupervisor, /*persistent=*/false,
                        nullptr, on_record);
}

Status CreateVolume(SandboxContext& ctx, const std::string& name, uint64_t size_bytes) {
  CELLA_TRY(store::CheckVolumeName(name));
  if (auto existing = ctx.store.GetVolume(name); existing)
    return Fail("volume \"" + name + "\" already exists");
  std::string dir = sandbox::VolumesDir(ctx.home) + "/" + name;
  CELLA_TRY(host::MakeDirs(sandbox::VolumesDir(ctx.home), 0700));
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);  // a leftover of an interrupted create
  CELLA_TRY(host::MakeDirs(dir, 0700));
  std::string image = sandbox::VolumeImagePath(ctx.home, name);
  CELLA_TRY(sandbox::MakeExt4Image(image, size_bytes, name));
  store::VolumeRecord record{name, image, static_cast<int64_t>(size_bytes), 0};
  if (auto st = ctx.store.CreateVolume(record); !st) {
    std::filesystem::remove_all(dir, ec);
    return st;
  }
  return {};
}

int RunCommand(const RunArgs& args) {
  BlockForwardedSignals();
  auto code = Run(args);
  if (!code) return ReportFailure(code.error());
  return *code;
}

int ReportFailure(const Error& error) {
  std::string line = "cella: " + error.message + "\n";
  // Nothing useful is left to do if stderr itself is gone.
  (void)WriteAll(STDERR_FILENO, line);
  return kExitCellaError;
}

}  // namespace cella::cli
