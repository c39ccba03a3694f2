// Programmer errors: a broken internal invariant ends the process at once,
// loudly, with where and why (STYLE.md: "assert or return an error?").
// Anything the environment, a user or the guest can cause is an Error value
// instead; never use these for those.
#pragma once

#include <string_view>

namespace cella {

// Writes "cella: fatal: <where>: <what>[: <detail>]" to stderr and aborts.
// Async-signal-safe (write(2) only), so it may be called after fork.
[[noreturn]] void Die(std::string_view where, std::string_view what,
                      std::string_view detail = {}) noexcept;

}  // namespace cella

#define CELLA_STRINGIFY_INNER(x) #x
#define CELLA_STRINGIFY(x) CELLA_STRINGIFY_INNER(x)
#define CELLA_HERE __FILE__ ":" CELLA_STRINGIFY(__LINE__)

// Aborts with the condition's text and `message` when `cond` is false.
#define CELLA_CHECK(cond, message)                                 \
  do {                                                             \
    if (!(cond)) [[unlikely]]                                      \
      ::cella::Die(CELLA_HERE, "check failed: " #cond, (message)); \
  } while (0)
