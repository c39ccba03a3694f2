// Named snapshots: `cella snapshot create|ls|rm|restore`. A snapshot lives in
// <sandbox home>/snapshots/NAME: the machine state and manifest
// (host/sandbox/snapshot.h), copies of the writable layer and config disk
// taken while the VM was frozen, and sandbox.json (the record it came from).
// restore makes a new sandbox (own ID, name, copies of the disks, its own
// sealed network) and resumes it from the snapshot; the source is untouched.
// `cella fork` is a snapshot into a hidden directory (snapshots/.fork-*)
// followed by N such restores in parallel.
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"
#include "cli/commands.h"
#include "cli/interrupt_hold.h"
#include "cli/sandbox_context.h"
#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/sandbox/control.h"
#include "host/sandbox/layout.h"
#include "host/sandbox/lifecycle.h"
#include "host/sandbox/snapshot.h"
#include "host/sandbox/spec.h"
#include "host/sandbox/supervisor.h"

namespace cella::cli {
namespace {

using nlohmann::json;

std::string SnapshotsDir(const std::string& home) { return home + "/snapshots"; }

// Docker's name rule (the volume one: letters, digits, '_', '.', '-').
Status CheckSnapshotName(const std::string& name) {
  if (auto st = store::CheckVolumeName(name); !st)
    return Fail("invalid snapshot name \"" + name +
                "\": use letters, digits, '_', '.', '-' (starting with a letter or digit)");
  return {};
}

Result<std::string> RandomId() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof bytes) {
    ssize_t n = ::getrandom(bytes + got, sizeof bytes - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("getrandom");
    got += static_cast<size_t>(n);
  }
  std::string hex;
  char buf[3];
  for (unsigned char b : bytes) {
    std::snprintf(buf, sizeof buf, "%02x", b);
    hex += buf;
  }
  return hex;
}

Status CopySparse(const std::string& from, const std::string& to) {
  CELLA_TRY(sandbox::CloneOrCopySparse(from, to));
  return {};
}

// A committed snapshot directory's contents as a restore needs them.
struct SnapshotSource {
  std::string dir;
  sandbox::SnapshotManifest manifest;
  json meta;  // sandbox.json
  sandbox::SandboxSpec spec;
};

Result<SnapshotSource> LoadSnapshotSource(const std::string& dir, const std::string& label,
                                          bool verify) {
  SnapshotSource src;
  src.dir = dir;
  if (verify) {
    src.manifest = CELLA_TRY_CTX(sandbox::VerifySnapshot(dir), "snapshot " + label);
  } else {
    // A fork's own fresh snapshot: the supervisor that resumes each copy
    // checks the sizes and the state file's checksum before QEMU reads a
    // byte anyway (its memory file has none: the manifest is transient).
    std::string text = CELLA_TRY(ReadFileToString(dir + "/" + sandbox::kManifestName, 64 * 1024));
    src.manifest = CELLA_TRY_CTX(sandbox::DecodeManifest(text), "snapshot " + label);
  }
  src.meta =
      json::parse(CELLA_TRY(ReadFileToString(dir + "/sandbox.json", 1 << 20)), nullptr, false);
  if (!src.meta.is_object() || !src.meta.contains("spec_json") ||
      !src.meta["spec_json"].is_string())
    return Fail("snapshot " + label + ": sandbox.json is damaged");
  src.spec = CELLA_TRY(sandbox::DecodeSpec(src.meta["spec_json"].get<std::string>()));
  return src;
}

// Makes a new sandbox record from a snapshot: a new ID and directory, its
// own copies of the disks, the state file linked into its standby/ (the
// supervisor resumes from there and deletes it after). Returns the ID; on
// failure nothing of it is left.
Result<std::string> CreateFromSnapshot(SandboxContext& ctx, const SnapshotSource& src,
                                       const std::string& new_name) {
  std::string id = CELLA_TRY(RandomId());
  sandbox::SandboxPaths paths = sandbox::PathsFor(ctx.home, id);
  CELLA_TRY(host::MakeDirs(paths.dir + "/standby", 0700));
  auto build = [&]() -> Status {
    CELLA_TRY(CopySparse(src.dir + "/upper.img", paths.upper_image));
    CELLA_TRY(CopySparse(src.dir + "/config.img", paths.dir + "/config.img"));
    // The manifest last: a standby/ with one holds the whole snapshot.
    std::vector<std::string> files = {src.manifest.state_file};
    if (!src.manifest.memory_file.empty()) files.push_back(src.manifest.memory_file);
    files.emplace_back(sandbox::kManifestName);
    for (const std::string& f : files) {
      std::string from = src.dir + "/" + f, to = paths.dir + "/standby/" + f;
      if (::link(from.c_str(), to.c_str()) != 0) CELLA_TRY(CopySparse(from, to));
    }
    // The DNS names the guest has cached (only with egress control).
    std::string names = src.dir + "/" + sandbox::kDnsNamesFile;
    if (::access(names.c_str(), F_OK) == 0)
      CELLA_TRY(CopySparse(names, paths.dir + "/standby/" + sandbox::kDnsNamesFile));
    // The FUSE share servers' node tables (only with host shares).
    std::string shares = src.dir + "/" + sandbox::kShareStatesFile;
    if (::access(shares.c_str(), F_OK) == 0)
      CELLA_TRY(CopySparse(shares, paths.dir + "/standby/" + sandbox::kShareStatesFile));
    // Its own writable layer; published ports would collide with the
    // source's, so the new sandbox has none.
    sandbox::SandboxSpec spec = src.spec;
    spec.upper_image = paths.upper_image;
    spec.ports.clear();
    store::SandboxRecord record;
    record.id = id;
    record.name = new_name;
    record.image = src.meta.value("image", std::string());
    if (src.meta.contains("command") && src.meta["command"].is_array())
      for (const auto& w : src.meta["command"])
        if (w.is_string()) record.command.push_back(w.get<std::string>());
    record.spec_json = sandbox::EncodeSpec(spec);
    CELLA_TRY(ctx.store.Create(record));
    return {};
  };
  if (auto st = build(); !st) {
    std::error_code ec;
    std::filesystem::remove_all(paths.dir, ec);
    return std::unexpected(st.error());
  }
  return id;
}

// Starts the supervisor that resumes a sandbox made by CreateFromSnapshot.
// It checks the snapshot against this host (kernel, QEMU, shape) and
// refuses a mismatch naming the part; the record then says failed and
// `cella rm` removes it.
Status SpawnRestored(const std::string& home, const std::string& id,
                     const sandbox::SandboxSpec& spec, const std::string& secrets_json) {
  std::string self = CELLA_TRY(SelfExecutablePath());
  return sandbox::SpawnSupervisor(self, id, sandbox::MainAttach::kBySupervisor,
                                  sandbox::PathsFor(home, id).supervisor_log,
                                  std::chrono::seconds(spec.boot_timeout_s + 120), secrets_json,
                                  /*resume=*/true);
}

Status Print(std::string_view text) { return WriteAll(STDOUT_FILENO, text); }

// Every running fork holds `path` (<home>/fork.lock) shared; a fork that
// gets it exclusively first knows no other is running, so every `.fork-*`
// directory is a leftover of one that was killed (kill -9 leaves no time to
// clean up) and removes them. The lock file is never removed.
Result<UniqueFd> LockForks(const std::string& root, const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) return FailErrno("open " + path);
  auto lock = [&](int how) -> Status {
    while (::flock(fd.Get(), how) != 0)
      if (errno != EINTR) return FailErrno("flock " + path);
    return {};
  };
  if (::flock(fd.Get(), LOCK_EX | LOCK_NB) == 0) {
    std::error_code ec;
    std::vector<std::string> stale;
    for (const auto& entry : std::filesystem::directory_iterator(root, ec)) {
      std::string name = entry.path().filename().string();
      if (name.starts_with(sandbox::kForkDirPrefix)) stale.push_back(entry.path().string());
    }
    for (const std::string& leftover : stale) {
      log::Debug("removing a killed fork's snapshot", {{"dir", leftover}});
      if (auto st = sandbox::RemoveSnapshot(leftover); !st)
        log::Warn("could not remove a leftover fork snapshot", {{"error", st.error().message}});
    }
  } else if (errno != EWOULDBLOCK) {
    return FailErrno("flock " + path);
  }
  CELLA_TRY(lock(LOCK_SH));  // from exclusive: a conversion
  return fd;
}

