// `cella rpc`: matchlock's JSON-RPC on stdin/stdout (host/rpc/server.h),
// one sandbox per process, owned by this process: removed on `close`, at
// the end of stdin, and, through a reaper, when this process dies however
// it dies (SIGKILL included), so no VM outlives its client.
//
// The reaper is `cella __rpc-reaper` in its own session (a signal to our
// process group does not reach it), holding the read end of a pipe whose
// only writer is this process. It first reads the sandbox ID, then waits
// for EOF: the kernel closes our end when we exit. If the sandbox still
// exists then, the reaper stops it (the same grace as `close`) and removes
// it.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"
#include "cli/commands.h"
#include "cli/sandbox_context.h"
#include "host/os/paths.h"
#include "host/rpc/server.h"
#include "host/sandbox/control.h"
#include "host/sandbox/layout.h"
#include "host/sandbox/port_forward.h"
#include "host/sandbox/spec.h"

extern char** environ;

namespace cella::cli {
namespace {

constexpr auto kStopGrace = std::chrono::milliseconds(2000);

// The reaper's lifeline: the write end of its pipe, and its pid.
struct Reaper {
  UniqueFd lifeline;
  pid_t pid = -1;
};

Result<Reaper> SpawnReaper() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return FailErrno("pipe2");
  UniqueFd first_read_end(fds[0]);
  Reaper reaper;
  reaper.lifeline = UniqueFd(fds[1]);
  // Above the target fd 3: a dup2 onto itself would keep O_CLOEXEC.
  UniqueFd read_end(::fcntl(first_read_end.Get(), F_DUPFD_CLOEXEC, 10));
  if (read_end.Get() < 0) return FailErrno("fcntl F_DUPFD_CLOEXEC");
  first_read_end.Reset();
  std::string self = CELLA_TRY(SelfExecutablePath());
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  if (int e = ::posix_spawn_file_actions_init(&actions); e != 0) {
    errno = e;
    return FailErrno("posix_spawn_file_actions_init");
  }
  if (int e = ::posix_spawnattr_init(&attr); e != 0) {
    ::posix_spawn_file_actions_destroy(&actions);
    errno = e;
    return FailErrno("posix_spawnattr_init");
  }
  // stdio on /dev/null: the reaper must not hold the client's pipes open.
  int err = 0;
  for (int fd : {0, 1, 2})
    if (err == 0)
      err = ::posix_spawn_file_actions_addopen(&actions, fd, "/dev/null",
                                               fd == 0 ? O_RDONLY : O_WRONLY, 0);
  if (err == 0) err = ::posix_spawn_file_actions_adddup2(&actions, read_end.Get(), 3);
  if (err == 0) err = ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);
  // A reaper must not die with a Ctrl-C meant for its client; the signals
  // cella blocks for forwarding stay blocked across exec otherwise.
  sigset_t none;
  sigemptyset(&none);
  if (err == 0) err = ::posix_spawnattr_setsigmask(&attr, &none);
  if (err == 0)
    err = ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK);
  char arg0[] = "cella";
  char arg1[] = "__rpc-reaper";
  char* argv[] = {arg0, arg1, nullptr};
  if (err == 0) err = ::posix_spawn(&reaper.pid, self.c_str(), &actions, &attr, argv, environ);
  ::posix_spawn_file_actions_destroy(&actions);
  ::posix_spawnattr_destroy(&attr);
  if (err != 0) {
    errno = err;
    return FailErrno("posix_spawn " + self + " __rpc-reaper");
  }
  return reaper;
}

// Stops the sandbox through its supervisor and waits (bounded) until it is
// removed; removes it directly when the supervisor cannot.
void StopAndRemove(SandboxContext& ctx, const std::string& id, std::chrono::milliseconds grace) {
  auto record = ctx.store.Get(id);
  if (!record) return;  // already gone
  // Before it goes: a client that sees it gone may run `rm ID` at once.
  RecordRpcRemoval(ctx, id);
  std::string control = sandbox::PathsFor(ctx.home, id).control_socket;
  if (store::IsActive(record->state)) {
    auto stopped = sandbox::ControlCall(control, {{"op", "stop"}, {"grace_ms", grace.count()}},
                                        grace + std::chrono::seconds(30));
    if (!stopped)
      log::Notice("rpc: stopping through the supervisor failed; killing",
                  {{"id", id}, {"error", stopped.error().message}});
  }
  FinishForegroundRun(ctx, id);
}

