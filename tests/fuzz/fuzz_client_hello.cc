// Feeds arbitrary bytes, as a guest could send them as the first bytes of a
// TCP flow, to the SNI reader. It must never crash, never return a name that
// is not a valid lower-case DNS name, and must be consistent on prefixes:
// once the whole input yields a name, no prefix may yield an error or a
// different name (the proxy calls it again as bytes arrive).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>

#include "host/net/tls.h"

namespace {

bool IsLowerDnsName(const std::string& name) {
  if (name.empty() || name.size() > 253 || name.front() == '.' || name.back() == '.') return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return name.find("..") == std::string::npos;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = std::as_bytes(std::span(data, size));
  auto whole = cella::net::ParseClientHelloSni(bytes);
  if (!whole) {
    if (whole.error().message.empty()) std::abort();
    return 0;
  }
  if (!whole->has_value()) {
    if (size >= cella::net::kMaxClientHelloBytes) std::abort();  // promised bound
    return 0;
  }
  const std::string& name = **whole;
  if (!IsLowerDnsName(name)) std::abort();
  for (size_t cut : {size / 2, size - 1, size / 3}) {
    auto prefix = cella::net::ParseClientHelloSni(bytes.first(cut));
    if (!prefix) std::abort();
    if (prefix->has_value() && **prefix != name) std::abort();
  }
  return 0;
}
