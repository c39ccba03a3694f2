// Fuzzes the config.json parser: arbitrary bytes must never crash it, and
// anything it accepts must survive SerializeConfig -> ParseConfig unchanged
// (the host writes what the guest reads; a lossy round trip would silently
// change a sandbox's configuration).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "protocol/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  auto config = cella::protocol::ParseConfig(input);
  if (!config) return 0;
  std::string json = cella::protocol::SerializeConfig(*config);
  auto again = cella::protocol::ParseConfig(json);
  if (!again) {
    std::fprintf(stderr, "re-parse failed: %s\njson: %s\n", again.error().message.c_str(),
                 json.c_str());
    std::abort();
  }
  if (!(*again == *config)) {
    std::fprintf(stderr, "round trip changed the config\njson: %s\n", json.c_str());
    std::abort();
  }
  return 0;
}