// The list before is read from the store; the supervisor applies the edit
// and answers with the list in force.
Result<rpc::Sandbox::AllowListChange> EditAllowListOf(SandboxContext& ctx, const std::string& id,
                                                      const std::vector<std::string>& add,
                                                      const std::vector<std::string>& remove) {
  rpc::Sandbox::AllowListChange change;
  store::SandboxRecord record = CELLA_TRY(ctx.store.Get(id));
  sandbox::SandboxSpec spec = CELLA_TRY(sandbox::DecodeSpec(record.spec_json));
  change.before = spec.egress.allow;
  std::string control = sandbox::PathsFor(ctx.home, id).control_socket;
  nlohmann::json reply = CELLA_TRY(sandbox::ControlCall(
      control, {{"op", "allow-list"}, {"add", add}, {"remove", remove}}, std::chrono::seconds(10)));
  if (!reply.contains("allow") || !reply["allow"].is_array())
    return Fail("the supervisor did not report the allow-list");
  for (const auto& h : reply["allow"])
    if (h.is_string()) change.after.push_back(h.get<std::string>());
  return change;
}

host::ExecRequest ExecDefaultsOf(const sandbox::SandboxSpec& spec) {
  host::ExecRequest defaults;
  for (const auto& [k, v] : spec.guest.env) defaults.env.push_back(k + "=" + v);
  defaults.workdir = spec.guest.workdir;
  defaults.user = spec.guest.user;
  defaults.privileged = spec.guest.privileged;
  return defaults;
}

// What every sandbox the rpc server drives has: its store, its agent
// through the router, the exec defaults of its spec, and allow-list edits.
class CliSandbox : public rpc::Sandbox {
 public:
  CliSandbox(SandboxContext ctx, std::string id, std::unique_ptr<host::AgentClient> agent,
             host::ExecRequest defaults)
      : ctx_(std::move(ctx)),
        id_(std::move(id)),
        agent_(std::move(agent)),
        defaults_(std::move(defaults)) {}

  const std::string& id() const override { return id_; }
  host::AgentClient& agent() override { return *agent_; }
  host::ExecRequest ExecDefaults() const override { return defaults_; }
  std::string ConsoleLogPath() const override {
    return sandbox::PathsFor(ctx_.home, id_).console_log;
  }
  Result<AllowListChange> EditAllowList(const std::vector<std::string>& add,
                                        const std::vector<std::string>& remove) override {
    // One edit at a time: the store's connection is not shared across threads.
    std::lock_guard lock(store_mu_);
    return EditAllowListOf(ctx_, id_, add, remove);
  }
  // Long-polls the supervisor's event ring ({"op":"events"}, supervisor.cc).
  Result<EventBatch> PollEvents(std::optional<uint64_t> from,
                                std::chrono::milliseconds wait) override {
    nlohmann::json request = {{"op", "events"}, {"wait_ms", wait.count()}};
    if (from) request["from"] = *from;
    nlohmann::json reply =
        CELLA_TRY(sandbox::ControlCall(control_socket_, request, wait + std::chrono::seconds(10)));
    EventBatch batch;
    if (!reply.contains("next") || !reply["next"].is_number_unsigned() ||
        !reply.contains("events") || !reply["events"].is_array())
      return Fail("the supervisor's events reply is malformed");
    batch.next = reply["next"].get<uint64_t>();
    if (reply.contains("dropped") && reply["dropped"].is_number_unsigned())
      batch.dropped = reply["dropped"].get<uint64_t>();
    for (auto& event : reply["events"])
      if (event.is_object()) batch.events.push_back(std::move(event));
    return batch;
  }
  Result<PortBinding> ForwardPort(const std::string& address, uint16_t local_port,
                                  uint16_t remote_port) override {
    host::AgentClient* agent = agent_.get();
    auto forwarder = CELLA_TRY(
        sandbox::PortForwarder::Start(address, local_port, remote_port,
                                      [agent](uint16_t port) { return agent->OpenPort(port); }));
    PortBinding binding{address, forwarder->BoundPort(), remote_port};
    std::lock_guard lock(forwards_mu_);
    forwards_.push_back({binding, std::move(forwarder)});
    return binding;
  }

  Result<std::vector<PortBinding>> StopForward(const std::string& address,
                                               uint16_t local_port) override {
    std::vector<Forward> stopping;
    {
      std::lock_guard lock(forwards_mu_);
      auto matches = [&](const Forward& f) {
        return f.binding.local_port == local_port &&
               (address.empty() || f.binding.address == address);
      };
      for (auto& f : forwards_)
        if (matches(f)) stopping.push_back(std::move(f));
      std::erase_if(forwards_, [](const Forward& f) { return !f.forwarder; });
    }
    if (stopping.empty())
      return std::unexpected(Error{"no port forward listens on " +
                                       (address.empty() ? std::string("*") : address) + ":" +
                                       std::to_string(local_port),
                                   ENOENT});
    std::vector<PortBinding> stopped;
    for (auto& f : stopping) {
      f.forwarder->Stop();  // outside the lock: it waits for its connections
      stopped.push_back(f.binding);
    }
    return stopped;
  }

