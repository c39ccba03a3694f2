// The lifecycle commands that act on existing sandboxes: exec, ps, inspect,
// logs, stop, start, kill, rm, prune, pause, unpause, standby, resume, cp,
// port-forward, volumes, and the hidden `__supervise` entry point of the
// supervisor process. One piece (~940 lines): they share the small helpers
// above (ForEach, StopOne, StartOne) and the rules of which state allows
// what; the named snapshots have their own file.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>
#include <tuple>

#include "base/io.h"
#include "base/log.h"
#include "cli/attach.h"
#include "cli/commands.h"
#include "cli/cp_stream.h"
#include "cli/format_template.h"
#include "cli/run_options.h"
#include "cli/sandbox_context.h"
#include "host/sandbox/control.h"
#include "host/sandbox/copy.h"
#include "host/sandbox/disk_image.h"
#include "host/sandbox/log_files.h"
#include "host/sandbox/port_forward.h"
#include "host/sandbox/snapshot.h"
#include "host/sandbox/spec.h"
#include "host/sandbox/supervisor.h"

namespace cella::cli {
namespace {

using nlohmann::json;

int Report(const Status& st) { return st ? 0 : ReportFailure(st.error()); }

Status Print(std::string_view text) { return WriteAll(STDOUT_FILENO, text); }

std::map<std::string, std::string> LabelsOf(const store::SandboxRecord& r) {
  auto spec = sandbox::DecodeSpec(r.spec_json);
  return spec ? spec->labels : std::map<std::string, std::string>{};
}

std::string LabelsText(const std::map<std::string, std::string>& labels) {
  std::string out;
  for (const auto& [k, v] : labels) out += (out.empty() ? "" : ",") + k + "=" + v;
  return out;
}

// ps --filter, docker's keys (commands.h).
Result<std::vector<store::SandboxRecord>> ListFiltered(SandboxContext& ctx, bool all,
                                                       const std::vector<std::string>& filters) {
  std::map<std::string, std::vector<std::string>> by_key;
  for (const std::string& f : filters) {
    size_t eq = f.find('=');
    std::string key = f.substr(0, eq);
    if (eq == std::string::npos ||
        (key != "label" && key != "name" && key != "id" && key != "status"))
      return Fail("ps --filter " + f + ": want label=KEY[=VALUE], name=TEXT, id=PREFIX or " +
                  "status=STATE");
    by_key[key].push_back(f.substr(eq + 1));
  }
  if (by_key.contains("status")) all = true;
  auto records =
      CELLA_TRY(ctx.store.List(all ? store::ListScope::kAll : store::ListScope::kActiveOnly));
  std::vector<store::SandboxRecord> kept;
  auto any_of = [&](const std::string& key, auto&& match) {
    auto it = by_key.find(key);
    return it == by_key.end() || std::ranges::any_of(it->second, match);
  };
  for (auto& r : records) {
    bool ok =
        any_of("name", [&](const std::string& v) { return r.name.find(v) != std::string::npos; }) &&
        any_of("id", [&](const std::string& v) { return r.id.starts_with(v); }) &&
        any_of("status", [&](const std::string& v) { return store::ToString(r.state) == v; });
    if (ok && by_key.contains("label")) {
      auto labels = LabelsOf(r);
      for (const std::string& want : by_key["label"]) {
        size_t eq = want.find('=');
        auto it = labels.find(want.substr(0, eq));
        if (it == labels.end() || (eq != std::string::npos && it->second != want.substr(eq + 1)))
          ok = false;
      }
    }
    if (ok) kept.push_back(std::move(r));
  }
  return kept;
}

// docker's CreatedAt: "2026-12-06 12:53:45 +0000 UTC".
std::string FormatUtc(int64_t ms) {
  time_t t = static_cast<time_t>(ms / 1000);
  struct tm tm {};
  char buf[64];
  if (::gmtime_r(&t, &tm) == nullptr ||
      std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S +0000 UTC", &tm) == 0)
    return "-";
  return buf;
}

std::string Joined(const std::vector<std::string>& words) {
  std::string out;
  for (const auto& w : words) {
    if (!out.empty()) out += ' ';
    out += w;
  }
  return out;
}

std::string Truncated(std::string text, size_t width) {
  if (text.size() > width) text = text.substr(0, width - 1) + "~";
  return text;
}

std::string PortsText(const store::SandboxRecord& r) {
  std::string out;
  for (const auto& p : r.ports) {
    if (!out.empty()) out += ", ";
    out += (p.host_ip.empty() ? "127.0.0.1" : p.host_ip) + ":" + std::to_string(p.host_port) +
           "->" + std::to_string(p.guest_port) + "/tcp";
  }
  return out;
}

json RecordJson(const store::SandboxRecord& r) {
  json ports = json::array();
  for (const auto& p : r.ports)
    ports.push_back(
        {{"host_ip", p.host_ip}, {"host_port", p.host_port}, {"guest_port", p.guest_port}});
  json volumes = json::array();
  for (const auto& v : r.volumes)
    volumes.push_back({{"name", v.volume}, {"path", v.guest_path}, {"mode", v.mode}});
  json out = {{"id", r.id},
              {"name", r.name},
              {"image", r.image},
              {"command", r.command},
              {"created_ms", r.created_ms},
              {"state", store::ToString(r.state)},
              {"status", DescribeStatus(r, NowMs())},
              {"ports", ports},
              {"volumes", volumes},
              {"auto_remove", r.auto_remove}};
  // Host shares live in the spec (they need no store bookkeeping: no
  // exclusivity, nothing to remove with the sandbox).
  json shares = json::array();
  if (auto spec = sandbox::DecodeSpec(r.spec_json); spec) {
    for (const auto& s : spec->shares)
      shares.push_back({{"source", s.host_path},
                        {"path", s.guest_path},
                        {"mode", protocol::ToString(s.mode)},
                        {"type", s.is_file ? "file" : "directory"}});
  }
  out["shares"] = shares;
  if (r.exit_code) out["exit_code"] = *r.exit_code;
  if (!r.reason.empty()) out["reason"] = r.reason;
  return out;
}

// Resolves each ref and runs `action`, docker style: the ref is echoed on
// success, each failure is reported, and the exit code says if any failed.
int ForEach(const std::vector<std::string>& refs,
            const std::function<Status(SandboxContext&, const store::SandboxRecord&)>& action) {
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  int code = 0;
  for (const std::string& ref : refs) {
    auto record = ctx->store.Resolve(ref);
    Status st = record ? action(*ctx, *record) : Status(std::unexpected(record.error()));
    if (!st) {
      code = ReportFailure(st.error());
      continue;
    }
    if (auto printed = Print(ref + "\n"); !printed) code = ReportFailure(printed.error());
  }
  return code;
}

// A supervisor whose --restart policy starts the sandbox again records the
// end first and `creating` a moment later, and between two boots it has no
// control socket for a moment (the next boot's is not up yet). A stop or
// kill that lands in either gap waits it out (bounded) instead of being
// lost: the restart would otherwise undo it.
Result<store::SandboxRecord> SettleRestart(SandboxContext& ctx, store::SandboxRecord record) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!store::IsActive(record.state) && record.state != store::SandboxState::kStandby &&
         store::IsAlive(record.supervisor) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    record = CELLA_TRY(ctx.store.Get(record.id));
  }
  return record;
}

// ControlCall, asked again while the sandbox is `creating` and its
// supervisor has no control socket yet (a boot, or a restart, under way).
Result<json> CallSupervisor(SandboxContext& ctx, const std::string& id, const json& request,
                            std::chrono::milliseconds timeout) {
  const std::string control = sandbox::PathsFor(ctx.home, id).control_socket;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (;;) {
    auto reply = sandbox::ControlCall(control, request, timeout);
    if (reply || std::chrono::steady_clock::now() >= deadline) return reply;
    auto now = ctx.store.Get(id);
    if (!now || now->state != store::SandboxState::kCreating || !store::IsAlive(now->supervisor))
      return reply;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

Status StopOne(SandboxContext& ctx, const store::SandboxRecord& given, int grace_seconds) {
  const store::SandboxRecord record = CELLA_TRY(SettleRestart(ctx, given));
  if (record.state == store::SandboxState::kStandby) {
    // Powered off, disks kept: the memory in the snapshot is let go.
    CELLA_TRY(ctx.store.Transition(record.id, store::SandboxState::kStopped,
                                   "stopped (cella stop; the standby snapshot was discarded)",
                                   std::nullopt, store::SandboxState::kStandby));
    return sandbox::RemoveSnapshot(sandbox::PathsFor(ctx.home, record.id).dir + "/standby");
  }
  if (!store::IsActive(record.state)) return {};  // already stopped: nothing to do
  auto grace = std::chrono::seconds(grace_seconds);
  auto reply = CallSupervisor(ctx, record.id, {{"op", "stop"}, {"grace_ms", grace_seconds * 1000}},
                              grace + std::chrono::minutes(1));
  if (!reply) {
    return Fail("stop " + record.Label() + ": " + reply.error().message +
                " (if it is stuck: cella rm -f " + record.Label() + ")");
  }
  return {};
}

Status KillOne(SandboxContext& ctx, const store::SandboxRecord& given) {
  const store::SandboxRecord record = CELLA_TRY(SettleRestart(ctx, given));
  if (!store::IsActive(record.state)) return RequireRunning(record, "kill");
  auto reply = CallSupervisor(ctx, record.id, {{"op", "kill"}}, std::chrono::seconds(30));
  if (!reply) return Fail("kill " + record.Label() + ": " + reply.error().message);
  return {};
}

// pause / unpause / standby go to the supervisor, which performs them on its
// main thread and records the state.
Status ControlOp(SandboxContext& ctx, const store::SandboxRecord& record, const std::string& op,
                 std::chrono::milliseconds timeout) {
  using enum store::SandboxState;
  if (op == "unpause" && record.state != kPaused)
    return Fail("cannot unpause: sandbox " + record.Label() + " is " +
                std::string(store::ToString(record.state)) + ", not paused");
  if (op != "unpause" && record.state != kRunning && !(op == "standby" && record.state == kPaused))
    return RequireRunning(record, op);
  std::string control = sandbox::PathsFor(ctx.home, record.id).control_socket;
  auto reply = sandbox::ControlCall(control, {{"op", op}}, timeout);
  if (!reply) return Fail(op + " " + record.Label() + ": " + reply.error().message);
  return {};
}

Status StartOne(SandboxContext& ctx, const store::SandboxRecord& record) {
  if (record.state == store::SandboxState::kRunning) return {};
  const bool resume = record.state == store::SandboxState::kStandby;
  sandbox::SandboxSpec decoded = CELLA_TRY(sandbox::DecodeSpec(record.spec_json));
  std::string secrets = CELLA_TRY(SecretsForRestart(decoded, record));
  if (resume) {
    // The supervisor that wrote the snapshot records standby just before it
    // closes QEMU; its sockets must be gone before a new one binds them.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (store::IsAlive(record.supervisor) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CELLA_TRY(ctx.store.Transition(record.id, store::SandboxState::kCreating,
                                 resume ? "resuming (cella resume)" : "started (cella start)",
                                 std::nullopt, record.state));
  sandbox::SandboxPaths paths = sandbox::PathsFor(ctx.home, record.id);
  auto spec = sandbox::DecodeSpec(record.spec_json);
  int boot_timeout = spec ? spec->boot_timeout_s : 120;
  return sandbox::SpawnSupervisor(CELLA_TRY(SelfExecutablePath()), record.id,
                                  sandbox::MainAttach::kBySupervisor, paths.supervisor_log,
                                  std::chrono::seconds(boot_timeout + 120), secrets, resume);
}

Status RemoveOne(SandboxContext& ctx, const store::SandboxRecord& record, bool force,
                 bool volumes) {
  if (store::IsActive(record.state)) {
    if (!force) {
      return Fail("sandbox " + record.Label() + " is " +
                  std::string(store::ToString(record.state)) + "; stop it first (cella stop " +
                  record.Label() + ") or use cella rm -f");
    }
    // Killing through the supervisor records the end properly; when it does
    // not answer, the processes are killed directly below.
    std::string control = sandbox::PathsFor(ctx.home, record.id).control_socket;
    if (auto reply = sandbox::ControlCall(control, {{"op", "kill"}}, std::chrono::seconds(10));
        !reply)
      log::Debug("kill through the supervisor failed", {{"error", reply.error().message}});
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (store::IsAlive(record.supervisor) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return RemoveSandboxCompletely(ctx, record, volumes);
}

// "ID:/path" names a guest path; anything starting with '/' or '.', or with
// no ':' before the first '/', is a host path (docker's rule).
struct CpEndpoint {
  std::string sandbox;  // empty = host
  std::string path;
};
CpEndpoint ParseCpEndpoint(const std::string& text) {
  if (text.empty() || text[0] == '/' || text[0] == '.') return {"", text};
  auto colon = text.find(':');
  auto slash = text.find('/');
  if (colon == std::string::npos || (slash != std::string::npos && slash < colon))
    return {"", text};
  return {text.substr(0, colon), text.substr(colon + 1)};
}

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Turns output.rec bytes back into the process's output: stdout records to
// stdout, stderr records to stderr (docker's `logs`), only those within
// [since, until], each line prefixed with its time for `-t`.
// Prints records as they come, each stream's pieces where the process put
// them (attach: an unfinished prompt shows at once).
class RecordPrinter {
 public:
  Status Feed(std::string_view bytes) {
    return decoder_.Feed(bytes, [](const sandbox::LogRecord& r) {
      std::string text(r.payload);
      if (r.line_end) text += '\n';
      return WriteAll(r.is_stderr ? STDERR_FILENO : STDOUT_FILENO, text);
    });
  }

 private:
  sandbox::LogRecordDecoder decoder_;
};

// Prints joined lines (logs): stdout to stdout, stderr to stderr, -t's time
// and --since/--until by a line's first piece.
class LinePrinter {
 public:
  LinePrinter(bool timestamps, std::optional<int64_t> since, std::optional<int64_t> until)
      : timestamps_(timestamps), since_(since), until_(until) {}

  Status Print(const sandbox::LogLine& line) {
    if (since_ && line.unix_nanos < *since_) return {};
    if (until_ && line.unix_nanos > *until_) return {};
    std::string text;
    if (timestamps_) {
      text = sandbox::FormatRfc3339Nano(line.unix_nanos);
      text += ' ';
    }
    text.append(line.text);
    if (line.line_end) text += '\n';
    return WriteAll(line.is_stderr ? STDERR_FILENO : STDOUT_FILENO, text);
  }
  bool PastUntil() const { return until_ && NowNanos() > *until_; }

 private:
  bool timestamps_;
  std::optional<int64_t> since_;
  std::optional<int64_t> until_;
};

bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// Prints what is appended to the log at `path` from `from` on, until the
// sandbox is no longer running and nothing more came. The writer may rotate
// the file (a new inode at `path`) or truncate it in place (the console):
// both are followed.
using LogSink = std::function<Status(std::string_view)>;

Status WriteStdout(std::string_view bytes) { return WriteAll(STDOUT_FILENO, bytes); }

// `done` (optional) is asked at each idle check: true ends the follow early
// (`logs -f --until`).
Result<void> FollowFile(const std::string& path, SandboxContext& ctx, const std::string& id,
                        off_t from, const LogSink& sink = WriteStdout,
                        const std::function<bool()>& done = {}) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  if (::lseek(fd.Get(), from, SEEK_SET) < 0) return FailErrno("seek " + path);
  off_t at = from;
  char buf[65536];
  int idle_checks = 0;
  for (;;) {
    auto got = ReadSome(fd.Get(), std::as_writable_bytes(std::span(buf)));
    if (!got) return std::unexpected(got.error());
    if (*got > 0) {
      CELLA_TRY(sink(std::string_view(buf, *got)));
      at += static_cast<off_t>(*got);
      continue;
    }
    struct stat ours {};
    struct stat now {};
    if (::fstat(fd.Get(), &ours) != 0) return FailErrno("stat " + path);
    if (::stat(path.c_str(), &now) == 0 && now.st_ino != ours.st_ino) {
      // Rotated: the writer renamed the old file before opening the new
      // one, so whatever reached the old file is there now: read it out,
      // then go on with the new one.
      UniqueFd next(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (next) {
        for (;;) {
          size_t rest = CELLA_TRY(ReadSome(fd.Get(), std::as_writable_bytes(std::span(buf))));
          if (rest == 0) break;
          CELLA_TRY(sink(std::string_view(buf, rest)));
        }
        fd = std::move(next);
        at = 0;
        continue;
      }
    }
    if (ours.st_size < at) {
      // Truncated in place: the writer starts again from the top.
      if (::lseek(fd.Get(), 0, SEEK_SET) < 0) return FailErrno("seek " + path);
      at = 0;
      continue;
    }
    // At the end of what is written so far: stop once the sandbox is no
    // longer running and nothing more came.
    if (++idle_checks % 5 == 0) {
      if (done && done()) return {};
      auto current = ctx.store.Get(id);
      if (!current || !store::IsActive(current->state)) {
        auto more = ReadSome(fd.Get(), std::as_writable_bytes(std::span(buf)));
        if (more && *more > 0) {
          CELLA_TRY(sink(std::string_view(buf, *more)));
          at += static_cast<off_t>(*more);
          continue;
        }
        return {};
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace

// Secret values are never stored: a restart takes them from this process's
// environment again (the NAME@host form), or cannot have them.
Result<std::string> SecretsForRestart(const sandbox::SandboxSpec& spec,
                                      const store::SandboxRecord& record) {
  json values = json::object();
  for (const auto& secret : spec.egress.secrets) {
    if (secret.from_env.empty()) {
      return Fail("secret " + secret.name + " of sandbox " + record.Label() +
                  " was given as NAME=VALUE and cella never stores values; remove the sandbox "
                  "and run it again (or pass secrets as NAME@host from the environment)");
    }
    const char* value = std::getenv(secret.from_env.c_str());
    if (!value || !*value) {
      return Fail("secret " + secret.name + " of sandbox " + record.Label() + ": export " +
                  secret.from_env + " in the environment of cella start");
    }
    values[secret.name] = value;
  }
  return values.dump();
}

int ExecCommand(const ExecArgs& args) {
  BlockForwardedSignals();
  auto run = [&]() -> Result<int> {
    if (args.command.empty()) return Fail("exec: give a command after the sandbox (ID -- CMD)");
    if (args.detach && (args.interactive || args.tty))
      return Fail("exec: -d goes with neither -i nor -t (a detached command has no terminal)");
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(args.sandbox));
    CELLA_TRY(RequireRunning(record, "exec"));
    sandbox::SandboxSpec spec = CELLA_TRY(sandbox::DecodeSpec(record.spec_json));
    protocol::ExecRequest request;
    request.argv = args.command;
    std::map<std::string, std::string> env = spec.guest.env;
    if (args.tty) env.try_emplace("TERM", "xterm");  // as docker; -e TERM=... still wins
    for (const auto& item : args.env_items)
      CELLA_TRY(ApplyEnvAssignment(
          item, [](const char* n) -> const char* { return std::getenv(n); }, env));
    for (const auto& [k, v] : env) request.env.push_back(k + "=" + v);
    request.workdir = args.workdir.empty() ? spec.guest.workdir : args.workdir;
    request.user = args.user.empty() ? spec.guest.user : args.user;
    request.privileged = spec.guest.privileged;
    request.tty = args.tty;
    request.stdin_open = args.interactive;
    if (args.tty) {
      uint16_t rows = 0, cols = 0;
      if (TerminalSize(rows, cols)) {
        request.rows = rows;
        request.cols = cols;
      }
    }
    request.detach = args.detach;
    auto agent = CELLA_TRY(ConnectAgent(ctx, record));
    if (args.detach) {
      // The guest answers once the process started, or with 127/126 and
      // the reason when the program could not be executed (as docker).
      host::ExecResult started = CELLA_TRY(agent->Exec(request));
      int code = started.status.ShellCode();
      if (code != 0) (void)WriteAll(STDERR_FILENO, started.stderr_data);
      return code;
    }
    host::ExecStatus status = CELLA_TRY(AttachToTerminal(
        [&](host::ExecCallbacks callbacks) {
          return agent->StartExec(request, std::move(callbacks));
        },
        {args.interactive, args.tty}));
    return status.ShellCode();
  };
  auto code = run();
  return code ? *code : ReportFailure(code.error());
}

int RenameCommand(const std::string& ref, const std::string& new_name) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(ref));
    return ctx.store.Rename(record.id, new_name);
  };
  return Report(run());
}

int TopCommand(const std::string& ref, const std::vector<std::string>& ps_args) {
  auto run = [&]() -> Result<int> {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(ref));
    CELLA_TRY(RequireRunning(record, "top"));
    sandbox::SandboxSpec spec = CELLA_TRY(sandbox::DecodeSpec(record.spec_json));
    // docker runs ps on the host over the container's PIDs; a guest's
    // processes are only visible inside it: the guest's own ps, as root
    // and outside the workload's working directory and hardening.
    protocol::ExecRequest request;
    request.argv = {"ps"};
    if (ps_args.empty()) request.argv.push_back("-ef");
    request.argv.insert(request.argv.end(), ps_args.begin(), ps_args.end());
    for (const auto& [k, v] : spec.guest.env) request.env.push_back(k + "=" + v);
    request.workdir = "/";
    request.user = "0";
    request.privileged = spec.guest.privileged;
    // The image's ps is the guest's: a wait on it is bounded.
    request.timeout_ms = 30000;
    auto agent = CELLA_TRY(ConnectAgent(ctx, record));
    host::ExecResult result = CELLA_TRY(agent->Exec(request));
    CELLA_TRY(WriteAll(STDOUT_FILENO, result.stdout_data));
    (void)WriteAll(STDERR_FILENO, result.stderr_data);
    int code = result.status.ShellCode();
    if (code == 127)
      return Fail("top: the image has no ps (its processes are visible with cella exec " +
                  record.Label() + " ls /proc)");
    return code;
  };
  auto code = run();
  return code ? *code : ReportFailure(code.error());
}

int AttachCommand(const std::string& ref) {
  auto run = [&]() -> Result<int> {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(ref));
    CELLA_TRY(RequireRunning(record, "attach"));
    // The supervisor holds a detached sandbox's main process and writes its
    // output to output.log: attaching follows that from now on, until the
    // sandbox ends, and exits with the main process's code (docker attach
    // without stdin).
    // A sandbox an older cella started writes raw bytes to output.log (as
    // logs reads it): follow that one.
    const sandbox::MainOutputLog log =
        sandbox::FindMainOutputLog(sandbox::PathsFor(ctx.home, record.id));
    const std::string& path = log.path;
    if (::access(path.c_str(), F_OK) != 0) {
      UniqueFd made(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
      if (!made) return FailErrno("open " + path);
    }
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
    // Records: stdout to stdout, stderr to stderr, as the process wrote them.
    RecordPrinter printer;
    LogSink sink = WriteStdout;
    if (log.records) sink = [&printer](std::string_view block) { return printer.Feed(block); };
    CELLA_TRY(FollowFile(path, ctx, record.id, st.st_size, sink));
    std::optional<store::SandboxRecord> ended;
    for (;;) {  // the log is drained; the record's end may land a moment later
      auto now = ctx.store.Get(record.id);
      if (!now) return 0;  // removed (--rm): its code went with it
      if (!store::IsActive(now->state)) {
        ended = *now;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return ended->exit_code.value_or(0);
  };
  auto code = run();
  return code ? *code : ReportFailure(code.error());
}

int WaitCommand(const std::vector<std::string>& refs) {
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  int code = 0;
  for (const std::string& ref : refs) {
    auto record = ctx->store.Resolve(ref);
    if (!record) {
      code = ReportFailure(record.error());
      continue;
    }
    // Unbounded on purpose, like docker wait: the user asked to wait for
    // the end, however far; Ctrl-C ends it.
    while (record && store::IsActive(record->state)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      record = ctx->store.Get(record->id);
    }
    if (!record) {
      code = ReportFailure(Error{"sandbox " + ref + " was removed before its end could be read"});
      continue;
    }
    if (auto printed = Print(std::to_string(record->exit_code.value_or(0)) + "\n"); !printed)
      code = ReportFailure(printed.error());
  }
  return code;
}

int PsCommand(bool all, ListFormat format, const std::vector<std::string>& filters) {
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  auto records = ListFiltered(*ctx, all, filters);
  if (!records) return ReportFailure(records.error());
  if (format == ListFormat::kJson) {
    json out = json::array();
    for (const auto& r : *records) out.push_back(RecordJson(r));
    return Report(Print(out.dump(2) + "\n"));
  }
  if (format == ListFormat::kQuiet) {
    std::string ids;
    for (const auto& r : *records) ids += store::ShortId(r.id) + "\n";
    return Report(Print(ids));
  }
  int64_t now = NowMs();
  std::string text;
  char line[512];
  std::snprintf(line, sizeof line, "%-14s %-16s %-20s %-22s %-16s %-28s %s\n", "SANDBOX ID", "NAME",
                "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS");
  text += line;
  for (const auto& r : *records) {
    std::snprintf(line, sizeof line, "%-14s %-16s %-20s %-22s %-16s %-28s %s\n",
                  store::ShortId(r.id).c_str(), Truncated(r.name, 16).c_str(),
                  Truncated(r.image.empty() ? kBuiltinImage : r.image, 20).c_str(),
                  Truncated("\"" + Joined(r.command) + "\"", 22).c_str(),
                  (DescribeAge(r.created_ms, now) + " ago").c_str(),
                  Truncated(DescribeStatus(r, now), 28).c_str(), PortsText(r).c_str());
    text += line;
  }
  return Report(Print(text));
}

int PsFormatCommand(bool all, const std::string& format_text,
                    const std::vector<std::string>& filters) {
  auto format = FormatTemplate::Parse(format_text);
  if (!format) return ReportFailure(format.error());
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  auto records = ListFiltered(*ctx, all, filters);
  if (!records) return ReportFailure(records.error());
  int64_t now = NowMs();
  std::vector<json> rows;
  for (const auto& r : *records) {
    // docker's ContainerContext names, plus cella's.
    json row = {{"ID", store::ShortId(r.id)},
                {"FullID", r.id},
                {"Names", r.name},
                {"Name", r.name},
                {"Image", r.image.empty() ? std::string(kBuiltinImage) : r.image},
                {"Command", "\"" + Joined(r.command) + "\""},
                {"CreatedAt", FormatUtc(r.created_ms)},
                {"RunningFor", DescribeAge(r.created_ms, now) + " ago"},
                {"Ports", PortsText(r)},
                {"State", store::ToString(r.state)},
                {"Status", DescribeStatus(r, now)},
                {"Labels", LabelsText(LabelsOf(r))}};
    if (r.exit_code) row["ExitCode"] = *r.exit_code;
    rows.push_back(std::move(row));
  }
  static const std::map<std::string, std::string> kHeaders = {
      {"ID", "SANDBOX ID"},        {"FullID", "SANDBOX ID"},
      {"Names", "NAMES"},          {"Name", "NAME"},
      {"Image", "IMAGE"},          {"Command", "COMMAND"},
      {"CreatedAt", "CREATED AT"}, {"RunningFor", "CREATED"},
      {"Ports", "PORTS"},          {"State", "STATE"},
      {"Status", "STATUS"},        {"ExitCode", "EXIT CODE"},
      {"Labels", "LABELS"}};
  return Report(Print(RenderAll(*format, rows, kHeaders)));
}

int InspectCommand(const std::vector<std::string>& refs, const std::string& format_text) {
  std::optional<FormatTemplate> format;
  if (!format_text.empty()) {
    auto parsed = FormatTemplate::Parse(format_text);
    if (!parsed) return ReportFailure(parsed.error());
    format = std::move(*parsed);
  }
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  json out = json::array();
  int code = 0;
  for (const auto& ref : refs) {
    auto r = ctx->store.Resolve(ref);
    if (!r) {
      code = ReportFailure(r.error());
      continue;
    }
    json item = RecordJson(*r);
    json spec = json::parse(r->spec_json, nullptr, false);
    item["config"] = spec.is_discarded() ? json() : spec;
    json history = json::array();
    if (auto changes = ctx->store.History(r->id)) {
      for (const auto& c : *changes)
        history.push_back(
            {{"at_ms", c.at_ms}, {"state", store::ToString(c.state)}, {"detail", c.detail}});
    }
    item["history"] = history;
    item["supervisor_pid"] = r->supervisor.pid;
    item["hypervisor_pid"] = r->hypervisor.pid;
    sandbox::SandboxPaths paths = sandbox::PathsFor(ctx->home, r->id);
    item["paths"] = {{"dir", paths.dir},
                     {"console_log", paths.console_log},
                     {"output_log", paths.output_log},
                     {"supervisor_log", paths.supervisor_log}};
    // Restarts made by the --restart policy since the last start by a user.
    int restarts = 0;
    if (auto text = ReadFileToString(sandbox::RestartStatePath(paths.dir), 4096)) {
      json state = json::parse(*text, nullptr, false);
      if (state.is_object()) restarts = std::max(0, state.value("count", 0));
    }
    item["restart_count"] = restarts;
    // A sandbox in standby: what its snapshot holds and takes on disk.
    const std::string standby = paths.dir + "/standby";
    if (auto text = ReadFileToString(standby + "/" + sandbox::kManifestName, 64 * 1024)) {
      if (auto manifest = sandbox::DecodeManifest(*text)) {
        item["standby_snapshot"] = {
            {"format", std::string(sandbox::ToString(sandbox::LayoutOf(*manifest)))},
            {"size_bytes", sandbox::SnapshotAllocatedBytes(standby)},
            {"memory_bytes", manifest->memory_bytes},
            {"created_ms", manifest->created_ms}};
      }
    }
    item["restart_policy"] =
        spec.is_object() ? spec.value("restart", std::string("no")) : std::string("no");
    out.push_back(item);
  }
  if (format) {
    std::vector<json> views;
    for (const json& item : out) {
      // docker inspect's names beside cella's own (exact names win, so
      // .State is docker's object and .state cella's string).
      json v = item;
      v["Id"] = item["id"];
      v["Name"] = item["name"];
      v["Image"] = item["image"];
      v["Created"] = FormatUtc(item.value("created_ms", int64_t{0}));
      v["RestartCount"] = item["restart_count"];
      {
        const std::string policy = item.value("restart_policy", std::string("no"));
        const auto colon = policy.find(':');
        v["HostConfig"] = {
            {"RestartPolicy",
             {{"Name", policy.substr(0, colon)},
              {"MaximumRetryCount",
               colon == std::string::npos ? 0 : std::atoi(policy.c_str() + colon + 1)}}}};
      }
      const std::string state = item.value("state", std::string());
      v["State"] = {{"Status", state},
                    {"Running", state == "running"},
                    {"ExitCode", item.value("exit_code", 0)},
                    {"Pid", item.value("hypervisor_pid", 0)},
                    {"Error", item.value("reason", std::string())}};
      const json& guest = item["config"].is_object() && item["config"].contains("guest")
                              ? item["config"]["guest"]
                              : json::object();
      v["Config"] = {
          {"Image", item["image"]},
          {"Cmd", item["command"]},
          {"Env", guest.value("env", json::object())},
          {"WorkingDir", guest.value("workdir", std::string())},
          {"User", guest.value("user", std::string())},
          {"Labels", item["config"].is_object() ? item["config"].value("labels", json::object())
                                                : json::object()}};
      views.push_back(std::move(v));
    }
    if (auto st = Print(RenderAll(*format, views)); !st) return ReportFailure(st.error());
    return code;
  }
  if (auto st = Print(out.dump(2) + "\n"); !st) return ReportFailure(st.error());
  return code;
}

int LogsCommand(const LogsArgs& args) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(args.sandbox));
    sandbox::SandboxPaths paths = sandbox::PathsFor(ctx.home, record.id);
    const int64_t now = NowNanos();
    std::optional<int64_t> since;
    std::optional<int64_t> until;
    if (!args.since.empty())
      since = CELLA_TRY_CTX(sandbox::ParseLogTime(args.since, now), "--since");
    if (!args.until.empty())
      until = CELLA_TRY_CTX(sandbox::ParseLogTime(args.until, now), "--until");
    const bool timed = since || until || args.timestamps;
    const sandbox::MainOutputLog main_log = sandbox::FindMainOutputLog(paths);
    std::string path = main_log.path;
    bool records = !args.console;
    if (args.console) {
      if (timed)
        return Fail("--since, --until and -t apply to the main process's output, not --console");
      path = paths.console_log;
    } else if (!main_log.records) {
      // Written by an older cella: raw bytes, stdout and stderr merged.
      if (timed)
        return Fail("the log of sandbox " + record.Label() +
                    " was written by an older cella and carries no times: --since, --until and "
                    "-t need a log written by this version (cella logs without them prints it)");
      path = paths.legacy_output_log;
      records = false;
    }
    if (!Exists(path)) {
      // Nothing was written yet (or the sandbox ran no main process).
      if (!args.follow) return {};
      UniqueFd made(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
      if (!made) return FailErrno("open " + path);
    }
    // Never the whole file in memory: the tail is found reading backwards
    // and the rest is streamed (the older generation first, see
    // host/sandbox/log_files.h).
    if (!records) {
      sandbox::LogPosition from = CELLA_TRY(sandbox::TailPosition(path, args.tail));
      off_t reached = CELLA_TRY(sandbox::CopyLog(path, from, WriteStdout));
      if (args.follow) return FollowFile(path, ctx, record.id, reached);
      return {};
    }
    // The records' pieces joined into lines: the tail, times and filters
    // are a line's.
    LinePrinter printer(args.timestamps, since, until);
    sandbox::LogLineJoiner joiner;
    sandbox::LogLineSink print = [&printer](const sandbox::LogLine& line) {
      return printer.Print(line);
    };
    off_t reached = CELLA_TRY(sandbox::CopyLogLines(path, args.tail, joiner, args.follow, print));
    if (!args.follow) return {};
    if (!printer.PastUntil())
      CELLA_TRY(FollowFile(
          path, ctx, record.id, reached,
          [&](std::string_view block) { return joiner.Feed(block, print); },
          [&printer] { return printer.PastUntil(); }));
    return joiner.Finish(print);
  };
  return Report(run());
}

int StopCommand(const std::vector<std::string>& refs, int grace_seconds) {
  return ForEach(refs, [&](SandboxContext& ctx, const store::SandboxRecord& r) {
    return StopOne(ctx, r, grace_seconds);
  });
}

int StartCommand(const std::vector<std::string>& refs) { return ForEach(refs, StartOne); }

Status RestartOne(SandboxContext& ctx, const store::SandboxRecord& given, int grace_seconds) {
  // Its supervisor removes such a sandbox as it stops: refused before that.
  if (given.auto_remove)
    return Fail("restart " + given.Label() +
                ": it is removed when it stops (a foreground run or --rm); cella stop it and "
                "run it again");
  CELLA_TRY(StopOne(ctx, given, grace_seconds));
  store::SandboxRecord record = CELLA_TRY_CTX(ctx.store.Get(given.id), "restart");
  // The stopped sandbox's supervisor may still be letting go of its sockets
  // and disks: the next one waits for it (bounded).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (store::IsAlive(record.supervisor) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    record = CELLA_TRY_CTX(ctx.store.Get(given.id), "restart");
  }
  if (store::IsAlive(record.supervisor))
    return Fail("restart " + record.Label() +
                ": its stopped supervisor has not exited after 30 s (cella rm -f " +
                record.Label() + " ends it)");
  if (store::IsActive(record.state))
    return Fail("restart " + record.Label() + ": it is " +
                std::string(store::ToString(record.state)) + " again (its restart policy?)");
  return StartOne(ctx, record);
}

int RestartCommand(const std::vector<std::string>& refs, int grace_seconds) {
  return ForEach(refs, [&](SandboxContext& ctx, const store::SandboxRecord& r) {
    return RestartOne(ctx, r, grace_seconds);
  });
}

int PortCommand(const std::string& ref, const std::string& guest_port) {
  auto run = [&]() -> Status {
    std::optional<uint16_t> wanted;
    bool udp = false;  // asked as docker allows; never published here
    if (!guest_port.empty()) {
      std::string_view number = guest_port;
      if (number.ends_with("/tcp")) {
        number.remove_suffix(4);
      } else if (number.ends_with("/udp")) {
        number.remove_suffix(4);
        udp = true;
      }
      int value = 0;
      auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), value);
      if (ec != std::errc() || end != number.data() + number.size() || value < 1 || value > 65535)
        return Fail("port " + guest_port + ": want a port number (80, 80/tcp or 80/udp)");
      wanted = static_cast<uint16_t>(value);
    }
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(ref));
    // As docker's: a sandbox that is not running publishes nothing.
    const bool running = record.state == store::SandboxState::kRunning ||
                         record.state == store::SandboxState::kPaused;
    std::vector<store::PortPublish> ports;
    if (running) ports = record.ports;
    std::ranges::sort(ports, [](const store::PortPublish& a, const store::PortPublish& b) {
      return std::tie(a.guest_port, a.host_ip, a.host_port) <
             std::tie(b.guest_port, b.host_ip, b.host_port);
    });
    std::string text;
    for (const auto& p : ports) {
      if (wanted && (udp || p.guest_port != *wanted)) continue;
      std::string host =
          (p.host_ip.empty() ? "127.0.0.1" : p.host_ip) + ":" + std::to_string(p.host_port);
      text += wanted ? host + "\n" : std::to_string(p.guest_port) + "/tcp -> " + host + "\n";
    }
    if (wanted && text.empty())
      return Fail("no public port '" + std::to_string(*wanted) + (udp ? "/udp" : "/tcp") +
                  "' published for " + record.Label());
    return Print(text);
  };
  return Report(run());
}

