#include "base/check.h"

#include <unistd.h>

#include <cstdlib>

namespace cella {
namespace {

void Put(std::string_view text) noexcept {
  while (!text.empty()) {
    ssize_t n = ::write(STDERR_FILENO, text.data(), text.size());
    if (n <= 0) return;  // about to abort: stderr gone is no reason to stop
    text.remove_prefix(static_cast<size_t>(n));
  }
}

}  // namespace

void Die(std::string_view where, std::string_view what, std::string_view detail) noexcept {
  Put("cella: fatal: ");
  Put(where);
  Put(": ");
  Put(what);
  if (!detail.empty()) {
    Put(": ");
    Put(detail);
  }
  Put("\n");
  std::abort();
}

}  // namespace cella
