#include "host/net/dns.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include "base/log.h"

namespace cella::net {
namespace {

constexpr uint32_t kVirtualBase = 0xc6120000;  // 198.18.0.0
constexpr uint32_t kVirtualSize = 1u << 17;    // /15
constexpr size_t kHeaderSize = 12;
constexpr size_t kMaxNameWireBytes = 255;
constexpr uint16_t kFlagResponse = 0x8000;
constexpr uint16_t kFlagAuthoritative = 0x0400;
constexpr uint16_t kFlagRecursionDesired = 0x0100;
constexpr uint16_t kFlagRecursionAvailable = 0x0080;
constexpr uint16_t kClassIn = 1;

uint16_t Get16(std::span<const std::byte> bytes, size_t at) {
  return static_cast<uint16_t>((std::to_integer<uint16_t>(bytes[at]) << 8) |
                               std::to_integer<uint16_t>(bytes[at + 1]));
}

void Put16(std::vector<std::byte>& out, uint16_t value) {
  out.push_back(static_cast<std::byte>(value >> 8));
  out.push_back(static_cast<std::byte>(value & 0xff));
}

void Put32(std::vector<std::byte>& out, uint32_t value) {
  Put16(out, static_cast<uint16_t>(value >> 16));
  Put16(out, static_cast<uint16_t>(value & 0xffff));
}

uint16_t OpcodeOf(uint16_t flags) { return (flags >> 11) & 0xf; }

uint16_t ReplyFlags(uint16_t query_flags, DnsRcode rcode) {
  return static_cast<uint16_t>(kFlagResponse | (query_flags & 0x7800) | kFlagAuthoritative |
                               (query_flags & kFlagRecursionDesired) | kFlagRecursionAvailable |
                               static_cast<uint16_t>(rcode));
}

}  // namespace

Result<std::vector<IpAddress>> SystemResolve(const std::string& name) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* list = nullptr;
  int rc = ::getaddrinfo(name.c_str(), nullptr, &hints, &list);
  if (rc == EAI_NONAME || rc == EAI_NODATA) return std::vector<IpAddress>{};
  if (rc == EAI_SYSTEM) return FailErrno("getaddrinfo " + name);
  if (rc != 0) return Fail("getaddrinfo " + name + ": " + ::gai_strerror(rc));
  std::vector<IpAddress> addresses;
  for (addrinfo* entry = list; entry != nullptr; entry = entry->ai_next) {
    auto address = IpAddress::FromSockaddr(entry->ai_addr, entry->ai_addrlen);
    if (address && std::find(addresses.begin(), addresses.end(), *address) == addresses.end()) {
      addresses.push_back(*address);
    }
  }
  ::freeaddrinfo(list);
  return addresses;
}

bool FakeIpTable::IsVirtual(in_addr address) {
  uint32_t a = ntohl(address.s_addr);
  return a - kVirtualBase < kVirtualSize;
}

bool FakeIpTable::IsVirtual(const IpAddress& address) {
  return address.family == IpAddress::Family::kV4 && IsVirtual(address.ToInAddr());
}

Result<in_addr> FakeIpTable::AddressFor(const std::string& name) {
  std::lock_guard lock(mutex_);
  uint32_t offset;
  if (auto it = by_name_.find(name); it != by_name_.end()) {
    offset = it->second;
  } else {
    // The last address of the block is left out: it reads like a broadcast.
    if (next_offset_ >= kVirtualSize - 1) {
      return Fail("virtual address space 198.18.0.0/15 exhausted (" +
                  std::to_string(by_name_.size()) + " names); cannot answer " + name);
    }
    offset = next_offset_++;
    by_name_.emplace(name, offset);
    by_offset_.emplace(offset, name);
  }
  in_addr address;
  address.s_addr = htonl(kVirtualBase + offset);
  return address;
}

std::optional<std::string> FakeIpTable::NameFor(in_addr address) const {
  if (!IsVirtual(address)) return std::nullopt;
  std::lock_guard lock(mutex_);
  auto it = by_offset_.find(ntohl(address.s_addr) - kVirtualBase);
  if (it == by_offset_.end()) return std::nullopt;
  return it->second;
}

