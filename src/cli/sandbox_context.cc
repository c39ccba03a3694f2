#include "cli/sandbox_context.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "base/log.h"
#include "base/unique_fd.h"
#include "host/os/paths.h"
#include "host/sandbox/control.h"
#include "host/sandbox/snapshot.h"
#include "host/store/process_identity.h"

namespace cella::cli {
namespace {

// Only a process proven to be the recorded one is killed: an unreadable
// /proc or a reused pid leaves it alone (with a warning for the former).
void KillIfAlive(const store::ProcessIdentity& who, std::string_view what) {
  auto sent = store::SignalIfSame(who, SIGKILL);
  if (!sent) {
    log::Warn("leftover process not killed",
              {{"what", std::string(what)}, {"pid", who.pid}, {"error", sent.error().message}});
    return;
  }
  if (!*sent) return;
  // Not our child: wait (bounded) for the kernel to tear it down so its
  // files are closed before they are removed.
  for (int i = 0; i < 100 && store::CheckProcess(who) == store::Liveness::kAlive; ++i)
    ::usleep(20'000);
}

// What a VM leaves in its directory while it runs; its supervisor removes
// them, so after a crashed supervisor the CLI does. console.log stays for
// `cella logs`.
void RemoveRuntimeFiles(const std::string& dir) {
  for (const char* name : {"agent.sock", "qmp.sock", "mux.sock", "control.sock", "qemu.log"}) {
    std::string path = dir + "/" + name;
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      log::Warn("could not remove leftover file", {{"path", path}});
  }
}

}  // namespace

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Result<SandboxContext> OpenSandboxes() {
  std::string home = CELLA_TRY(sandbox::SandboxHome());
  CELLA_TRY(host::MakeDirs(home + "/sandboxes", 0700));
  auto store = CELLA_TRY(store::StateStore::Open(sandbox::StateDbPath(home)));
  SandboxContext ctx{home, std::move(store)};
  // The manifest's rename is a standby snapshot's commit point (snapshot.h):
  // with it there, the sandbox is resumable whatever happened to its
  // supervisor after; without it, anything in standby/ is never trusted.
  auto committed_standby = [&home](const store::SandboxRecord& r) {
    std::string manifest = sandbox::PathsFor(home, r.id).dir + "/standby/" + sandbox::kManifestName;
    return ::access(manifest.c_str(), F_OK) == 0;
  };
  auto dead = CELLA_TRY(
      ctx.store.Reconcile([](const store::ProcessIdentity& who) { return store::IsAlive(who); },
                          std::chrono::seconds(60), committed_standby));
  for (const store::SandboxRecord& r : dead) {
    log::Notice("sandbox supervisor is gone; cleaning up", {{"sandbox", r.Label()}});
    KillIfAlive(r.hypervisor, "qemu");
    if (r.auto_remove) {
      if (auto st = RemoveSandboxCompletely(ctx, r); !st)
        log::Warn("could not remove sandbox", {{"error", st.error().message}});
    } else {
      RemoveRuntimeFiles(sandbox::PathsFor(home, r.id).dir);
    }
  }
  return ctx;
}

Status RemoveSandboxCompletely(SandboxContext& ctx, const store::SandboxRecord& record,
                               bool volumes) {
  KillIfAlive(record.supervisor, "supervisor");
  KillIfAlive(record.hypervisor, "qemu");
  std::string dir = sandbox::PathsFor(ctx.home, record.id).dir;
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  if (ec) return Fail("remove " + dir + ": " + ec.message());
  CELLA_TRY(ctx.store.Remove(record.id));
  if (volumes || record.auto_remove)
    return sandbox::RemoveAnonymousVolumes(ctx.store, ctx.home, record.spec_json);
  return {};
}

Status RequireRunning(const store::SandboxRecord& record, std::string_view for_what) {
  if (record.state == store::SandboxState::kRunning) return {};
  std::string state(store::ToString(record.state));
  if (record.state == store::SandboxState::kExited && record.exit_code)
    state += " (" + std::to_string(*record.exit_code) + ")";
  std::string hint = record.state == store::SandboxState::kPaused
                         ? "unpause it with: cella unpause " + record.Label()
                     : record.state == store::SandboxState::kStandby
                         ? "resume it with: cella resume " + record.Label()
                     : store::IsActive(record.state)
                         ? "wait for it and try again"
                         : "start it with: cella start " + record.Label();
  return Fail("cannot " + std::string(for_what) + ": sandbox " + record.Label() + " is " + state +
              "; " + hint);
}

Result<std::unique_ptr<host::AgentClient>> ConnectAgent(const SandboxContext& ctx,
                                                        const store::SandboxRecord& record) {
  const sandbox::SandboxPaths paths = sandbox::PathsFor(ctx.home, record.id);
  // While a snapshot or fork of the sandbox is being saved, its supervisor
  // has closed the socket (the guest's link is released for the save) and
  // opens it again when the VM runs on: wait for that, bounded, as long as
  // the supervisor lives.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (;;) {
    auto fd = sandbox::ConnectUnixSocket(paths.mux_socket);
    if (fd) return host::AgentClient::Connect(std::move(*fd));
    const int why = fd.error().errno_value;
    const bool saving = (why == ENOENT || why == ECONNREFUSED) &&
                        std::chrono::steady_clock::now() < deadline && record.supervisor.pid > 0 &&
                        store::IsAlive(record.supervisor);
    if (!saving)
      return Fail("cannot reach sandbox " + record.Label() + " (" + fd.error().message +
                  "); is it running? see cella ps -a");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

std::string DescribeAge(int64_t then_ms, int64_t now_ms) {
  int64_t s = (now_ms - then_ms) / 1000;
  if (s < 1) return "Less than a second";
  auto unit = [](int64_t n, const char* one, const char* many) {
    return std::to_string(n) + " " + (n == 1 ? one : many);
  };
  if (s < 60) return unit(s, "second", "seconds");
  if (s < 3600) return unit(s / 60, "minute", "minutes");
  if (s < 86400 * 2) return unit(s / 3600, "hour", "hours");
  return unit(s / 86400, "day", "days");
}

std::string DescribeStatus(const store::SandboxRecord& r, int64_t now_ms) {
  switch (r.state) {
    case store::SandboxState::kCreating:
      return "Creating";
    case store::SandboxState::kRunning:
      return "Up " + DescribeAge(r.updated_ms, now_ms);
    case store::SandboxState::kStopping:
      return "Stopping";
    case store::SandboxState::kStopped:
      return "Stopped " + DescribeAge(r.updated_ms, now_ms) + " ago";
    case store::SandboxState::kExited:
      return "Exited (" + std::to_string(r.exit_code.value_or(-1)) + ") " +
             DescribeAge(r.updated_ms, now_ms) + " ago";
    case store::SandboxState::kFailed:
      return "Failed: " + r.reason;
    case store::SandboxState::kPaused:
      return "Paused " + DescribeAge(r.updated_ms, now_ms);
    case store::SandboxState::kStandby:
      return "Standby " + DescribeAge(r.updated_ms, now_ms);
  }
  return "?";
}

namespace {

std::string RpcRemovedDir(const SandboxContext& ctx) { return ctx.home + "/rpc-removed"; }

bool IsFullId(std::string_view ref) {
  return ref.size() == 32 && std::ranges::all_of(ref, [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

}  // namespace

void RecordRpcRemoval(const SandboxContext& ctx, const std::string& id) {
  if (!IsFullId(id)) return;
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string dir = RpcRemovedDir(ctx);
  fs::create_directories(dir, ec);
  if (ec) {
    log::Debug("rpc: no removal marker", {{"dir", dir}, {"error", ec.message()}});
    return;
  }
  // Old markers go first, so the directory stays as small as a day's use.
  auto cutoff = fs::file_time_type::clock::now() - std::chrono::hours(24);
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    std::error_code stat_ec;
    auto written = it->last_write_time(stat_ec);
    if (!stat_ec && written < cutoff) fs::remove(it->path(), stat_ec);
  }
  UniqueFd marker(::open((dir + "/" + id).c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
  if (!marker) log::Debug("rpc: no removal marker", {{"id", id}, {"error", strerror(errno)}});
}

bool ForgetRpcRemoval(const SandboxContext& ctx, const std::string& ref) {
  if (!IsFullId(ref)) return false;
  return ::unlink((RpcRemovedDir(ctx) + "/" + ref).c_str()) == 0;
}

}  // namespace cella::cli
