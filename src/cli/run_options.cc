#include "cli/run_options.h"

#include <arpa/inet.h>

#include <charconv>
#include <cmath>

namespace cella::cli {
namespace {

bool ValidEnvName(std::string_view name) {
  if (name.empty()) return false;
  for (char c : name)
    if (c == '=' || c == '\0' || c == ' ' || c == '\t' || c == '\n') return false;
  return true;
}

bool ValidIp(const std::string& ip) {
  unsigned char buf[16];
  return inet_pton(AF_INET, ip.c_str(), buf) == 1 || inet_pton(AF_INET6, ip.c_str(), buf) == 1;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r'))
    s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

}  // namespace

Status ApplyEnvAssignment(std::string_view item, EnvLookup lookup,
                          std::map<std::string, std::string>& env) {
  auto eq = item.find('=');
  std::string name(item.substr(0, eq));
  if (!ValidEnvName(name))
    return Fail("environment variable \"" + std::string(item) + "\": invalid name");
  if (eq != std::string_view::npos) {
    env[name] = std::string(item.substr(eq + 1));
    return {};
  }
  if (const char* value = lookup(name.c_str())) env[name] = value;
  return {};
}

Status ApplyEnvFile(std::string_view contents, std::string_view file_name, EnvLookup lookup,
                    std::map<std::string, std::string>& env) {
  int line_no = 0;
  while (!contents.empty()) {
    auto nl = contents.find('\n');
    std::string_view line = contents.substr(0, nl);
    contents = nl == std::string_view::npos ? std::string_view{} : contents.substr(nl + 1);
    ++line_no;
    // Only leading whitespace is insignificant: a value keeps its spaces.
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || line.front() == '#') continue;
    auto applied = ApplyEnvAssignment(line, lookup, env);
    if (!applied)
      return std::unexpected(
          std::move(applied.error())
              .WithContext(std::string(file_name) + ":" + std::to_string(line_no)));
  }
  return {};
}

Result<int> ParseMemoryMiB(std::string_view text) {
  std::string_view t = Trim(text);
  double value = 0;
  auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  if (ec != std::errc() || ptr == t.data() || !(value > 0))
    return Fail("--memory \"" + std::string(text) + "\": expected a positive size like 512m or 2g");
  std::string unit(ptr, t.data() + t.size());
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double mib;
  if (unit.empty() || unit == "m" || unit == "mb" || unit == "mib") {
    mib = value;
  } else if (unit == "g" || unit == "gb" || unit == "gib") {
    mib = value * 1024;
  } else if (unit == "k" || unit == "kb" || unit == "kib") {
    mib = value / 1024;
  } else {
    return Fail("--memory \"" + std::string(text) + "\": unknown unit \"" + unit +
                "\" (use k, m or g)");
  }
  if (mib < 64 || mib > 1024 * 1024)
    return Fail("--memory \"" + std::string(text) + "\": must be between 64m and 1024g");
  return static_cast<int>(std::lround(mib));
}

Result<double> ParseCpus(std::string_view text) {
  std::string_view t = Trim(text);
  double value = 0;
  auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  if (ec != std::errc() || ptr != t.data() + t.size() || !(value >= 0.01) || value > 64)
    return Fail("--cpus \"" + std::string(text) +
                "\": expected a number of CPUs between 0.01 and 64");
  return value;
}

Result<HostEntry> ParseAddHost(std::string_view text) {
  auto colon = text.find(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size())
    return Fail("--add-host \"" + std::string(text) + "\": expected HOST:IP");
  HostEntry entry{std::string(text.substr(0, colon)), std::string(text.substr(colon + 1))};
  if (!ValidIp(entry.ip))
    return Fail("--add-host \"" + std::string(text) + "\": \"" + entry.ip +
                "\" is not an IP address");
  for (char c : entry.host)
    if (c == ' ' || c == '\t' || c == '\n' || c == '#')
      return Fail("--add-host \"" + std::string(text) + "\": invalid host name");
  return entry;
}

}  // namespace cella::cli