 protected:
  // Before the agent goes: every forwarder's connections use it.
  void StopForwards() {
    std::vector<Forward> forwards;
    {
      std::lock_guard lock(forwards_mu_);
      forwards.swap(forwards_);
    }
    for (auto& f : forwards) f.forwarder->Stop();
  }

  SandboxContext ctx_;
  std::string id_;
  // agent_ outlives Close: a worker the server gave up waiting for may still
  // hold it; its calls fail once the VM is gone.
  std::unique_ptr<host::AgentClient> agent_;
  host::ExecRequest defaults_;
  std::mutex store_mu_;  // serializes the users of ctx_.store
  std::string control_socket_ = sandbox::PathsFor(ctx_.home, id_).control_socket;
  struct Forward {
    PortBinding binding;
    std::unique_ptr<sandbox::PortForwarder> forwarder;
  };
  std::mutex forwards_mu_;
  std::vector<Forward> forwards_;  // guarded by forwards_mu_
};

// A sandbox this rpc process created and owns: Close stops and removes it.
class OwnedSandbox : public CliSandbox {
 public:
  OwnedSandbox(SandboxContext ctx, std::string id, std::unique_ptr<host::AgentClient> agent,
               host::ExecRequest defaults, Reaper reaper)
      : CliSandbox(std::move(ctx), std::move(id), std::move(agent), std::move(defaults)),
        reaper_(std::move(reaper)) {}
  ~OwnedSandbox() override { (void)Close(kStopGrace); }

  Status Close(std::chrono::milliseconds grace) override {
    StopForwards();
    std::lock_guard lock(store_mu_);
    if (closed_) return {};
    closed_ = true;
    StopAndRemove(ctx_, id_, grace);
    // The reaper sees EOF, finds the sandbox gone and exits.
    reaper_.lifeline.Reset();
    for (int i = 0; i < 50 && reaper_.pid > 0; ++i) {
      pid_t r = ::waitpid(reaper_.pid, nullptr, WNOHANG);
      if (r == reaper_.pid || (r < 0 && errno != EINTR)) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (ctx_.store.Get(id_)) return Fail("sandbox " + id_ + " could not be removed");
    return {};
  }

 private:
  Reaper reaper_;
  bool closed_ = false;  // guarded by store_mu_
};

// A sandbox someone else owns (`cella.attach`): driven through the router
// like `cella exec`; Close lets go and leaves it running.
class AttachedSandbox : public CliSandbox {
 public:
  using CliSandbox::CliSandbox;
  ~AttachedSandbox() override { StopForwards(); }
  // The forwards this client made end with it; the sandbox stays.
  Status Close(std::chrono::milliseconds) override {
    StopForwards();
    return {};
  }
};

std::string FormatCpus(double cpus) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", cpus);
  return text;
}

Result<RunArgs> ToRunArgs(const rpc::CreateParams& p) {
  RunArgs args;
  // "@builtin" names the built-in image here too, as on the command line.
  args.image = p.image == kBuiltinImage ? "" : p.image;
  args.privileged = p.privileged;
  args.cpus = FormatCpus(p.cpus);
  args.memory = std::to_string(p.memory_mb) + "m";
  if (p.disk_size_mb > 0) args.disk_size = std::to_string(p.disk_size_mb) + "m";
  args.no_network = p.no_network;
  args.allow_hosts = p.allowed_hosts;
  args.allow_private = p.allow_private;
  args.network_intercept = p.intercept;
  args.dns = p.dns_servers;
  args.hostname = p.hostname;
  args.mtu = p.mtu;
  for (const auto& [host, ip] : p.add_hosts) args.add_hosts.push_back(host + ":" + ip);
  // NAME=VALUE@hosts: the value may hold '@' (the last one starts the hosts).
  for (const auto& s : p.secrets) {
    std::string hosts;
    for (const auto& h : s.hosts) hosts += (hosts.empty() ? "" : ",") + h;
    args.secrets.push_back(s.name + "=" + s.value + "@" + hosts);
  }
  // image_config's env under the request's own env.
  for (const auto& [k, v] : p.image_env) args.env_items.push_back(k + "=" + v);
  for (const auto& [k, v] : p.env) args.env_items.push_back(k + "=" + v);
  args.tmpfs.insert(args.tmpfs.end(), p.memory_mounts.begin(), p.memory_mounts.end());
  for (const auto& s : p.shares)
    args.volumes.push_back(s.host_path + ":" + s.guest_path + ":" + s.mode);
  args.user = p.user;
  args.workdir = p.working_dir;
  if (p.launch_entrypoint) {
    if (!p.entrypoint.empty())
      return Fail("image_config.entrypoint: not supported by cella yet (cmd is)");
    args.command = p.cmd;
    args.keep_alive = true;
  } else {
    args.no_main = true;
  }
  return args;
}

