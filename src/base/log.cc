#include "base/log.h"

#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>

namespace cella::log {
namespace {

std::atomic<Level> g_level{Level::kNotice};

const char* LevelName(Level level) {
  switch (level) {
    case Level::kDebug:
      return "debug";
    case Level::kInfo:
      return "info";
    case Level::kNotice:
      return "notice";
    case Level::kWarn:
      return "warn";
    case Level::kError:
      return "error";
  }
  return "?";
}

void AppendValue(std::string& out, std::string_view v) {
  bool plain = !v.empty();
  for (char c : v) {
    if (c == ' ' || c == '"' || c == '=' || c == '\\' || static_cast<unsigned char>(c) < 0x20) {
      plain = false;
      break;
    }
  }
  if (plain) {
    out += v;
    return;
  }
  out += '"';
  for (char c : v) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          static const char kHex[] = "0123456789abcdef";
          out += "\\x";
          out += kHex[(c >> 4) & 0xf];
          out += kHex[c & 0xf];
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

}  // namespace

void SetLevel(Level level) { g_level.store(level); }
Level CurrentLevel() { return g_level.load(); }
bool Enabled(Level level) { return level >= g_level.load(); }

std::string Format(Level level, std::string_view msg, std::initializer_list<Field> fields) {
  std::string line = "level=";
  line += LevelName(level);
  line += " msg=";
  AppendValue(line, msg);
  for (const Field& f : fields) {
    line += ' ';
    line += f.key;
    line += '=';
    AppendValue(line, f.value);
  }
  line += '\n';
  return line;
}

void Write(Level level, std::string_view msg, std::initializer_list<Field> fields) {
  if (!Enabled(level)) return;
  std::string line = Format(level, msg, fields);
  // Debug logs are read as timelines (docs/performance.md): wall-clock
  // milliseconds, comparable with a warm guest's debug lines (its clock is
  // set from the host's on restore).
  if (g_level.load() == Level::kDebug) {
    timespec now{};
    if (::clock_gettime(CLOCK_REALTIME, &now) == 0) {
      char stamp[40];
      int n = std::snprintf(stamp, sizeof stamp, "t=%lld.%03ld ",
                            static_cast<long long>(now.tv_sec), now.tv_nsec / 1'000'000);
      if (n > 0) line.insert(0, stamp, static_cast<size_t>(n));
    }
  }
  // A log line that cannot be written has nowhere else to go; dropping it
  // is the only option, so the result is deliberately ignored.
  ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

}  // namespace cella::log
