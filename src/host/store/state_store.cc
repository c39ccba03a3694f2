// One piece (~740 lines) on purpose: every SQL statement of the state store
// and the transaction rules that make them safe across processes sit
// together, so a schema or rule change is reviewed in one place.
#include "host/store/state_store.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <nlohmann/json.hpp>

#include "base/env.h"
#include "host/store/sqlite_db.h"

namespace cella::store {
namespace {

using Json = nlohmann::json;
using sql::Transaction;
using sql::TransactionKind;

// A writer waits this long for another process's transaction before giving
// up; transactions here last milliseconds, so reaching it means a stuck
// process, not load.
constexpr int kBusyTimeoutMs = 10000;
constexpr size_t kIdLength = 32;
constexpr size_t kShortIdLength = 12;
constexpr size_t kMaxNameLength = 128;
// At most this many candidates are listed in an "ambiguous" error.
constexpr size_t kMaxAmbiguousListed = 5;

// Schema migrations: kMigrations[v] takes the database from user_version v
// to v + 1. Append only; never edit a step that has shipped.
constexpr std::array<const char*, 1> kMigrations = {
    // v0 -> v1
    "CREATE TABLE volumes("
    " name TEXT PRIMARY KEY,"
    " path TEXT NOT NULL,"
    " size_bytes INTEGER NOT NULL,"
    " created_ms INTEGER NOT NULL);"
    "CREATE TABLE sandboxes("
    " id TEXT PRIMARY KEY,"
    // NULL (not '') when unnamed: the unique index treats NULLs as distinct.
    " name TEXT,"
    " created_ms INTEGER NOT NULL,"
    " image TEXT NOT NULL,"
    " command_json TEXT NOT NULL,"
    " spec_json TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " exit_code INTEGER,"
    " reason TEXT NOT NULL,"
    " auto_remove INTEGER NOT NULL,"
    " supervisor_pid INTEGER NOT NULL,"
    " supervisor_start_ticks INTEGER NOT NULL,"
    " hypervisor_pid INTEGER NOT NULL,"
    " hypervisor_start_ticks INTEGER NOT NULL,"
    " ports_json TEXT NOT NULL,"
    " updated_ms INTEGER NOT NULL);"
    "CREATE UNIQUE INDEX sandboxes_name ON sandboxes(name);"
    "CREATE INDEX sandboxes_state ON sandboxes(state);"
    // A child table rather than JSON: conflict checks and "who uses this
    // volume" are joins, and the foreign key keeps a used volume's row.
    "CREATE TABLE volume_uses("
    " sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,"
    " position INTEGER NOT NULL,"
    " volume TEXT NOT NULL REFERENCES volumes(name),"
    " guest_path TEXT NOT NULL,"
    " mode TEXT NOT NULL CHECK(mode IN ('ro', 'rw', 'overlay')),"
    " PRIMARY KEY(sandbox_id, position));"
    "CREATE INDEX volume_uses_volume ON volume_uses(volume);"
    "CREATE TABLE history("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,"
    " at_ms INTEGER NOT NULL,"
    " state TEXT NOT NULL,"
    " detail TEXT NOT NULL);"
    "CREATE INDEX history_sandbox ON history(sandbox_id, seq);",
};
constexpr int64_t kSchemaVersion = static_cast<int64_t>(kMigrations.size());

constexpr const char* kSandboxColumns =
    "SELECT id, name, created_ms, image, command_json, spec_json, state, exit_code, reason, "
    "auto_remove, supervisor_pid, supervisor_start_ticks, hypervisor_pid, "
    "hypervisor_start_ticks, ports_json, updated_ms FROM sandboxes ";
constexpr const char* kActiveStatesSql = "('creating', 'running', 'paused', 'stopping')";

std::unexpected<Error> Refuse(int errno_value, std::string message) {
  return std::unexpected(Error{std::move(message), errno_value});
}

// Through the Env so a test can step the clock (history timestamps are
// clamped against it running backwards).
int64_t NowMs() { return cella::NowMs(Env::Current()); }

bool IsLowerHex(std::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

bool IsAlnum(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

// Docker's container/volume name rule; keeps names safe in paths and logs.
bool IsValidName(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength || !IsAlnum(name[0])) return false;
  return std::all_of(name.begin(), name.end(),
                     [](char c) { return IsAlnum(c) || c == '_' || c == '.' || c == '-'; });
}

Status CheckId(std::string_view id) {
  if (id.size() != kIdLength || !IsLowerHex(id))
    return Refuse(EINVAL, "invalid sandbox id \"" + std::string(id) + "\": want " +
                              std::to_string(kIdLength) + " lowercase hex digits");
  return {};
}

Status CheckVolumeUse(const VolumeUse& use) {
  CELLA_TRY(CheckVolumeName(use.volume));
  if (use.mode != "ro" && use.mode != "rw" && use.mode != "overlay")
    return Refuse(EINVAL, "volume \"" + use.volume + "\": invalid mode \"" + use.mode +
                              "\" (want ro, rw or overlay)");
  if (use.guest_path.empty() || use.guest_path[0] != '/')
    return Refuse(EINVAL, "volume \"" + use.volume + "\": guest path \"" + use.guest_path +
                              "\" is not absolute");
  return {};
}

std::string_view DescribeAttachment(std::string_view mode) {
  if (mode == "rw") return "read-write";
  if (mode == "ro") return "read-only";
  return "as an overlay base";
}

std::string NoSandbox(std::string_view ref) {
  return "no sandbox \"" + std::string(ref) + "\" (see cella ps -a)";
}

std::string NoVolume(std::string_view name) {
  return "no volume \"" + std::string(name) + "\" (create it with cella volume create " +
         std::string(name) + ")";
}

std::string LabelOf(std::string_view id, std::string_view name) {
  return name.empty() ? ShortId(id) : std::string(name);
}

std::string CommandToJson(const std::vector<std::string>& command) { return Json(command).dump(); }

std::string PortsToJson(const std::vector<PortPublish>& ports) {
  Json out = Json::array();
  for (const PortPublish& p : ports)
    out.push_back(
        {{"host_ip", p.host_ip}, {"host_port", p.host_port}, {"guest_port", p.guest_port}});
  return out.dump();
}

}  // namespace

std::string_view ToString(SandboxState state) {
  switch (state) {
    case SandboxState::kCreating:
      return "creating";
    case SandboxState::kRunning:
      return "running";
    case SandboxState::kStopping:
      return "stopping";
    case SandboxState::kStopped:
      return "stopped";
    case SandboxState::kExited:
      return "exited";
    case SandboxState::kFailed:
      return "failed";
    case SandboxState::kPaused:
      return "paused";
    case SandboxState::kStandby:
      return "standby";
  }
  return "unknown";
}

Result<SandboxState> ParseSandboxState(std::string_view text) {
  for (SandboxState s : {SandboxState::kCreating, SandboxState::kRunning, SandboxState::kStopping,
                         SandboxState::kStopped, SandboxState::kExited, SandboxState::kFailed,
                         SandboxState::kPaused, SandboxState::kStandby}) {
    if (ToString(s) == text) return s;
  }
  return Refuse(EINVAL,
                "unknown sandbox state \"" + std::string(text) +
                    "\" (want creating, running, paused, stopping, stopped, exited, failed or "
                    "standby)");
}

Status CheckVolumeName(std::string_view name) {
  if (!IsValidName(name))
    return Refuse(EINVAL, "invalid volume name \"" + std::string(name) +
                              "\": use letters, digits, '_', '.', '-' (starting with a letter or "
                              "digit), at most " +
                              std::to_string(kMaxNameLength) + " characters");
  return {};
}

bool IsActive(SandboxState state) {
  return state == SandboxState::kCreating || state == SandboxState::kRunning ||
         state == SandboxState::kPaused || state == SandboxState::kStopping;
}

bool IsTransitionAllowed(SandboxState from, SandboxState to) {
  using enum SandboxState;
  switch (from) {
    case kCreating:
      return to == kRunning || to == kFailed || to == kStopped;
    case kRunning:
      return to == kStopping || to == kExited || to == kFailed || to == kStopped || to == kPaused ||
             to == kStandby;
    case kPaused:
      return to == kRunning || to == kStopping || to == kExited || to == kFailed ||
             to == kStopped || to == kStandby;
    case kStandby:
      return to == kCreating || to == kStopped;
    case kStopping:
      return to == kStopped || to == kExited || to == kFailed;
    case kStopped:
    case kExited:
    case kFailed:
      return to == kCreating;
  }
  return false;
}

std::string ShortId(std::string_view id) { return std::string(id.substr(0, kShortIdLength)); }

std::string SandboxRecord::Label() const { return LabelOf(id, name); }

struct StateStore::Impl {
  std::unique_ptr<sql::Connection> db;

