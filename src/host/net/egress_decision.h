// The egress proxy's decisions, apart from its I/O: given what is known
// about a flow (where the guest sent it, the TLS SNI, an HTTP request's Host
// header and head) and the sandbox's Policy, the verdict and its reason.
// Pure functions: no sockets, no clocks, no logging; the proxy gathers the
// facts, calls these, and acts (tests/unit/net_egress_decision_test.cc
// drives them from a table).
//
// The stages, in the order the proxy meets them:
//   DecideDestination  when a flow is accepted: what its original
//                      destination stands for and whether it may be reached.
//   DecideStream       TLS (by SNI) or raw TCP, once the first bytes are in.
//   DecideHttpRequest  every HTTP/1.x request head, plain or inside
//                      intercepted TLS; substitutes the secrets it may carry.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "host/net/http.h"
#include "host/net/policy.h"

namespace cella::net {

// What the proxy knows of a flow's destination when it accepts it.
struct DestinationFacts {
  Endpoint address;  // SO_ORIGINAL_DST
  // address is a virtual address (198.18.0.0/15) of the sandbox's DNS.
  bool is_virtual = false;
  // is_virtual: the name the sandbox DNS handed that address out for
  // (nullopt: never handed out).
  std::optional<std::string> virtual_name;
  // address is the host gateway (10.0.2.2: the host itself).
  bool is_host_gateway = false;
};

struct DestinationVerdict {
  Decision decision;
  std::string host;                 // what logs name the destination by
  std::optional<std::string> name;  // the virtual name, when there is one
};

DestinationVerdict DecideDestination(const Policy& policy, const DestinationFacts& facts);

// A verdict on a stream or request: `host` is what logs name it by (the
// normalized SNI or Host when valid, else the raw text, cut to 255 bytes).
struct Verdict {
  bool allowed = false;
  std::string reason;
  std::string host;
  explicit operator bool() const { return allowed; }
};

// A TLS flow with a readable SNI, or (sni = nullopt) a TLS flow without one
// or a raw TCP flow: with an SNI, it must be valid, allowed, and equal the
// virtual name when the destination has one; without, the destination
// decides alone.
Verdict DecideStream(const Policy& policy, const DestinationVerdict& destination,
                     const std::optional<std::string>& sni);

struct HttpRequestFacts {
  std::string_view host;  // from the Host header (or absolute URI), port stripped
  // The name the connection is bound to: the virtual name, the SNI under
  // interception, or the Host of an earlier request on this connection.
  std::optional<std::string> connection_host;
  // The upstream is reached by that name (virtual address or verified TLS),
  // not by an address the guest chose: only then may secrets be substituted.
  bool upstream_by_name = false;
};

// One request head: Host valid and allowed, consistent with the
// connection, not CONNECT, and its secrets placed only where they may go
// (SubstituteSecrets, which rewrites `head` when allowed).
Verdict DecideHttpRequest(const Policy& policy, const Decision& destination,
                          const HttpRequestFacts& facts, http::RequestHead& head);

}  // namespace cella::net
