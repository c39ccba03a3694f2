// `cella pull/images/rmi/import/image gc/login`, and the image half of
// `cella run --image`. All of them go through registry::ImageStore in the
// cella home; none keeps state between calls. Single-threaded.
#pragma once

#include <string>
#include <vector>

#include "base/result.h"
#include "host/sandbox/compose.h"

namespace cella::cli {

// How to reach registries. Flags add to the environment's
// CELLA_INSECURE_REGISTRIES (comma-separated host[:port]) and replace
// CELLA_CA_FILE (a PEM bundle used instead of the system CAs).
struct RegistryFlags {
  std::vector<std::string> insecure_registries;
  std::string ca_file;
};

// kQuiet: one reference a line (what rmi takes).
enum class OutputFormat { kText, kJson, kQuiet };

struct PullArgs {
  std::string reference;
  std::string platform;  // "os/arch[/variant]"; empty = linux/amd64
  RegistryFlags registry;
};

struct LoginArgs {
  std::string host;
  std::string username;
  bool password_stdin = false;
};

int PullCommand(const PullArgs& args);
int ImagesCommand(OutputFormat format);
int RmiCommand(const std::vector<std::string>& references, bool force);
int ImportCommand(const std::string& path, const std::string& reference);
int ImageGcCommand();
int LoginCommand(const LoginArgs& args);

struct RunImage {
  std::string rootfs_path;  // erofs image of the merged layers
  sandbox::ImageDefaults defaults;
};

// Finds `reference` in the store and builds its root image if not built
// yet. `pull` is docker's run --pull: "missing" pulls only when the store
// has no such image, "always" pulls first (a newer image replaces the name),
// "never" fails when it is not in the store.
Result<RunImage> PrepareRunImage(const std::string& home, const std::string& reference,
                                 const std::string& platform, const RegistryFlags& registry,
                                 const std::string& pull = "missing");

}  // namespace cella::cli