  Error Corrupt(const std::string& id, std::string_view what) const {
    return Error::Msg(db->path() + ": sandbox " + id + ": " + std::string(what));
  }

  Result<int64_t> UserVersion() {
    sql::Statement st = CELLA_TRY(db->Prepare("PRAGMA user_version"));
    if (!CELLA_TRY(st.Step())) return std::unexpected(db->Failure("PRAGMA user_version"));
    return st.Int(0);
  }

  Status Migrate() {
    // Most opens find the schema current and need no write lock.
    if (CELLA_TRY(UserVersion()) == kSchemaVersion) return {};
    Transaction txn = CELLA_TRY(Transaction::Begin(*db, TransactionKind::kWrite));
    // Re-read under the lock: another process may have migrated meanwhile.
    int64_t version = CELLA_TRY(UserVersion());
    if (version > kSchemaVersion || version < 0)
      return Fail(db->path() + ": written by a newer cella (schema version " +
                  std::to_string(version) + ", this cella knows up to " +
                  std::to_string(kSchemaVersion) + "); upgrade cella");
    for (; version < kSchemaVersion; ++version)
      CELLA_TRY_CTX(db->Exec(kMigrations[static_cast<size_t>(version)]),
                    "migrate schema to version " + std::to_string(version + 1));
    // PRAGMA takes no bound parameters; the value is our own constant.
    CELLA_TRY(db->Exec(("PRAGMA user_version = " + std::to_string(kSchemaVersion)).c_str()));
    return txn.Commit();
  }