std::string FakeIpTable::Export() const {
  std::lock_guard lock(mutex_);
  std::string out = "cella-fake-ips 1\n";
  for (const auto& [offset, name] : by_offset_) out += std::to_string(offset) + " " + name + "\n";
  return out;
}

Status FakeIpTable::Import(std::string_view text) {
  if (text.size() > kMaxExportBytes) return Fail("fake-ip table: larger than the limit");
  constexpr std::string_view kHeader = "cella-fake-ips 1\n";
  if (!text.starts_with(kHeader)) return Fail("fake-ip table: not a cella-fake-ips 1 file");
  text.remove_prefix(kHeader.size());
  std::map<std::string, uint32_t> by_name;
  std::map<uint32_t, std::string> by_offset;
  uint32_t highest = 0;
  size_t line_no = 1;
  while (!text.empty()) {
    ++line_no;
    size_t end = text.find('\n');
    if (end == std::string_view::npos)
      return Fail("fake-ip table: line " + std::to_string(line_no) + " is not terminated");
    std::string_view line = text.substr(0, end);
    text.remove_prefix(end + 1);
    size_t space = line.find(' ');
    auto bad = [&](std::string_view why) {
      return Fail("fake-ip table: line " + std::to_string(line_no) + ": " + std::string(why));
    };
    if (space == std::string_view::npos || space == 0 || space > 6) return bad("no offset");
    uint32_t offset = 0;
    for (char c : line.substr(0, space)) {
      if (c < '0' || c > '9') return bad("offset is not a number");
      offset = offset * 10 + uint32_t(c - '0');
    }
    // The same range AddressFor hands out.
    if (offset < 1 || offset >= kVirtualSize - 1) return bad("offset outside the block");
    std::string_view name = line.substr(space + 1);
    if (name.empty() || name.size() > 255) return bad("name of a wrong length");
    for (char c : name)
      if (c <= ' ' || c > '~') return bad("name has a byte outside printable ASCII");
    if (!by_offset.emplace(offset, std::string(name)).second) return bad("offset used twice");
    if (!by_name.emplace(std::string(name), offset).second) return bad("name used twice");
    highest = std::max(highest, offset);
  }
  std::lock_guard lock(mutex_);
  if (!by_name_.empty()) return Fail("fake-ip table: import into a table in use");
  by_name_ = std::move(by_name);
  by_offset_ = std::move(by_offset);
  next_offset_ = highest + 1;
  return {};
}

void FakeIpTable::SetResolved(const std::string& name, std::vector<IpAddress> addresses) {
  std::lock_guard lock(mutex_);
  resolved_[name] = ResolvedEntry{std::move(addresses), std::chrono::steady_clock::now()};
}

std::optional<std::vector<IpAddress>> FakeIpTable::Resolved(
    const std::string& name, std::chrono::steady_clock::duration max_age) const {
  std::lock_guard lock(mutex_);
  auto it = resolved_.find(name);
  if (it == resolved_.end()) return std::nullopt;
  if (std::chrono::steady_clock::now() - it->second.when > max_age) return std::nullopt;
  return it->second.addresses;
}

Result<DnsQuery> ParseDnsQuery(std::span<const std::byte> packet) {
  if (packet.size() < kHeaderSize) return Fail("dns: packet shorter than a header");
  DnsQuery query;
  query.id = Get16(packet, 0);
  query.flags = Get16(packet, 2);
  if (query.flags & kFlagResponse) return Fail("dns: packet is a response, not a query");
  if (OpcodeOf(query.flags) != 0) return Fail("dns: not a standard query (opcode)");
  uint16_t questions = Get16(packet, 4);
  uint16_t answers = Get16(packet, 6);
  uint16_t authority = Get16(packet, 8);
  uint16_t additional = Get16(packet, 10);
  if (questions != 1) return Fail("dns: want exactly one question");
  if (answers != 0 || authority != 0) return Fail("dns: query carries answer/authority records");
  size_t at = kHeaderSize;
  size_t wire_bytes = 0;
  for (;;) {
    if (at >= packet.size()) return Fail("dns: question name runs past the packet");
    auto length = std::to_integer<uint8_t>(packet[at]);
    if ((length & 0xc0) == 0xc0) return Fail("dns: compression pointer in the question");
    if (length & 0xc0) return Fail("dns: unknown label type");
    wire_bytes += 1 + length;
    if (wire_bytes > kMaxNameWireBytes) return Fail("dns: name longer than 255 bytes");
    ++at;
    if (length == 0) break;
    if (packet.size() - at < length) return Fail("dns: label runs past the packet");
    if (!query.name.empty()) query.name += '.';
    for (size_t i = 0; i < length; ++i) {
      auto c = std::to_integer<char>(packet[at + i]);
      // A dot inside a label would make two different names print alike.
      if (c == '.' || c == '\0') return Fail("dns: label contains '.' or NUL");
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
      query.name += c;
    }
    at += length;
  }
  if (packet.size() - at < 4) return Fail("dns: question type/class missing");
  query.qtype = Get16(packet, at);
  query.qclass = Get16(packet, at + 2);
  query.question.assign(packet.begin() + kHeaderSize,
                        packet.begin() + static_cast<ptrdiff_t>(at + 4));
  at += 4;
  if (additional == 0 && at != packet.size()) return Fail("dns: trailing bytes after the question");
  return query;
}

