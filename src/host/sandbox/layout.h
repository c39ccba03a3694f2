// Where a sandbox's host-side files live, and the shared state root.
//
//   <sandbox home>/state.db             SQLite state store (store/state_store.h)
//   <sandbox home>/sandboxes/<id>/       one directory per sandbox:
//       upper.img        writable layer (ext4; absent for tmpfs uppers)
//       overlay-<vol>.img private layers of overlay-mode volumes
//       config.img       the config disk (rewritten at every boot)
//       agent.sock qmp.sock  QEMU's sockets (gone when the VM is)
//       mux.sock         the supervisor's agent router: what exec/cp/attach connect to
//       control.sock     the supervisor's control socket (stop, kill, status)
//       console.log      guest console
//       output.rec       the main process's output, timed records (log_files.h);
//                        output.log in sandboxes made before those: raw bytes
//       supervisor.log   the supervisor's own log lines
//   <sandbox home>/volumes/<name>/volume.img
//   <sandbox home>/rpc-removed/<id>      `cella rpc` closed it; `rm ID` succeeds once
//
// sandbox home = $CELLA_SANDBOX_HOME when set (tests isolate themselves
// with it), else the cella home (host/os/paths.h). Pure functions.
#pragma once

#include <string>

#include "base/result.h"

namespace cella::sandbox {

Result<std::string> SandboxHome();
std::string StateDbPath(const std::string& sandbox_home);
std::string VolumesDir(const std::string& sandbox_home);
std::string VolumeImagePath(const std::string& sandbox_home, const std::string& volume);

struct SandboxPaths {
  std::string dir;
  std::string upper_image;
  std::string mux_socket;
  std::string control_socket;
  std::string console_log;
  std::string output_log;         // output.rec
  std::string legacy_output_log;  // output.log (older versions; read only)
  std::string supervisor_log;
  std::string OverlayLayer(const std::string& volume) const {
    return dir + "/overlay-" + volume + ".img";
  }
};
SandboxPaths PathsFor(const std::string& sandbox_home, const std::string& id);

// <dir>/restart.json: {"count":N,"delay_ms":D}, written by a supervisor
// whose --restart policy restarts the sandbox (`inspect`'s RestartCount).
inline std::string RestartStatePath(const std::string& sandbox_dir) {
  return sandbox_dir + "/restart.json";
}

}  // namespace cella::sandbox
