// Host directories in the sandbox: one virtiofsd (QEMU 7.2's C daemon,
// /usr/lib/qemu/virtiofsd) per `-v /host:/guest` share, started and owned by
// the supervisor.
//
// What the host enforces, whatever the guest asks (the guest speaks FUSE to
// virtiofsd and is hostile):
//   - confinement: virtiofsd pivots into the exported directory inside its own
//     mount/pid/net namespaces, so a symlink, `..` or a hardlink named by the
//     guest resolves inside the share (the guest kernel follows symlinks in
//     its own namespace, never the host's);
//   - ro and overlay shares are exported from a read-only bind mount made in a
//     private mount namespace of the daemon (the host's view is unchanged);
//   - every share's mount is nosuid,nodev for the daemon, CAP_MKNOD is
//     dropped (no device nodes), and a seccomp filter refuses modes with the
//     setuid/setgid bits (chmod, create, mknod), so the guest cannot leave a
//     setuid file or a device on the host;
//   - a single file is exported as the only entry of a tiny read-only tmpfs
//     that exists only in the daemon's namespace: its siblings are never
//     reachable.
// Limits: virtiofsd holds at most kShareMaxFds descriptors (inodes the guest
// has looked up), and its thread pool and the virtqueue bound requests in
// flight; reads and writes go straight between the file and guest RAM.
//
// Thread-safety: a ShareDaemon is owned by one thread (the supervisor's
// main thread, which must also be the thread that started it: the daemon's
// PDEATHSIG follows that thread). Stop() is idempotent; the destructor stops.
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "protocol/config.h"

namespace cella::sandbox {

inline constexpr const char* kDefaultVirtiofsd = "/usr/lib/qemu/virtiofsd";
inline constexpr int kShareMaxFds = 16384;

struct ShareDaemonOptions {
  std::string virtiofsd = kDefaultVirtiofsd;  // $CELLA_VIRTIOFSD overrides (ResolveVirtiofsd)
  std::string host_path;                      // absolute; a directory or a regular file
  bool is_file = false;
  protocol::MountMode mode = protocol::MountMode::kReadWrite;
  std::string stage_dir;    // an empty directory this daemon may mount over (its private view)
  std::string socket_path;  // vhost-user socket virtiofsd creates
  std::string log_path;     // virtiofsd's stderr (appended)
};

// The argv virtiofsd runs with (pure; tested without starting anything).
std::vector<std::string> VirtiofsdArgv(const ShareDaemonOptions& options);

// $CELLA_VIRTIOFSD, else kDefaultVirtiofsd; an error (saying which package
// ships it) when it is not an executable file.
Result<std::string> ResolveVirtiofsd();

class ShareDaemon {
 public:
  // Forks the daemon (private mount namespace, read-only bind for ro/overlay,
  // seccomp filter, PDEATHSIG) and waits, bounded, until its socket exists.
  // On failure the error carries the tail of its log.
  static Result<std::unique_ptr<ShareDaemon>> Start(const ShareDaemonOptions& options);
  ~ShareDaemon();
  ShareDaemon(const ShareDaemon&) = delete;
  ShareDaemon& operator=(const ShareDaemon&) = delete;

  // Kills the daemon (it serves nothing once QEMU is gone) and reaps it.
  void Stop();
  // Non-empty (and stays so) once the daemon has exited by itself (reaped
  // here): the guest's requests to that share would now wait forever.
  std::optional<std::string> Exited();
  pid_t pid() const { return pid_; }

 private:
  explicit ShareDaemon(pid_t pid) : pid_(pid) {}
  pid_t pid_;
  std::optional<std::string> exit_;  // set once it exited by itself
};

}  // namespace cella::sandbox