// Removes a copy a failed fork made: killed through its supervisor when it
// has one (which records the end), its processes killed directly when that
// does not answer, then its record and directory.
void DiscardCopy(SandboxContext& ctx, const std::string& id) {
  auto record = ctx.store.Get(id);
  if (!record) {
    log::Warn("a failed fork's copy not found", {{"id", id}, {"error", record.error().message}});
    return;
  }
  if (record->supervisor.pid != 0) {
    std::string control = sandbox::PathsFor(ctx.home, id).control_socket;
    if (auto reply = sandbox::ControlCall(control, {{"op", "kill"}}, std::chrono::seconds(10));
        !reply)
      log::Debug("kill through the supervisor failed", {{"error", reply.error().message}});
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (store::IsAlive(record->supervisor) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (auto st = RemoveSandboxCompletely(ctx, *record); !st)
    log::Warn("could not remove a failed fork's copy", {{"id", id}, {"error", st.error().message}});
}

}  // namespace

int SnapshotCreateCommand(const std::string& sandbox_ref, const std::string& name_arg) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(sandbox_ref));
    CELLA_TRY(RequireRunning(record, "snapshot"));
    std::string name = name_arg;
    if (name.empty()) name = record.Label() + "-" + std::to_string(NowMs() / 1000);
    CELLA_TRY(CheckSnapshotName(name));
    std::string dir = SnapshotsDir(ctx.home) + "/" + name;
    if (::mkdir(SnapshotsDir(ctx.home).c_str(), 0700) != 0 && errno != EEXIST)
      return FailErrno("mkdir " + SnapshotsDir(ctx.home));
    if (::access(dir.c_str(), F_OK) == 0)
      return Fail("snapshot " + name + " exists already (cella snapshot rm " + name + ")");
    std::string control = sandbox::PathsFor(ctx.home, record.id).control_socket;
    auto reply =
        sandbox::ControlCall(control, {{"op", "snapshot"}, {"dir", dir}}, std::chrono::minutes(15));
    if (!reply) return Fail("snapshot " + record.Label() + ": " + reply.error().message);
    return Print(name + "\n");
  };
  auto st = run();
  return st ? 0 : ReportFailure(st.error());
}

