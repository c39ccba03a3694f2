// `cella`: runs OCI images as microVM sandboxes. The CLI only parses
// arguments and hands them to the commands; exceptions from CLI11 stop here.
#include <signal.h>

#include <CLI/CLI.hpp>

#include "base/log.h"
#include "cli/commands.h"

int main(int argc, char** argv) {
  using cella::cli::kExitCellaError;
  // A peer that went away (the guest link, a closed stdout pipe) must be an
  // error value at the write, not a silent death of the whole CLI.
  ::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"cella: run OCI images as microVM sandboxes", "cella"};
  app.require_subcommand(1);
  bool debug = false;
  app.add_flag("--debug", debug, "Verbose structured logs on stderr");

  cella::cli::RunArgs run;
  CLI::App* run_cmd = app.add_subcommand("run", "Boot a sandbox, run a command in it, and exit with its code");
  run_cmd->add_option("-e,--env", run.env_items, "Set an environment variable (KEY=VALUE, or KEY to pass the host's)");
  run_cmd->add_option("--env-file", run.env_files, "Read environment variables from a file");
  run_cmd->add_option("-w,--workdir", run.workdir, "Working directory inside the sandbox");
  run_cmd->add_option("-u,--user", run.user, "User to run as (name, uid, uid:gid)");
  run_cmd->add_option("--cpus", run.cpus, "Number of CPUs (fractional allowed, e.g. 1.5)");
  run_cmd->add_option("-m,--memory", run.memory, "Memory (e.g. 512m, 2g)");
  run_cmd->add_option("--hostname", run.hostname, "Guest hostname (default: the sandbox ID)");
  run_cmd->add_option("--dns", run.dns, "DNS server for the guest (repeatable)");
  run_cmd->add_option("--add-host", run.add_hosts, "Add an /etc/hosts entry (HOST:IP)");
  run_cmd->add_option("--mtu", run.mtu, "Guest interface MTU")->check(CLI::Range(576, 65535));
  run_cmd->add_flag("--no-network", run.no_network, "No network interface at all (only lo)");
  run_cmd->add_flag("--privileged", run.privileged, "Skip in-guest hardening (seccomp, capability drop, no_new_privs)");
  run_cmd->add_flag("-i,--interactive", run.interactive, "Forward stdin to the command");
  run_cmd->add_option("--kernel", run.kernel, "Boot this kernel image instead of the cached default");
  run_cmd->add_option("--accel", run.accel, "Accelerator: auto, kvm or tcg")
      ->check(CLI::IsMember({"auto", "kvm", "tcg"}));
  run_cmd->add_option("--boot-timeout", run.boot_timeout_s, "Seconds to wait for the guest agent")
      ->check(CLI::Range(1, 3600));
  run_cmd->add_option("command", run.command, "Command and arguments (after --)");
  run_cmd->positionals_at_end(true);

  bool diagnose_json = false;
  CLI::App* diagnose_cmd = app.add_subcommand("diagnose", "Report what this host offers and what cella chose");
  diagnose_cmd->add_flag("--json", diagnose_json, "Machine-readable output");
  CLI::App* version_cmd = app.add_subcommand("version", "Print the version");

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
  return kExitCellaError;
}