int KillCommand(const std::vector<std::string>& refs) { return ForEach(refs, KillOne); }

int PauseCommand(const std::vector<std::string>& refs) {
  return ForEach(refs, [](SandboxContext& ctx, const store::SandboxRecord& r) {
    return ControlOp(ctx, r, "pause", std::chrono::seconds(30));
  });
}

int StandbyCommand(const std::vector<std::string>& refs) {
  return ForEach(refs, [](SandboxContext& ctx, const store::SandboxRecord& r) {
    return ControlOp(ctx, r, "standby", std::chrono::minutes(15));
  });
}

int ResumeCommand(const std::vector<std::string>& refs) {
  return ForEach(refs, [](SandboxContext& ctx, const store::SandboxRecord& r) -> Status {
    if (r.state != store::SandboxState::kStandby)
      return Fail("cannot resume: sandbox " + r.Label() + " is " +
                  std::string(store::ToString(r.state)) + ", not in standby" +
                  (store::IsActive(r.state) ? "" : " (cella start boots it)"));
    return StartOne(ctx, r);
  });
}

int UnpauseCommand(const std::vector<std::string>& refs) {
  return ForEach(refs, [](SandboxContext& ctx, const store::SandboxRecord& r) {
    return ControlOp(ctx, r, "unpause", std::chrono::seconds(30));
  });
}

