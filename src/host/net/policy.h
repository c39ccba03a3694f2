// The egress policy of one sandbox: which hosts and addresses the guest may
// reach, whether private networks are open, whether HTTPS is intercepted,
// which secrets the proxy swaps in, and pinned upstream addresses.
//
// Threading: every method of Policy is safe to call from any thread. The
// allow list changes at runtime (`cella allow-list add|rm`); a change takes
// effect for every check made after it returns (new connections, new DNS
// queries, the next request on a kept-alive connection). Secrets, pins and
// the two flags are fixed when the Policy is created.
//
// Secrets: a Secret's `value` never appears in a log line, an error message
// or a formatted Secret (see FormatRedacted / operator<<).
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::net {

// An IPv4 or IPv6 address, compared by value. IPv4-mapped IPv6 addresses
// (::ffff:a.b.c.d) are folded to IPv4 so one rule covers both spellings.
struct IpAddress {
  enum class Family : uint8_t { kV4, kV6 };
  Family family = Family::kV4;
  // V4 uses the first 4 bytes, network order.
  std::array<uint8_t, 16> bytes{};

  static IpAddress V4(in_addr address);
  static IpAddress V6(const in6_addr& address);
  // Accepts dotted quads and RFC 4291 text (with or without [brackets]).
  static std::optional<IpAddress> Parse(std::string_view text);
  static std::optional<IpAddress> FromSockaddr(const sockaddr* address, socklen_t length);

  in_addr ToInAddr() const;    // only for kV4
  in6_addr ToIn6Addr() const;  // only for kV6
  std::string ToString() const;
  bool operator==(const IpAddress&) const = default;
};

// An address and port to connect to.
struct Endpoint {
  IpAddress address;
  uint16_t port = 0;
  std::string ToString() const;  // "1.2.3.4:80", "[::1]:443"
  bool operator==(const Endpoint&) const = default;
};

// Private networks, loopback, link-local, CGNAT, unique-local, "this network"
// (0.0.0.0/8), multicast and broadcast: addresses a sandbox must not reach
// unless the user said so.
bool IsPrivateOrSpecial(const in_addr& address);
bool IsPrivateOrSpecial(const in6_addr& address);
bool IsPrivateOrSpecial(const IpAddress& address);
// False for non-IP families.
bool IsPrivateOrSpecial(const sockaddr* address, socklen_t length);

// 127.0.0.0/8, 0.0.0.0/8 and ::1, :: : addresses that reach the host itself
// when the proxy connects to them. A subset of IsPrivateOrSpecial.
bool IsHostLoopback(const IpAddress& address);

// Lower-cases and drops one trailing dot; nullopt if `host` is not a valid
// DNS name or IP literal (empty labels, bad characters, too long).
std::optional<std::string> NormalizeHost(std::string_view host);

// One allow-list entry: "api.example.com", "*.example.com" (any depth of
// subdomain, never the apex), "203.0.113.7", "2001:db8::1", "10.1.0.0/16".
class HostPattern {
 public:
  static Result<HostPattern> Parse(std::string_view text);
  // `name` must be normalized (NormalizeHost).
  bool MatchesName(std::string_view name) const;
  bool MatchesAddress(const IpAddress& address) const;
  // True only for a single-address entry ("10.0.2.2", "10.0.2.2/32"): a
  // wider network that happens to cover the address does not name it.
  bool IsExactly(const IpAddress& address) const;
  // Canonical text: what `cella allow-list ls` prints and `rm` matches.
  const std::string& text() const { return text_; }
  bool operator==(const HostPattern& other) const { return text_ == other.text_; }

 private:
  enum class Kind : uint8_t { kExact, kGlob, kNetwork };
  Kind kind_ = Kind::kExact;
  std::string text_;
  std::string suffix_;  // kGlob: ".example.com"
  IpAddress network_;   // kNetwork
  int prefix_bits_ = 0;
};

// A real credential the guest only knows by its placeholder.
struct Secret {
  std::string name;                // the environment variable name inside the guest
  std::string placeholder;         // "CELLA_SECRET_" + 32 hex: what the guest holds
  std::string value;               // never logged, never sent to the guest
  std::vector<HostPattern> hosts;  // requests to these hosts get the value
};
// "Secret{name=GITHUB_TOKEN placeholder=CELLA_SECRET_ab12… hosts=[api.github.test]
// value=<redacted>}"
std::string FormatRedacted(const Secret& secret);
std::ostream& operator<<(std::ostream& out, const Secret& secret);  // redacted, for gtest

// "CELLA_SECRET_" + 32 lower-case hex digits from getrandom(2).
Result<std::string> NewPlaceholder();

// name:port → address:port, like curl's --resolve. A pinned address is an
// explicit choice by whoever started the sandbox, so it is used even when it
// is private or loopback (that is how tests reach their 127.0.0.1 servers).
struct Pin {
  std::string name;  // normalized on Policy creation
  uint16_t port = 0;
  Endpoint target;
};

struct Decision {
  bool allowed = false;
  std::string reason;  // why it was blocked (empty when allowed)
  explicit operator bool() const { return allowed; }
};

struct PolicyConfig {
  std::vector<std::string> allow;  // HostPattern texts
  bool allow_private = false;
  bool intercept = false;
  // The default network: every public host, by name or address, without an
  // allow-list (and so without runtime edits). Private and special addresses
  // still follow allow_private, the host gateway allow_host_loopback.
  bool allow_all_public = false;
  // The host's loopback is open (`--allow-host-loopback`): the gateway
  // address (mapped to it, as in QEMU's user network) without an entry naming
  // it, and names resolving to loopback addresses. allow_private does not
  // open these: it is the LAN, not the host itself.
  bool allow_host_loopback = false;
  std::vector<Secret> secrets;
  std::vector<Pin> pins;
};

class Policy {
 public:
  // Validates every entry; errors name the bad entry (never a secret value).
  static Result<std::shared_ptr<Policy>> Create(PolicyConfig config);

  // Runtime allow-list changes. Add is idempotent; Remove returns whether the
  // entry (compared in canonical form) was present. Refused under
  // allow_all_public: there is no list to edit, and a first entry silently
  // closing every other host would surprise whoever added it.
  Status AddAllowed(std::string_view entry);
  Result<bool> RemoveAllowed(std::string_view entry);
  std::vector<std::string> AllowedEntries() const;
  // One allow-list edit, all or nothing: every entry is validated and every
  // removal must be present before anything changes; then `persist` is given
  // the resulting list (canonical texts) and the edit takes effect only if it
  // succeeds. Edits are serialized, so concurrent ones never lose each other.
  // Returns the list now in force.
  Result<std::vector<std::string>> EditAllowed(
      std::span<const std::string> add, std::span<const std::string> remove,
      const std::function<Status(const std::vector<std::string>& entries)>& persist);

  // A name or an IP literal (as in a Host header or SNI, port already
  // stripped). Names must match an allow entry. IP literals go to
  // CheckAddress.
  Decision Check(std::string_view host) const;
  // A destination address the guest named directly. Allowed when an allow
  // entry names it (even if private); otherwise a loopback address only with
  // allow_host_loopback, another private/special one only with
  // allow_private, and a public one only under allow_all (the guest must
  // otherwise use a name).
  Decision CheckAddress(const IpAddress& address) const;
  // Whether an address a (non-pinned) allowed name resolved to may be used as
  // its upstream: public, or loopback with allow_host_loopback, or other
  // private with allow_private, or named by an entry.
  bool MayConnectToResolved(const IpAddress& address) const;
  // Whether an allow entry (address or CIDR) names `address` itself, as
  // opposed to it passing by --allow-private.
  bool NamesAddress(const IpAddress& address) const;
  // An entry that is this one address, not a network covering it: the only
  // way to open the host itself (the gateway).
  bool NamesExactly(const IpAddress& address) const;

  bool allow_private() const { return allow_private_; }
  bool intercept() const { return intercept_; }
  bool allow_all_public() const { return allow_all_public_; }
  // Whether flows to the host gateway (the host itself) may pass: the flag,
  // or an entry that is exactly that address.
  bool MayReachHostGateway(const IpAddress& gateway) const;

  std::optional<Endpoint> PinFor(std::string_view name, uint16_t port) const;
  bool HasPin(std::string_view name) const;

  std::span<const Secret> secrets() const { return secrets_; }
  // `host` must be normalized.
  static bool SecretAppliesTo(const Secret& secret, std::string_view host);

 private:
  Policy(const PolicyConfig& flags, std::vector<Secret> secrets, std::vector<Pin> pins)
      : allow_private_(flags.allow_private),
        intercept_(flags.intercept),
        allow_all_public_(flags.allow_all_public),
        host_loopback_(flags.allow_host_loopback),
        secrets_(std::move(secrets)),
        pins_(std::move(pins)) {}

  const bool allow_private_;
  const bool intercept_;
  const bool allow_all_public_;
  const bool host_loopback_;
  const std::vector<Secret> secrets_;
  const std::vector<Pin> pins_;
  std::mutex edit_mutex_;  // serializes EditAllowed (held across persist)
  mutable std::shared_mutex mutex_;
  std::vector<HostPattern> allow_;  // guarded by mutex_
  // Interception with no allow-list: every public host is allowed, still
  // through the proxy. Set at creation only; the first AddAllowed clears it
  // (a list was asked for), and emptying a list never opens everything.
  bool allow_all_ = false;  // guarded by mutex_
};

}  // namespace cella::net
