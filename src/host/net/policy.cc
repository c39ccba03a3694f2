#include "host/net/policy.h"

#include <arpa/inet.h>
#include <sys/random.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <mutex>
#include <ostream>

#include "protocol/network.h"

namespace cella::net {
namespace {

constexpr std::string_view kPlaceholderPrefix = "CELLA_SECRET_";
constexpr size_t kPlaceholderHexDigits = 32;

bool InV4Net(uint32_t host_order, uint32_t network, int bits) {
  uint32_t mask = bits == 0 ? 0 : ~uint32_t{0} << (32 - bits);
  return (host_order & mask) == (network & mask);
}

bool PrefixMatches(const uint8_t* a, const uint8_t* b, int bits) {
  int whole = bits / 8;
  if (std::memcmp(a, b, static_cast<size_t>(whole)) != 0) return false;
  int rest = bits % 8;
  if (rest == 0) return true;
  auto mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (a[whole] & mask) == (b[whole] & mask);
}

bool IsV4Mapped(const in6_addr& a) {
  static constexpr uint8_t kPrefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return std::memcmp(a.s6_addr, kPrefix, sizeof(kPrefix)) == 0;
}

bool IsSecretName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    char c = name[i];
    bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool IsPlaceholder(std::string_view text) {
  if (!text.starts_with(kPlaceholderPrefix)) return false;
  std::string_view hex = text.substr(kPlaceholderPrefix.size());
  if (hex.size() != kPlaceholderHexDigits) return false;
  return std::all_of(hex.begin(), hex.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

}  // namespace

IpAddress IpAddress::V4(in_addr address) {
  IpAddress ip;
  ip.family = Family::kV4;
  std::memcpy(ip.bytes.data(), &address.s_addr, 4);
  return ip;
}

IpAddress IpAddress::V6(const in6_addr& address) {
  if (IsV4Mapped(address)) {
    in_addr v4;
    std::memcpy(&v4.s_addr, address.s6_addr + 12, 4);
    return V4(v4);
  }
  IpAddress ip;
  ip.family = Family::kV6;
  std::memcpy(ip.bytes.data(), address.s6_addr, 16);
  return ip;
}

std::optional<IpAddress> IpAddress::Parse(std::string_view text) {
  if (text.size() >= 2 && text.front() == '[' && text.back() == ']') {
    text = text.substr(1, text.size() - 2);
  }
  if (text.empty() || text.size() > INET6_ADDRSTRLEN) return std::nullopt;
  std::string buffer(text);
  in_addr v4;
  if (::inet_pton(AF_INET, buffer.c_str(), &v4) == 1) return V4(v4);
  in6_addr v6;
  if (::inet_pton(AF_INET6, buffer.c_str(), &v6) == 1) return V6(v6);
  return std::nullopt;
}

std::optional<IpAddress> IpAddress::FromSockaddr(const sockaddr* address, socklen_t length) {
  if (address == nullptr) return std::nullopt;
  if (address->sa_family == AF_INET && length >= static_cast<socklen_t>(sizeof(sockaddr_in))) {
    sockaddr_in v4;
    std::memcpy(&v4, address, sizeof(v4));
    return V4(v4.sin_addr);
  }
  if (address->sa_family == AF_INET6 && length >= static_cast<socklen_t>(sizeof(sockaddr_in6))) {
    sockaddr_in6 v6;
    std::memcpy(&v6, address, sizeof(v6));
    return V6(v6.sin6_addr);
  }
  return std::nullopt;
}

in_addr IpAddress::ToInAddr() const {
  in_addr v4{};
  std::memcpy(&v4.s_addr, bytes.data(), 4);
  return v4;
}

in6_addr IpAddress::ToIn6Addr() const {
  in6_addr v6{};
  std::memcpy(v6.s6_addr, bytes.data(), 16);
  return v6;
}

std::string IpAddress::ToString() const {
  char text[INET6_ADDRSTRLEN] = {};
  if (family == Family::kV4) {
    in_addr v4 = ToInAddr();
    ::inet_ntop(AF_INET, &v4, text, sizeof(text));
  } else {
    in6_addr v6 = ToIn6Addr();
    ::inet_ntop(AF_INET6, &v6, text, sizeof(text));
  }
  return text;
}

std::string Endpoint::ToString() const {
  if (address.family == IpAddress::Family::kV6) {
    return "[" + address.ToString() + "]:" + std::to_string(port);
  }
  return address.ToString() + ":" + std::to_string(port);
}

bool IsPrivateOrSpecial(const in_addr& address) {
  uint32_t a = ntohl(address.s_addr);
  return InV4Net(a, 0x00000000, 8) ||   // 0.0.0.0/8 "this network"
         InV4Net(a, 0x0a000000, 8) ||   // 10/8
         InV4Net(a, 0x64400000, 10) ||  // 100.64/10 CGNAT
         InV4Net(a, 0x7f000000, 8) ||   // 127/8
         InV4Net(a, 0xa9fe0000, 16) ||  // 169.254/16 link-local, cloud metadata
         InV4Net(a, 0xac100000, 12) ||  // 172.16/12
         InV4Net(a, 0xc0000000, 24) ||  // 192.0.0/24 IETF protocol assignments
         InV4Net(a, 0xc0a80000, 16) ||  // 192.168/16
         InV4Net(a, 0xc6120000, 15) ||  // 198.18/15 benchmarking
         InV4Net(a, 0xe0000000, 4) ||   // 224/4 multicast
         InV4Net(a, 0xf0000000, 4);     // 240/4 reserved, includes 255.255.255.255
}

bool IsPrivateOrSpecial(const in6_addr& address) {
  if (IsV4Mapped(address)) {
    in_addr v4;
    std::memcpy(&v4.s_addr, address.s6_addr + 12, 4);
    return IsPrivateOrSpecial(v4);
  }
  const uint8_t* b = address.s6_addr;
  static constexpr uint8_t kZero[16] = {};
  if (std::memcmp(b, kZero, 15) == 0 && (b[15] == 0 || b[15] == 1)) return true;  // ::, ::1
  if ((b[0] & 0xfe) == 0xfc) return true;                                         // fc00::/7
  if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) return true;                         // fe80::/10
  if (b[0] == 0xff) return true;                                                  // multicast
  if (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0) return true;  // fec0::/10 site-local
  // Prefixes that embed an IPv4 address the host would reach: judge that one.
  static constexpr uint8_t kNat64[12] = {0x00, 0x64, 0xff, 0x9b};  // 64:ff9b::/96
  if (std::memcmp(b, kNat64, 12) == 0) {
    in_addr v4;
    std::memcpy(&v4.s_addr, b + 12, 4);
    return IsPrivateOrSpecial(v4);
  }
  if (b[0] == 0x20 && b[1] == 0x02) return true;  // 2002::/16 6to4: refuse outright
  return false;
}

bool IsHostLoopback(const IpAddress& address) {
  if (address.family == IpAddress::Family::kV4) {
    uint32_t a = ntohl(address.ToInAddr().s_addr);
    return InV4Net(a, 0x7f000000, 8) || InV4Net(a, 0x00000000, 8);
  }
  const auto& b = address.bytes;
  return std::all_of(b.begin(), b.begin() + 15, [](uint8_t x) { return x == 0; }) &&
         (b[15] == 0 || b[15] == 1);
}

bool IsPrivateOrSpecial(const IpAddress& address) {
  if (address.family == IpAddress::Family::kV4) return IsPrivateOrSpecial(address.ToInAddr());
  return IsPrivateOrSpecial(address.ToIn6Addr());
}

bool IsPrivateOrSpecial(const sockaddr* address, socklen_t length) {
  auto ip = IpAddress::FromSockaddr(address, length);
  return ip && IsPrivateOrSpecial(*ip);
}

std::optional<std::string> NormalizeHost(std::string_view host) {
  if (auto ip = IpAddress::Parse(host)) return ip->ToString();
  if (host.ends_with('.')) host.remove_suffix(1);
  std::string name(host);
  std::transform(name.begin(), name.end(), name.begin(), [](char c) {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
  });
  if (!protocol::IsValidHostName(name)) return std::nullopt;
  return name;
}

Result<HostPattern> HostPattern::Parse(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
  const std::string quoted = "\"" + std::string(text.substr(0, 300)) + "\"";
  HostPattern pattern;
  if (size_t slash = text.find('/'); slash != std::string_view::npos) {
    auto network = IpAddress::Parse(text.substr(0, slash));
    std::string_view bits_text = text.substr(slash + 1);
    int bits = -1;
    auto [end, ec] = std::from_chars(bits_text.data(), bits_text.data() + bits_text.size(), bits);
    int max_bits = network && network->family == IpAddress::Family::kV4 ? 32 : 128;
    if (!network || ec != std::errc() || end != bits_text.data() + bits_text.size() ||
        bits_text.empty() || bits < 0 || bits > max_bits) {
      return Fail("allow entry " + quoted + ": not a valid CIDR (want ADDRESS/BITS)");
    }
    // Clear the host bits so the canonical text is the network itself.
    size_t total = network->family == IpAddress::Family::kV4 ? 4 : 16;
    for (size_t i = 0; i < total; ++i) {
      int keep = std::clamp(bits - static_cast<int>(i * 8), 0, 8);
      network->bytes[i] &= static_cast<uint8_t>(keep == 0 ? 0 : 0xff << (8 - keep));
    }
    pattern.kind_ = Kind::kNetwork;
    pattern.network_ = *network;
    pattern.prefix_bits_ = bits;
    pattern.text_ = network->ToString() + "/" + std::to_string(bits);
    return pattern;
  }
  if (auto address = IpAddress::Parse(text)) {
    pattern.kind_ = Kind::kNetwork;
    pattern.network_ = *address;
    pattern.prefix_bits_ = address->family == IpAddress::Family::kV4 ? 32 : 128;
    pattern.text_ = address->ToString();
    return pattern;
  }
  if (text.starts_with("*.")) {
    auto base = NormalizeHost(text.substr(2));
    if (!base || IpAddress::Parse(*base)) {
      return Fail("allow entry " + quoted + ": not a valid host glob (want *.example.com)");
    }
    pattern.kind_ = Kind::kGlob;
    pattern.suffix_ = "." + *base;
    pattern.text_ = "*" + pattern.suffix_;
    return pattern;
  }
  auto name = NormalizeHost(text);
  if (!name) {
    return Fail("allow entry " + quoted + ": not a host name, *.domain glob, IP address or CIDR");
  }
  pattern.kind_ = Kind::kExact;
  pattern.text_ = *name;
  return pattern;
}

bool HostPattern::MatchesName(std::string_view name) const {
  switch (kind_) {
    case Kind::kExact:
      return name == text_;
    case Kind::kGlob:
      return name.size() > suffix_.size() && name.ends_with(suffix_);
    case Kind::kNetwork:
      if (auto address = IpAddress::Parse(name)) return MatchesAddress(*address);
      return false;
  }
  return false;
}

bool HostPattern::IsExactly(const IpAddress& address) const {
  const int full_bits = address.family == IpAddress::Family::kV4 ? 32 : 128;
  return kind_ == Kind::kNetwork && prefix_bits_ == full_bits && MatchesAddress(address);
}

bool HostPattern::MatchesAddress(const IpAddress& address) const {
  if (kind_ != Kind::kNetwork || address.family != network_.family) return false;
  return PrefixMatches(address.bytes.data(), network_.bytes.data(), prefix_bits_);
}

std::string FormatRedacted(const Secret& secret) {
  std::string out =
      "Secret{name=" + secret.name + " placeholder=" + secret.placeholder + " hosts=[";
  for (size_t i = 0; i < secret.hosts.size(); ++i) {
    if (i > 0) out += ",";
    out += secret.hosts[i].text();
  }
  out += "] value=<redacted>}";
  return out;
}

std::ostream& operator<<(std::ostream& out, const Secret& secret) {
  return out << FormatRedacted(secret);
}

Result<std::string> NewPlaceholder() {
  uint8_t random[kPlaceholderHexDigits / 2];
  size_t filled = 0;
  while (filled < sizeof(random)) {
    ssize_t n = ::getrandom(random + filled, sizeof(random) - filled, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno("getrandom for a secret placeholder");
    }
    filled += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string placeholder(kPlaceholderPrefix);
  for (uint8_t byte : random) {
    placeholder += kHex[byte >> 4];
    placeholder += kHex[byte & 0xf];
  }
  return placeholder;
}

Result<std::shared_ptr<Policy>> Policy::Create(PolicyConfig config) {
  std::vector<HostPattern> allow;
  for (const std::string& entry : config.allow) {
    HostPattern pattern = CELLA_TRY(HostPattern::Parse(entry));
    if (std::find(allow.begin(), allow.end(), pattern) == allow.end()) allow.push_back(pattern);
  }
  for (Secret& secret : config.secrets) {
    // Error messages name the secret, never its value.
    const std::string where = "secret " + secret.name.substr(0, 100);
    if (!IsSecretName(secret.name)) {
      return Fail(where + ": name must be letters, digits and underscores");
    }
    if (secret.placeholder.empty()) secret.placeholder = CELLA_TRY_CTX(NewPlaceholder(), where);
    if (!IsPlaceholder(secret.placeholder)) {
      return Fail(where + ": placeholder must be CELLA_SECRET_ followed by 32 hex digits");
    }
    if (secret.value.empty()) return Fail(where + ": empty value");
    if (secret.value.find_first_of(std::string_view("\r\n\0", 3)) != std::string::npos) {
      return Fail(where + ": value contains CR, LF or NUL and cannot go in an HTTP header");
    }
    if (secret.hosts.empty()) return Fail(where + ": no hosts given (NAME@host)");
    for (const Secret& other : config.secrets) {
      if (&other != &secret && other.placeholder == secret.placeholder) {
        return Fail(where + ": placeholder shared with secret " + other.name);
      }
    }
  }
  for (Pin& pin : config.pins) {
    auto name = NormalizeHost(pin.name);
    if (!name || pin.port == 0 || pin.target.port == 0) {
      return Fail("pin " + pin.name.substr(0, 300) + ":" + std::to_string(pin.port) +
                  ": want NAME:PORT:ADDRESS:PORT with non-zero ports");
    }
    pin.name = *name;
  }
  if (config.allow_all_public && !allow.empty())
    return Fail("policy: an allow-list and allow_all_public exclude each other");
  auto policy = std::shared_ptr<Policy>(
      new Policy(config, std::move(config.secrets), std::move(config.pins)));
  policy->allow_all_ = (allow.empty() && config.intercept) || config.allow_all_public;
  policy->allow_ = std::move(allow);
  return policy;
}

namespace {
constexpr const char* kNoListToEdit =
    "this sandbox has no allow-list: it reaches every public host (the default network); "
    "start it with --allow-host to restrict it to a list";
}  // namespace

Status Policy::AddAllowed(std::string_view entry) {
  if (allow_all_public_) return Fail(kNoListToEdit);
  HostPattern pattern = CELLA_TRY(HostPattern::Parse(entry));
  std::unique_lock lock(mutex_);
  if (std::find(allow_.begin(), allow_.end(), pattern) == allow_.end()) allow_.push_back(pattern);
  allow_all_ = false;
  return {};
}

Result<bool> Policy::RemoveAllowed(std::string_view entry) {
  if (allow_all_public_) return Fail(kNoListToEdit);
  HostPattern pattern = CELLA_TRY(HostPattern::Parse(entry));
  std::unique_lock lock(mutex_);
  auto it = std::find(allow_.begin(), allow_.end(), pattern);
  if (it == allow_.end()) return false;
  allow_.erase(it);
  return true;
}

Result<std::vector<std::string>> Policy::EditAllowed(
    std::span<const std::string> add, std::span<const std::string> remove,
    const std::function<Status(const std::vector<std::string>& entries)>& persist) {
  if (allow_all_public_) return Fail(kNoListToEdit);
  std::lock_guard edit(edit_mutex_);
  std::vector<HostPattern> next;
  {
    std::shared_lock lock(mutex_);
    next = allow_;
  }
  for (const std::string& entry : remove) {
    HostPattern pattern = CELLA_TRY(HostPattern::Parse(entry));
    auto it = std::find(next.begin(), next.end(), pattern);
    if (it == next.end()) return Fail(pattern.text() + " is not on the allow-list");
    next.erase(it);
  }
  for (const std::string& entry : add) {
    HostPattern pattern = CELLA_TRY(HostPattern::Parse(entry));
    if (std::find(next.begin(), next.end(), pattern) == next.end()) next.push_back(pattern);
  }
  std::vector<std::string> texts;
  texts.reserve(next.size());
  for (const HostPattern& pattern : next) texts.push_back(pattern.text());
  CELLA_TRY(persist(texts));
  std::unique_lock lock(mutex_);
  allow_ = std::move(next);
  if (!add.empty()) allow_all_ = false;
  return texts;
}

std::vector<std::string> Policy::AllowedEntries() const {
  std::shared_lock lock(mutex_);
  std::vector<std::string> entries;
  entries.reserve(allow_.size());
  for (const HostPattern& pattern : allow_) entries.push_back(pattern.text());
  return entries;
}

Decision Policy::Check(std::string_view host) const {
  auto name = NormalizeHost(host);
  if (!name) return {false, "not a valid host name"};
  if (auto address = IpAddress::Parse(*name)) return CheckAddress(*address);
  std::shared_lock lock(mutex_);
  if (allow_all_) return {true, ""};
  for (const HostPattern& pattern : allow_) {
    if (pattern.MatchesName(*name)) return {true, ""};
  }
  return {false, "host not in allow list"};
}

bool Policy::NamesExactly(const IpAddress& address) const {
  std::shared_lock lock(mutex_);
  return std::any_of(allow_.begin(), allow_.end(),
                     [&](const HostPattern& p) { return p.IsExactly(address); });
}

bool Policy::MayReachHostGateway(const IpAddress& gateway) const {
  return host_loopback_ || NamesExactly(gateway);
}

bool Policy::NamesAddress(const IpAddress& address) const {
  std::shared_lock lock(mutex_);
  return std::any_of(allow_.begin(), allow_.end(),
                     [&](const HostPattern& p) { return p.MatchesAddress(address); });
}

Decision Policy::CheckAddress(const IpAddress& address) const {
  if (NamesAddress(address)) return {true, ""};
  // The gateway literal (a Host header naming it, say) is the host itself:
  // open exactly when the gateway is.
  static const IpAddress kGateway = *IpAddress::Parse(protocol::kHostGateway);
  if (host_loopback_ && address == kGateway) return {true, ""};
  if (IsHostLoopback(address)) {
    if (host_loopback_) return {true, ""};
    return {false,
            "the host's loopback (--allow-private does not open it; use "
            "--allow-host-loopback)"};
  }
  if (IsPrivateOrSpecial(address)) {
    if (allow_private_) return {true, ""};
    return {false, "private or special address (use --allow-private or allow it by address)"};
  }
  {
    std::shared_lock lock(mutex_);
    if (allow_all_) return {true, ""};
  }
  return {false, "address not in allow list (connect by an allowed name)"};
}

bool Policy::MayConnectToResolved(const IpAddress& address) const {
  if (NamesAddress(address)) return true;
  if (IsHostLoopback(address)) return host_loopback_;
  return !IsPrivateOrSpecial(address) || allow_private_;
}

std::optional<Endpoint> Policy::PinFor(std::string_view name, uint16_t port) const {
  for (const Pin& pin : pins_) {
    if (pin.name == name && pin.port == port) return pin.target;
  }
  return std::nullopt;
}

bool Policy::HasPin(std::string_view name) const {
  return std::any_of(pins_.begin(), pins_.end(), [&](const Pin& p) { return p.name == name; });
}

bool Policy::SecretAppliesTo(const Secret& secret, std::string_view host) {
  return std::any_of(secret.hosts.begin(), secret.hosts.end(),
                     [&](const HostPattern& p) { return p.MatchesName(host); });
}

}  // namespace cella::net
