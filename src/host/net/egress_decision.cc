#include "host/net/egress_decision.h"

#include "host/net/secrets.h"

namespace cella::net {

DestinationVerdict DecideDestination(const Policy& policy, const DestinationFacts& facts) {
  DestinationVerdict out;
  out.host = facts.address.address.ToString();
  if (facts.is_virtual) {
    out.name = facts.virtual_name;
    if (!facts.virtual_name) {
      out.decision = {false, "unknown virtual address (not handed out by the sandbox DNS)"};
    } else if (IpAddress::Parse(*facts.virtual_name)) {
      // An address literal must never stand behind a virtual address: that
      // would skip the address checks (the host's loopback among them).
      out.host = *facts.virtual_name;
      out.decision = {false, "address literal behind a virtual address"};
    } else {
      out.host = *facts.virtual_name;
      out.decision = policy.Check(*facts.virtual_name);
    }
    return out;
  }
  if (facts.is_host_gateway) {
    // The gateway is the host itself (its loopback): --allow-private alone
    // does not open it, only --allow-host-loopback or an entry naming the
    // gateway address.
    if (policy.MayReachHostGateway(facts.address.address)) {
      out.decision = {true, ""};
    } else {
      out.decision = {false, "the gateway is the host itself; use --allow-host-loopback or allow " +
                                 out.host + " explicitly to reach it"};
    }
    return out;
  }
  out.decision = policy.CheckAddress(facts.address.address);
  return out;
}

Verdict DecideStream(const Policy& policy, const DestinationVerdict& destination,
                     const std::optional<std::string>& sni) {
  Verdict out{false, "", destination.host};
  auto refuse = [&](std::string reason) {
    out.reason = std::move(reason);
    return out;
  };
  if (!sni) {
    if (!destination.decision) return refuse(destination.decision.reason);
    out.allowed = true;
    return out;
  }
  auto name = NormalizeHost(*sni);
  out.host = name.value_or(sni->substr(0, 255));
  if (!name) return refuse("invalid SNI");
  if (!destination.decision) return refuse(destination.decision.reason);
  if (destination.name && *name != *destination.name)
    return refuse("TLS SNI " + *name + " does not match the resolved name " + *destination.name);
  if (Decision decision = policy.Check(*name); !decision) return refuse(decision.reason);
  out.allowed = true;
  return out;
}

Verdict DecideHttpRequest(const Policy& policy, const Decision& destination,
                          const HttpRequestFacts& facts, http::RequestHead& head) {
  auto host = NormalizeHost(facts.host);
  Verdict out{false, "", host.value_or(std::string(facts.host.substr(0, 255)))};
  auto refuse = [&](std::string reason) {
    out.reason = std::move(reason);
    return out;
  };
  if (!host) return refuse("invalid Host header");
  if (!destination) return refuse(destination.reason);
  if (facts.connection_host && *facts.connection_host != *host)
    return refuse("Host header " + *host + " does not match the connection's host " +
                  *facts.connection_host);
  if (Decision decision = policy.Check(*host); !decision) return refuse(decision.reason);
  if (head.method == "CONNECT") return refuse("CONNECT is not supported through the egress proxy");
  // A secret may only travel to an upstream the proxy reached by that name
  // (a virtual address's name, or TLS verified for the SNI name). On a
  // literal address the guest chose, the Host header is the guest's word
  // only: any placeholder there is refused, never substituted.
  std::string_view secret_host = facts.upstream_by_name ? std::string_view(*host) : "";
  if (auto refusal = SubstituteSecrets(policy, secret_host, head)) return refuse(*refusal);
  out.allowed = true;
  return out;
}

}  // namespace cella::net
