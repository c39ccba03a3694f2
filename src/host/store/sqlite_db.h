// Thin checked wrapper over the sqlite3 C API, private to the store module.
// Every failure names the database path, what was being done and
// sqlite3_errmsg. Values reach SQL only through bound parameters.
//
// Lifetime: a Statement or Transaction must not outlive its Connection. A
// Connection is used from one thread at a time (SQLITE_OPEN_NOMUTEX).
#pragma once

#include <sqlite3.h>

#include <concepts>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#include "base/result.h"

namespace cella::store::sql {

class Connection;

class Statement {
 public:
  Statement(Connection* conn, sqlite3_stmt* stmt) : conn_(conn), stmt_(stmt) {}
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  Statement(Statement&& other) noexcept;
  Statement& operator=(Statement&& other) noexcept;
  ~Statement();

  // Binds parameters ?1..?N in order. Strings bind as TEXT, integers as
  // INTEGER, std::nullopt as NULL.
  template <class... Args>
  Status BindAll(const Args&... args) {
    int index = 0;
    Status status;
    ((status = status ? BindOne(++index, args) : status), ...);
    return status;
  }

  // true: a row is available; false: done.
  Result<bool> Step();
  // Steps a statement that returns no rows.
  Status Run();

  std::string Text(int col) const;
  int64_t Int(int col) const;
  bool IsNull(int col) const;

 private:
  friend class Connection;
  Status BindOne(int index, std::string_view value);
  Status BindOne(int index, const std::string& value) {
    return BindOne(index, std::string_view(value));
  }
  Status BindOne(int index, const char* value) { return BindOne(index, std::string_view(value)); }
  Status BindInt(int index, int64_t value);
  Status BindNull(int index);
  template <std::integral T>
  Status BindOne(int index, T value) {
    return BindInt(index, static_cast<int64_t>(value));
  }
  template <class T>
  Status BindOne(int index, const std::optional<T>& value) {
    return value ? BindOne(index, *value) : BindNull(index);
  }
  Status BindOne(int index, std::nullopt_t) { return BindNull(index); }

  Connection* conn_;
  sqlite3_stmt* stmt_;
};

class Connection {
 public:
  // Opens (creating if missing) with busy_timeout, WAL and foreign keys on.
  static Result<std::unique_ptr<Connection>> Open(const std::string& path, int busy_timeout_ms);
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection();

  // For constant SQL only (schema, pragmas, transaction control).
  Status Exec(const char* sql);
  Result<Statement> Prepare(const char* sql);
  Result<Statement> Prepare(const std::string& sql) { return Prepare(sql.c_str()); }
  // Rows changed by the last INSERT/UPDATE/DELETE.
  int64_t Changes() { return sqlite3_changes64(db_); }

  // "<path>: <what>: <sqlite3_errmsg>"
  Error Failure(std::string_view what) const;
  const std::string& path() const { return path_; }
  sqlite3* raw() { return db_; }

 private:
  Status EnableWal(int busy_timeout_ms);
  // " (<the Env's error>)" after an I/O error the Env injected, else "".
  std::string IoCause() const;
  Connection(std::string path, sqlite3* db) : path_(std::move(path)), db_(db) {}
  std::string path_;
  sqlite3* db_;
};

enum class TransactionKind {
  // BEGIN (deferred): a consistent snapshot for multi-statement reads.
  kRead,
  // BEGIN IMMEDIATE: takes the write lock up front (waiting up to the busy
  // timeout), so check-then-write sequences cannot interleave across
  // processes and no read lock ever has to be upgraded (which in WAL mode
  // fails with SQLITE_BUSY without waiting).
  kWrite,
};

// Rolls back on destruction unless committed.
class Transaction {
 public:
  static Result<Transaction> Begin(Connection& conn, TransactionKind kind);
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  Transaction(Transaction&& other) noexcept : conn_(std::exchange(other.conn_, nullptr)) {}
  Transaction& operator=(Transaction&&) = delete;
  ~Transaction();
  Status Commit();

 private:
  explicit Transaction(Connection* conn) : conn_(conn) {}
  Connection* conn_;  // null once committed or rolled back
};

}  // namespace cella::store::sql
