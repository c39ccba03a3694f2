#include "protocol/network.h"

namespace cella::protocol {

bool IsValidHostName(std::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  size_t label = 0;
  char previous = '.';
  for (char c : name) {
    if (c == '.') {
      if (label == 0 || previous == '-') return false;
      label = 0;
      previous = c;
      continue;
    }
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_';
    if (!ok || (label == 0 && c == '-') || ++label > 63) return false;
    previous = c;
  }
  return label != 0 && previous != '-';
}

}  // namespace cella::protocol