  // Reads every row of a statement selecting kSandboxColumns, then each
  // row's volume uses.
  Result<std::vector<SandboxRecord>> ReadSandboxes(sql::Statement& st) {
    std::vector<SandboxRecord> out;
    while (CELLA_TRY(st.Step())) {
      SandboxRecord r;
      r.id = st.Text(0);
      r.name = st.Text(1);
      r.created_ms = st.Int(2);
      r.image = st.Text(3);
      const std::string command_json = st.Text(4);
      r.spec_json = st.Text(5);
      r.state = CELLA_TRY_CTX(ParseSandboxState(st.Text(6)), db->path() + ": sandbox " + r.id);
      if (!st.IsNull(7)) r.exit_code = static_cast<int>(st.Int(7));
      r.reason = st.Text(8);
      r.auto_remove = st.Int(9) != 0;
      r.supervisor = {static_cast<int>(st.Int(10)), static_cast<uint64_t>(st.Int(11))};
      r.hypervisor = {static_cast<int>(st.Int(12)), static_cast<uint64_t>(st.Int(13))};
      const std::string ports_json = st.Text(14);
      r.updated_ms = st.Int(15);
      try {
        r.command = Json::parse(command_json).get<std::vector<std::string>>();
      } catch (const Json::exception& e) {
        return std::unexpected(Corrupt(r.id, std::string("column command_json: ") + e.what()));
      }
      try {
        for (const Json& p : Json::parse(ports_json)) {
          r.ports.push_back({p.at("host_ip").get<std::string>(), p.at("host_port").get<uint16_t>(),
                             p.at("guest_port").get<uint16_t>()});
        }
      } catch (const Json::exception& e) {
        return std::unexpected(Corrupt(r.id, std::string("column ports_json: ") + e.what()));
      }
      out.push_back(std::move(r));
    }
    for (SandboxRecord& r : out) r.volumes = CELLA_TRY(ReadVolumeUses(r.id));
    return out;
  }

  Result<std::vector<VolumeUse>> ReadVolumeUses(const std::string& id) {
    sql::Statement st =
        CELLA_TRY(db->Prepare("SELECT volume, guest_path, mode FROM volume_uses WHERE sandbox_id = "
                              "?1 ORDER BY position"));
    CELLA_TRY(st.BindAll(id));
    std::vector<VolumeUse> out;
    while (CELLA_TRY(st.Step())) out.push_back({st.Text(0), st.Text(1), st.Text(2)});
    return out;
  }

  Result<std::optional<SandboxRecord>> FindBy(const char* where, std::string_view value) {
    sql::Statement st = CELLA_TRY(db->Prepare(std::string(kSandboxColumns) + where));
    CELLA_TRY(st.BindAll(value));
    std::vector<SandboxRecord> rows = CELLA_TRY(ReadSandboxes(st));
    if (rows.empty()) return std::nullopt;
    return std::move(rows.front());
  }

  Result<SandboxRecord> Require(const std::string& id) {
    std::optional<SandboxRecord> r = CELLA_TRY(FindBy("WHERE id = ?1", id));
    if (!r) return Refuse(ENOENT, NoSandbox(id));
    return std::move(*r);
  }

  Result<std::vector<SandboxRecord>> SelectActive() {
    sql::Statement st = CELLA_TRY(db->Prepare(std::string(kSandboxColumns) + "WHERE state IN " +
                                              kActiveStatesSql + " ORDER BY created_ms, rowid"));
    return ReadSandboxes(st);
  }

  Result<std::optional<VolumeRecord>> FindVolume(const std::string& name) {
    sql::Statement st = CELLA_TRY(
        db->Prepare("SELECT name, path, size_bytes, created_ms FROM volumes WHERE name = ?1"));
    CELLA_TRY(st.BindAll(name));
    if (!CELLA_TRY(st.Step())) return std::nullopt;
    return VolumeRecord{st.Text(0), st.Text(1), st.Int(2), st.Int(3)};
  }

