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
  run_cmd->add_option("--dns", run.dns, "DNS server for the guest (repeatable)");
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
