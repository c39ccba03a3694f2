// The OS calls crash safety depends on — write, fsync, rename and the wall
// clock — behind one small interface (LevelDB's Env), so a test can make any
// of them fail on purpose and check that what was on disk before stays
// readable and the error says what failed.
//
// Env's own methods ARE the real calls; a test derives from Env and
// overrides only what it wants to break. Which Env is used:
//  - helpers that write files take one (`WriteFileAtomically(..., env)`),
//    defaulting to Env::Current();
//  - code that reaches the OS through a library with its own I/O (SQLite:
//    the state store's VFS shim, host/store/env_vfs.h) asks Current()'s
//    CheckForeign before each write and sync of a file.
// Env::Current() is Env::Default() unless a test installs another with
// ScopedEnvOverride (process-wide: every thread sees it; tests only).
//
// Thread-safety: the default is stateless; an override must be thread-safe
// as long as it is installed.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "base/result.h"

namespace cella {

enum class FileOp { kWrite, kSync };

class Env {
 public:
  virtual ~Env() = default;

  // One write(2), retried on EINTR: the bytes written (maybe fewer).
  virtual Result<size_t> Write(int fd, std::span<const std::byte> data);
  // fsync(2). `what` names the file in the error.
  virtual Status Sync(int fd, std::string_view what);
  // rename(2).
  virtual Status Rename(const std::string& from, const std::string& to);
  virtual std::chrono::system_clock::time_point Now();
  // Asked before a library writes (kWrite) or syncs (kSync) `path` with its
  // own calls; an error fails that operation instead. Default: allowed.
  virtual Status CheckForeign(FileOp op, std::string_view path);

  // Plain syscalls; lives forever.
  static Env& Default();
  // The process-wide Env (Default unless overridden).
  static Env& Current();
};

// Installs `env` as Env::Current() for its lifetime and restores the
// previous one after. Tests only; not nestable across threads.
class ScopedEnvOverride {
 public:
  explicit ScopedEnvOverride(Env& env);
  ~ScopedEnvOverride();
  ScopedEnvOverride(const ScopedEnvOverride&) = delete;
  ScopedEnvOverride& operator=(const ScopedEnvOverride&) = delete;

 private:
  Env* previous_;
};

// Wall-clock milliseconds since the epoch, by `env`.
int64_t NowMs(Env& env = Env::Current());

}  // namespace cella
