// `--dns X` under the sealed network: cella's resolver asks X itself. A
// fake DNS server on 127.0.0.1 answers with the wire helpers of dns.h.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "base/unique_fd.h"
#include "host/net/dns.h"
#include "host/net/resolver.h"

namespace cella::net {
namespace {

// Answers A queries for "known.test" with 192.0.2.7, NXDOMAIN for anything
// else, and never answers "silent.test".
class FakeDnsServer {
 public:
  FakeDnsServer() : fd_(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(fd_.Get(), reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
    socklen_t length = sizeof address;
    EXPECT_EQ(::getsockname(fd_.Get(), reinterpret_cast<sockaddr*>(&address), &length), 0);
    port_ = ntohs(address.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeDnsServer() {
    stop_ = true;
    thread_.join();
  }
  Endpoint endpoint() const { return Endpoint{*IpAddress::Parse("127.0.0.1"), port_}; }
  int queries() const { return queries_; }

 private:
  void Serve() {
    while (!stop_) {
      pollfd pfd{fd_.Get(), POLLIN, 0};
      if (::poll(&pfd, 1, 50) <= 0) continue;
      std::byte buffer[512];
      sockaddr_in peer{};
      socklen_t length = sizeof peer;
      ssize_t n = ::recvfrom(fd_.Get(), buffer, sizeof buffer, 0,
                             reinterpret_cast<sockaddr*>(&peer), &length);
      if (n <= 0) continue;
      ++queries_;
      auto query = ParseDnsQuery(std::span(buffer, static_cast<size_t>(n)));
      if (!query || query->name == "silent.test") continue;
      std::optional<in_addr> address;
      DnsRcode rcode = DnsRcode::kNxDomain;
      if (query->name == "known.test") {
        rcode = DnsRcode::kNoError;
        if (query->qtype == static_cast<uint16_t>(DnsType::kA)) {
          in_addr a;
          ::inet_pton(AF_INET, "192.0.2.7", &a);
          address = a;
        }
      }
      auto reply = BuildDnsResponse(*query, rcode, address);
      (void)::sendto(fd_.Get(), reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&peer),
                     length);
    }
  }

  UniqueFd fd_;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> queries_{0};
  std::thread thread_;
};

TEST(NetResolver, AsksTheGivenServerForANameAndNxDomainIsEmpty) {
  FakeDnsServer server;
  HostResolver resolve = MakeUpstreamResolver({server.endpoint()});
  auto known = resolve("known.test");
  ASSERT_TRUE(known) << known.error().message;
  ASSERT_EQ(known->size(), 1u);
  EXPECT_EQ((*known)[0].ToString(), "192.0.2.7");
  auto unknown = resolve("unknown.test");
  ASSERT_TRUE(unknown) << unknown.error().message;
  EXPECT_TRUE(unknown->empty());
  EXPECT_GE(server.queries(), 3);  // A + AAAA, then A for the NXDOMAIN
}

TEST(NetResolver, ASilentServerPassesTheQuestionToTheNextOne) {
  FakeDnsServer good;
  // A port nobody answers on: its socket is closed at once.
  Endpoint dead;
  {
    FakeDnsServer gone;
    dead = gone.endpoint();
  }
  // Generous: the dead port refuses at once (a connected socket), so only a
  // loaded machine's good server ever needs the time.
  HostResolver resolve = MakeUpstreamResolver({dead, good.endpoint()}, std::chrono::seconds(5));
  auto known = resolve("known.test");
  ASSERT_TRUE(known) << known.error().message;
  ASSERT_EQ(known->size(), 1u);
  auto silent =
      MakeUpstreamResolver({good.endpoint()}, std::chrono::milliseconds(200))("silent.test");
  ASSERT_FALSE(silent);
  EXPECT_NE(silent.error().message.find("no answer"), std::string::npos);
}

TEST(NetResolver, AnswersToAnotherQueryOrMalformedAreNotTaken) {
  const unsigned char raw[] = {0x12, 0x34, 0x01, 0x00, 0,   1,   0,   0,   0, 0, 0, 0, 4, 'k',
                               'n',  'o',  'w',  4,    't', 'e', 's', 't', 0, 0, 1, 0, 1};
  auto query = ParseDnsQuery(std::as_bytes(std::span(raw)));
  ASSERT_TRUE(query) << query.error().message;
  in_addr a;
  ASSERT_EQ(::inet_pton(AF_INET, "198.51.100.9", &a), 1);
  auto reply = BuildDnsResponse(*query, DnsRcode::kNoError, a);
  auto taken = ParseDnsAnswer(reply, 0x1234);
  ASSERT_TRUE(taken) << taken.error().message;
  ASSERT_EQ(taken->size(), 1u);
  EXPECT_EQ((*taken)[0].ToString(), "198.51.100.9");
  EXPECT_FALSE(ParseDnsAnswer(reply, 0x1235));  // someone else's answer
  auto refused = BuildDnsResponse(*query, DnsRcode::kRefused, std::nullopt);
  EXPECT_FALSE(ParseDnsAnswer(refused, 0x1234));
  std::byte garbage[5] = {};
  EXPECT_FALSE(ParseDnsAnswer(garbage, 1));
  EXPECT_FALSE(UpstreamResolverFor({"dns.example"}));
  EXPECT_TRUE(UpstreamResolverFor({"192.0.2.53", "2001:db8::53"}));
}

}  // namespace
}  // namespace cella::net
