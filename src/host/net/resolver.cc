#include "host/net/resolver.h"

#include <arpa/nameser.h>
#include <poll.h>
#include <resolv.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "base/unique_fd.h"

namespace cella::net {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxUdpAnswer = 4096;

Result<std::vector<std::byte>> BuildQuery(const std::string& name, uint16_t id, uint16_t type) {
  std::vector<std::byte> out;
  auto put16 = [&](uint16_t v) {
    out.push_back(static_cast<std::byte>(v >> 8));
    out.push_back(static_cast<std::byte>(v & 0xff));
  };
  put16(id);
  put16(0x0100);  // recursion desired
  put16(1);       // one question
  put16(0);
  put16(0);
  put16(0);
  size_t start = 0;
  while (start < name.size()) {
    size_t dot = name.find('.', start);
    if (dot == std::string::npos) dot = name.size();
    size_t length = dot - start;
    if (length == 0 || length > 63) return Fail("dns query: bad name " + name.substr(0, 255));
    out.push_back(static_cast<std::byte>(length));
    for (size_t i = start; i < dot; ++i) out.push_back(static_cast<std::byte>(name[i]));
    start = dot + 1;
  }
  out.push_back(std::byte{0});
  put16(type);
  put16(ns_c_in);
  return out;
}

Result<uint16_t> RandomId() {
  uint16_t id = 0;
  for (;;) {
    ssize_t n = ::getrandom(&id, sizeof id, 0);
    if (n == sizeof id) return id;
    if (n < 0 && errno != EINTR) return FailErrno("getrandom for a DNS query id");
  }
}

// One question to one server; the connected socket only takes its answers.
Result<std::vector<IpAddress>> Ask(const Endpoint& server, const std::string& name, uint16_t type,
                                   std::chrono::milliseconds timeout) {
  const std::string where = "dns " + server.ToString() + " " + name;
  uint16_t id = CELLA_TRY(RandomId());
  std::vector<std::byte> query = CELLA_TRY(BuildQuery(name, id, type));
  sockaddr_storage address{};
  socklen_t length = 0;
  if (server.address.family == IpAddress::Family::kV4) {
    auto* v4 = reinterpret_cast<sockaddr_in*>(&address);
    v4->sin_family = AF_INET;
    v4->sin_port = htons(server.port);
    v4->sin_addr = server.address.ToInAddr();
    length = sizeof(sockaddr_in);
  } else {
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&address);
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(server.port);
    v6->sin6_addr = server.address.ToIn6Addr();
    length = sizeof(sockaddr_in6);
  }
  UniqueFd fd(::socket(address.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd) return FailErrno(where + ": socket");
  if (::connect(fd.Get(), reinterpret_cast<sockaddr*>(&address), length) != 0)
    return FailErrno(where + ": connect");
  if (::send(fd.Get(), query.data(), query.size(), 0) != static_cast<ssize_t>(query.size()))
    return FailErrno(where + ": send");
  auto deadline = Clock::now() + timeout;
  std::vector<std::byte> buffer(kMaxUdpAnswer);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return Fail(where + ": no answer");
    pollfd pfd{fd.Get(), POLLIN, 0};
    int ready = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (ready < 0) {
      if (errno == EINTR) continue;
      return FailErrno(where + ": poll");
    }
    if (ready == 0) continue;
    ssize_t n = ::recv(fd.Get(), buffer.data(), buffer.size(), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FailErrno(where + ": recv");
    }
    auto answer = ParseDnsAnswer(std::span(buffer.data(), static_cast<size_t>(n)), id);
    // A stray or forged datagram (wrong id) is skipped, as stub resolvers do.
    if (!answer && answer.error().message.starts_with("dns answer: id")) continue;
    if (!answer) return Fail(where + ": " + answer.error().message);
    return answer;
  }
}

}  // namespace

Result<std::vector<IpAddress>> ParseDnsAnswer(std::span<const std::byte> packet, uint16_t id) {
  ns_msg message;
  if (::ns_initparse(reinterpret_cast<const unsigned char*>(packet.data()),
                     static_cast<int>(packet.size()), &message) != 0)
    return Fail("dns answer: malformed");
  if (ns_msg_id(message) != id) return Fail("dns answer: id mismatch");
  if (!ns_msg_getflag(message, ns_f_qr)) return Fail("dns answer: not a response");
  int rcode = ns_msg_getflag(message, ns_f_rcode);
  if (rcode == ns_r_nxdomain) return std::vector<IpAddress>{};
  if (rcode != ns_r_noerror) return Fail("dns answer: rcode " + std::to_string(rcode));
  std::vector<IpAddress> addresses;
  for (int i = 0; i < ns_msg_count(message, ns_s_an); ++i) {
    ns_rr record;
    if (::ns_parserr(&message, ns_s_an, i, &record) != 0) return Fail("dns answer: bad record");
    if (ns_rr_class(record) != ns_c_in) continue;
    std::optional<IpAddress> address;
    if (ns_rr_type(record) == ns_t_a && ns_rr_rdlen(record) == 4) {
      in_addr v4;
      std::memcpy(&v4, ns_rr_rdata(record), 4);
      address = IpAddress::V4(v4);
    } else if (ns_rr_type(record) == ns_t_aaaa && ns_rr_rdlen(record) == 16) {
      in6_addr v6;
      std::memcpy(&v6, ns_rr_rdata(record), 16);
      address = IpAddress::V6(v6);
    }
    if (address && std::find(addresses.begin(), addresses.end(), *address) == addresses.end())
      addresses.push_back(*address);
  }
  return addresses;
}

HostResolver MakeUpstreamResolver(std::vector<Endpoint> servers,
                                  std::chrono::milliseconds timeout) {
  return [servers = std::move(servers),
          timeout](const std::string& name) -> Result<std::vector<IpAddress>> {
    std::string errors;
    for (const Endpoint& server : servers) {
      auto all = Ask(server, name, ns_t_a, timeout);
      if (!all) {
        if (!errors.empty()) errors += "; ";
        errors += all.error().message;
        continue;
      }
      // A server that answered A but fails AAAA still gave a usable answer
      // (IPv4 is what the guest's virtual addresses stand for anyway).
      if (auto v6 = Ask(server, name, ns_t_aaaa, timeout)) {
        for (const IpAddress& a : *v6)
          if (std::find(all->begin(), all->end(), a) == all->end()) all->push_back(a);
      }
      return all;
    }
    return Fail(errors.empty() ? "no DNS server to ask" : errors);
  };
}

Result<HostResolver> UpstreamResolverFor(const std::vector<std::string>& addresses) {
  std::vector<Endpoint> servers;
  for (const std::string& text : addresses) {
    auto address = IpAddress::Parse(text);
    if (!address) return Fail("dns server " + text.substr(0, 100) + ": not an IP address");
    servers.push_back(Endpoint{*address, 53});
  }
  if (servers.empty()) return Fail("no DNS server given");
  return MakeUpstreamResolver(std::move(servers));
}

}  // namespace cella::net
