// Fuzzes the sandbox DNS server's query parser with datagrams a hostile
// guest could send. Nothing may crash; an accepted query respects the
// limits (name <= 255 wire bytes, one question) and its response echoes the
// question exactly and stays within a classic 512-byte DNS datagram.
#include <arpa/inet.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>

#include "host/net/dns.h"

using namespace cella::net;

namespace {

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "%s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto packet = std::as_bytes(std::span(data, size));
  auto header_only = BuildHeaderOnlyReply(packet, DnsRcode::kFormErr);
  if (size >= 12 && header_only.size() != 12) Die("header-only reply is not 12 bytes");
  auto query = ParseDnsQuery(packet);
  if (!query) return 0;
  if (query->name.size() > 253) Die("accepted a name longer than 253 characters");
  if (query->question.size() > 255 + 4) Die("accepted a question longer than 259 bytes");
  in_addr address;
  address.s_addr = htonl(0xc6120001);
  auto response = BuildDnsResponse(*query, DnsRcode::kNoError, address);
  if (response.size() > 512) Die("response larger than 512 bytes");
  if (std::memcmp(response.data() + 12, query->question.data(), query->question.size()) != 0) {
    Die("response does not echo the question");
  }
  if (std::memcmp(response.data(), data, 2) != 0) Die("response id differs");
  return 0;
}
