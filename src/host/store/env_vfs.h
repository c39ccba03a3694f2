// An SQLite VFS over the default one that asks Env::Current() (base/env.h)
// before every write and sync SQLite makes, so a test can fail the state
// store's writes and fsyncs on purpose. Everything else (locking, shared
// memory for WAL, reads) is the default VFS's own, unchanged. Private to
// the store module.
#pragma once

#include <optional>

#include "base/result.h"

namespace cella::store::sql {

// The VFS's name for sqlite3_open_v2; registered on first use.
const char* EnvVfsName();

// The Env's error behind this thread's latest SQLITE_IOERR_WRITE/FSYNC from
// the shim, and forgets it; nullopt when the last failure was SQLite's own.
std::optional<Error> TakeEnvVfsError();

}  // namespace cella::store::sql