  Status AppendHistory(const std::string& id, int64_t now, SandboxState state,
                       std::string_view detail) {
    // Clamped to the previous entry so history stays ordered when the real
    // time clock steps backwards.
    sql::Statement st = CELLA_TRY(db->Prepare(
        "INSERT INTO history(sandbox_id, at_ms, state, detail) VALUES(?1, "
        "MAX(?2, COALESCE((SELECT MAX(at_ms) FROM history WHERE sandbox_id = ?1), 0)), ?3, ?4)"));
    CELLA_TRY(st.BindAll(id, now, ToString(state), detail));
    return st.Run();
  }

  // The volume rule, checked against OTHER sandboxes in an active state: a
  // rw use conflicts with any other use; ro and overlay uses conflict only
  // with a rw use. Within one sandbox the same rule applies between its own
  // uses (two attachments of one disk image, one of them writable, would
  // corrupt it just the same).
  Status CheckVolumes(const std::string& self_id, const std::vector<VolumeUse>& uses) {
    for (size_t i = 0; i < uses.size(); ++i) {
      const VolumeUse& use = uses[i];
      CELLA_TRY(CheckVolumeUse(use));
      if (!CELLA_TRY(FindVolume(use.volume))) return Refuse(ENOENT, NoVolume(use.volume));
      for (size_t j = 0; j < i; ++j) {
        const VolumeUse& earlier = uses[j];
        if (earlier.volume == use.volume && (earlier.mode == "rw" || use.mode == "rw"))
          return Refuse(EBUSY, "volume \"" + use.volume + "\" is attached twice (at " +
                                   earlier.guest_path + " " + earlier.mode + " and " +
                                   use.guest_path + " " + use.mode +
                                   "); a read-write volume can be attached only once");
      }
      sql::Statement st = CELLA_TRY(
          db->Prepare(std::string("SELECT s.id, s.name, s.state, u.mode FROM volume_uses u "
                                  "JOIN sandboxes s ON s.id = u.sandbox_id "
                                  "WHERE u.volume = ?1 AND s.id <> ?2 AND s.state IN ") +
                      kActiveStatesSql + " ORDER BY s.created_ms, s.rowid, u.position"));
      CELLA_TRY(st.BindAll(use.volume, self_id));
      while (CELLA_TRY(st.Step())) {
        const std::string holder_mode = st.Text(3);
        if (use.mode != "rw" && holder_mode != "rw") continue;
        const std::string holder_id = st.Text(0);
        const std::string holder = LabelOf(holder_id, st.Text(1));
        std::string msg = "volume \"" + use.volume + "\" is attached ";
        msg += DescribeAttachment(holder_mode);
        msg += " to " + st.Text(2) + " sandbox " + holder + " (" + ShortId(holder_id) + ")";
        msg += "; attaching it " + use.mode + " needs it detached";
        msg += " (stop that sandbox: cella stop " + holder + ")";
        return Refuse(EBUSY, std::move(msg));
      }
    }
    return {};
  }

