// The warm-start handshake (host/template, guest/init/template_point.h): two
// text lines on the agent's virtio-serial port, before the agent protocol
// starts on it.
//
//   guest -> host  "cella-template-point\n"   the guest (booted with
//                  cella.template=1 on its kernel command line) has its
//                  kernel, init and modules up and has read nothing of the
//                  sandbox; it now blocks on the port.
//   host -> guest  "cella-go <realtime_ns> <seed hex> <config bytes>\n"
//                  then <config bytes> of config.json: sent to the
//                  template's clone (never to the template itself, which is
//                  saved and killed while it waits): the wall clock to set,
//                  kWarmSeedBytes of host randomness for the kernel CRNG and
//                  the sandbox's config.json (the same bytes as on its config
//                  disk; 0 or no field: none, read the config disk).
//
// A cold boot (cella.go=1 on its kernel command line, no template) asks for
// the same go line once its boot modules are loaded:
//
//   guest -> host  "cella-config-please\n"
//   host -> guest  the go line and config.json, as above
//
// so it need not find and mount its config disk either, and the host may
// finish the sandbox's network and config disk while the kernel boots.
//
// After the go line (and its config) the guest closes the port and boots on
// exactly as a cold boot does from parsing its config: carried here, the
// clone's guest need not probe and mount its config disk, which cost
// ~0.5 s of every warm start under TCG. The agent then opens the port again
// and says Hello. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::protocol {

inline constexpr std::string_view kTemplatePointLine = "cella-template-point\n";
inline constexpr std::string_view kTemplateCmdlineFlag = "cella.template=1";
inline constexpr std::string_view kConfigRequestLine = "cella-config-please\n";
inline constexpr std::string_view kColdGoCmdlineFlag = "cella.go=1";
// A template (and its clones) whose writable layer is part of it: the
// upper disk stays bound at the template point, is mounted and the overlay
// made on it, and every clone attaches a copy of the template's disk.
inline constexpr std::string_view kSeededUpperCmdlineFlag = "cella.seeded_upper=1";
inline constexpr size_t kWarmSeedBytes = 64;
// Bound for either line (a longer one is refused, not waited for).
inline constexpr size_t kMaxWarmLine = 512;

struct WarmGo {
  uint64_t realtime_ns = 0;
  std::vector<uint8_t> seed;  // exactly kWarmSeedBytes
  // Bytes of config.json that follow the line (<= kMaxConfigBytes);
  // FormatWarmGo takes them from `config_json`.
  size_t config_bytes = 0;
  std::string config_json;
};

// The line and, when config_json is set, the config bytes after it.
std::string FormatWarmGo(const WarmGo& go);
// Parses one line (with or without its '\n'; the config bytes are not part
// of it: the caller reads config_bytes more); errors say what is wrong.
Result<WarmGo> ParseWarmGo(std::string_view line);

// True when the kernel command line carries kTemplateCmdlineFlag as a word.
bool CmdlineWantsTemplate(std::string_view cmdline);
// True when it carries kColdGoCmdlineFlag as a word.
bool CmdlineWantsColdGo(std::string_view cmdline);
// True when it carries kSeededUpperCmdlineFlag as a word.
bool CmdlineWantsSeededUpper(std::string_view cmdline);

}  // namespace cella::protocol
