#include "base/env.h"

#include <stdio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

namespace cella {
namespace {

std::atomic<Env*> g_current{nullptr};

}  // namespace

Result<size_t> Env::Write(int fd, std::span<const std::byte> data) {
  for (;;) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n >= 0) return static_cast<size_t>(n);
    if (errno != EINTR) return FailErrno("write");
  }
}

Status Env::Sync(int fd, std::string_view what) {
  if (::fsync(fd) != 0) return FailErrno("fsync " + std::string(what));
  return {};
}

Status Env::Rename(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) return FailErrno("rename " + from + " -> " + to);
  return {};
}

std::chrono::system_clock::time_point Env::Now() { return std::chrono::system_clock::now(); }

Status Env::CheckForeign(FileOp, std::string_view) { return {}; }

Env& Env::Default() {
  // Never destroyed: other static destructors may still write.
  static Env* env = new Env();
  return *env;
}

Env& Env::Current() {
  Env* env = g_current.load(std::memory_order_acquire);
  return env != nullptr ? *env : Default();
}

ScopedEnvOverride::ScopedEnvOverride(Env& env)
    : previous_(g_current.exchange(&env, std::memory_order_acq_rel)) {}

ScopedEnvOverride::~ScopedEnvOverride() { g_current.store(previous_, std::memory_order_release); }

int64_t NowMs(Env& env) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(env.Now().time_since_epoch())
      .count();
}

}  // namespace cella