int SnapshotLsCommand(ListFormat format) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    std::vector<std::string> names;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(SnapshotsDir(ctx.home), ec))
      if (entry.is_directory() && entry.path().extension() != ".partial" &&
          entry.path().filename().string()[0] != '.')  // a fork's own, in progress
        names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    json out = json::array();
    std::string text;
    char line[512];
    std::snprintf(line, sizeof line, "%-28s %-16s %-10s %-10s %s\n", "NAME", "SOURCE", "SIZE",
                  "MEMORY", "CREATED");
    text += line;
    for (const auto& name : names) {
      std::string dir = SnapshotsDir(ctx.home) + "/" + name;
      auto manifest_text = ReadFileToString(dir + "/" + sandbox::kManifestName, 64 * 1024);
      if (!manifest_text) continue;  // not a committed snapshot
      auto manifest = sandbox::DecodeManifest(*manifest_text);
      if (!manifest) continue;
      auto meta = json::parse(ReadFileToString(dir + "/sandbox.json", 1 << 20).value_or("{}"),
                              nullptr, false);
      std::string source = meta.is_object() ? meta.value("source_name", std::string()) : "";
      if (source.empty() && meta.is_object())
        source = store::ShortId(meta.value("source_id", std::string()));
      uint64_t size = sandbox::SnapshotAllocatedBytes(dir);
      out.push_back({{"name", name},
                     {"source", source},
                     {"size_bytes", size},
                     {"state_bytes", manifest->size_bytes},
                     {"memory_bytes", manifest->memory_bytes},
                     {"compression", std::string(sandbox::ToString(manifest->compression))},
                     {"format", std::string(sandbox::ToString(sandbox::LayoutOf(*manifest)))},
                     {"created_ms", manifest->created_ms}});
      std::snprintf(line, sizeof line, "%-28s %-16s %-10s %-10s %s ago\n", name.c_str(),
                    source.c_str(), (std::to_string(size >> 20) + "MiB").c_str(),
                    (std::to_string(manifest->memory_bytes >> 20) + "MiB").c_str(),
                    DescribeAge(manifest->created_ms, NowMs()).c_str());
      text += line;
    }
    return Print(format == ListFormat::kJson ? out.dump(2) + "\n" : text);
  };
  auto st = run();
  return st ? 0 : ReportFailure(st.error());
}