std::vector<std::byte> BuildDnsResponse(const DnsQuery& query, DnsRcode rcode,
                                        std::optional<in_addr> address, uint32_t ttl) {
  std::vector<std::byte> out;
  out.reserve(kHeaderSize + query.question.size() + 16);
  Put16(out, query.id);
  Put16(out, ReplyFlags(query.flags, rcode));
  Put16(out, 1);
  Put16(out, address ? 1 : 0);
  Put16(out, 0);
  Put16(out, 0);
  out.insert(out.end(), query.question.begin(), query.question.end());
  if (address) {
    Put16(out, 0xc000 | kHeaderSize);  // pointer to the question's name
    Put16(out, static_cast<uint16_t>(DnsType::kA));
    Put16(out, kClassIn);
    Put32(out, ttl);
    Put16(out, 4);
    Put32(out, ntohl(address->s_addr));
  }
  return out;
}

std::vector<std::byte> BuildHeaderOnlyReply(std::span<const std::byte> packet, DnsRcode rcode) {
  if (packet.size() < kHeaderSize) return {};
  std::vector<std::byte> out;
  Put16(out, Get16(packet, 0));
  Put16(out, ReplyFlags(Get16(packet, 2), rcode));
  for (int i = 0; i < 4; ++i) Put16(out, 0);
  return out;
}

Result<std::unique_ptr<DnsServer>> DnsServer::Start(UniqueFd udp_socket, DnsServerOptions options) {
  if (!udp_socket) return Fail("dns server: no socket");
  if (!options.policy || !options.table || !options.resolver) {
    return Fail("dns server: policy, table and resolver are required");
  }
  WakeFd wake = CELLA_TRY(WakeFd::Create("dns server"));
  auto server = std::unique_ptr<DnsServer>(
      new DnsServer(std::move(udp_socket), std::move(wake), std::move(options)));
  server->thread_ = std::thread([raw = server.get()] { raw->Serve(); });
  return server;
}

DnsServer::~DnsServer() { Stop(); }

void DnsServer::Stop() {
  if (stopped_.exchange(true)) return;
  wake_.Signal();
  if (thread_.joinable()) thread_.join();
}

void DnsServer::Serve() {
  std::vector<std::byte> buffer(65536);
  for (;;) {
    pollfd fds[2] = {{socket_.Get(), POLLIN, 0}, {wake_.Get(), POLLIN, 0}};
    int ready = ::poll(fds, 2, -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      log::Error("dns server stopped", {{"error", std::string("poll: ") + std::strerror(errno)}});
      return;
    }
    if (fds[1].revents != 0) return;
    if (fds[0].revents == 0) continue;
    sockaddr_storage peer{};
    socklen_t peer_length = sizeof(peer);
    ssize_t n = ::recvfrom(socket_.Get(), buffer.data(), buffer.size(), MSG_DONTWAIT | MSG_TRUNC,
                           reinterpret_cast<sockaddr*>(&peer), &peer_length);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      log::Error("dns server stopped",
                 {{"error", std::string("recvfrom: ") + std::strerror(errno)}});
      return;
    }
    if (static_cast<size_t>(n) > buffer.size()) continue;  // truncated: not a sane query
    auto reply = Answer(std::span(buffer.data(), static_cast<size_t>(n)));
    if (reply.empty()) continue;
    if (::sendto(socket_.Get(), reply.data(), reply.size(), MSG_DONTWAIT | MSG_NOSIGNAL,
                 reinterpret_cast<sockaddr*>(&peer), peer_length) < 0) {
      log::Debug("dns reply not sent", {{"error", std::strerror(errno)}});
    }
  }
}

