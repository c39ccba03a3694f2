// A host share served over FUSE (share/fuse_server.h) on the agent link: one
// stream (op serve_share) and one thread per share, started by the
// supervisor once the guest's agent is up and before the main process runs.
//
// The thread reads the guest kernel's FUSE requests from the stream (each a
// whole message; reassembled by the length in its header, which must not
// exceed kFuseMaxRequest), answers each with the server and writes the reply
// back: one request at a time, so host memory per share is one request and
// one reply. A stream error (the link ended) ends the thread.
//
// Thread-safety: Start and the destructor from the supervisor's thread. The
// server belongs to the serving thread while it runs; the destructor joins
// the thread, so destroy the FuseShare after the agent link is closed (the
// thread is blocked reading it until then) and only then touch the server
// (save its state, serve it again on the next link).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "base/result.h"
#include "host/agent/client.h"
#include "host/share/fuse_server.h"
#include "protocol/config.h"

namespace cella::sandbox {

// How long the supervisor waits (op shares_mounted) for the guest to put
// its FUSE shares in place once served: a few lookups and mounts each, so
// only a guest that is stuck or hostile takes long; the start then fails.
inline constexpr std::chrono::seconds kSharesMountedTimeout{60};

struct FuseShareOptions {
  std::string host_path;  // absolute; a directory or a regular file
  bool is_file = false;
  // rw; ro and overlay are served read-only (the guest's overlayfs keeps
  // its writes)
  protocol::MountMode mode = protocol::MountMode::kReadWrite;
};

// The share's server, before it is served: opened early so a missing host
// path fails before the VM boots; state may be loaded into it (resume).
Result<std::unique_ptr<share::FuseServer>> OpenFuseServer(const FuseShareOptions& options);

class FuseShare {
 public:
  // Opens stream serve_share{index} (the guest mounts the share) and starts
  // serving it with `server`.
  static Result<std::unique_ptr<FuseShare>> Start(host::AgentClient& agent, uint32_t index,
                                                  std::shared_ptr<share::FuseServer> server);
  ~FuseShare();
  FuseShare(const FuseShare&) = delete;
  FuseShare& operator=(const FuseShare&) = delete;

 private:
  FuseShare() = default;
  void Serve();
  std::shared_ptr<share::FuseServer> server_;
  std::unique_ptr<host::PortStream> stream_;
  uint32_t index_ = 0;
  std::thread thread_;
};

}  // namespace cella::sandbox
