// Persistent state of long-lived sandboxes and named volumes, in SQLite.
//
// cella has no daemon: every CLI call and every sandbox supervisor opens the
// store, reads or changes it in short transactions, and reconciles it with
// the processes that actually exist (Reconcile). Each multi-step change runs
// in one BEGIN IMMEDIATE transaction, so concurrent processes see either all
// of it or none, and check-then-write races (two `run --name web` at once,
// two sandboxes grabbing one read-write volume) cannot slip through.
//
// Threads: a StateStore is one SQLite connection; use it from one thread at
// a time. Processes: any number may open the same database at once. Open a
// fresh StateStore after fork(); never use one inherited from the parent.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/result.h"
#include "host/store/process_identity.h"

namespace cella::store {

// Lifecycle:
//   creating -> running | failed | stopped
//   running  -> stopping | exited | failed | stopped | paused | standby
//   paused   -> running | stopping | exited | failed | stopped | standby
//   stopping -> stopped | exited | failed
//   stopped | exited | failed -> creating   (a restart)
//   standby  -> creating (a resume) | stopped (its snapshot discarded)
// paused: the vCPUs are frozen, the supervisor and QEMU live on (active).
// standby: the whole machine is in a snapshot in the sandbox's directory;
// no process runs (not active).
enum class SandboxState {
  kCreating,
  kRunning,
  kStopping,
  kStopped,
  kExited,
  kFailed,
  kPaused,
  kStandby
};

std::string_view ToString(SandboxState state);  // "creating", "running", ...
Result<SandboxState> ParseSandboxState(std::string_view text);
// Active = a supervisor is expected to be alive: creating, running, paused,
// stopping.
bool IsActive(SandboxState state);
// Docker's name rule, the one place it lives: letters, digits, '_', '.', '-',
// starting with a letter or digit, at most 128 characters. EINVAL otherwise.
Status CheckVolumeName(std::string_view name);
bool IsTransitionAllowed(SandboxState from, SandboxState to);

// How a sandbox attaches a named volume. mode: "ro" | "rw" | "overlay"
// (overlay: the volume is a read-only lower layer with a throwaway upper).
struct VolumeUse {
  std::string volume;
  std::string guest_path;  // absolute
  std::string mode;
  bool operator==(const VolumeUse&) const = default;
};

struct PortPublish {
  std::string host_ip;  // may be empty (the CLI's default address)
  uint16_t host_port = 0;
  uint16_t guest_port = 0;
  bool operator==(const PortPublish&) const = default;
};

struct SandboxRecord {
  std::string id;          // 32 lowercase hex
  std::string name;        // may be empty; else [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 bytes
  int64_t created_ms = 0;  // 0 in Create = now
  std::string image;       // reference as the user gave it; empty = built-in image
  std::vector<std::string> command;
  std::string spec_json;  // opaque to the store: what the supervisor needs to boot it again
  SandboxState state = SandboxState::kCreating;
  std::optional<int> exit_code;  // exited only
  // Detail of the latest transition: why it failed (failed), or e.g. what
  // stopped it. Cleared by a restart.
  std::string reason;
  bool auto_remove = false;    // --rm: the CLI removes it once it is no longer active
  ProcessIdentity supervisor;  // pid 0 when none; meaningful only while active
  ProcessIdentity hypervisor;  // QEMU; pid 0 when none; meaningful only while active
  std::vector<VolumeUse> volumes;
  std::vector<PortPublish> ports;
  int64_t updated_ms = 0;  // set by the store on every change

  // Name when it has one, else the 12-character short id; for messages.
  std::string Label() const;
};

struct StateChange {
  int64_t at_ms = 0;  // never earlier than the entry before it
  SandboxState state = SandboxState::kCreating;
  std::string detail;
};

struct VolumeRecord {
  std::string name;  // [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 bytes
  std::string path;  // absolute path of the disk image
  int64_t size_bytes = 0;
  int64_t created_ms = 0;  // 0 in CreateVolume = now
};

enum class ListScope { kActiveOnly, kAll };

// First 12 characters of an id, as shown by ps.
std::string ShortId(std::string_view id);

// Error meanings, in Error::errno_value (messages are for people):
//   ENOENT  no such sandbox / volume
//   EEXIST  name or volume name taken
//   EBUSY   volume conflict, volume in use
//   ESTALE  Transition's expected_from did not match the current state
//   EPERM   transition not allowed from the current state
//   EINVAL  malformed input (id, name, mode, path...)
//   0       database trouble (the message names the path and SQLite's reason)
class StateStore {
 public:
  // Creates the schema on first use (PRAGMA user_version tracks migrations),
  // WAL, busy_timeout 10 s (a writer waits for another rather than failing
  // with "database is locked"), foreign keys on. The directory must exist.
  static Result<StateStore> Open(const std::string& db_path);