int SnapshotRmCommand(const std::vector<std::string>& names) {
  auto ctx = OpenSandboxes();
  if (!ctx) return ReportFailure(ctx.error());
  int code = 0;
  for (const auto& name : names) {
    Status st = CheckSnapshotName(name);
    std::string dir = SnapshotsDir(ctx->home) + "/" + name;
    if (st && ::access(dir.c_str(), F_OK) != 0) st = Fail("no snapshot \"" + name + "\"");
    if (st) st = sandbox::RemoveSnapshot(dir);
    if (st) st = Print(name + "\n");
    if (!st) code = ReportFailure(st.error());
  }
  return code;
}

int SnapshotRestoreCommand(const std::string& snapshot, const std::string& new_name) {
  auto run = [&]() -> Result<std::string> {
    CELLA_TRY(CheckSnapshotName(snapshot));
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    std::string from = SnapshotsDir(ctx.home) + "/" + snapshot;
    if (::access(from.c_str(), F_OK) != 0) return Fail("no snapshot \"" + snapshot + "\"");
    SnapshotSource src = CELLA_TRY(LoadSnapshotSource(from, snapshot, /*verify=*/true));
    std::string id = CELLA_TRY(CreateFromSnapshot(ctx, src, new_name));
    CELLA_TRY(SpawnRestored(ctx.home, id, src.spec, "{}"));
    return id;
  };
  auto id = run();
  if (!id) return ReportFailure(id.error());
  return Print(*id + "\n") ? 0 : 1;
}

