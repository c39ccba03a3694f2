// The `cella` subcommands. Each returns the process exit code: the guest's
// own code for `run`, docker's 125 for cella's own failures.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace cella::cli {

inline constexpr int kExitCellaError = 125;

struct RunArgs {
  std::vector<std::string> command;  // after `--`; empty = the image's default
  std::vector<std::string> env_items;
  std::vector<std::string> env_files;
  std::string workdir;
  std::string user;
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
  std::vector<std::string> insecure_registries;
  std::string ca_file;
  int boot_timeout_s = 120;
};

int RunCommand(const RunArgs& args);
int DiagnoseCommand(bool json);
int VersionCommand();

}  // namespace cella::cli