  Status SetProcess(const std::string& id, const char* update_sql, ProcessIdentity identity,
                    std::string_view role) {
    CELLA_TRY(CheckId(id));
    if (identity.pid < 0)
      return Refuse(EINVAL, "sandbox " + ShortId(id) + ": invalid " + std::string(role) + " pid " +
                                std::to_string(identity.pid));
    Transaction txn = CELLA_TRY(Transaction::Begin(*db, TransactionKind::kWrite));
    sql::Statement st = CELLA_TRY(db->Prepare(update_sql));
    CELLA_TRY(st.BindAll(id, identity.pid, static_cast<int64_t>(identity.start_ticks), NowMs()));
    CELLA_TRY(st.Run());
    if (db->Changes() == 0) return Refuse(ENOENT, NoSandbox(id));
    return txn.Commit();
  }
};

StateStore::StateStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StateStore::StateStore(StateStore&&) noexcept = default;
StateStore& StateStore::operator=(StateStore&&) noexcept = default;
StateStore::~StateStore() = default;

const std::string& StateStore::path() const { return impl_->db->path(); }

Result<StateStore> StateStore::Open(const std::string& db_path) {
  auto impl = std::make_unique<Impl>();
  impl->db = CELLA_TRY(sql::Connection::Open(db_path, kBusyTimeoutMs));
  CELLA_TRY(impl->Migrate());
  return StateStore(std::move(impl));
}

Status StateStore::Create(const SandboxRecord& record) {
  Impl& s = *impl_;
  CELLA_TRY(CheckId(record.id));
  if (!record.name.empty() && !IsValidName(record.name))
    return Refuse(EINVAL, "invalid sandbox name \"" + record.name +
                              "\": use letters, digits, '_', '.', '-' (starting with a letter or "
                              "digit), at most " +
                              std::to_string(kMaxNameLength) + " characters");
  if (record.state != SandboxState::kCreating)
    return Refuse(EINVAL, "sandbox " + record.Label() +
                              ": a new sandbox starts in state creating, not " +
                              std::string(ToString(record.state)));
  if (record.exit_code)
    return Refuse(EINVAL, "sandbox " + record.Label() + ": a new sandbox has no exit code");

  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  if (!record.name.empty()) {
    std::optional<SandboxRecord> holder = CELLA_TRY(s.FindBy("WHERE name = ?1", record.name));
    if (holder)
      return Refuse(EEXIST, "name \"" + record.name + "\" is already in use by sandbox " +
                                ShortId(holder->id) + "; remove it (cella rm " + record.name +
                                ") or choose another --name");
  }
  if (CELLA_TRY(s.FindBy("WHERE id = ?1", record.id)))
    return Refuse(EEXIST, "sandbox id " + record.id + " already exists");
  CELLA_TRY(s.CheckVolumes(record.id, record.volumes));

  const int64_t now = NowMs();
  sql::Statement insert = CELLA_TRY(s.db->Prepare(
      "INSERT INTO sandboxes(id, name, created_ms, image, command_json, spec_json, state, "
      "exit_code, reason, auto_remove, supervisor_pid, supervisor_start_ticks, hypervisor_pid, "
      "hypervisor_start_ticks, ports_json, updated_ms) "
      "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"));
  std::optional<std::string> name;
  if (!record.name.empty()) name = record.name;
  CELLA_TRY(insert.BindAll(
      record.id, name, record.created_ms != 0 ? record.created_ms : now, record.image,
      CommandToJson(record.command), record.spec_json, ToString(SandboxState::kCreating),
      record.reason, record.auto_remove ? 1 : 0, record.supervisor.pid,
      static_cast<int64_t>(record.supervisor.start_ticks), record.hypervisor.pid,
      static_cast<int64_t>(record.hypervisor.start_ticks), PortsToJson(record.ports), now));
  CELLA_TRY(insert.Run());
  for (size_t i = 0; i < record.volumes.size(); ++i) {
    const VolumeUse& use = record.volumes[i];
    sql::Statement st = CELLA_TRY(
        s.db->Prepare("INSERT INTO volume_uses(sandbox_id, position, volume, guest_path, mode) "
                      "VALUES(?1, ?2, ?3, ?4, ?5)"));
    CELLA_TRY(st.BindAll(record.id, static_cast<int64_t>(i), use.volume, use.guest_path, use.mode));
    CELLA_TRY(st.Run());
  }
  CELLA_TRY(s.AppendHistory(record.id, now, SandboxState::kCreating, "created"));
  return txn.Commit();
}

Result<SandboxRecord> StateStore::Resolve(std::string_view ref) {
  Impl& s = *impl_;
  if (ref.empty()) return Refuse(ENOENT, NoSandbox(ref));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kRead));
  if (ref.size() == kIdLength) {
    if (auto r = CELLA_TRY(s.FindBy("WHERE id = ?1", ref))) return std::move(*r);
  }
  if (auto r = CELLA_TRY(s.FindBy("WHERE name = ?1", ref))) return std::move(*r);
  if (ref.size() > kIdLength || !IsLowerHex(ref)) return Refuse(ENOENT, NoSandbox(ref));

  // substr rather than LIKE: no wildcard escaping to get wrong.
  sql::Statement st = CELLA_TRY(s.db->Prepare(
      "SELECT id FROM sandboxes WHERE substr(id, 1, ?2) = ?1 ORDER BY created_ms, rowid"));
  CELLA_TRY(st.BindAll(ref, static_cast<int64_t>(ref.size())));
  std::vector<std::string> ids;
  while (CELLA_TRY(st.Step())) ids.push_back(st.Text(0));
  if (ids.empty()) return Refuse(ENOENT, NoSandbox(ref));
  if (ids.size() == 1) return s.Require(ids.front());
  // Show enough of each id to tell them apart beyond what was typed.
  const size_t shown = std::clamp(ref.size() + 4, kShortIdLength, kIdLength);
  std::string list;
  for (size_t i = 0; i < ids.size() && i < kMaxAmbiguousListed; ++i) {
    if (i > 0) list += ", ";
    list += ids[i].substr(0, shown);
  }
  if (ids.size() > kMaxAmbiguousListed)
    list += " and " + std::to_string(ids.size() - kMaxAmbiguousListed) + " more";
  Error e = Error::Msg("\"" + std::string(ref) + "\" is ambiguous: it matches sandboxes " + list +
                       "; give more of the ID");
  e.errno_value = EINVAL;
  return std::unexpected(std::move(e));
}

