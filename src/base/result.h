// Errors are values: every fallible function returns Result<T>, and the
// error says what failed and where. CELLA_TRY keeps the error path short.
#pragma once

#include <cerrno>
#include <cstring>
#include <expected>
#include <string>
#include <string_view>
#include <utility>

namespace cella {

struct Error {
  std::string message;
  // errno-level meaning (ENOENT, EISDIR, EACCES...) when the failure has one;
  // 0 otherwise. Lets callers branch on "not found" without parsing text.
  int errno_value = 0;

  // Builds an error from the current errno: "<what>: <strerror>".
  static Error FromErrno(std::string_view what) { return FromErrno(what, errno); }
  static Error FromErrno(std::string_view what, int err) {
    return Error{std::string(what) + ": " + std::strerror(err), err};
  }
  static Error Msg(std::string message) { return Error{std::move(message), 0}; }

  // Prefixes the message with where it happened, keeping errno_value.
  Error WithContext(std::string_view where) && {
    message = std::string(where) + ": " + message;
    return std::move(*this);
  }
};

template <class T>
using Result = std::expected<T, Error>;
using Status = Result<void>;

inline std::unexpected<Error> Fail(std::string message) {
  return std::unexpected(Error::Msg(std::move(message)));
}
inline std::unexpected<Error> FailErrno(std::string_view what) {
  return std::unexpected(Error::FromErrno(what));
}
inline std::unexpected<Error> FailErrno(std::string_view what, int err) {
  return std::unexpected(Error::FromErrno(what, err));
}

}  // namespace cella

// Evaluates a Result expression; on error returns it from the enclosing
// function, otherwise yields the value. GCC/Clang statement expression.
#define CELLA_TRY(expr)                                             \
  ({                                                                \
    auto cella_try_result_ = (expr);                                \
    if (!cella_try_result_) [[unlikely]]                            \
      return std::unexpected(std::move(cella_try_result_.error())); \
    std::move(cella_try_result_).value();                           \
  })

// Same, but prefixes the error with a context string.
#define CELLA_TRY_CTX(expr, ctx)                                                     \
  ({                                                                                 \
    auto cella_try_result_ = (expr);                                                 \
    if (!cella_try_result_) [[unlikely]]                                             \
      return std::unexpected(std::move(cella_try_result_.error()).WithContext(ctx)); \
    std::move(cella_try_result_).value();                                            \
  })