int RmCommand(const std::vector<std::string>& refs, bool force, bool volumes) {
  if (!force) {
    // `rm ID` of a sandbox `cella rpc` already removed on close is done,
    // not an error: matchlock's SDKs remove after closing. Anything else
    // missing is docker's "No such container" error.
    auto ctx = OpenSandboxes();
    if (!ctx) return ReportFailure(ctx.error());
    std::vector<std::string> rest;
    int code = 0;
    for (const std::string& ref : refs) {
      if (!ctx->store.Resolve(ref) && ForgetRpcRemoval(*ctx, ref)) {
        if (auto printed = Print(ref + "\n"); !printed) code = ReportFailure(printed.error());
        continue;
      }
      rest.push_back(ref);
    }
    if (rest.empty()) return code;
    int others = ForEach(rest, [&](SandboxContext& c, const store::SandboxRecord& r) {
      return RemoveOne(c, r, false, volumes);
    });
    return code != 0 ? code : others;
  }
  // docker's `rm -f`: what is already gone (never existed, or a --rm
  // sandbox whose supervisor removed it meanwhile) is what was asked for.
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  int code = 0;
  for (const std::string& ref : refs) {
    auto record = ctx->store.Resolve(ref);
    if (!record && record.error().errno_value == ENOENT) continue;
    Status st =
        record ? RemoveOne(*ctx, *record, true, volumes) : Status(std::unexpected(record.error()));
    // Its supervisor (a --rm sandbox's) removed the record meanwhile: removed.
    if (!st && st.error().errno_value == ENOENT && !ctx->store.Resolve(record->id)) st = {};
    if (!st) {
      code = ReportFailure(st.error());
      continue;
    }
    if (auto printed = Print(ref + "\n"); !printed) code = ReportFailure(printed.error());
  }
  return code;
}