Result<SandboxRecord> StateStore::Get(const std::string& id) {
  CELLA_TRY(CheckId(id));
  Transaction txn = CELLA_TRY(Transaction::Begin(*impl_->db, TransactionKind::kRead));
  return impl_->Require(id);
}

Result<std::vector<SandboxRecord>> StateStore::List(ListScope scope) {
  Impl& s = *impl_;
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kRead));
  if (scope == ListScope::kActiveOnly) return s.SelectActive();
  sql::Statement st =
      CELLA_TRY(s.db->Prepare(std::string(kSandboxColumns) + "ORDER BY created_ms, rowid"));
  return s.ReadSandboxes(st);
}

Result<std::vector<StateChange>> StateStore::History(const std::string& id) {
  Impl& s = *impl_;
  CELLA_TRY(CheckId(id));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kRead));
  sql::Statement st = CELLA_TRY(
      s.db->Prepare("SELECT at_ms, state, detail FROM history WHERE sandbox_id = ?1 ORDER BY seq"));
  CELLA_TRY(st.BindAll(id));
  std::vector<StateChange> out;
  while (CELLA_TRY(st.Step())) {
    SandboxState state =
        CELLA_TRY_CTX(ParseSandboxState(st.Text(1)), s.db->path() + ": history of " + id);
    out.push_back({st.Int(0), state, st.Text(2)});
  }
  if (out.empty()) {
    // Every sandbox has a "created" entry; none means no such sandbox.
    return Refuse(ENOENT, NoSandbox(id));
  }
  return out;
}

Status StateStore::Transition(const std::string& id, SandboxState to, const std::string& detail,
                              std::optional<int> exit_code,
                              std::optional<SandboxState> expected_from) {
  Impl& s = *impl_;
  CELLA_TRY(CheckId(id));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  SandboxRecord current = CELLA_TRY(s.Require(id));
  const std::string label = "sandbox " + current.Label();
  if (expected_from && current.state != *expected_from)
    return Refuse(ESTALE, label + " is " + std::string(ToString(current.state)) + ", not " +
                              std::string(ToString(*expected_from)) + "; not moving it to " +
                              std::string(ToString(to)));
  if (!IsTransitionAllowed(current.state, to))
    return Refuse(EPERM, label + " is " + std::string(ToString(current.state)) + "; cannot go to " +
                             std::string(ToString(to)));
  if (exit_code && to != SandboxState::kExited)
    return Refuse(EINVAL, label + ": an exit code is recorded only when it goes to exited, not " +
                              std::string(ToString(to)));

  const int64_t now = NowMs();
  if (to == SandboxState::kCreating) {
    CELLA_TRY(s.CheckVolumes(id, current.volumes));
    sql::Statement st = CELLA_TRY(s.db->Prepare(
        "UPDATE sandboxes SET state = ?2, exit_code = NULL, reason = '', supervisor_pid = 0, "
        "supervisor_start_ticks = 0, hypervisor_pid = 0, hypervisor_start_ticks = 0, "
        "updated_ms = ?3 WHERE id = ?1"));
    CELLA_TRY(st.BindAll(id, ToString(to), now));
    CELLA_TRY(st.Run());
  } else {
    sql::Statement st = CELLA_TRY(s.db->Prepare(
        "UPDATE sandboxes SET state = ?2, exit_code = ?3, reason = ?4, updated_ms = ?5 "
        "WHERE id = ?1"));
    CELLA_TRY(st.BindAll(id, ToString(to), exit_code, detail, now));
    CELLA_TRY(st.Run());
  }
  CELLA_TRY(s.AppendHistory(id, now, to, detail));
  return txn.Commit();
}

Status StateStore::SetSupervisor(const std::string& id, ProcessIdentity identity) {
  return impl_->SetProcess(id,
                           "UPDATE sandboxes SET supervisor_pid = ?2, supervisor_start_ticks = ?3, "
                           "updated_ms = ?4 WHERE id = ?1",
                           identity, "supervisor");
}

Status StateStore::SetHypervisor(const std::string& id, ProcessIdentity identity) {
  return impl_->SetProcess(id,
                           "UPDATE sandboxes SET hypervisor_pid = ?2, hypervisor_start_ticks = ?3, "
                           "updated_ms = ?4 WHERE id = ?1",
                           identity, "hypervisor");
}

