#include "host/sandbox/layout.h"

#include <cstdlib>

#include "host/os/paths.h"

namespace cella::sandbox {

Result<std::string> SandboxHome() {
  if (const char* own = std::getenv("CELLA_SANDBOX_HOME"); own && *own) {
    std::string home = own;
    if (home.front() != '/') return Fail("CELLA_SANDBOX_HOME must be an absolute path: " + home);
    return home;
  }
  return host::CellaHome();
}

std::string StateDbPath(const std::string& sandbox_home) { return sandbox_home + "/state.db"; }
std::string VolumesDir(const std::string& sandbox_home) { return sandbox_home + "/volumes"; }
std::string VolumeImagePath(const std::string& sandbox_home, const std::string& volume) {
  return VolumesDir(sandbox_home) + "/" + volume + "/volume.img";
}

SandboxPaths PathsFor(const std::string& sandbox_home, const std::string& id) {
  SandboxPaths p;
  p.dir = sandbox_home + "/sandboxes/" + id;
  p.upper_image = p.dir + "/upper.img";
  p.mux_socket = p.dir + "/mux.sock";
  p.control_socket = p.dir + "/control.sock";
  p.console_log = p.dir + "/console.log";
  p.output_log = p.dir + "/output.rec";
  p.legacy_output_log = p.dir + "/output.log";
  p.supervisor_log = p.dir + "/supervisor.log";
  return p;
}

}  // namespace cella::sandbox
