// `cella events [--since D] [--until D]`: sandbox state changes as JSON
// lines, read from the state store's history (every transition is recorded
// there with its time), so no daemon is needed: past changes come from the
// history, new ones by polling it four times a second.
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "base/io.h"
#include "cli/commands.h"
#include "cli/sandbox_context.h"

namespace cella::cli {
namespace {

int64_t EpochMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// docker's forms: a duration before now ("10m", "90s", "2h", "0s") or a
// Unix time in seconds. Returns milliseconds since the epoch.
Result<int64_t> ParseWhen(const std::string& text, const char* flag) {
  if (text.empty()) return Fail(std::string(flag) + ": empty");
  int64_t number = 0;
  const char* end = text.data() + text.size();
  auto [stop, ec] = std::from_chars(text.data(), end, number);
  if (ec != std::errc() || number < 0)
    return Fail(std::string(flag) + " " + text +
                ": want a duration (10m, 30s, 2h) or Unix seconds");
  std::string unit(stop, end);
  if (unit.empty()) return number * 1000;  // Unix seconds
  int64_t scale = unit == "s" ? 1000 : unit == "m" ? 60'000 : unit == "h" ? 3'600'000 : 0;
  if (scale == 0) return Fail(std::string(flag) + " " + text + ": unknown unit (want s, m or h)");
  return EpochMs() - number * scale;
}

std::string Line(const store::SandboxRecord& r, int64_t at_ms, std::string_view state,
                 const std::string& detail) {
  nlohmann::json j = {{"time_ms", at_ms}, {"id", r.id},     {"name", r.name},
                      {"image", r.image}, {"state", state}, {"detail", detail}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

}  // namespace

int EventsCommand(const std::string& since, const std::string& until) {
  auto run = [&]() -> Status {
    SandboxContext ctx = CELLA_TRY(OpenSandboxes());
    const int64_t start = EpochMs();
    const int64_t from = since.empty() ? start : CELLA_TRY(ParseWhen(since, "--since"));
    // No --until: follow forever (INT64_MAX is never reached).
    const int64_t to = until.empty() ? std::numeric_limits<int64_t>::max()
                                     : CELLA_TRY(ParseWhen(until, "--until"));
    std::map<std::string, size_t> seen;  // id -> history entries already handled
    std::map<std::string, store::SandboxRecord> known;
    for (;;) {
      const int64_t now = EpochMs();
      std::vector<std::tuple<int64_t, std::string>> lines;  // sorted by time
      std::set<std::string> present;
      for (const store::SandboxRecord& r : CELLA_TRY(ctx.store.List(store::ListScope::kAll))) {
        present.insert(r.id);
        known[r.id] = r;
        // A sandbox may go between List and History: skip it this round.
        auto history = ctx.store.History(r.id);
        if (!history) continue;
        size_t& done = seen[r.id];
        for (size_t i = done; i < history->size(); ++i) {
          const store::StateChange& c = (*history)[i];
          if (c.at_ms < from || c.at_ms > to) continue;
          lines.emplace_back(c.at_ms, Line(r, c.at_ms, store::ToString(c.state), c.detail));
        }
        done = history->size();
      }
      // Removed since the last round: the record (and its history) is gone.
      for (auto it = known.begin(); it != known.end();) {
        if (present.contains(it->first)) {
          ++it;
          continue;
        }
        if (now <= to) lines.emplace_back(now, Line(it->second, now, "removed", ""));
        seen.erase(it->first);
        it = known.erase(it);
      }
      std::ranges::stable_sort(lines, {}, [](const auto& l) { return std::get<0>(l); });
      for (const auto& [at, text] : lines) CELLA_TRY(WriteAll(STDOUT_FILENO, text));
      if (to <= EpochMs()) return {};
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
  };
  auto st = run();
  return st ? 0 : ReportFailure(st.error());
}

}  // namespace cella::cli
