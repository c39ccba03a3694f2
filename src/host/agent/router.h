// The agent link router: the sandbox supervisor owns the ONLY connection to
// the guest agent (a virtio-serial port allows exactly one), and every CLI
// process (exec, cp, port-forward, an attached `run`) talks to the guest at
// the same time through it. Each downstream client speaks the ordinary agent
// protocol (src/protocol/README.md) and uses an unchanged AgentClient: to a
// client the router looks like an agent.
//
// What the router does to frames:
//  - Stream ids: each client numbers its own streams; the router allocates
//    upstream ids (increasing, never reused on the link) and rewrites every
//    frame both ways, so clients neither collide nor see each other.
//  - Stream 0: a client's Ping goes to the guest (so it measures the guest)
//    with an 8-byte tag naming the client in front of its payload; the Pong
//    is stripped and delivered to that client only. Any other stream-0 frame
//    after the handshake disconnects the client.
//  - Everything a misbehaving client could do that the agent would punish by
//    ending the WHOLE link (reused ids, frames for streams never opened,
//    exceeding stdin credit, host-only frame types) is caught here and costs
//    only that client its connection.
//  - Flow control passes through per stream; the router also checks that the
//    guest stays within the windows the clients granted (a guest that does
//    not is a protocol violation that fails the router). Per-client output
//    buffers are capped: a client that stops reading is disconnected, it
//    never blocks the router. When the guest stops reading, clients stop
//    being read (backpressure), never buffered without bound.
//  - A disconnecting client has Close sent for each of its live streams
//    (its execs are killed, its ports closed). NB: that includes a stream
//    that attached the main process; the agent kills the main process on
//    Close, exactly as it would for a direct AgentClient.
//
// Trust: the upstream (guest) is untrusted: frame sizes are capped by
// FrameDecoder and any protocol violation fails the router. Clients are
// semi-trusted (same uid) but nothing they send can crash the router or
// affect the upstream link or other clients.
//
// Threading: Start() runs the upstream handshake on the calling thread, then
// one router thread owns every fd (upstream, listener, clients) in a poll
// loop. AddClient / Listen / ConnectLocal / UpstreamError / Stats / Stop are
// thread-safe. RouterHooks run on the router thread: they must be quick,
// must not throw, must not block on the guest (every client waits while a
// hook runs), and must not call Stop() or destroy the Router (that would
// join the router thread from itself).
//
// Lifetime: Stop() (or the destructor) joins the router thread and closes
// the upstream link (the agent then detaches the main process and kills
// every other session) and every client, and removes the listening socket
// file if it is still the one Listen() created.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"
#include "protocol/wire.h"

namespace cella::host {

struct RouterHooks {
  // Bytes of the guest's main process (a stream opened with attach_main by
  // any client): channel stdout or stderr. The supervisor tees these into the
  // sandbox's log. Called on the router thread.
  std::function<void(protocol::Channel, std::span<const std::byte>)> on_main_output;
  // The Result JSON (protocol ExecOutcome) of an attach_main stream.
  std::function<void(std::string_view result_json)> on_main_result;
};

struct RouterOptions {
  // A connected client must send its Hello within this.
  std::chrono::milliseconds client_handshake_timeout{10'000};
  // Bytes queued toward one client; beyond it the client is disconnected.
  size_t max_client_buffer = size_t{64} << 20;
  // Bytes queued toward the guest; beyond it clients are not read until the
  // guest has taken some (backpressure, nobody is dropped). At twice this the
  // guest itself is not read either (its Pings queue Pongs), which bounds the
  // router's memory whatever the guest sends.
  size_t max_upstream_buffer = size_t{16} << 20;
};

// Observations for tests and diagnostics.
struct RouterStats {
  size_t clients = 0;       // connected (handshake done or pending)
  size_t live_streams = 0;  // upstream ids currently mapped
  // Largest total of bytes queued toward clients and the guest at once.
  size_t peak_buffered_bytes = 0;
};

class Router {
 public:
  // Performs the host side of the Hello handshake on `upstream` (bounded by
  // `handshake_timeout`), then starts the router thread.
  static Result<std::unique_ptr<Router>> Start(UniqueFd upstream, RouterHooks hooks,
                                               std::chrono::milliseconds handshake_timeout,
                                               RouterOptions options = {});
  ~Router();  // Stop()
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  // Adds a connected downstream (a socket). Fails once the upstream is gone
  // or the router stopped.
  Status AddClient(UniqueFd client);
  // Accepts clients on a Unix socket created at `path` (mode 0600; a stale
  // socket file there is replaced, any other kind of file is refused). At
  // most one listening socket per router.
  Status Listen(const std::string& path);
  // A socket pair: one end becomes a client, the other is returned for
  // AgentClient::Connect (the supervisor's own client).
  Result<UniqueFd> ConnectLocal();
  // Set once the upstream failed or closed (guest gone) or the router was
  // stopped; every client was disconnected then.
  std::optional<Error> UpstreamError() const;
  RouterStats Stats() const;
  // Idempotent.
  void Stop();

 private:
  struct Impl;
  explicit Router(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cella::host