Result<std::vector<std::string>> ForkSandbox(const std::string& sandbox_ref, int count,
                                             const std::string& name_prefix) {
  log::Debug("fork: start");
  if (count < 1 || count > kMaxForkCount)
    return Fail("fork: --count must be 1.." + std::to_string(kMaxForkCount));
  SandboxContext ctx = CELLA_TRY(OpenSandboxes());
  store::SandboxRecord record = CELLA_TRY(ctx.store.Resolve(sandbox_ref));
  CELLA_TRY(RequireRunning(record, "fork"));
  sandbox::SandboxSpec spec = CELLA_TRY(sandbox::DecodeSpec(record.spec_json));
  // What a snapshot cannot hold, refused before the source is touched.
  if (record.auto_remove)
    return Fail("fork " + record.Label() +
                ": it was started with --rm, so nothing of it may outlive its supervisor; "
                "fork a sandbox started with cella run -d");
  if (!spec.volumes.empty())
    return Fail("fork " + record.Label() +
                ": it has volumes, which the copies would share with it and each other (a "
                "fork copies only the writable layer); fork a sandbox without volumes");
  // Host shares are FUSE on the agent link: the copies serve the same host
  // directory (like several docker containers given the same -v), each with
  // its own overlay layers. (Under CELLA_SHARE_TRANSPORT=virtiofs the
  // supervisor refuses the save: QEMU cannot save a virtiofs device.)
  std::vector<std::string> names;
  for (int i = 1; i <= count; ++i) {
    if (name_prefix.empty()) {
      names.emplace_back();
      continue;
    }
    std::string name = name_prefix + "-" + std::to_string(i);
    if (auto st = store::CheckVolumeName(name); !st)
      return Fail("fork: --name " + name_prefix + ": " + st.error().message);
    if (ctx.store.Resolve(name)) return Fail("fork: a sandbox named " + name + " exists already");
    names.push_back(std::move(name));
  }
  // Secret values are never stored: the copies get them from this process's
  // environment, as `cella start` does.
  std::string secrets = CELLA_TRY(SecretsForRestart(spec, record));

  // From here on every way out removes what this fork made: Ctrl-C, SIGTERM
  // and SIGHUP are held back and looked at between the steps. The source's
  // save can take minutes: a second Ctrl-C (or SIGTERM, SIGHUP) during it
  // gives up at once (the source runs on after its save either way).
  InterruptHold interrupts;
  std::string root = SnapshotsDir(ctx.home);
  if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) return FailErrno("mkdir " + root);
  UniqueFd fork_lock = CELLA_TRY(LockForks(root, ctx.home + "/fork.lock"));
  std::string dir = root + "/" + sandbox::kForkDirPrefix + CELLA_TRY(RandomId()).substr(0, 12);
  // The state file and disk copies stay reachable through the copies' own
  // links and copies; the fork's directory goes whatever happens next (also
  // when the source's supervisor died mid-save and left it half written).
  // A save given up on is still being written to `<dir>.partial`: removing
  // it makes the source's supervisor fail it sooner (and resume the source)
  // rather than leave a whole snapshot for the next fork to remove.
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      (void)sandbox::RemoveSnapshot(dir);
      (void)sandbox::RemoveSnapshot(dir + ".partial");
    }
  } cleanup{dir};
  std::vector<std::string> ids;
  // All or nothing: a fork that fails partway removes every copy it made,
  // started or not (their supervisors are killed), and says why each
  // failed one did; the source is never touched.
  auto made = [&]() -> Status {
    std::string control = sandbox::PathsFor(ctx.home, record.id).control_socket;
    auto reply =
        sandbox::ControlCall(control, {{"op", "snapshot"}, {"dir", dir}}, std::chrono::minutes(15),
                             interrupts.WakeFd(), [&interrupts] { return interrupts.GiveUp(); });
    if (!reply && reply.error().errno_value == ECANCELED) return interrupts.Check();
    // The supervisor's refusals speak of "snapshot": the same reasons.
    if (!reply) return Fail(reply.error().message);
    CELLA_TRY(interrupts.Check());
    log::Debug("fork: source saved", {{"id", record.id}});
    SnapshotSource src = CELLA_TRY(LoadSnapshotSource(dir, record.Label(), /*verify=*/false));
    for (const std::string& name : names) {
      ids.push_back(CELLA_TRY(CreateFromSnapshot(ctx, src, name)));
      CELLA_TRY(interrupts.Check());
    }
    log::Debug("fork: copies made", {{"count", std::to_string(ids.size())}});
    // The copies resume in parallel: each supervisor builds its own network
    // and QEMU, and the wait is for the slowest, not the sum.
    std::vector<Status> started(ids.size());
    {
      std::vector<std::jthread> threads;
      for (size_t i = 0; i < ids.size(); ++i)
        threads.emplace_back(
            [&, i] { started[i] = SpawnRestored(ctx.home, ids[i], src.spec, secrets); });
    }
    std::string failures;
    for (size_t i = 0; i < ids.size(); ++i)
      if (!started[i])
        failures += (failures.empty() ? "" : "; ") + store::ShortId(ids[i]) + ": " +
                    sandbox::OneLine(started[i].error().message);
    if (!failures.empty())
      return Fail("not every copy started (" + failures + "); no copy is kept");
    return interrupts.Check();
  }();
  if (!made) {
    for (const std::string& id : ids) DiscardCopy(ctx, id);
    return Fail("fork " + record.Label() + ": " + made.error().message);
  }
  return ids;
}

int ForkCommand(const std::string& sandbox_ref, int count, const std::string& name_prefix,
                bool json_output) {
  auto ids = ForkSandbox(sandbox_ref, count, name_prefix);
  if (!ids) return ReportFailure(ids.error());
  std::string text;
  if (json_output) {
    text = json{{"ids", *ids}}.dump(2) + "\n";
  } else {
    for (const auto& id : *ids) text += id + "\n";
  }
  return Print(text) ? 0 : 1;
}

}  // namespace cella::cli