  StateStore(StateStore&&) noexcept;
  StateStore& operator=(StateStore&&) noexcept;
  ~StateStore();

  const std::string& path() const;

  // Inserts the record in state creating with one history entry ("created").
  // Refuses a taken name (naming the holder and what to do), unknown volumes
  // and volume conflicts with active sandboxes, all in one transaction.
  Status Create(const SandboxRecord& record);

  // Finds a sandbox by full id, exact name, or unique id prefix, in that
  // order of precedence.
  Result<SandboxRecord> Resolve(std::string_view ref);
  Result<SandboxRecord> Get(const std::string& id);
  Result<std::vector<SandboxRecord>> List(ListScope scope);         // oldest first
  Result<std::vector<StateChange>> History(const std::string& id);  // oldest first

  // Moves a sandbox to `to` and records it in its history, atomically.
  // `expected_from`: fail (ESTALE) when the current state differs, so a
  // writer acting on what it read earlier cannot overwrite a newer change.
  // `exit_code` only with to == exited. `detail` becomes the record's
  // reason. A restart (to creating) re-checks volume conflicts and clears
  // exit_code, reason and both process identities.
  Status Transition(const std::string& id, SandboxState to, const std::string& detail = {},
                    std::optional<int> exit_code = std::nullopt,
                    std::optional<SandboxState> expected_from = std::nullopt);
  Status SetSupervisor(const std::string& id, ProcessIdentity identity);
  Status SetHypervisor(const std::string& id, ProcessIdentity identity);
  // Replaces the recorded spec (e.g. a runtime allow-list change, so a
  // restart keeps it). Touches neither the state, its history nor its age.
  Status UpdateSpec(const std::string& id, const std::string& spec_json);
  // Read-modify-write of the spec in one write transaction: `edit` sees the
  // record as it is now and returns the new spec, or an error that leaves
  // the record unchanged. Concurrent edits are serialized, none lost.
  using SpecEdit = std::function<Result<std::string>(const SandboxRecord& current)>;
  // `cella rename`: a new (valid, untaken) name, in any state; refuses a
  // name another sandbox holds (EEXIST).
  Status Rename(const std::string& id, const std::string& name);
  Status EditSpec(const std::string& id, const SpecEdit& edit);
  // Deletes the record, its history and its volume uses, whatever its
  // state: stopping processes first is the caller's job.
  Status Remove(const std::string& id);

  // For every active sandbox whose supervisor is not alive (per `alive`),
  // moves it to failed with reason "supervisor (pid N) exited unexpectedly",
  // and returns those records as they were before, so the caller can kill a
  // leftover hypervisor and clean up files. A creating sandbox with no
  // supervisor recorded counts as dead once it has been creating for longer
  // than `creating_grace` (the CLI died before spawning one); a running or
  // stopping one with none counts as dead at once. `alive` runs inside the
  // write transaction: keep it quick, and it must not use this store.
  // A running or paused one whose `committed_standby` says its standby
  // snapshot was committed (its supervisor died between the commit and
  // recording standby) becomes standby instead, resumable; it is still
  // returned, as it was (its leftover processes and files need the same
  // cleanup). `committed_standby` also runs inside the transaction.
  Result<std::vector<SandboxRecord>> Reconcile(
      const std::function<bool(const ProcessIdentity&)>& alive,
      std::chrono::milliseconds creating_grace,
      const std::function<bool(const SandboxRecord&)>& committed_standby = {});

  Status CreateVolume(const VolumeRecord& volume);
  Result<VolumeRecord> GetVolume(const std::string& name);
  Result<std::vector<VolumeRecord>> ListVolumes();  // by name
  // Refused while any sandbox, active or not, uses the volume.
  Status RemoveVolume(const std::string& name);
  // Sandbox ids using the volume, with how; oldest sandbox first.
  Result<std::vector<std::pair<std::string, VolumeUse>>> VolumeUsers(const std::string& name);

 private:
  struct Impl;
  explicit StateStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cella::store
