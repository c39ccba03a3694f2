// The guest agent: serves the protocol in src/protocol/README.md over one
// link (virtio-serial port, vsock, or a socket pair in tests).
//
// Threading: an Agent is single-threaded. Serve() runs a poll loop that owns
// the link, every session's pipes/pty/sockets and the child processes; the
// callbacks in AgentOptions run on that loop. Create() blocks SIGCHLD in the
// calling thread (it is read through a signalfd) and ignores SIGPIPE, so
// create and serve from the same thread of a process that has no other
// threads (the standalone binary, or the guest init as PID 1).
//
// Lifetime: an Agent outlives links. When a link ends, every session is
// abandoned (process groups killed, temp files removed) except the main
// process, which keeps running detached until a later link attaches to it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>

#include "base/result.h"
#include "base/unique_fd.h"
#include "guest/agent/spawn.h"
#include "protocol/messages.h"

namespace cella::agent {

enum class ReapMode {
  kOwnChildren,  // waitpid() only the agent's own sessions
  kAllChildren,  // PID 1: waitpid(-1) reaps orphans too (silently)
};

struct AgentOptions {
  Hardening hardening = Hardening::kOff;
  // Once a host share is served through this agent, commands start without
  // the loop waiting for their exec (spawn.h) and file operations run on
  // threads of their own: either may wait on a share for this loop to relay
  // its lookups. True: the same from the start (tests, without shares).
  bool as_if_serving_shares = false;
  ReapMode reap = ReapMode::kOwnChildren;
  // The "main process" that op attach_main starts (exactly once) and streams
  // like an exec. After its Result is sent, on_main_exit gets the raw
  // waitpid status.
  std::optional<protocol::ExecRequest> main_request;
  std::function<void(int wait_status)> on_main_exit;
  // Op shutdown: called with the request (its grace), then Result {} is
  // sent. Without it the op fails with ENOSYS.
  std::function<void(const protocol::ShutdownRequest&)> on_shutdown;
  // Op resumed (the VM woke from a snapshot): sets the clock and counts the
  // resume (guest/agent/resume.h), returning the count. Without it the op
  // fails with ENOSYS.
  std::function<Result<uint64_t>(const protocol::ResumedRequest&)> on_resumed;
  // Op serve_share: the /dev/fuse descriptor of host share `index`, mounted
  // on the first call (later links get the same mount again). The agent
  // takes the returned descriptor (a dup: closing it never ends the mount)
  // and relays whole FUSE messages on the stream. Without it the op fails
  // with ENOSYS.
  std::function<Result<UniqueFd>(uint32_t index)> on_serve_share;
  // Op shares_mounted: `mounts_result` says whether the mounts made through
  // the FUSE shares (by another thread, while this loop relays) are done:
  // nullopt while they are not, then their outcome for good.
  // `mounts_ready_fd` becomes readable (and stays so) once they are; the
  // loop polls it while a shares_mounted waits. Without mounts_result the
  // op answers {} at once (nothing to wait for).
  std::function<std::optional<Status>()> mounts_result;
  int mounts_ready_fd = -1;
  // Op release on a virtio port: the port is closed and opened again before
  // the host may go on, so the answer is not sent on the released link but
  // by AnswerRelease() on the port opened anew (the host saves the VM once
  // it has it, and a restored copy's host finds that descriptor waiting).
  // Off (a socket, --fd/--listen): the answer goes out on the link itself.
  bool answer_release_on_reopened_port = false;
  // Children are not read while this much is queued toward the host.
  size_t link_soft_cap = 1u << 20;
  // The link is not read while this much is queued toward the host (a host
  // that floods requests without reading replies stops being served).
  size_t link_hard_cap = 16u << 20;
};

enum class LinkEnd {
  kPeerClosed,  // the host closed the link (EOF)
  kStopped,     // StopWhenFlushed() was called and everything queued was sent
  kReleased,    // the host asked for it (op release); with
                // answer_release_on_reopened_port, AnswerRelease() is due
};

class Agent {
 public:
  static Result<std::unique_ptr<Agent>> Create(AgentOptions options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Serves one link until it ends. kPeerClosed on EOF; an error when the
  // handshake fails, the host breaks framing, or the link fails. Either way
  // the link is done and the caller decides whether to serve another.
  Result<LinkEnd> Serve(UniqueFd link);

  // Makes Serve return kStopped once every queued frame has reached the
  // link: PID 1 powers off after the main process's Result, and must not
  // lose it. Call from a callback (same thread as Serve).
  void StopWhenFlushed();

  // After Serve returned kReleased with answer_release_on_reopened_port:
  // writes the release's answer on `port` (the agent port opened anew, the
  // same host still connected to it), bounded. The caller then waits for
  // the next host's first bytes (WaitForHostData) before serving again:
  // after a release the host speaks first.
  Status AnswerRelease(int port);

  // The first half of a graceful stop (docker stop): SIGTERM to the main
  // process's group now, SIGKILL once `grace` has passed if it still runs,
  // and SIGKILL to what is left of its group once the leader is gone (its
  // pipes must close for the Result to be sent). True when the main process
  // is attached to a stream, so its output, its Result and on_main_exit
  // follow while Serve() keeps serving; false when there is nothing to wait
  // for (no main process, already reported, or detached between links).
  // Call from a callback (same thread as Serve).
  bool TerminateMain(std::chrono::milliseconds grace);

 private:
  struct Impl;
  explicit Agent(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cella::agent
