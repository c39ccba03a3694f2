// The sealed sandbox network: a private network namespace holding one TAP
// device for QEMU, an nftables ruleset that turns every guest TCP flow into a
// connection to one listening socket, and a UDP socket for the guest's DNS.
//
// The supervisor never enters the namespace. A short-lived child builds it
// and hands back descriptors over SCM_RIGHTS; sockets keep the namespace they
// were created in, so the supervisor accepts guest flows and answers DNS from
// the host namespace, where its own upstream connections go out normally.
// Nothing needs cleaning up: the namespace, the TAP and the ruleset live
// exactly as long as the last of these descriptors (no named netns, no
// persistent TAP), so a killed supervisor leaves nothing behind.
//
// What the guest sees (same addresses as QEMU user-mode networking, so the
// guest config does not change): it is 10.0.2.15/24, the gateway 10.0.2.2 is
// the TAP's address, DNS is 10.0.2.3 (a second address on the TAP).
// Inside the namespace:
//   - TCP from the TAP to any address and port is redirected (nat prerouting)
//     to kGatewayAddress:proxy_port, where `proxy_listener` accepts it;
//     OriginalDestination() recovers where the guest meant to go.
//   - UDP to 10.0.2.3:53 reaches `dns_socket`.
//   - Everything else arriving on the TAP (other UDP, ICMP, IPv6) is dropped,
//     and nothing is forwarded: the namespace has no route out at all.
//
// Thread-safety: CreateIsolatedNetwork may be called from any thread of a
// multi-threaded process (the child it forks makes only async-signal-safe
// calls); OriginalDestination is a getsockopt.
#pragma once

#include <netinet/in.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "base/result.h"
#include "base/unique_fd.h"
#include "protocol/network.h"

namespace cella::net {

inline constexpr const char* kTapName = "cella0";
// The TAP; proxy_listener's address.
inline constexpr const char* kGatewayAddress = protocol::kHostGateway;
inline constexpr const char* kDnsAddress = protocol::kGuestDns;
inline constexpr uint16_t kDnsPort = 53;
inline constexpr int kNetworkPrefix = protocol::kGuestPrefixLength;

struct IsolatedNetworkOptions {
  uint16_t proxy_port = 15001;  // inside the namespace; not reachable from the host
  int mtu = 1500;               // of the TAP (the guest should use the same)
};

enum class NamespaceOwner {
  kHost,             // we were root: a network namespace of the host's user namespace
  kOwnUserNamespace  // unprivileged: a new user namespace maps our uid/gid to 0
};

struct IsolatedNetwork {
  UniqueFd tap;             // IFF_TAP|IFF_NO_PI, no vnet header: for QEMU `-netdev tap,fd=`
  UniqueFd proxy_listener;  // TCP, bound to kGatewayAddress:proxy_port, listening, blocking
  UniqueFd dns_socket;      // UDP, bound to kDnsAddress:53, blocking
  UniqueFd netns;           // the namespace itself (/proc/<child>/ns/net): setns() for diagnostics
  NamespaceOwner owner = NamespaceOwner::kHost;
  uint16_t proxy_port = 0;
};

// Builds the namespace in a child process: unshare(CLONE_NEWNET) when root
// (effective uid 0), else CLONE_NEWUSER|CLONE_NEWNET with the caller's
// uid/gid mapped to 0 (setgroups denied). Then: lo up; the TAP kTapName with
// kGatewayAddress/24 and kDnsAddress/24, the MTU, up; the ruleset loaded with
// `nft -f -` run inside the namespace; the sockets bound. Bounded in time
// (the child is killed after 20 s). Errors name the step that failed, with
// nft's own message when the ruleset was refused. Needs /dev/net/tun to be
// openable by the caller and `nft` (/usr/sbin/nft or on PATH).
Result<IsolatedNetwork> CreateIsolatedNetwork(const IsolatedNetworkOptions& options);

// CreateIsolatedNetwork in two steps, so that QEMU can start with the TAP
// while the child loads the ruleset (an nft process: tens of ms) and binds
// the sockets. Until Finish() succeeded the namespace may have no ruleset:
// a guest must not run on the TAP before then (a restored VM held with -S,
// or a clone waiting for its go line, sends nothing). The namespace has no
// route out either way, and its sockets only exist once the rules do.
class PendingIsolatedNetwork {
 public:
  PendingIsolatedNetwork() = default;
  PendingIsolatedNetwork(PendingIsolatedNetwork&& other) noexcept;
  PendingIsolatedNetwork& operator=(PendingIsolatedNetwork&& other) noexcept;
  PendingIsolatedNetwork(const PendingIsolatedNetwork&) = delete;
  PendingIsolatedNetwork& operator=(const PendingIsolatedNetwork&) = delete;
  // Kills and reaps a child that was not waited for by Finish().
  ~PendingIsolatedNetwork();

  // The TAP, up and addressed (for QEMU `-netdev tap,fd=`); Finish() moves it
  // into the IsolatedNetwork, so take a copy's number before.
  int tap() const { return tap_.Get(); }
  // Waits (bounded, as CreateIsolatedNetwork) for the ruleset and the
  // sockets. Once: a second call fails.
  Result<IsolatedNetwork> Finish();

 private:
  friend Result<PendingIsolatedNetwork> StartIsolatedNetwork(const IsolatedNetworkOptions&);
  void Abandon();

  UniqueFd tap_;
  UniqueFd parent_end_;
  pid_t pid_ = -1;
  std::chrono::steady_clock::time_point deadline_{};
  NamespaceOwner owner_ = NamespaceOwner::kHost;
  uint16_t proxy_port_ = 0;
};

// Forks the child and returns once the TAP is up (or the child failed
// before that, with CreateIsolatedNetwork's errors).
Result<PendingIsolatedNetwork> StartIsolatedNetwork(const IsolatedNetworkOptions& options);

// The nftables ruleset CreateIsolatedNetwork loads (exposed for tests and
// `cella diagnose`).
std::string IsolatedNetworkRuleset(const IsolatedNetworkOptions& options);

// Where the guest meant to connect, for a connection accepted on
// proxy_listener (conntrack's SO_ORIGINAL_DST; IPv4 only, as the guest is).
Result<sockaddr_in> OriginalDestination(int accepted_fd);

}  // namespace cella::net
