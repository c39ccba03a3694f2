// `cella stats [--no-stream] [SANDBOX...]`: CPU, memory and disk I/O of each
// running sandbox, measured from the host: its QEMU process's /proc entry.
//
// What the numbers mean (docs/cli-format.md, "stats"):
//   CPU %     host CPU time QEMU used over the sample interval, per host
//             CPU (100% = one host core busy; up to cores×100%). Under TCG
//             that is the cost of emulating the guest (translation
//             included), not the guest's own idea of how busy it is.
//   MEM       QEMU's resident set (guest RAM it touched, plus QEMU itself)
//             against the sandbox's --memory.
//   BLOCK I/O bytes QEMU read from / wrote to storage (/proc/PID/io),
//             i.e. the guest's disk traffic that reached the host's disks.
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "cli/commands.h"
#include "cli/sandbox_context.h"
#include "host/sandbox/spec.h"
#include "host/store/process_identity.h"

namespace cella::cli {
namespace {

struct Sample {
  uint64_t cpu_ticks = 0;  // utime + stime
  uint64_t rss_bytes = 0;
  std::optional<uint64_t> read_bytes, write_bytes;  // nullopt: /proc/PID/io unreadable
  std::chrono::steady_clock::time_point at;
};

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The recorded QEMU, only if it is still that process (pid reuse).
Result<Sample> SampleProcess(const store::ProcessIdentity& qemu) {
  if (qemu.pid <= 0) return Fail("no hypervisor recorded");
  const std::string dir = "/proc/" + std::to_string(qemu.pid);
  Sample sample;
  sample.at = std::chrono::steady_clock::now();
  std::string stat = ReadSmallFile(dir + "/stat");
  size_t close = stat.rfind(')');
  if (close == std::string::npos)
    return Fail("hypervisor (pid " + std::to_string(qemu.pid) + ") is gone");
  std::istringstream fields(stat.substr(close + 2));
  std::vector<std::string> f;
  for (std::string word; fields >> word;) f.push_back(word);
  // f[0] is field 3 (state): utime 14, stime 15, starttime 22.
  if (f.size() < 20) return Fail("/proc/" + std::to_string(qemu.pid) + "/stat: too short");
  auto number = [](const std::string& text) -> std::optional<uint64_t> {
    uint64_t value = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
    return value;
  };
  auto start = number(f[19]), utime = number(f[11]), stime = number(f[12]);
  if (!start || !utime || !stime) return Fail(dir + "/stat: unparsable");
  if (*start != qemu.start_ticks)
    return Fail("hypervisor (pid " + std::to_string(qemu.pid) + ") is gone");
  sample.cpu_ticks = *utime + *stime;
  std::istringstream statm(ReadSmallFile(dir + "/statm"));
  uint64_t size_pages = 0, resident_pages = 0;
  if (!(statm >> size_pages >> resident_pages)) return Fail(dir + "/statm: unreadable");
  sample.rss_bytes = resident_pages * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  std::istringstream io(ReadSmallFile(dir + "/io"));
  for (std::string key; io >> key;) {
    uint64_t value = 0;
    if (!(io >> value)) break;
    if (key == "read_bytes:") sample.read_bytes = value;
    if (key == "write_bytes:") sample.write_bytes = value;
  }
  return sample;
}

std::string Bytes(uint64_t bytes) {
  char text[32];
  if (bytes >= (uint64_t{1} << 30))
    std::snprintf(text, sizeof text, "%.2fGiB", static_cast<double>(bytes) / (1 << 30));
  else if (bytes >= (uint64_t{1} << 20))
    std::snprintf(text, sizeof text, "%.1fMiB", static_cast<double>(bytes) / (1 << 20));
  else if (bytes >= 1024)
    std::snprintf(text, sizeof text, "%.1fKiB", static_cast<double>(bytes) / 1024);
  else
    std::snprintf(text, sizeof text, "%lluB", static_cast<unsigned long long>(bytes));
  return text;
}

struct Row {
  std::string id, name;
  double cpu_percent = 0;
  uint64_t mem = 0, limit = 0;
  std::optional<uint64_t> read, written;
};

Result<std::vector<store::SandboxRecord>> Targets(SandboxContext& ctx,
                                                  const std::vector<std::string>& refs) {
  std::vector<store::SandboxRecord> out;
  if (refs.empty()) {
    for (auto& r : CELLA_TRY(ctx.store.List(store::ListScope::kAll)))
      if (r.state == store::SandboxState::kRunning || r.state == store::SandboxState::kPaused)
        out.push_back(std::move(r));
    return out;
  }
  for (const std::string& ref : refs) {
    store::SandboxRecord r = CELLA_TRY(ctx.store.Resolve(ref));
    if (!store::IsActive(r.state) || r.hypervisor.pid == 0)
      return Fail("sandbox " + r.Label() + " is not running");
    out.push_back(std::move(r));
  }
  return out;
}

// Two samples `interval` apart (docker's way: CPU% needs a difference).
std::vector<Row> Measure(const std::vector<store::SandboxRecord>& records,
                         std::chrono::milliseconds interval) {
  std::map<std::string, Sample> first;
  for (const auto& r : records)
    if (auto s = SampleProcess(r.hypervisor)) first[r.id] = *s;
  std::this_thread::sleep_for(interval);
  const double ticks_per_second = static_cast<double>(::sysconf(_SC_CLK_TCK));
  std::vector<Row> rows;
  for (const auto& r : records) {
    auto before = first.find(r.id);
    auto now = SampleProcess(r.hypervisor);
    if (before == first.end() || !now) continue;  // it ended meanwhile
    Row row;
    row.id = r.id.substr(0, 12);
    row.name = r.name.empty() ? row.id : r.name;
    double seconds = std::chrono::duration<double>(now->at - before->second.at).count();
    double used = static_cast<double>(now->cpu_ticks - before->second.cpu_ticks) / ticks_per_second;
    row.cpu_percent = seconds > 0 ? 100.0 * used / seconds : 0;
    row.mem = now->rss_bytes;
    if (auto spec = sandbox::DecodeSpec(r.spec_json))
      row.limit = static_cast<uint64_t>(spec->shape.memory_mib) << 20;
    row.read = now->read_bytes;
    row.written = now->write_bytes;
    rows.push_back(std::move(row));
  }
  return rows;
}

std::string Render(const std::vector<Row>& rows, bool json) {
  std::string out;
  if (json) {
    for (const Row& row : rows) {
      nlohmann::json j = {{"id", row.id},
                          {"name", row.name},
                          {"cpu_percent", row.cpu_percent},
                          {"memory_bytes", row.mem},
                          {"memory_limit_bytes", row.limit}};
      j["block_read_bytes"] = row.read ? nlohmann::json(*row.read) : nlohmann::json(nullptr);
      j["block_write_bytes"] = row.written ? nlohmann::json(*row.written) : nlohmann::json(nullptr);
      out += j.dump() + "\n";
    }
    return out;
  }
  char line[256];
  std::snprintf(line, sizeof line, "%-12s  %-20s  %7s  %-21s  %6s  %s\n", "SANDBOX ID", "NAME",
                "CPU %", "MEM USAGE / LIMIT", "MEM %", "BLOCK I/O");
  out += line;
  for (const Row& row : rows) {
    std::string mem = Bytes(row.mem) + " / " + Bytes(row.limit);
    double mem_percent =
        row.limit > 0 ? 100.0 * static_cast<double>(row.mem) / static_cast<double>(row.limit) : 0;
    std::string io = row.read && row.written ? Bytes(*row.read) + " / " + Bytes(*row.written)
                                             : std::string("-- / --");
    std::snprintf(line, sizeof line, "%-12s  %-20s  %6.2f%%  %-21s  %5.2f%%  %s\n", row.id.c_str(),
                  row.name.substr(0, 20).c_str(), row.cpu_percent, mem.c_str(), mem_percent,
                  io.c_str());
    out += line;
  }
  return out;
}

}  // namespace

int StatsCommand(const std::vector<std::string>& refs, bool no_stream, bool json) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    std::vector<store::SandboxRecord> records = CELLA_TRY(Targets(ctx, refs));
    const bool tty = ::isatty(STDOUT_FILENO) == 1;
    for (;;) {
      std::string text = Render(Measure(records, std::chrono::milliseconds(1000)), json);
      // Streaming on a terminal redraws in place, as docker does.
      if (!no_stream && tty && !json) text = "\x1b[H\x1b[2J" + text;
      CELLA_TRY(WriteAll(STDOUT_FILENO, text));
      if (no_stream) return {};
      if (refs.empty()) records = CELLA_TRY(Targets(ctx, refs));  // new and ended sandboxes
    }
  };
  auto st = run();
  return st ? 0 : ReportFailure(st.error());
}

}  // namespace cella::cli