int PruneCommand() {
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  auto records = ctx->store.List(store::ListScope::kAll);
  if (!records) return ReportFailure(records.error());
  int code = 0;
  int removed = 0;
  for (const auto& r : *records) {
    // A standby sandbox is asleep, not stopped: its snapshot is kept.
    if (store::IsActive(r.state) || r.state == store::SandboxState::kStandby) continue;
    if (auto st = RemoveSandboxCompletely(*ctx, r); !st) {
      code = ReportFailure(st.error());
      continue;
    }
    ++removed;
    if (auto st = Print("Deleted: " + r.id + "\n"); !st) code = ReportFailure(st.error());
  }
  if (auto st = Print("Removed " + std::to_string(removed) + " stopped sandbox(es)\n"); !st)
    code = ReportFailure(st.error());
  return code;
}

int CpCommand(const std::string& source, const std::string& destination, bool archive) {
  auto run = [&]() -> Status {
    CpEndpoint src = ParseCpEndpoint(source);
    CpEndpoint dst = ParseCpEndpoint(destination);
    if (src.sandbox.empty() == dst.sandbox.empty()) {
      return Fail(
          "cp: exactly one side must name a sandbox path (ID:/path), e.g. cella cp ./file "
          "web:/tmp/ or cella cp web:/etc/hosts .");
    }
    // docker's `-`: a tar stream on stdout/stdin, through a private host
    // directory that the copy engine fills (or reads) as for any host path.
    // Made first, while this process has no threads yet, so that its
    // janitor can be forked: the directory goes on any failure (Cleanup)
    // and also on Ctrl-C or kill (RemoveWhenProcessEnds).
    std::string staging;
    struct Cleanup {
      std::string* dir;
      ~Cleanup() {
        std::error_code ignored;
        if (!dir->empty()) std::filesystem::remove_all(*dir, ignored);
      }
    } cleanup{&staging};
    if (src.path == "-" || dst.path == "-") {
      std::string pattern = (std::filesystem::temp_directory_path() / "cella-cp-XXXXXX").string();
      if (::mkdtemp(pattern.data()) == nullptr) return FailErrno("cp: mkdtemp " + pattern);
      staging = pattern;
      CELLA_TRY(RemoveWhenProcessEnds(staging));
    }
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    const std::string& ref = src.sandbox.empty() ? dst.sandbox : src.sandbox;
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(ref));
    CELLA_TRY(RequireRunning(record, "cp"));
    auto agent = CELLA_TRY(ConnectAgent(ctx, record));
    sandbox::CopyStats stats;
    int hard_links = 0;
    const sandbox::CopyOptions options{.ownership = archive
                                                        ? sandbox::Ownership::kFromSource
                                                        : sandbox::Ownership::kDestinationDefault};
    if (dst.sandbox.empty()) {
      if (src.path.empty() || src.path[0] != '/')
        return Fail("cp: the sandbox path must be absolute: " + source);
      if (dst.path == "-") {
        std::filesystem::path from(src.path);
        std::string entry = from.filename().string();
        if (entry.empty() || entry == ".") entry = from.parent_path().filename().string();
        if (entry.empty() || entry == "..")
          return Fail("cp: name a file or directory to stream, not " + src.path);
        stats = CELLA_TRY(sandbox::CopyFromGuest(*agent, src.path, staging + "/" + entry, options));
        CELLA_TRY(WriteTarOf(staging, entry, STDOUT_FILENO));
      } else {
        stats = CELLA_TRY(sandbox::CopyFromGuest(*agent, src.path, dst.path, options));
      }
    } else {
      if (dst.path.empty() || dst.path[0] != '/')
        return Fail("cp: the sandbox path must be absolute: " + destination);
      if (src.path == "-") {
        hard_links = CELLA_TRY(ExtractTarInto(STDIN_FILENO, staging));
        stats = CELLA_TRY(sandbox::CopyToGuest(*agent, staging + "/.", dst.path, options));
      } else {
        stats = CELLA_TRY(sandbox::CopyToGuest(*agent, src.path, dst.path, options));
      }
    }
    std::string notes;
    if (hard_links > 0)
      notes += "cella: cp: " + std::to_string(hard_links) +
               " hard link(s) in the tar were copied as separate files\n";
    for (const auto& w : stats.warnings) notes += "cella: cp: " + w + "\n";
    if (stats.skipped > 0)
      notes += "cella: cp: skipped " + std::to_string(stats.skipped) +
               " entries (devices, fifos, sockets or unrepresentable names)\n";
    if (!notes.empty()) CELLA_TRY(WriteAll(STDERR_FILENO, notes));
    return {};
  };
  return Report(run());
}