Result<std::unique_ptr<rpc::Sandbox>> CreateOwnedSandbox(const rpc::CreateParams& params) {
  RunArgs args = CELLA_TRY(ToRunArgs(params));
  SandboxContext ctx = CELLA_TRY(OpenSandboxes());
  Reaper reaper = CELLA_TRY(SpawnReaper());
  // The reaper learns the ID before the supervisor exists: from then on,
  // however this process ends, the sandbox is removed.
  std::function<Status(const std::string&)> tell_reaper = [&](const std::string& new_id) {
    return WriteAll(reaper.lifeline.Get(), new_id + "\n");
  };
  std::string id = CELLA_TRY(StartOwnedSandbox(args, ctx, tell_reaper));
  auto fail = [&](const Error& error) -> Result<std::unique_ptr<rpc::Sandbox>> {
    StopAndRemove(ctx, id, kStopGrace);
    return std::unexpected(error);
  };
  auto record = ctx.store.Get(id);
  if (!record) return fail(record.error());
  auto spec = sandbox::DecodeSpec(record->spec_json);
  if (!spec) return fail(spec.error());
  host::ExecRequest defaults = ExecDefaultsOf(*spec);
  auto agent = ConnectAgent(ctx, *record);
  if (!agent) return fail(agent.error());
  return std::make_unique<OwnedSandbox>(std::move(ctx), id, std::move(*agent), std::move(defaults),
                                        std::move(reaper));
}

Result<std::unique_ptr<rpc::Sandbox>> AttachSandbox(const std::string& ref) {
  SandboxContext ctx = CELLA_TRY(OpenSandboxes());
  store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(ref));
  CELLA_TRY(RequireRunning(record, "cella.attach"));
  sandbox::SandboxSpec spec = CELLA_TRY(sandbox::DecodeSpec(record.spec_json));
  auto agent = CELLA_TRY(ConnectAgent(ctx, record));
  return std::make_unique<AttachedSandbox>(std::move(ctx), record.id, std::move(agent),
                                           ExecDefaultsOf(spec));
}

// Reads the sandbox ID line from the lifeline (fd 3); "" when the owner
// ended before it had one.
std::string ReadOwnedId(int fd) {
  std::string id;
  char c;
  while (id.size() < 128) {
    ssize_t n = ::read(fd, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || c == '\n') break;
    id += c;
  }
  return id;
}

}  // namespace

int RpcCommand() {
  rpc::ServerOptions options;
  options.fork = &ForkSandbox;  // copies are ordinary sandboxes, not owned by this server
  rpc::Server server(&CreateOwnedSandbox, STDIN_FILENO, STDOUT_FILENO, options, &AttachSandbox);
  if (auto st = server.Serve(); !st) return ReportFailure(st.error());
  return 0;
}

int RpcReaperCommand() {
  constexpr int kLifeline = 3;
  std::string id = ReadOwnedId(kLifeline);
  if (id.empty()) return 0;
  // Wait for the owner to end: EOF (or an error) on the lifeline. Polled in
  // ticks so a sandbox removed by other means (cella rm -f) ends the wait.
  unsigned ticks = 0;
  for (;;) {
    pollfd p{kLifeline, POLLIN, 0};
    int r = ::poll(&p, 1, 1000);
    if (r < 0 && errno != EINTR) break;
    if (r > 0) {
      char buffer[64];
      ssize_t n = ::read(kLifeline, buffer, sizeof buffer);
      if (n <= 0 && !(n < 0 && errno == EINTR)) break;
      continue;  // the owner writes nothing more; ignore stray bytes
    }
    // Only a sandbox known to be gone ends the watch: a busy or failing
    // store must not leave the VM without its reaper. Every 5 s, since each
    // look reconciles the store.
    if (++ticks % 5 != 0) continue;
    auto ctx = OpenSandboxes();
    if (!ctx) continue;
    auto record = ctx->store.Get(id);
    if (!record && record.error().errno_value == ENOENT) return 0;
  }
  auto ctx = OpenSandboxes();
  if (!ctx) return 1;
  if (ctx->store.Get(id)) {
    log::Notice("rpc: owner gone; removing its sandbox", {{"id", id}});
    StopAndRemove(*ctx, id, kStopGrace);
  }
  return 0;
}

}  // namespace cella::cli
