// What host and guest agree on about the guest's network, defined once:
// the addresses (the same under QEMU's user-mode network and cella's sealed
// network, so config.json does not change between them) and the one rule a
// host name must follow wherever cella accepts one (allow-lists, SNI, Host
// headers, the guest's hostname and extra hosts). No I/O: the static guest
// binaries link it too.
#pragma once

#include <array>
#include <string_view>
#include <utility>

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

// Trust of cella's egress CA inside the guest (when TLS is intercepted),
// defined once. The init writes the CA to kEgressCaFile and appends it to
// every bundle of kTrustBundles present in the image (Debian/Ubuntu and
// Alpine read the first, Alpine's libressl/openssl the second, Fedora/RHEL
// the third); the sandbox's environment points the usual TLS stacks at them
// (kTrustEnvironment), unless the image or the user set those already.
inline constexpr const char* kEgressCaFile = "/etc/ssl/certs/cella-egress-ca.pem";
inline constexpr std::array<const char*, 3> kTrustBundles = {
    "/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem", "/etc/pki/tls/certs/ca-bundle.crt"};
inline constexpr std::array<std::pair<const char*, const char*>, 4> kTrustEnvironment = {{
    {"SSL_CERT_FILE", kTrustBundles[0]},
    {"REQUESTS_CA_BUNDLE", kTrustBundles[0]},
    {"CURL_CA_BUNDLE", kTrustBundles[0]},
    {"NODE_EXTRA_CA_CERTS", kEgressCaFile},
}};

}  // namespace cella::protocol