int PortForwardCommand(const std::string& sandbox_ref, const std::string& mapping_text) {
  BlockForwardedSignals();
  auto run = [&]() -> Status {
    sandbox::PortMapping mapping = CELLA_TRY(sandbox::ParsePortMapping(mapping_text));
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(sandbox_ref));
    CELLA_TRY(RequireRunning(record, "port-forward"));
    std::shared_ptr<host::AgentClient> agent = CELLA_TRY(ConnectAgent(ctx, record));
    auto forwarder = CELLA_TRY(
        sandbox::PortForwarder::Start(mapping.host_ip, mapping.host_port, mapping.guest_port,
                                      [agent](uint16_t port) { return agent->OpenPort(port); }));
    CELLA_TRY(Print("Forwarding " + mapping.host_ip + ":" + std::to_string(forwarder->BoundPort()) +
                    " -> " + record.Label() + ":" + std::to_string(mapping.guest_port) +
                    " (Ctrl-C to stop)\n"));
    sigset_t set;
    sigemptyset(&set);
    for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, s);
    for (;;) {
      timespec tick{0, 200'000'000};
      if (::sigtimedwait(&set, nullptr, &tick) > 0) break;
      if (auto link = agent->LinkError()) {
        forwarder->Stop();
        return Fail("port-forward: sandbox " + record.Label() + " went away (" + link->message +
                    ")");
      }
    }
    forwarder->Stop();
    return {};
  };
  return Report(run());
}

