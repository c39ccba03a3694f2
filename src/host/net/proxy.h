// The sandbox's transparent egress proxy. nftables in the sandbox's network
// namespace redirects every guest TCP flow to one listening socket; this
// accepts them, recovers where each was meant to go, and decides by policy:
//
//   destination  a virtual address (198.18.0.0/15) stands for the allowed
//                name the guest resolved through our DNS; any other address
//                is a literal the guest chose (Policy::CheckAddress).
//   TLS          the ClientHello's SNI must be allowed (and equal the name a
//                virtual address stands for). With interception the proxy
//                terminates TLS with a CA-minted leaf and handles the HTTP
//                inside; without it the bytes are spliced to the upstream.
//   HTTP/1.x     the Host header decides (and must equal the virtual name);
//                requests are parsed one by one (keep-alive), placeholders
//                of secrets swapped for their values on the secret's hosts,
//                bodies and responses streamed with their framing tracked
//                (Content-Length, chunked, until close), never buffered
//                whole; WebSocket upgrades become a byte splice after 101.
//   other TCP    spliced, only to a virtual address of an allowed name or an
//                allowed address literal.
// Blocked flows get `403 Forbidden` with the reason (HTTP) or are closed
// (TLS, raw TCP), and always a `level=notice msg="egress blocked"` log line.
// Every decision is also handed to ProxyOptions::on_event (EgressEvent).
//
// Upstream address for a name: the pin for name:port if one exists (used
// even when private or loopback: pins are an explicit choice), else the
// addresses the sandbox's DNS resolved (FakeIpTable), else a host lookup;
// private/special addresses are skipped unless the policy allows them.
//
// Threading: one accept thread; each connection runs on its own thread plus
// one helper thread while two directions are pumped. Stop() (or the
// destructor) closes the listener, aborts every open connection and joins
// all threads. The Policy may change concurrently (runtime allow-list).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>

#include "base/byte_stream.h"
#include "base/result.h"
#include "base/unique_fd.h"
#include "base/wake_fd.h"
#include "host/net/dns.h"
#include "host/net/http.h"
#include "host/net/policy.h"
#include "host/net/secrets.h"  // SubstituteSecrets, used by the tests through this header

namespace cella::net {

class CertificateAuthority;

// HTTPS interception, behind an interface so the proxy can be tested without
// certificates. Implementations must be thread-safe (connections call them
// concurrently).
class TlsProvider {
 public:
  virtual ~TlsProvider() = default;
  // Completes the guest-facing handshake as `name`; `client_hello` holds the
  // bytes already read from `raw`.
  virtual Result<std::unique_ptr<ByteStream>> AcceptFromGuest(std::unique_ptr<ByteStream> raw,
                                                              std::string_view client_hello,
                                                              const std::string& name) = 0;
  // Connects TLS to the real upstream, verifying its certificate for `name`.
  virtual Result<std::unique_ptr<ByteStream>> ConnectUpstream(std::unique_ptr<ByteStream> raw,
                                                              const std::string& name) = 0;
};

// The real one: leaves minted by `ca`; upstreams verified against `ca_file`
// (PEM) or, when empty, the host's trust store.
std::shared_ptr<TlsProvider> MakeTlsProvider(std::shared_ptr<CertificateAuthority> ca,
                                             std::string ca_file);

// Where an accepted connection was going. The default reads SO_ORIGINAL_DST.
using OriginalDestinationFn = std::function<Result<Endpoint>(int accepted_fd)>;
// SNI of a ClientHello prefix (see ParseClientHelloSni in tls.h, the
// default): nullopt = need more bytes, error = no usable SNI.
using SniParser = std::function<Result<std::optional<std::string>>(std::span<const std::byte>)>;

// One egress decision, in the shape of matchlock's NetworkEvent: a blocked
// flow or request, an answered HTTP request (plain or intercepted), or an
// allowed TLS/TCP stream when it ends. Byte counts are what crossed the
// proxy (heads and bodies for HTTP; 0 for spliced streams, which are not
// counted). `url` is built from the request as the guest sent it, before
// secrets were substituted, so it never carries a secret's value.
struct EgressEvent {
  std::string method;  // HTTP method; empty for TLS/TCP streams
  std::string url;     // http(s)://host/target; empty for TLS/TCP streams
  std::string host;
  std::string protocol;  // http, https, tls, tcp
  int status_code = 0;   // the upstream's (or the proxy's own 403); 0 for streams
  uint64_t request_bytes = 0;
  uint64_t response_bytes = 0;
  int64_t duration_ms = 0;
  bool blocked = false;
  std::string block_reason;
};
// Called on the connection's thread; must not block (the supervisor's sink
// is a bounded ring that drops the oldest).
using EgressEventSink = std::function<void(EgressEvent)>;

struct ProxyOptions {
  std::shared_ptr<Policy> policy;
  EgressEventSink on_event;  // empty: decisions are only logged
  std::shared_ptr<FakeIpTable> fake_ips;
  OriginalDestinationFn original_destination;  // empty = SO_ORIGINAL_DST
  HostResolver resolver = SystemResolve;       // names the DNS cache does not know
  SniParser sni_parser;                        // empty = ParseClientHelloSni
  // Required when policy->intercept(); ignored otherwise.
  std::shared_ptr<TlsProvider> tls;
  // Flows to this address (allowed only by an allow entry naming it, not by
  // allow_private: it is the host itself) go to the host's 127.0.0.1 on the
  // same port, as the gateway of QEMU's user-mode network does. Unset: no
  // such mapping.
  std::optional<IpAddress> host_gateway;
  // How long to wait for the guest's first bytes before treating the flow
  // as raw TCP (server-speaks-first protocols send nothing).
  std::chrono::milliseconds first_bytes_wait{1000};
  // Bound on receiving a whole request head / ClientHello once it started.
  std::chrono::milliseconds head_wait{30000};
  std::chrono::milliseconds connect_timeout{10000};
};

class TransparentProxy {
 public:
  // Takes a bound, listening TCP socket.
  static Result<std::unique_ptr<TransparentProxy>> Start(UniqueFd listener, ProxyOptions options);
  ~TransparentProxy();
  TransparentProxy(const TransparentProxy&) = delete;
  TransparentProxy& operator=(const TransparentProxy&) = delete;

  void Stop();

  // Internal: one accepted connection's state, shared with its thread.
  struct Connection;

 private:
  TransparentProxy(UniqueFd listener, WakeFd wake, ProxyOptions options)
      : listener_(std::move(listener)), wake_(std::move(wake)), options_(std::move(options)) {}
  void AcceptLoop();
  void ReapFinished();

  UniqueFd listener_;
  WakeFd wake_;  // Stop() wakes the accept poll
  ProxyOptions options_;
  std::thread accept_thread_;
  std::atomic<bool> stopped_{false};
  std::mutex mutex_;
  std::list<std::shared_ptr<Connection>> connections_;  // guarded by mutex_
  std::set<std::string> warned_secret_hosts_;           // guarded by mutex_
  friend class ConnectionHandler;
};

}  // namespace cella::net
