#include "host/store/sqlite_db.h"

#include <chrono>
#include <thread>
#include <utility>

#include "base/log.h"
#include "host/store/env_vfs.h"

namespace cella::store::sql {

Statement::Statement(Statement&& other) noexcept
    : conn_(other.conn_), stmt_(std::exchange(other.stmt_, nullptr)) {}

Statement& Statement::operator=(Statement&& other) noexcept {
  std::swap(conn_, other.conn_);
  std::swap(stmt_, other.stmt_);
  return *this;
}

// sqlite3_finalize only repeats the last step's error, already reported.
Statement::~Statement() { sqlite3_finalize(stmt_); }

Status Statement::BindOne(int index, std::string_view value) {
  if (sqlite3_bind_text(stmt_, index, value.data(), static_cast<int>(value.size()),
                        SQLITE_TRANSIENT) != SQLITE_OK)
    return std::unexpected(conn_->Failure("bind parameter " + std::to_string(index)));
  return {};
}

Status Statement::BindInt(int index, int64_t value) {
  if (sqlite3_bind_int64(stmt_, index, value) != SQLITE_OK)
    return std::unexpected(conn_->Failure("bind parameter " + std::to_string(index)));
  return {};
}

Status Statement::BindNull(int index) {
  if (sqlite3_bind_null(stmt_, index) != SQLITE_OK)
    return std::unexpected(conn_->Failure("bind parameter " + std::to_string(index)));
  return {};
}

Result<bool> Statement::Step() {
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  const char* sql = sqlite3_sql(stmt_);
  std::string what = "execute \"";
  what += sql ? std::string_view(sql).substr(0, 60) : std::string_view("?");
  what += "\"";
  return std::unexpected(conn_->Failure(what));
}

Status Statement::Run() {
  bool row = CELLA_TRY(Step());
  if (row)
    return std::unexpected(conn_->Failure("statement returned a row where none was expected"));
  return {};
}

std::string Statement::Text(int col) const {
  const unsigned char* text = sqlite3_column_text(stmt_, col);
  if (text == nullptr) return {};
  return std::string(reinterpret_cast<const char*>(text),
                     static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
}

int64_t Statement::Int(int col) const { return sqlite3_column_int64(stmt_, col); }

bool Statement::IsNull(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }

Result<std::unique_ptr<Connection>> Connection::Open(const std::string& path, int busy_timeout_ms) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                           EnvVfsName());
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    return Fail(path + ": open: " + msg);
  }
  std::unique_ptr<Connection> conn(new Connection(path, db));
  if (sqlite3_extended_result_codes(db, 1) != SQLITE_OK)
    return std::unexpected(conn->Failure("enable extended result codes"));
  if (sqlite3_busy_timeout(db, busy_timeout_ms) != SQLITE_OK)
    return std::unexpected(conn->Failure("set busy timeout"));
  CELLA_TRY(conn->EnableWal(busy_timeout_ms));
  // FULL: a commit returns once its WAL frames are fsynced, so a recorded
  // state change survives a crash or power loss (NORMAL may lose the last
  // ones), and a failed fsync fails the commit instead of going unnoticed.
  CELLA_TRY(conn->Exec("PRAGMA synchronous=FULL"));
  CELLA_TRY(conn->Exec("PRAGMA foreign_keys=ON"));
  // No checkpoint when a connection closes: every cella process opens the
  // store and the last one to close it would otherwise copy the WAL into the
  // database, fsync it and unlink the WAL and its index (measured 10-40 ms
  // at the end of every `cella run`, on the caller's time), and the next
  // writer would create the WAL again and fsync the directory. The WAL
  // stays (every commit fsynced it: FULL) and the next first opener reads
  // it back to rebuild its index: the automatic checkpoint (inside a
  // commit) comes every 128 pages rather than SQLite's 1000, so that read
  // stays under half a MiB (a run writes ~25 pages).
  if (sqlite3_db_config(conn->db_, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, nullptr) != SQLITE_OK)
    return std::unexpected(conn->Failure("turn off the checkpoint on close"));
  CELLA_TRY(conn->Exec("PRAGMA wal_autocheckpoint=128"));
  return conn;
}

Status Connection::EnableWal(int busy_timeout_ms) {
  Statement wal = CELLA_TRY(Prepare("PRAGMA journal_mode=WAL"));
  // Switching a new database to WAL needs an exclusive lock, and SQLite
  // does not call the busy handler for it: processes opening a fresh
  // database together would get "database is locked". Retry instead.
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(busy_timeout_ms);
  int rc;
  while (((rc = sqlite3_step(wal.stmt_)) & 0xff) == SQLITE_BUSY) {
    if (std::chrono::steady_clock::now() >= deadline) break;
    sqlite3_reset(wal.stmt_);  // repeats the BUSY just seen; nothing new to report
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (rc != SQLITE_ROW) return std::unexpected(Failure("switch to write-ahead logging"));
  // journal_mode answers with the mode now in force; anything but "wal"
  // means readers and the writer would block each other.
  if (std::string mode = wal.Text(0); mode != "wal")
    return Fail(path_ + ": cannot switch to write-ahead logging (journal mode stays \"" + mode +
                "\"); put the state directory on a local filesystem");
  return {};
}

// sqlite3_close fails only with unfinalized statements, which RAII rules out.
Connection::~Connection() { sqlite3_close(db_); }

Status Connection::Exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errmsg(db_);
    sqlite3_free(err);
    return Fail(path_ + ": " + std::string(std::string_view(sql).substr(0, 60)) + ": " + msg +
                IoCause());
  }
  return {};
}

Result<Statement> Connection::Prepare(const char* sql) {
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db_, sql, -1, &stmt, nullptr) != SQLITE_OK)
    return std::unexpected(
        Failure("prepare \"" + std::string(std::string_view(sql).substr(0, 60)) + "\""));
  return Statement(this, stmt);
}

Error Connection::Failure(std::string_view what) const {
  return Error::Msg(path_ + ": " + std::string(what) + ": " + sqlite3_errmsg(db_) + IoCause());
}

// SQLite says only "disk I/O error"; the Env that refused the operation
// knows which file and which call.
std::string Connection::IoCause() const {
  std::optional<Error> cause = TakeEnvVfsError();
  if (!cause || (sqlite3_extended_errcode(db_) & 0xff) != SQLITE_IOERR) return {};
  return " (" + cause->message + ")";
}

Result<Transaction> Transaction::Begin(Connection& conn, TransactionKind kind) {
  CELLA_TRY(conn.Exec(kind == TransactionKind::kWrite ? "BEGIN IMMEDIATE" : "BEGIN"));
  return Transaction(&conn);
}

Status Transaction::Commit() {
  Connection* conn = std::exchange(conn_, nullptr);
  if (conn == nullptr) return Fail("commit: transaction already finished");
  Status st = conn->Exec("COMMIT");
  if (!st && !sqlite3_get_autocommit(conn->raw())) {
    // A failed COMMIT (e.g. SQLITE_BUSY) leaves the transaction open.
    Status rb = conn->Exec("ROLLBACK");
    if (!rb) log::Warn("rollback after failed commit failed", {{"error", rb.error().message}});
  }
  return st;
}

Transaction::~Transaction() {
  // Some errors (SQLITE_FULL, SQLITE_IOERR...) already rolled back.
  if (conn_ == nullptr || sqlite3_get_autocommit(conn_->raw())) return;
  if (Status rb = conn_->Exec("ROLLBACK"); !rb)
    log::Warn("transaction rollback failed", {{"error", rb.error().message}});
}

}  // namespace cella::store::sql
