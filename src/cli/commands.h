// The `cella` subcommands. Each returns the process exit code: the guest's
// own code for `run`, docker's 125 for cella's own failures.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"

namespace cella::cli {

inline constexpr int kExitCellaError = 125;
// The name users type for the built-in busybox image (`cella run @builtin sh`).
// A registry reference cannot start with '@', so no image can ever take it.
inline constexpr const char* kBuiltinImage = "@builtin";

struct RunArgs {
  std::vector<std::string> command;  // empty = the image's default
  // What the parser collected: IMAGE [COMMAND [ARG...]], split by main.cc.
  std::vector<std::string> words;
  // --entrypoint: replaces the image's ENTRYPOINT and clears its CMD; "" = none.
  std::optional<std::string> entrypoint;
  std::vector<std::string> env_items;
  std::vector<std::string> env_files;
  std::string workdir;
  std::string user;
  bool cold = false;   // --cold: no warm start from a template
  std::string cpus;    // raw text, parsed by ParseCpus
  std::string memory;  // raw text, parsed by ParseMemoryMiB
  std::string hostname;
  std::vector<std::string> dns;
  std::vector<std::string> add_hosts;
  int mtu = 0;
  bool no_network = false;
  bool privileged = false;
  bool interactive = false;
  std::string kernel;
  std::string accel = "auto";
  // --image: an image reference (pulled when missing); empty = built-in image.
  std::string image;
  std::string platform;
  std::string pull = "missing";  // --pull always|missing|never (docker's)
  std::vector<std::string> insecure_registries;
  std::string ca_file;
  int boot_timeout_s = 120;
  // Lifecycle: -d prints the ID and leaves the sandbox running; foreground
  // runs are always removed at the end (--rm), detached ones only with --rm.
  bool detach = false;
  bool rm = false;
  // --restart no|on-failure[:N]|always|unless-stopped (sandbox/spec.h
  // RestartPolicy); needs -d and excludes --rm, as docker's excludes --rm.
  std::string restart = "no";
  bool tty = false;
  std::string name;
  std::vector<std::string> publish;  // -p [IP:]HOST:GUEST
  std::vector<std::string> volumes;  // -v NAME:/path[:ro|rw|overlay]
  std::string disk_size;             // writable layer size (--disk-size)
  std::string log_max_size;          // --log-max-size (each log file's cap)
  std::vector<std::string> labels;   // --label K[=V]
  bool read_only = false;            // --read-only: no writable layer
  std::vector<std::string> tmpfs;    // --tmpfs PATH[:size=N]
  // Egress: every sandbox with a network gets the sealed one; these make its
  // policy (PlanNetwork in cli/run_options.h).
  std::vector<std::string> allow_hosts;  // --allow-host (repeatable, comma lists)
  bool allow_private = false;
  bool allow_host_loopback = false;  // 10.0.2.2 reaches the host's 127.0.0.1
  bool network_intercept = false;
  std::vector<std::string> secrets;   // --secret NAME@host[,host] | NAME=VALUE@host
  std::vector<std::string> resolves;  // --resolve NAME:PORT:ADDR[:PORT]
  std::string upstream_ca;            // --upstream-ca FILE
  // Set by `cella rpc`, not by flags: no_main runs no main process (the
  // image's entrypoint included) and keeps the VM up for exec; keep_alive
  // keeps it up after the main process ends.
  bool no_main = false;
  bool keep_alive = false;
};

struct ExecArgs {
  std::string sandbox;
  std::vector<std::string> command;
  bool interactive = false;
  bool tty = false;
  bool detach = false;  // -d: start it and return; its output is discarded
  std::vector<std::string> env_items;
  std::string workdir;
  std::string user;
};

struct LogsArgs {
  std::string sandbox;
  bool follow = false;
  int tail = -1;  // -1: everything
  bool console = false;
  std::string since;  // docker's forms: RFC 3339, a date, Unix seconds, a duration (10m)
  std::string until;
  bool timestamps = false;  // -t: each line prefixed with its RFC 3339 nano time
};

// kQuiet: one short ID a line, for `cella rm -f $(cella ps -aq)`.
enum class ListFormat { kText, kJson, kQuiet };

int RunCommand(const RunArgs& args);
int ExecCommand(const ExecArgs& args);
// `filters`: docker's --filter KEY=VALUE, KEY one of label (KEY or KEY=VALUE;
// several must all match), name (substring), id (prefix), status (a state;
// lists stopped ones too); values of one key are alternatives.
int PsCommand(bool all, ListFormat format, const std::vector<std::string>& filters = {});
// ps --format TEMPLATE (cli/format_template.h): docker's fields .ID .Names
// .Image .Command .CreatedAt .RunningFor .Ports .State .Status, and more.
int PsFormatCommand(bool all, const std::string& format,
                    const std::vector<std::string>& filters = {});
// docker wait: blocks until each sandbox ends, prints its exit code (0 when
// it stopped without one).
int WaitCommand(const std::vector<std::string>& refs);
// `cella stats [--no-stream] [--json] [SANDBOX...]`: CPU, memory and block
// I/O of running sandboxes from the host side (stats_command.cc says what
// each number means); every running one when none is named.
int StatsCommand(const std::vector<std::string>& refs, bool no_stream, bool json);
// `cella events [--since WHEN] [--until WHEN]`: state changes of every
// sandbox as JSON lines {time_ms,id,name,image,state,detail} (state
// "removed" when a record goes); WHEN is a duration before now (10m, 30s,
// 2h) or Unix seconds. Without --until it follows until interrupted.
int EventsCommand(const std::string& since, const std::string& until);
// `cella attach SANDBOX`: follows a running sandbox's main process output
// from now on until the sandbox ends, then exits with its exit code (stdin
// is not forwarded: docker's attach --no-stdin).
int AttachCommand(const std::string& ref);
// `cella rename SANDBOX NEW_NAME`, in any state (docker's).
int RenameCommand(const std::string& ref, const std::string& new_name);
// `cella top SANDBOX [ps OPTIONS]`: the guest's `ps -ef` (or ps with the
// given options), run as root in the guest.
int TopCommand(const std::string& ref, const std::vector<std::string>& ps_args);
// `format` empty: the JSON array; else one rendered line per sandbox, with
// docker's .Id .Name .State.Status .State.ExitCode .Config.Image ... beside
// cella's own fields.
int InspectCommand(const std::vector<std::string>& refs, const std::string& format = {});
int LogsCommand(const LogsArgs& args);
int StopCommand(const std::vector<std::string>& refs, int grace_seconds);
int StartCommand(const std::vector<std::string>& refs);
// docker restart: stops each sandbox (killed after the grace) and boots it
// again; a stopped one is just started, a standby one loses its memory.
int RestartCommand(const std::vector<std::string>& refs, int grace_seconds);
// docker port: a running sandbox's published ports, "GUEST/tcp -> IP:HOST"
// a line; with a guest port ("80" or "80/tcp"), only its "IP:HOST" lines,
// and a failure when it is not published.
int PortCommand(const std::string& ref, const std::string& guest_port);
int KillCommand(const std::vector<std::string>& refs);
// Freeze / thaw the vCPUs of running sandboxes (memory stays; exec and cp
// are refused while paused).
int PauseCommand(const std::vector<std::string>& refs);
int UnpauseCommand(const std::vector<std::string>& refs);
// The whole machine to a snapshot in the sandbox's directory; QEMU and the
// supervisor exit. `resume` (or `start`) brings it back where it was.
int StandbyCommand(const std::vector<std::string>& refs);
int ResumeCommand(const std::vector<std::string>& refs);
// Named snapshots (snapshot_commands.cc): create from a running sandbox
// (frozen only while saved), list, remove, restore into a new sandbox.
int SnapshotCreateCommand(const std::string& sandbox_ref, const std::string& name);
int SnapshotLsCommand(ListFormat format);
int SnapshotRmCommand(const std::vector<std::string>& names);
int SnapshotRestoreCommand(const std::string& snapshot, const std::string& new_name);
// Memory templates (template_commands.cc): list, remove, build ahead of
// time (the shape of a foreground `cella run` with the same flags).
int TemplateLsCommand(ListFormat format);
int TemplateRmCommand(const std::vector<std::string>& keys, bool all);
int TemplateCreateCommand(RunArgs args);
// cella fork ID [--count N] [--name PREFIX] [--json]: prints the new IDs,
// one per line, or {"ids":[...]}.
int ForkCommand(const std::string& sandbox_ref, int count, const std::string& name_prefix,
                bool json_output);
// `volumes` (-v): the sandbox's anonymous volumes go with it, as docker's.
int RmCommand(const std::vector<std::string>& refs, bool force, bool volumes);
int PruneCommand();
// Without `archive`, copied entries belong to the copier (root in the
// guest, the caller on the host) and lose setuid/setgid bits (docker cp).
int CpCommand(const std::string& source, const std::string& destination, bool archive);
int PortForwardCommand(const std::string& sandbox, const std::string& mapping);
// A bare number for `size` is MB (matchlock's CLI); --json prints
// {"name","size","path"} with size as "N.0 MB", as matchlock's SDKs parse.
int VolumeCreateCommand(const std::string& name, const std::string& size, ListFormat format);
int VolumeLsCommand(ListFormat format);
int VolumeRmCommand(const std::vector<std::string>& names);
enum class AllowListOp { kAdd, kRemove, kList };
int AllowListCommand(AllowListOp op, const std::string& sandbox,
                     const std::vector<std::string>& hosts);
// matchlock's JSON-RPC on stdin/stdout, one sandbox owned by this process.
int RpcCommand();
// Removes an rpc process's sandbox once that process is gone (rpc_command.cc).
int RpcReaperCommand();
int SuperviseCommand(const std::string& id, int ready_fd, bool client_attaches, bool resume,
                     bool restarted);
// cella's own failure: one line on stderr, docker's exit code 125.
int ReportFailure(const Error& error);
int DiagnoseCommand(bool json);
int VersionCommand();

}  // namespace cella::cli
