// What every sandbox command starts with: the sandbox home, the state store
// reconciled with the processes that really exist, and helpers to find a
// sandbox and reach its supervisor.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/agent/client.h"
#include "host/sandbox/layout.h"
#include "host/sandbox/spec.h"
#include "host/store/state_store.h"

namespace cella::cli {

struct SandboxContext {
  std::string home;  // sandbox home (host/sandbox/layout.h)
  store::StateStore store;
};

// Opens the store and reconciles it: sandboxes whose supervisor is gone are
// marked failed, their leftover QEMU is killed and their sockets removed;
// --rm sandboxes among them are removed entirely.
Result<SandboxContext> OpenSandboxes();

// Kills whatever processes a record names (identity-checked, so a reused pid
// is never hit) and removes its directory and record.
// With `volumes`, or for a sandbox removed automatically (record.auto_remove:
// --rm, foreground, rpc), its anonymous volumes (`run -v /path`) go too.
Status RemoveSandboxCompletely(SandboxContext& ctx, const store::SandboxRecord& record,
                               bool volumes = false);

// The record must be running; the error says what state it is in and what
// to do.
Status RequireRunning(const store::SandboxRecord& record, std::string_view for_what);

// The secret values a restart (start, resume, fork) hands its supervisor,
// as JSON {NAME: value}: never stored, so taken from this process's
// environment (secrets given as NAME@host); a secret given as NAME=VALUE
// cannot be had again and is an error naming it.
Result<std::string> SecretsForRestart(const sandbox::SandboxSpec& spec,
                                      const store::SandboxRecord& record);

// Forks a running sandbox (snapshot_commands.cc): its state is saved (the
// source frozen only for that and the copy of its disks, then running on)
// and `count` new sandboxes resume from it in parallel, each with its own
// ID, name (`name_prefix`-1..N, or none), copies of the disks, network and
// the source's egress policy. Returns their IDs once all are running; on
// any failure (or SIGINT/SIGTERM/SIGHUP, held back meanwhile) removes every
// copy it made and its snapshot, and returns the error.
inline constexpr int kMaxForkCount = 32;
Result<std::vector<std::string>> ForkSandbox(const std::string& sandbox_ref, int count,
                                             const std::string& name_prefix);

// An agent client through the supervisor's router (mux.sock).
Result<std::unique_ptr<host::AgentClient>> ConnectAgent(const SandboxContext& ctx,
                                                        const store::SandboxRecord& record);

// Creates a sandbox from `args` as `run` does, with its main process (if
// any) started by the supervisor, and returns its ID once it is running.
// It is removed when it stops (a foreground run's lifecycle) but nobody
// attaches: `cella rpc` owns it and stops it. (Defined with `run`.)
// `on_record` runs once the sandbox has an ID and a record, before its
// supervisor starts (so an owner can arrange its removal first); its error
// removes the sandbox and is returned.
struct RunArgs;
Result<std::string> StartOwnedSandbox(
    const RunArgs& args, SandboxContext& ctx,
    const std::function<Status(const std::string&)>& on_record = nullptr);

// Waits (bounded) for the supervisor to record the end and remove an
// auto-removed sandbox, and removes it itself if the supervisor could not.
void FinishForegroundRun(SandboxContext& ctx, const std::string& id);

// Makes the volume's sparse ext4 image and records it; refuses bad or taken
// names. (Defined with `run`, which creates volumes on first use.)
Status CreateVolume(SandboxContext& ctx, const std::string& name, uint64_t size_bytes);

// A sandbox `cella rpc` removed on `close` (or at the end of its stdin)
// leaves a marker under <home>/rpc-removed/ so that a later `cella rm ID` by
// its full ID succeeds: matchlock's SDKs call `rm ID` after `close`, as
// matchlock keeps a closed VM until then, and fail when it does. Markers
// older than a day are dropped whenever a new one is written.
void RecordRpcRemoval(const SandboxContext& ctx, const std::string& id);
// True (and the marker is gone) when `ref` is the full ID of such a sandbox.
bool ForgetRpcRemoval(const SandboxContext& ctx, const std::string& ref);

// "Up 3 minutes", "Exited (0) 2 hours ago", "Failed: reason"...
std::string DescribeStatus(const store::SandboxRecord& record, int64_t now_ms);
std::string DescribeAge(int64_t then_ms, int64_t now_ms);  // "3 minutes"
int64_t NowMs();

}  // namespace cella::cli