// matchlock's volume size text ("1024.0 MB"), which its SDKs parse.
static std::string MegabytesText(int64_t bytes) {
  char text[64];
  std::snprintf(text, sizeof text, "%.1f MB", static_cast<double>(bytes) / (1 << 20));
  return text;
}

int VolumeCreateCommand(const std::string& name, const std::string& size, ListFormat format) {
  auto run = [&]() -> Status {
    const bool bare_number =
        !size.empty() && size.find_first_not_of("0123456789") == std::string::npos;
    uint64_t bytes = size.empty()  ? (uint64_t{1} << 30)
                     : bare_number ? CELLA_TRY(sandbox::ParseDiskSize(size + "m"))
                                   : CELLA_TRY(sandbox::ParseDiskSize(size));
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    CELLA_TRY(CreateVolume(ctx, name, bytes));
    if (format == ListFormat::kJson) {
      store::VolumeRecord v = CELLA_TRY(ctx.store.GetVolume(name));
      return Print(
          json{{"name", v.name}, {"size", MegabytesText(v.size_bytes)}, {"path", v.path}}.dump() +
          "\n");
    }
    return Print(name + "\n");
  };
  return Report(run());
}

int VolumeLsCommand(ListFormat format) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    auto volumes = CELLA_TRY(ctx.store.ListVolumes());
    json out = json::array();
    std::string text;
    char line[512];
    std::snprintf(line, sizeof line, "%-24s %-10s %s\n", "VOLUME NAME", "SIZE", "USED BY");
    text += line;
    for (const auto& v : volumes) {
      auto users = CELLA_TRY(ctx.store.VolumeUsers(v.name));
      json used = json::array();
      std::string used_text;
      for (const auto& [id, use] : users) {
        used.push_back({{"sandbox", id}, {"path", use.guest_path}, {"mode", use.mode}});
        if (!used_text.empty()) used_text += ", ";
        used_text += store::ShortId(id) + ":" + use.guest_path + ":" + use.mode;
      }
      out.push_back({{"name", v.name},
                     {"size", MegabytesText(v.size_bytes)},
                     {"path", v.path},
                     {"size_bytes", v.size_bytes},
                     {"created_ms", v.created_ms},
                     {"used_by", used}});
      std::string size = std::to_string(v.size_bytes >> 20) + "MiB";
      std::snprintf(line, sizeof line, "%-24s %-10s %s\n", v.name.c_str(), size.c_str(),
                    used_text.c_str());
      text += line;
    }
    return Print(format == ListFormat::kJson ? out.dump(2) + "\n" : text);
  };
  return Report(run());
}

