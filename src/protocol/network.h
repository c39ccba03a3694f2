// What host and guest agree on about the guest's network, defined once:
// the addresses (the same under QEMU's user-mode network and cella's sealed
// network, so config.json does not change between them) and the one rule a
// host name must follow wherever cella accepts one (allow-lists, SNI, Host
// headers, the guest's hostname and extra hosts). No I/O: the static guest
// binaries link it too.
#pragma once

#include <string_view>

namespace cella::protocol {

inline constexpr const char* kGuestSubnet = "10.0.2.0/24";
inline constexpr int kGuestPrefixLength = 24;
inline constexpr const char* kGuestNetmask = "255.255.255.0";
// The host as the guest sees it: QEMU's user-network gateway, or the TAP
// (where cella's proxy listens) in the sealed network.
inline constexpr const char* kHostGateway = "10.0.2.2";
inline constexpr const char* kGuestDns = "10.0.2.3";
inline constexpr const char* kGuestIp = "10.0.2.15";

// Letters (either case), digits, '-' and '_' in dot-separated labels of
// 1-63 bytes, no label starting or ending with '-', 253 bytes in all, no
// trailing dot (callers that accept DNS's absolute form strip one first).
// '_' is allowed because real names carry it (SRV-style and some CDN
// hosts); IP literals are not names and are judged by their callers.
bool IsValidHostName(std::string_view name);

}  // namespace cella::protocol