std::expected<std::vector<IpAddress>, DnsRcode> DnsServer::ResolveOnHost(const std::string& name) {
  if (auto cached = options_.table->Resolved(name, options_.resolve_cache)) return *cached;
  auto resolved = options_.resolver(name);
  if (!resolved) {
    log::Warn("dns: host lookup failed", {{"host", name}, {"error", resolved.error().message}});
    return std::unexpected(DnsRcode::kServFail);
  }
  if (resolved->empty()) return std::unexpected(DnsRcode::kNxDomain);
  std::vector<IpAddress> usable;
  for (const IpAddress& address : *resolved) {
    if (options_.policy->MayConnectToResolved(address)) usable.push_back(address);
  }
  if (usable.empty()) {
    log::Notice("egress blocked",
                {{"host", name},
                 {"reason",
                  "name resolves only to private or special addresses (DNS rebinding "
                  "guard; use --allow-private)"},
                 {"address", (*resolved)[0].ToString()}});
    return std::unexpected(DnsRcode::kRefused);
  }
  options_.table->SetResolved(name, usable);
  return usable;
}

std::vector<std::byte> DnsServer::Answer(std::span<const std::byte> packet) {
  if (packet.size() < kHeaderSize) return {};
  uint16_t flags = Get16(packet, 2);
  if (flags & kFlagResponse) return {};  // never answer answers: no reflection loops
  if (OpcodeOf(flags) != 0) return BuildHeaderOnlyReply(packet, DnsRcode::kNotImp);
  auto query = ParseDnsQuery(packet);
  if (!query) {
    log::Debug("dns: malformed query", {{"error", query.error().message}});
    return BuildHeaderOnlyReply(packet, DnsRcode::kFormErr);
  }
  if (query->qclass != kClassIn) return BuildDnsResponse(*query, DnsRcode::kNotImp, std::nullopt);
  Decision decision =
      query->name.empty() ? Decision{false, "empty name"} : options_.policy->Check(query->name);
  if (!decision) {
    log::Notice("egress blocked",
                {{"host", query->name}, {"reason", decision.reason}, {"via", "dns"}});
    return BuildDnsResponse(*query, DnsRcode::kRefused, std::nullopt);
  }
  // Check() accepted it, so it is a valid name or address literal; keep the
  // canonical spelling so the proxy's later checks see the same text.
  std::string name = NormalizeHost(query->name).value_or(query->name);
  if (!options_.policy->HasPin(name) && !IpAddress::Parse(name)) {
    auto resolved = ResolveOnHost(name);
    if (!resolved) return BuildDnsResponse(*query, resolved.error(), std::nullopt);
  }
  if (query->qtype != static_cast<uint16_t>(DnsType::kA)) {
    // IPv4 only inside: AAAA and everything else get "no records", which
    // makes resolvers fall back to A without an error.
    return BuildDnsResponse(*query, DnsRcode::kNoError, std::nullopt);
  }
  // An address literal is its own answer, never a virtual name: the guest
  // then connects to the address itself and the proxy judges that address
  // (private ranges, the host gateway) instead of a name standing for it.
  if (auto literal = IpAddress::Parse(name)) {
    if (literal->family != IpAddress::Family::kV4)
      return BuildDnsResponse(*query, DnsRcode::kNoError, std::nullopt);
    return BuildDnsResponse(*query, DnsRcode::kNoError, literal->ToInAddr());
  }
  auto address = options_.table->AddressFor(name);
  if (!address) {
    log::Error("dns: cannot answer", {{"host", name}, {"error", address.error().message}});
    return BuildDnsResponse(*query, DnsRcode::kServFail, std::nullopt);
  }
  return BuildDnsResponse(*query, DnsRcode::kNoError, *address);
}

}  // namespace cella::net
