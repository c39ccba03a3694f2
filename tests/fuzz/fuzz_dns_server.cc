// Fuzzes the sandbox DNS server's handling of names end to end (parse,
// policy, host resolution, literals, virtual addresses) with query packets a
// hostile guest could send. The host resolver is a fake: names containing
// "private" resolve to 10.0.0.1, "loop" to 127.0.0.1, others to a public
// address. Whatever arrives, an A record is only ever:
//  - the address literal that was asked for, never a virtual address for it;
//  - or a virtual address (198.18.0.0/15) for a name the policy allows, whose
//    host resolution was not refused, and that maps back to that name.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>

#include "host/net/dns.h"
#include "host/net/policy.h"

using namespace cella;
using namespace cella::net;

namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "%s\n", what.c_str());
  std::abort();
}

std::shared_ptr<Policy>& ThePolicy() {
  static auto* policy = [] {
    PolicyConfig config;
    config.allow = {"*.test", "api.example.com", "203.0.113.0/24", "10.0.2.2"};
    auto created = Policy::Create(std::move(config));
    if (!created) Die("policy: " + created.error().message);
    return new std::shared_ptr<Policy>(*created);
  }();
  return *policy;
}

DnsServer& Server() {
  static DnsServer* server = [] {
    UniqueFd udp(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (!udp) Die("socket");
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(udp.Get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) Die("bind");
    DnsServerOptions options;
    options.policy = ThePolicy();
    options.table = std::make_shared<FakeIpTable>();
    options.resolver = [](const std::string& name) -> Result<std::vector<IpAddress>> {
      if (name.find("private") != std::string::npos)
        return std::vector{*IpAddress::Parse("10.0.0.1")};
      if (name.find("loop") != std::string::npos)
        return std::vector{*IpAddress::Parse("127.0.0.1")};
      return std::vector{*IpAddress::Parse("203.0.113.7")};
    };
    auto started = DnsServer::Start(std::move(udp), std::move(options));
    if (!started) Die("dns server: " + started.error().message);
    return started->release();
  }();
  return *server;
}

uint16_t Get16(std::span<const std::byte> b, size_t at) {
  return static_cast<uint16_t>((std::to_integer<uint16_t>(b[at]) << 8) |
                               std::to_integer<uint16_t>(b[at + 1]));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto packet = std::as_bytes(std::span(data, size));
  std::vector<std::byte> reply = Server().Answer(packet);
  if (reply.empty()) return 0;
  if (reply.size() > 512) Die("reply larger than 512 bytes");
  if (reply.size() < 12) Die("reply shorter than a header");
  uint16_t answers = Get16(reply, 6);
  if (answers == 0) return 0;
  if (answers != 1) Die("more than one answer record");
  auto query = ParseDnsQuery(packet);
  if (!query) Die("an answer to a query that does not parse");
  if (query->qtype != 1) Die("an A record for a query that is not for A");
  in_addr got{};
  std::memcpy(&got, reply.data() + reply.size() - 4, 4);
  char text[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &got, text, sizeof text);
  std::string name = NormalizeHost(query->name).value_or(query->name);
  if (auto literal = IpAddress::Parse(name)) {
    if (literal->family != IpAddress::Family::kV4 || literal->ToInAddr().s_addr != got.s_addr)
      Die("literal " + name + " answered with " + text);
    return 0;
  }
  if (!FakeIpTable::IsVirtual(got)) Die("name " + name + " answered with a real address " + text);
  if (!ThePolicy()->Check(name)) Die("a name the policy refuses got an address: " + name);
  if (name.find("private") != std::string::npos || name.find("loop") != std::string::npos)
    Die("a name resolving to a private address got an address: " + name);
  auto back = Server().NameForVirtualAddress(got);
  if (!back || *back != name) Die(std::string("virtual address ") + text + " does not map back");
  return 0;
}
