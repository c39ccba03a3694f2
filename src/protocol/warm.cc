#include "protocol/warm.h"

#include <charconv>

#include "protocol/config.h"

namespace cella::protocol {
namespace {

constexpr std::string_view kGoPrefix = "cella-go ";
constexpr char kHex[] = "0123456789abcdef";

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

}  // namespace

std::string FormatWarmGo(const WarmGo& go) {
  std::string line(kGoPrefix);
  line += std::to_string(go.realtime_ns);
  line += ' ';
  for (uint8_t b : go.seed) {
    line += kHex[b >> 4];
    line += kHex[b & 0xf];
  }
  if (!go.config_json.empty()) {
    line += ' ';
    line += std::to_string(go.config_json.size());
  }
  line += '\n';
  line += go.config_json;
  return line;
}

Result<WarmGo> ParseWarmGo(std::string_view line) {
  if (line.size() > kMaxWarmLine) return Fail("warm go line: longer than its bound");
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  if (!line.starts_with(kGoPrefix)) return Fail("warm go line: does not start with cella-go");
  line.remove_prefix(kGoPrefix.size());
  size_t space = line.find(' ');
  if (space == std::string_view::npos) return Fail("warm go line: no seed");
  WarmGo go;
  std::string_view clock = line.substr(0, space);
  auto [end, ec] = std::from_chars(clock.data(), clock.data() + clock.size(), go.realtime_ns);
  if (ec != std::errc() || end != clock.data() + clock.size() || go.realtime_ns == 0)
    return Fail("warm go line: bad clock \"" + std::string(clock) + "\"");
  std::string_view hex = line.substr(space + 1);
  if (size_t next = hex.find(' '); next != std::string_view::npos) {
    std::string_view bytes = hex.substr(next + 1);
    hex = hex.substr(0, next);
    auto [bytes_end, bytes_ec] =
        std::from_chars(bytes.data(), bytes.data() + bytes.size(), go.config_bytes);
    if (bytes_ec != std::errc() || bytes_end != bytes.data() + bytes.size() || bytes.empty() ||
        go.config_bytes > kMaxConfigBytes)
      return Fail("warm go line: bad config size \"" + std::string(bytes) + "\"");
  }
  if (hex.size() != 2 * kWarmSeedBytes)
    return Fail("warm go line: seed of " + std::to_string(hex.size()) + " hex digits, want " +
                std::to_string(2 * kWarmSeedBytes));
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = HexValue(hex[i]);
    int lo = HexValue(hex[i + 1]);
    if (hi < 0 || lo < 0) return Fail("warm go line: seed is not lower-case hex");
    go.seed.push_back(static_cast<uint8_t>(hi << 4 | lo));
  }
  return go;
}

namespace {

bool CmdlineHasWord(std::string_view cmdline, std::string_view word) {
  size_t pos = 0;
  while (pos < cmdline.size()) {
    size_t end = cmdline.find_first_of(" \t\n", pos);
    if (end == std::string_view::npos) end = cmdline.size();
    if (cmdline.substr(pos, end - pos) == word) return true;
    pos = end + 1;
  }
  return false;
}

}  // namespace

bool CmdlineWantsTemplate(std::string_view cmdline) {
  return CmdlineHasWord(cmdline, kTemplateCmdlineFlag);
}

bool CmdlineWantsColdGo(std::string_view cmdline) {
  return CmdlineHasWord(cmdline, kColdGoCmdlineFlag);
}

bool CmdlineWantsSeededUpper(std::string_view cmdline) {
  return CmdlineHasWord(cmdline, kSeededUpperCmdlineFlag);
}

}  // namespace cella::protocol
