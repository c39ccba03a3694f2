// Structured logging: one line per event, `level=... msg="..." key=value`,
// to stderr. Quiet by default (notices and above); --debug lowers the bar.
// Thread-safe: each line is written with a single write(2).
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

namespace cella::log {

enum class Level { kDebug = 0, kInfo = 1, kNotice = 2, kWarn = 3, kError = 4 };

struct Field {
  std::string_view key;
  std::string value;
  Field(std::string_view k, std::string_view v) : key(k), value(v) {}
  Field(std::string_view k, const char* v) : key(k), value(v) {}
  Field(std::string_view k, const std::string& v) : key(k), value(v) {}
  template <class Number>
  requires std::is_arithmetic_v<Number> Field(std::string_view k, Number v)
      : key(k), value(std::to_string(v)) {}
};

void SetLevel(Level level);
Level CurrentLevel();
bool Enabled(Level level);
// Formats without writing; exposed for tests.
std::string Format(Level level, std::string_view msg, std::initializer_list<Field> fields);
void Write(Level level, std::string_view msg, std::initializer_list<Field> fields = {});

inline void Debug(std::string_view msg, std::initializer_list<Field> f = {}) {
  Write(Level::kDebug, msg, f);
}
inline void Info(std::string_view msg, std::initializer_list<Field> f = {}) {
  Write(Level::kInfo, msg, f);
}
inline void Notice(std::string_view msg, std::initializer_list<Field> f = {}) {
  Write(Level::kNotice, msg, f);
}
inline void Warn(std::string_view msg, std::initializer_list<Field> f = {}) {
  Write(Level::kWarn, msg, f);
}
inline void Error(std::string_view msg, std::initializer_list<Field> f = {}) {
  Write(Level::kError, msg, f);
}

}  // namespace cella::log