Status StateStore::UpdateSpec(const std::string& id, const std::string& spec_json) {
  Impl& s = *impl_;
  CELLA_TRY(CheckId(id));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  // updated_ms is when the state was entered ("Up 5 minutes"): a spec edit
  // is not a state change.
  sql::Statement st = CELLA_TRY(s.db->Prepare("UPDATE sandboxes SET spec_json = ?2 WHERE id = ?1"));
  CELLA_TRY(st.BindAll(id, spec_json));
  CELLA_TRY(st.Run());
  if (s.db->Changes() == 0) return Refuse(ENOENT, NoSandbox(id));
  return txn.Commit();
}

Status StateStore::Rename(const std::string& id, const std::string& name) {
  Impl& s = *impl_;
  CELLA_TRY(CheckId(id));
  if (!IsValidName(name))
    return Refuse(EINVAL, "invalid sandbox name \"" + name +
                              "\": use letters, digits, '_', '.', '-' (starting with a letter or "
                              "digit), at most " +
                              std::to_string(kMaxNameLength) + " characters");
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  SandboxRecord current = CELLA_TRY(s.Require(id));
  if (current.name == name) return txn.Commit();
  std::optional<SandboxRecord> holder = CELLA_TRY(s.FindBy("WHERE name = ?1", name));
  if (holder)
    return Refuse(EEXIST,
                  "name \"" + name + "\" is already in use by sandbox " + ShortId(holder->id));
  // Like a spec edit, not a state change: updated_ms stays.
  sql::Statement st = CELLA_TRY(s.db->Prepare("UPDATE sandboxes SET name = ?2 WHERE id = ?1"));
  CELLA_TRY(st.BindAll(id, name));
  CELLA_TRY(st.Run());
  return txn.Commit();
}

Status StateStore::EditSpec(const std::string& id, const SpecEdit& edit) {
  Impl& s = *impl_;
  CELLA_TRY(CheckId(id));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  SandboxRecord current = CELLA_TRY(s.Require(id));
  std::string spec_json = CELLA_TRY(edit(current));
  sql::Statement st = CELLA_TRY(s.db->Prepare("UPDATE sandboxes SET spec_json = ?2 WHERE id = ?1"));
  CELLA_TRY(st.BindAll(id, spec_json));
  CELLA_TRY(st.Run());
  return txn.Commit();
}

Status StateStore::Remove(const std::string& id) {
  Impl& s = *impl_;
  CELLA_TRY(CheckId(id));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  // History and volume uses go with it (ON DELETE CASCADE).
  sql::Statement st = CELLA_TRY(s.db->Prepare("DELETE FROM sandboxes WHERE id = ?1"));
  CELLA_TRY(st.BindAll(id));
  CELLA_TRY(st.Run());
  if (s.db->Changes() == 0) return Refuse(ENOENT, NoSandbox(id));
  return txn.Commit();
}

Result<std::vector<SandboxRecord>> StateStore::Reconcile(
    const std::function<bool(const ProcessIdentity&)>& alive,
    std::chrono::milliseconds creating_grace,
    const std::function<bool(const SandboxRecord&)>& committed_standby) {
  Impl& s = *impl_;
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  std::vector<SandboxRecord> active = CELLA_TRY(s.SelectActive());
  const int64_t now = NowMs();
  std::vector<SandboxRecord> dead;
  for (SandboxRecord& r : active) {
    std::string reason;
    if (r.supervisor.pid != 0) {
      if (alive(r.supervisor)) continue;
      reason = "supervisor (pid " + std::to_string(r.supervisor.pid) + ") exited unexpectedly";
    } else if (r.state == SandboxState::kCreating) {
      // updated_ms is when it entered creating: SetSupervisor is the only
      // later change, and it sets a pid.
      if (now - r.updated_ms <= creating_grace.count()) continue;
      reason = "creation was interrupted: no supervisor started within " +
               std::to_string(creating_grace.count()) + " ms";
    } else {
      reason = "no supervisor recorded for a " + std::string(ToString(r.state)) + " sandbox";
    }
    // A supervisor killed between committing a standby snapshot and
    // recording it: the snapshot is the sandbox (its VM was frozen from the
    // save on, so the disks match it).
    SandboxState to = SandboxState::kFailed;
    if ((r.state == SandboxState::kRunning || r.state == SandboxState::kPaused) &&
        committed_standby && committed_standby(r)) {
      to = SandboxState::kStandby;
      reason = "standby (" + reason + " after the snapshot was committed)";
    }
    sql::Statement st = CELLA_TRY(s.db->Prepare(
        "UPDATE sandboxes SET state = ?4, exit_code = NULL, reason = ?2, updated_ms = ?3 "
        "WHERE id = ?1"));
    CELLA_TRY(st.BindAll(r.id, reason, now, std::string(ToString(to))));
    CELLA_TRY(st.Run());
    CELLA_TRY(s.AppendHistory(r.id, now, to, reason));
    dead.push_back(std::move(r));
  }
  CELLA_TRY(txn.Commit());
  return dead;
}