int VolumeRmCommand(const std::vector<std::string>& names) {
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  int code = 0;
  for (const auto& name : names) {
    auto volume = ctx->store.GetVolume(name);
    Status st = volume ? ctx->store.RemoveVolume(name) : Status(std::unexpected(volume.error()));
    if (st) {
      std::error_code ec;
      std::filesystem::remove_all(sandbox::VolumesDir(ctx->home) + "/" + name, ec);
      if (ec) st = Fail("remove volume files of " + name + ": " + ec.message());
    }
    if (!st) {
      code = ReportFailure(st.error());
      continue;
    }
    if (auto printed = Print(name + "\n"); !printed) code = ReportFailure(printed.error());
  }
  return code;
}

int AllowListCommand(AllowListOp op, const std::string& sandbox_ref,
                     const std::vector<std::string>& hosts_args) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(sandbox_ref));
    // A default sandbox has no list to edit: a first entry would silently
    // close every other host it reaches.
    auto require_egress = [&](const sandbox::SandboxSpec& spec) -> Status {
      if (spec.egress.enabled && !spec.egress.all_public) return {};
      if (spec.egress.all_public)
        return Fail("sandbox " + record.Label() +
                    " has no allow-list: it reaches every public host (the default network); "
                    "give --allow-host or --network-intercept to cella run for a list");
      return Fail("sandbox " + record.Label() +
                  " has no egress policy: its network is plain NAT (give --allow-host or "
                  "--network-intercept to cella run)");
    };
    if (op == AllowListOp::kList) {
      sandbox::SandboxSpec spec = CELLA_TRY(sandbox::DecodeSpec(record.spec_json));
      CELLA_TRY(require_egress(spec));
      std::string text;
      for (const auto& h : spec.egress.allow) text += h + "\n";
      return Print(text);
    }
    // Validated and canonical before anything is asked or stored.
    std::vector<std::string> hosts = CELLA_TRY(SplitHostList(hosts_args));
    nlohmann::json hosts_json = hosts;
    const char* key = op == AllowListOp::kAdd ? "add" : "remove";
    // A running sandbox's supervisor owns its list: it applies the edit and
    // stores it in one step. Otherwise the record is edited in one write
    // transaction, re-checking that no supervisor took over meanwhile.
    bool running = false;
    auto edit = [&](const store::SandboxRecord& current) -> Result<std::string> {
      sandbox::SandboxSpec spec = CELLA_TRY(sandbox::DecodeSpec(current.spec_json));
      CELLA_TRY(require_egress(spec));
      if (current.state == store::SandboxState::kCreating)
        return Fail("sandbox " + record.Label() +
                    " is starting: its allow-list can change once it runs");
      if (store::IsActive(current.state)) {
        running = true;
        return Fail("active");  // rolled back; the supervisor edits instead
      }
      std::vector<std::string>& allow = spec.egress.allow;
      for (const auto& h : hosts) {
        auto it = std::find(allow.begin(), allow.end(), h);
        if (op == AllowListOp::kAdd && it == allow.end()) allow.push_back(h);
        if (op == AllowListOp::kRemove) {
          if (it == allow.end()) return Fail(h + " is not on the allow-list of " + record.Label());
          allow.erase(it);
        }
      }
      return sandbox::EncodeSpec(spec);
    };
    Status edited = ctx.store.EditSpec(record.id, edit);
    if (!running) return edited;
    std::string control = sandbox::PathsFor(ctx.home, record.id).control_socket;
    // Generous: edits from many callers queue for the supervisor's cap and
    // each commits to the store; a slow edit beats a lost one.
    CELLA_TRY_CTX(sandbox::ControlCall(control, {{"op", "allow-list"}, {key, hosts_json}},
                                       std::chrono::seconds(30)),
                  "update the running sandbox " + record.Label());
    return {};
  };
  return Report(run());
}

int SuperviseCommand(const std::string& id, int ready_fd, bool client_attaches, bool resume,
                     bool restarted) {
  sandbox::SupervisorArgs args;
  args.resume = resume;
  args.restarted = restarted;
  args.id = id;
  args.ready_fd = ready_fd;
  args.main_attach =
      client_attaches ? sandbox::MainAttach::kByClient : sandbox::MainAttach::kBySupervisor;
  return sandbox::RunSupervisor(args);
}

}  // namespace cella::cli
