// Named snapshots: `cella snapshot create|ls|rm|restore`. A snapshot lives in
// <sandbox home>/snapshots/NAME: the machine state and manifest
// (host/sandbox/snapshot.h), copies of the writable layer and config disk
// taken while the VM was frozen, and sandbox.json (the record it came from).
// restore makes a new sandbox (own ID, name, copies of the disks, its own
// sealed network) and resumes it from the snapshot; the source is untouched.
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "base/io.h"
#include "cli/commands.h"
#include "cli/sandbox_context.h"
#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/sandbox/control.h"
#include "host/sandbox/layout.h"
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

uint64_t AllocatedBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) == 0) total += uint64_t(st.st_blocks) * 512;
  }
  return total;
}

Status CopySparse(const std::string& from, const std::string& to) {
  CELLA_TRY(host::CheckCommand({"cp", "--sparse=always", from, to}, std::chrono::minutes(10)));
  return {};
}

Status Print(std::string_view text) { return WriteAll(STDOUT_FILENO, text); }

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
      if (entry.is_directory() && entry.path().extension() != ".partial")
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
      uint64_t size = AllocatedBytes(dir);
      out.push_back({{"name", name},
                     {"source", source},
                     {"size_bytes", size},
                     {"state_bytes", manifest->size_bytes},
                     {"memory_bytes", manifest->memory_bytes},
                     {"compression", std::string(sandbox::ToString(manifest->compression))},
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
    sandbox::SnapshotManifest manifest =
        CELLA_TRY_CTX(sandbox::VerifySnapshot(from), "snapshot " + snapshot);
    json meta =
        json::parse(CELLA_TRY(ReadFileToString(from + "/sandbox.json", 1 << 20)), nullptr, false);
    if (!meta.is_object() || !meta.contains("spec_json") || !meta["spec_json"].is_string())
      return Fail("snapshot " + snapshot + ": sandbox.json is damaged");
    sandbox::SandboxSpec spec =
        CELLA_TRY(sandbox::DecodeSpec(meta["spec_json"].get<std::string>()));
    std::string id = CELLA_TRY(RandomId());
    sandbox::SandboxPaths paths = sandbox::PathsFor(ctx.home, id);
    CELLA_TRY(host::MakeDirs(paths.dir + "/standby", 0700));
    auto build = [&]() -> Status {
      CELLA_TRY(CopySparse(from + "/upper.img", paths.upper_image));
      CELLA_TRY(CopySparse(from + "/config.img", paths.dir + "/config.img"));
      for (const std::string& f : {manifest.state_file, std::string(sandbox::kManifestName)}) {
        std::string src = from + "/" + f, dst = paths.dir + "/standby/" + f;
        if (::link(src.c_str(), dst.c_str()) != 0) CELLA_TRY(CopySparse(src, dst));
      }
      // Its own writable layer; published ports would collide with the
      // source's, so the restored sandbox has none.
      spec.upper_image = paths.upper_image;
      spec.ports.clear();
      store::SandboxRecord record;
      record.id = id;
      record.name = new_name;
      record.image = meta.value("image", std::string());
      if (meta.contains("command") && meta["command"].is_array())
        for (const auto& w : meta["command"])
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
    // The supervisor checks the snapshot against this host (kernel, QEMU,
    // shape) and refuses a mismatch naming the part; the record then says
    // failed and `cella rm` removes it.
    std::string self = CELLA_TRY(SelfExecutablePath());
    CELLA_TRY(sandbox::SpawnSupervisor(self, id, sandbox::MainAttach::kBySupervisor,
                                       paths.supervisor_log,
                                       std::chrono::seconds(spec.boot_timeout_s + 120), "{}",
                                       /*resume=*/true));
    return id;
  };
  auto id = run();
  if (!id) return ReportFailure(id.error());
  return Print(*id + "\n") ? 0 : 1;
}

}  // namespace cella::cli
