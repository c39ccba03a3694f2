// Parsing of the docker-style values `cella run` takes (-e, --env-file,
// --memory, --cpus, --add-host, -p ...). Pure functions: unit-tested.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/sandbox/spec.h"

namespace cella::cli {

// "KEY=VALUE" sets; a bare "KEY" takes the value from `lookup` (the host
// environment), as docker does, and is dropped when unset there.
using EnvLookup = const char* (*)(const char*);
Status ApplyEnvAssignment(std::string_view item, EnvLookup lookup,
                          std::map<std::string, std::string>& env);
// docker's env-file format: KEY=VALUE or KEY per line, '#' comments, blank
// lines ignored; no quoting rules (values are taken verbatim).
Status ApplyEnvFile(std::string_view contents, std::string_view file_name, EnvLookup lookup,
                    std::map<std::string, std::string>& env);
// "512", "512m", "512M", "2g", "1.5G", "256MiB" -> MiB. Bare numbers are MiB.
Result<int> ParseMemoryMiB(std::string_view text);
// "0.5", "2", "1.25" -> CPUs (> 0, <= 64).
Result<double> ParseCpus(std::string_view text);
struct HostEntry {
  std::string host;
  std::string ip;
};
// "name:ip" (docker's --add-host); IPv6 addresses may contain ':' after the first.
Result<HostEntry> ParseAddHost(std::string_view text);

// "a.test,b.test" and repeated flags -> one list; empty items refused.
Result<std::vector<std::string>> SplitHostList(const std::vector<std::string>& items);

// --secret NAME@host[,host...] (value from the host environment variable
// NAME) or NAME=VALUE@host[,host...]. The value may contain '@' (the last
// '@' starts the hosts). Error messages never include the value.
struct SecretFlag {
  std::string name;
  std::string value;
  std::vector<std::string> hosts;
  bool from_env = false;
};
Result<SecretFlag> ParseSecretFlag(std::string_view text, EnvLookup lookup);

// --resolve NAME:PORT:ADDR[:PORT] (curl's form, plus an optional upstream
// port); ADDR is IPv4 or [IPv6].
struct ResolveFlag {
  std::string name;
  uint16_t port = 0;
  std::string address;
  uint16_t address_port = 0;
};
Result<ResolveFlag> ParseResolveFlag(std::string_view text);

// -v SOURCE:/guest/path[:ro|rw|overlay] (default rw). SOURCE with a '/' or
// starting with '.' (docker's rule) is a host path: relative ones resolve
// against `cwd`, symlinks are resolved, and it must exist now, as a
// directory or a regular file. Anything else is a named volume. A bare
// /guest/path (no ':') is an anonymous volume: `name` is left empty for the
// caller to generate.
struct MountFlag {
  bool is_host = false;
  bool anonymous = false;
  std::string name;       // named volume
  std::string host_path;  // host share: absolute, resolved
  bool is_file = false;   // host share of one regular file
  std::string guest_path;
  protocol::MountMode mode = protocol::MountMode::kReadWrite;
};
Result<MountFlag> ParseMountFlag(std::string_view text, const std::string& cwd);

// The sandbox's network, decided from the flags already parsed into
// `egress` (allow list, private, host loopback, interception, pins, CA,
// secrets) and the rest of the network flags:
//   --no-network      no NIC; refused together with any egress flag.
//   a policy flag     (--allow-host, --network-intercept, --secret,
//                     --resolve, --upstream-ca) the sealed network with that
//                     policy, as before.
//   otherwise         the sealed network open to every public host
//                     (all_public), no TLS interception: the host's
//                     loopback, LAN and link-local stay closed unless
//                     --allow-host-loopback / --allow-private.
// `dns` (--dns) must be IP addresses. Under the sealed network the guest
// always asks cella's DNS (10.0.2.3: the only UDP the namespace lets out),
// so the servers become what cella's resolver asks (egress.dns_servers) and
// `guest_dns` is left empty; with --no-network they go to the guest as given.
Status PlanNetwork(bool no_network, const std::vector<std::string>& dns,
                   sandbox::EgressSpec& egress, std::vector<std::string>& guest_dns);

}  // namespace cella::cli
