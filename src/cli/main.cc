// `cella`: runs OCI images as microVM sandboxes. The CLI only parses
// arguments and hands them to the commands; exceptions from CLI11 stop here.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "base/log.h"
#include "cli/commands.h"
#include "cli/image_commands.h"

namespace {

int Main(int argc, char** argv) {
  using cella::cli::kExitCellaError;
  CLI::App app{"cella: run OCI images as microVM sandboxes", "cella"};
  app.require_subcommand(1);
  bool debug = false;
  app.add_flag("--debug", debug, "Verbose structured logs on stderr");

  cella::cli::RunArgs run;
  CLI::App* run_cmd =
      app.add_subcommand("run", "Boot a sandbox, run a command in it, and exit with its code");
  run_cmd->add_option("-e,--env", run.env_items,
                      "Set an environment variable (KEY=VALUE, or KEY to pass the host's)");
  run_cmd->add_option("--env-file", run.env_files, "Read environment variables from a file");
  run_cmd->add_option("-w,--workdir", run.workdir, "Working directory inside the sandbox");
  run_cmd->add_option("-u,--user", run.user, "User to run as (name, uid, uid:gid)");
  run_cmd->add_option("--cpus", run.cpus, "Number of CPUs (fractional allowed, e.g. 1.5)");
  run_cmd->add_option("-m,--memory", run.memory, "Memory (e.g. 512m, 2g)");
  run_cmd->add_option("--hostname", run.hostname, "Guest hostname (default: the sandbox ID)");
  run_cmd->add_option("--dns", run.dns,
                      "DNS server (IP) cella's resolver asks for the guest (repeatable)");
  run_cmd->add_option("--add-host", run.add_hosts, "Add an /etc/hosts entry (HOST:IP)");
  run_cmd->add_option("--mtu", run.mtu, "Guest interface MTU")->check(CLI::Range(576, 65535));
  run_cmd->add_flag("--no-network", run.no_network, "No network interface at all (only lo)");
  run_cmd->add_flag("--privileged", run.privileged,
                    "Skip in-guest hardening (seccomp, capability drop, no_new_privs)");
  run_cmd->add_flag("-i,--interactive", run.interactive, "Forward stdin to the command");
  run_cmd->add_option("--kernel", run.kernel,
                      "Boot this kernel image instead of the cached default");
  run_cmd->add_option("--accel", run.accel, "Accelerator: auto, kvm or tcg")
      ->check(CLI::IsMember({"auto", "kvm", "tcg"}));
  run_cmd->add_option("--boot-timeout", run.boot_timeout_s, "Seconds to wait for the guest agent")
      ->check(CLI::Range(1, 3600));
  run_cmd->add_option("--image", run.image,
                      "Image to run (pulled when missing; default: built-in busybox)");
  run_cmd->add_option("--platform", run.platform,
                      "Platform to pull for --image (os/arch[/variant])");
  run_cmd->add_option(
      "--insecure-registry", run.insecure_registries,
      "Registry host[:port] reachable over plain HTTP or unverified TLS (repeatable)");
  run_cmd->add_option("--ca-file", run.ca_file,
                      "PEM CA bundle for registry TLS instead of the system CAs");
  run_cmd->add_flag("-d,--detach", run.detach, "Run in the background and print the sandbox ID");
  run_cmd->add_flag("--rm", run.rm,
                    "Remove the sandbox when it ends (always so for foreground runs)");
  run_cmd->add_flag("-t,--tty", run.tty, "Give the command a pseudo-terminal");
  run_cmd->add_option("--name", run.name, "Name the sandbox");
  run_cmd->add_option("-p,--publish", run.publish,
                      "Publish a guest TCP port: [IP:]HOST:GUEST (IP defaults to 127.0.0.1)");
  run_cmd->add_option("-v,--volume", run.volumes,
                      "Attach a named volume: NAME:/path[:ro|rw|overlay] (created when missing)");
  run_cmd->add_option("--disk-size", run.disk_size,
                      "Size of the writable layer (sparse; default 8g for -d, RAM otherwise)");
  run_cmd->add_option("--log-max-size", run.log_max_size,
                      "Cap on each log file (output, console), one older file kept (default 64m)");
  run_cmd->add_option("--allow-host", run.allow_hosts,
                      "Allow only these hosts (repeatable, a,b lists, *.globs, IPs); default: "
                      "every public host");
  run_cmd->add_flag("--allow-private", run.allow_private,
                    "Also allow private, link-local and special addresses (the host's LAN)");
  run_cmd->add_flag("--allow-host-loopback", run.allow_host_loopback,
                    "Let 10.0.2.2 reach the host's 127.0.0.1 (closed by default)");
  run_cmd->add_flag("--network-intercept", run.network_intercept,
                    "Pass all traffic through the TLS-intercepting proxy (no list: all hosts)");
  run_cmd->add_option("--secret", run.secrets,
                      "NAME@host[,host] (value from the host env) or NAME=VALUE@host: the guest "
                      "sees a placeholder, the proxy sends the value to those hosts only");
  run_cmd->add_option("--resolve", run.resolves,
                      "Pin an upstream: NAME:PORT:ADDR[:PORT] (like curl --resolve)");
  run_cmd->add_option("--upstream-ca", run.upstream_ca,
                      "PEM CA bundle to verify upstream TLS instead of the host's trust store");
  run_cmd->add_option("command", run.command, "Command and arguments (after --)");
  run_cmd->positionals_at_end(true);

  bool diagnose_json = false;
  CLI::App* diagnose_cmd =
      app.add_subcommand("diagnose", "Report what this host offers and what cella chose");
  diagnose_cmd->add_flag("--json", diagnose_json, "Machine-readable output");
  CLI::App* version_cmd = app.add_subcommand("version", "Print the version");

  cella::cli::PullArgs pull;
  CLI::App* pull_cmd =
      app.add_subcommand("pull", "Fetch an image into the local store; prints its manifest digest");
  pull_cmd->add_option("--platform", pull.platform,
                       "Platform to pick from a multi-platform image (os/arch[/variant])");
  pull_cmd->add_option(
      "--insecure-registry", pull.registry.insecure_registries,
      "Registry host[:port] reachable over plain HTTP or unverified TLS (repeatable)");
  pull_cmd->add_option("--ca-file", pull.registry.ca_file,
                       "PEM CA bundle for registry TLS instead of the system CAs");
  pull_cmd->add_option("reference", pull.reference, "Image reference")->required();

  bool images_json = false;
  CLI::App* images_cmd = app.add_subcommand("images", "List stored images");
  images_cmd->add_flag("--json", images_json, "Machine-readable output");

  std::vector<std::string> rmi_refs;
  CLI::App* rmi_cmd =
      app.add_subcommand("rmi", "Remove image references (blobs go with `cella image gc`)");
  rmi_cmd->add_option("reference", rmi_refs, "Image references")->required();

  std::string import_path, import_ref;
  CLI::App* import_cmd =
      app.add_subcommand("import", "Import a `docker save` tarball or an OCI layout (dir or tar)");
  import_cmd->add_option("path", import_path, "File or directory")->required();
  import_cmd->add_option("reference", import_ref,
                         "Name to record (default: the name in the archive)");

  CLI::App* image_cmd = app.add_subcommand("image", "Manage the image store");
  image_cmd->require_subcommand(1);
  CLI::App* image_gc_cmd =
      image_cmd->add_subcommand("gc", "Delete blobs and root images no image uses");

  cella::cli::LoginArgs login;
  CLI::App* login_cmd = app.add_subcommand("login", "Store registry credentials for HOST");
  login_cmd->add_option("-u,--username", login.username, "User name");
  login_cmd->add_flag("--password-stdin", login.password_stdin, "Read the password from stdin");
  login_cmd->add_option("host", login.host, "Registry host[:port]")->required();

  cella::cli::ExecArgs exec;
  CLI::App* exec_cmd = app.add_subcommand("exec", "Run a command in a running sandbox");
  exec_cmd->add_flag("-i,--interactive", exec.interactive, "Forward stdin to the command");
  exec_cmd->add_flag("-t,--tty", exec.tty, "Give the command a pseudo-terminal");
  exec_cmd->add_option("-e,--env", exec.env_items, "Set an environment variable (KEY=VALUE)");
  exec_cmd->add_option("-w,--workdir", exec.workdir, "Working directory");
  exec_cmd->add_option("-u,--user", exec.user, "User to run as");
  exec_cmd->add_option("sandbox", exec.sandbox, "Sandbox name, ID or ID prefix")->required();
  exec_cmd->add_option("command", exec.command, "Command and arguments (after --)");
  exec_cmd->positionals_at_end(true);

  bool ps_all = false, ps_json = false;
  CLI::App* ps_cmd = app.add_subcommand("ps", "List sandboxes (running; -a for all)");
  ps_cmd->alias("ls");
  ps_cmd->add_flag("-a,--all", ps_all, "Also stopped, exited and failed sandboxes");
  ps_cmd->add_flag("--json", ps_json, "Machine-readable output");

  std::vector<std::string> inspect_refs;
  CLI::App* inspect_cmd =
      app.add_subcommand("inspect", "Show a sandbox's config, state and history (JSON)");
  inspect_cmd->add_option("sandbox", inspect_refs, "Sandboxes")->required();

  cella::cli::LogsArgs logs;
  CLI::App* logs_cmd = app.add_subcommand("logs", "Print a sandbox's main process output");
  logs_cmd->add_flag("-f,--follow", logs.follow, "Keep printing as output arrives");
  logs_cmd->add_option("-n,--tail", logs.tail, "Only the last N lines");
  logs_cmd->add_flag("--console", logs.console, "The guest console (kernel and init) instead");
  logs_cmd->add_option("sandbox", logs.sandbox, "Sandbox")->required();

  int stop_grace = 10;
  std::vector<std::string> stop_refs;
  CLI::App* stop_cmd =
      app.add_subcommand("stop", "Stop sandboxes gracefully (killed after the grace)");
  stop_cmd->add_option("-t,--time", stop_grace, "Seconds to wait before killing")
      ->check(CLI::Range(0, 3600));
  stop_cmd->add_option("sandbox", stop_refs, "Sandboxes")->required();

  std::vector<std::string> start_refs;
  CLI::App* start_cmd = app.add_subcommand("start", "Boot stopped sandboxes again");
  start_cmd->add_option("sandbox", start_refs, "Sandboxes")->required();

  std::vector<std::string> kill_refs;
  CLI::App* kill_cmd = app.add_subcommand("kill", "Kill sandboxes' VMs at once");
  kill_cmd->add_option("sandbox", kill_refs, "Sandboxes")->required();

  bool rm_force = false;
  std::vector<std::string> rm_refs;
  CLI::App* rm_cmd = app.add_subcommand("rm", "Remove sandboxes and their files");
  rm_cmd->add_flag("-f,--force", rm_force, "Kill running sandboxes first");
  rm_cmd->add_option("sandbox", rm_refs, "Sandboxes")->required();

  CLI::App* prune_cmd = app.add_subcommand("prune", "Remove every sandbox that is not running");

  std::string cp_src, cp_dst;
  CLI::App* cp_cmd = app.add_subcommand(
      "cp", "Copy files/directories between the host and a sandbox (ID:/path on one side)");
  cp_cmd->add_option("source", cp_src, "Source")->required();
  cp_cmd->add_option("destination", cp_dst, "Destination")->required();
  bool cp_archive = false;
  cp_cmd->add_flag("-a,--archive", cp_archive,
                   "Keep the source's uid/gid (and, as root, setuid/setgid bits)");

  std::string pf_sandbox, pf_mapping;
  CLI::App* pf_cmd = app.add_subcommand(
      "port-forward", "Forward a host port to a guest TCP port until interrupted");
  pf_cmd->add_option("sandbox", pf_sandbox, "Sandbox")->required();
  pf_cmd->add_option("mapping", pf_mapping, "[IP:]HOST:GUEST")->required();

  CLI::App* volume_cmd = app.add_subcommand("volume", "Manage named volumes");
  volume_cmd->require_subcommand(1);
  std::string volume_name, volume_size;
  CLI::App* volume_create_cmd = volume_cmd->add_subcommand("create", "Create a volume");
  volume_create_cmd->add_option("--size", volume_size,
                                "Size (sparse; default 1g; a bare number is MB)");
  volume_create_cmd->add_option("name", volume_name, "Volume name")->required();
  bool volume_json = false;
  volume_create_cmd->add_flag("--json", volume_json, "Print {name, size, path} as JSON");
  CLI::App* volume_ls_cmd = volume_cmd->add_subcommand("ls", "List volumes");
  volume_ls_cmd->add_flag("--json", volume_json, "Machine-readable output");
  std::vector<std::string> volume_rm_names;
  CLI::App* volume_rm_cmd =
      volume_cmd->add_subcommand("rm", "Remove volumes (refused while a sandbox uses them)");
  volume_rm_cmd->add_option("name", volume_rm_names, "Volume names")->required();

  CLI::App* allow_cmd =
      app.add_subcommand("allow-list", "Change a running sandbox's egress allow-list");
  allow_cmd->require_subcommand(1);
  std::string allow_sandbox;
  std::vector<std::string> allow_hosts;
  CLI::App* allow_add_cmd = allow_cmd->add_subcommand("add", "Allow hosts (new connections)");
  allow_add_cmd->add_option("sandbox", allow_sandbox, "Sandbox")->required();
  allow_add_cmd->add_option("hosts", allow_hosts, "Hosts (a,b lists, *.globs)")->required();
  CLI::App* allow_rm_cmd = allow_cmd->add_subcommand("rm", "Stop allowing hosts");
  allow_rm_cmd->add_option("sandbox", allow_sandbox, "Sandbox")->required();
  allow_rm_cmd->add_option("hosts", allow_hosts, "Hosts")->required();
  CLI::App* allow_ls_cmd = allow_cmd->add_subcommand("ls", "Print the allow-list");
  allow_ls_cmd->add_option("sandbox", allow_sandbox, "Sandbox")->required();

  CLI::App* rpc_cmd = app.add_subcommand(
      "rpc", "Serve matchlock's JSON-RPC 2.0 on stdin/stdout (one sandbox, removed at the end)");
  CLI::App* rpc_reaper_cmd = app.add_subcommand("__rpc-reaper", "");
  rpc_reaper_cmd->group("");

  // The sandbox supervisor: started by cella itself, not by people.
  std::string supervise_id;
  int supervise_ready_fd = -1;
  bool supervise_client_attaches = false;
  CLI::App* supervise_cmd = app.add_subcommand("__supervise", "");
  supervise_cmd->group("");
  supervise_cmd->add_option("id", supervise_id)->required();
  supervise_cmd->add_option("--ready-fd", supervise_ready_fd);
  supervise_cmd->add_flag("--client-attaches", supervise_client_attaches);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : kExitCellaError;
  }
  if (debug) cella::log::SetLevel(cella::log::Level::kDebug);
  if (run_cmd->parsed()) return cella::cli::RunCommand(run);
  if (diagnose_cmd->parsed()) return cella::cli::DiagnoseCommand(diagnose_json);
  if (version_cmd->parsed()) return cella::cli::VersionCommand();
  using cella::cli::OutputFormat;
  if (pull_cmd->parsed()) return cella::cli::PullCommand(pull);
  if (images_cmd->parsed())
    return cella::cli::ImagesCommand(images_json ? OutputFormat::kJson : OutputFormat::kText);
  if (rmi_cmd->parsed()) return cella::cli::RmiCommand(rmi_refs);
  if (import_cmd->parsed()) return cella::cli::ImportCommand(import_path, import_ref);
  if (image_gc_cmd->parsed()) return cella::cli::ImageGcCommand();
  if (login_cmd->parsed()) return cella::cli::LoginCommand(login);
  using cella::cli::ListFormat;
  if (exec_cmd->parsed()) {
    // CLI11 keeps the `--` that separates the sandbox from the command when
    // a positional precedes it.
    if (!exec.command.empty() && exec.command.front() == "--")
      exec.command.erase(exec.command.begin());
    return cella::cli::ExecCommand(exec);
  }
  if (ps_cmd->parsed())
    return cella::cli::PsCommand(ps_all, ps_json ? ListFormat::kJson : ListFormat::kText);
  if (inspect_cmd->parsed()) return cella::cli::InspectCommand(inspect_refs);
  if (logs_cmd->parsed()) return cella::cli::LogsCommand(logs);
  if (stop_cmd->parsed()) return cella::cli::StopCommand(stop_refs, stop_grace);
  if (start_cmd->parsed()) return cella::cli::StartCommand(start_refs);
  if (kill_cmd->parsed()) return cella::cli::KillCommand(kill_refs);
  if (rm_cmd->parsed()) return cella::cli::RmCommand(rm_refs, rm_force);
  if (prune_cmd->parsed()) return cella::cli::PruneCommand();
  if (cp_cmd->parsed()) return cella::cli::CpCommand(cp_src, cp_dst, cp_archive);
  if (pf_cmd->parsed()) return cella::cli::PortForwardCommand(pf_sandbox, pf_mapping);
  if (rpc_cmd->parsed()) return cella::cli::RpcCommand();
  if (rpc_reaper_cmd->parsed()) return cella::cli::RpcReaperCommand();
  if (volume_create_cmd->parsed())
    return cella::cli::VolumeCreateCommand(volume_name, volume_size,
                                           volume_json ? ListFormat::kJson : ListFormat::kText);
  if (volume_ls_cmd->parsed())
    return cella::cli::VolumeLsCommand(volume_json ? ListFormat::kJson : ListFormat::kText);
  if (volume_rm_cmd->parsed()) return cella::cli::VolumeRmCommand(volume_rm_names);
  using cella::cli::AllowListOp;
  if (allow_add_cmd->parsed())
    return cella::cli::AllowListCommand(AllowListOp::kAdd, allow_sandbox, allow_hosts);
  if (allow_rm_cmd->parsed())
    return cella::cli::AllowListCommand(AllowListOp::kRemove, allow_sandbox, allow_hosts);
  if (allow_ls_cmd->parsed())
    return cella::cli::AllowListCommand(AllowListOp::kList, allow_sandbox, allow_hosts);
  if (supervise_cmd->parsed())
    return cella::cli::SuperviseCommand(supervise_id, supervise_ready_fd,
                                        supervise_client_attaches);
  return kExitCellaError;
}

}  // namespace

int main(int argc, char** argv) {
  // A peer that went away (the guest link, a closed stdout pipe) must be an
  // error value at the write, not a silent death of the whole CLI.
  if (::signal(SIGPIPE, SIG_IGN) == SIG_ERR) {
    std::perror("cella: signal(SIGPIPE)");
    return cella::cli::kExitCellaError;
  }
  // CLI11 and the standard library may throw (bad_alloc, bad option
  // definitions); nothing below expects to, so this is the only boundary.
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    // Last words on the way out; a failed write to stderr changes nothing.
    (void)std::fprintf(stderr, "cella: internal error: %s\n", e.what());
    return cella::cli::kExitCellaError;
  }
}
