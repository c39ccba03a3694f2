// Name resolution through given DNS servers instead of the host's resolver:
// what `cella run --dns X` means under the sealed network. The guest keeps
// asking cella's DNS (10.0.2.3, the only UDP its namespace lets out); that
// server, and the proxy, ask X through this, from the host's network.
#pragma once

#include <chrono>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/net/dns.h"
#include "host/net/policy.h"

namespace cella::net {

// A stub resolver over UDP: asks for A and AAAA records of a name, each
// server in turn (up to `timeout` per query), like resolv.conf's nameserver
// lines. NXDOMAIN and "no such record" are an empty answer; a server that
// fails or does not answer passes the question to the next one.
HostResolver MakeUpstreamResolver(std::vector<Endpoint> servers,
                                  std::chrono::milliseconds timeout = std::chrono::seconds(2));
// The same on port 53 of each address ("8.8.8.8", "2001:db8::53").
Result<HostResolver> UpstreamResolverFor(const std::vector<std::string>& addresses);

// The A/AAAA addresses of an answer to query `id` (empty for NXDOMAIN).
// Exposed for tests.
Result<std::vector<IpAddress>> ParseDnsAnswer(std::span<const std::byte> packet, uint16_t id);

}  // namespace cella::net