Status StateStore::CreateVolume(const VolumeRecord& volume) {
  Impl& s = *impl_;
  CELLA_TRY(CheckVolumeName(volume.name));
  if (volume.path.empty() || volume.path[0] != '/')
    return Refuse(EINVAL,
                  "volume \"" + volume.name + "\": path \"" + volume.path + "\" is not absolute");
  if (volume.size_bytes < 0)
    return Refuse(EINVAL, "volume \"" + volume.name + "\": negative size " +
                              std::to_string(volume.size_bytes));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  if (CELLA_TRY(s.FindVolume(volume.name)))
    return Refuse(EEXIST, "volume \"" + volume.name + "\" already exists");
  sql::Statement st = CELLA_TRY(s.db->Prepare(
      "INSERT INTO volumes(name, path, size_bytes, created_ms) VALUES(?1, ?2, ?3, ?4)"));
  CELLA_TRY(st.BindAll(volume.name, volume.path, volume.size_bytes,
                       volume.created_ms != 0 ? volume.created_ms : NowMs()));
  CELLA_TRY(st.Run());
  return txn.Commit();
}

Result<VolumeRecord> StateStore::GetVolume(const std::string& name) {
  CELLA_TRY(CheckVolumeName(name));
  std::optional<VolumeRecord> v = CELLA_TRY(impl_->FindVolume(name));
  if (!v) return Refuse(ENOENT, NoVolume(name));
  return std::move(*v);
}

Result<std::vector<VolumeRecord>> StateStore::ListVolumes() {
  sql::Statement st = CELLA_TRY(
      impl_->db->Prepare("SELECT name, path, size_bytes, created_ms FROM volumes ORDER BY name"));
  std::vector<VolumeRecord> out;
  while (CELLA_TRY(st.Step())) out.push_back({st.Text(0), st.Text(1), st.Int(2), st.Int(3)});
  return out;
}

Status StateStore::RemoveVolume(const std::string& name) {
  Impl& s = *impl_;
  CELLA_TRY(CheckVolumeName(name));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kWrite));
  if (!CELLA_TRY(s.FindVolume(name))) return Refuse(ENOENT, NoVolume(name));
  sql::Statement users = CELLA_TRY(s.db->Prepare(
      "SELECT DISTINCT s.id, s.name, s.created_ms FROM volume_uses u "
      "JOIN sandboxes s ON s.id = u.sandbox_id WHERE u.volume = ?1 ORDER BY s.created_ms, s.id"));
  CELLA_TRY(users.BindAll(name));
  std::string holders;
  std::string labels;
  size_t count = 0;
  while (CELLA_TRY(users.Step())) {
    const std::string id = users.Text(0);
    const std::string label = LabelOf(id, users.Text(1));
    if (count++ > 0) {
      holders += ", ";
      labels += " ";
    }
    holders += label + " (" + ShortId(id) + ")";
    labels += label;
  }
  if (count > 0)
    return Refuse(EBUSY, "volume \"" + name + "\" is in use by sandbox" +
                             (count > 1 ? "es " : " ") + holders + "; remove " +
                             (count > 1 ? "them" : "the sandbox") + " first (cella rm " + labels +
                             ")");
  sql::Statement del = CELLA_TRY(s.db->Prepare("DELETE FROM volumes WHERE name = ?1"));
  CELLA_TRY(del.BindAll(name));
  CELLA_TRY(del.Run());
  return txn.Commit();
}

Result<std::vector<std::pair<std::string, VolumeUse>>> StateStore::VolumeUsers(
    const std::string& name) {
  Impl& s = *impl_;
  CELLA_TRY(CheckVolumeName(name));
  Transaction txn = CELLA_TRY(Transaction::Begin(*s.db, TransactionKind::kRead));
  if (!CELLA_TRY(s.FindVolume(name))) return Refuse(ENOENT, NoVolume(name));
  sql::Statement st = CELLA_TRY(
      s.db->Prepare("SELECT u.sandbox_id, u.volume, u.guest_path, u.mode FROM volume_uses u "
                    "JOIN sandboxes s ON s.id = u.sandbox_id WHERE u.volume = ?1 "
                    "ORDER BY s.created_ms, s.rowid, u.position"));
  CELLA_TRY(st.BindAll(name));
  std::vector<std::pair<std::string, VolumeUse>> out;
  while (CELLA_TRY(st.Step()))
    out.emplace_back(st.Text(0), VolumeUse{st.Text(1), st.Text(2), st.Text(3)});
  return out;
}

}  // namespace cella::store
