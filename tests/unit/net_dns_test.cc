#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <atomic>
#include <cstring>

#include "host/net/dns.h"

namespace cella::net {
namespace {

// A query packet built by hand, independent of the code under test.
std::vector<std::byte> Query(uint16_t id, const std::string& name, uint16_t qtype,
                             uint16_t questions = 1) {
  std::vector<uint8_t> out = {static_cast<uint8_t>(id >> 8),
                              static_cast<uint8_t>(id),
                              0x01,
                              0x00,
                              0,
                              static_cast<uint8_t>(questions),
                              0,
                              0,
                              0,
                              0,
                              0,
                              0};
  size_t start = 0;
  while (start <= name.size() && !name.empty()) {
    size_t dot = name.find('.', start);
    std::string label =
        name.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    out.push_back(static_cast<uint8_t>(label.size()));
    out.insert(out.end(), label.begin(), label.end());
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  out.push_back(0);
  out.push_back(static_cast<uint8_t>(qtype >> 8));
  out.push_back(static_cast<uint8_t>(qtype));
  out.push_back(0);
  out.push_back(1);
  std::vector<std::byte> bytes(out.size());
  std::memcpy(bytes.data(), out.data(), out.size());
  return bytes;
}

struct Reply {
  uint16_t id = 0;
  int rcode = -1;
  int answers = 0;
  std::optional<std::string> address;  // first A record
};

// Decodes only what the tests look at; assumes the answer name is a pointer.
Reply Decode(const std::vector<std::byte>& packet) {
  Reply reply;
  if (packet.size() < 12) return reply;
  auto byte = [&](size_t i) { return std::to_integer<uint8_t>(packet[i]); };
  reply.id = static_cast<uint16_t>(byte(0) << 8 | byte(1));
  EXPECT_TRUE(byte(2) & 0x80) << "QR bit not set";
  reply.rcode = byte(3) & 0x0f;
  reply.answers = byte(6) << 8 | byte(7);
  size_t at = 12;
  if ((byte(4) << 8 | byte(5)) == 1) {
    while (at < packet.size() && byte(at) != 0) at += 1 + byte(at);
    at += 5;
  }
  if (reply.answers > 0 && at + 16 <= packet.size()) {
    EXPECT_EQ(byte(at), 0xc0);
    EXPECT_EQ(byte(at + 3), 1);  // type A
    char text[INET_ADDRSTRLEN];
    in_addr address;
    std::memcpy(&address, packet.data() + at + 12, 4);
    inet_ntop(AF_INET, &address, text, sizeof(text));
    reply.address = text;
  }
  return reply;
}

class DnsFixture : public ::testing::Test {
 protected:
  void StartServer(std::vector<std::string> allow, bool allow_private = false,
                   std::vector<Pin> pins = {}, bool allow_host_loopback = false) {
    PolicyConfig config;
    config.allow = std::move(allow);
    config.allow_private = allow_private;
    config.allow_host_loopback = allow_host_loopback;
    config.pins = std::move(pins);
    auto policy = Policy::Create(config);
    ASSERT_TRUE(policy.has_value()) << policy.error().message;
    policy_ = *policy;
    table_ = std::make_shared<FakeIpTable>();

    UniqueFd socket(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    ASSERT_TRUE(socket.Valid());
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(socket.Get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    socklen_t length = sizeof(server_address_);
    ASSERT_EQ(::getsockname(socket.Get(), reinterpret_cast<sockaddr*>(&server_address_), &length),
              0);

    DnsServerOptions options;
    options.policy = policy_;
    options.table = table_;
    options.resolver = [this](const std::string& name) -> Result<std::vector<IpAddress>> {
      ++resolver_calls_;
      if (name == "rebind.test") return std::vector{*IpAddress::Parse("127.0.0.1")};
      if (name == "lan.test") return std::vector{*IpAddress::Parse("192.168.1.20")};
      if (name == "mixed.test") {
        return std::vector{*IpAddress::Parse("10.0.0.1"), *IpAddress::Parse("203.0.113.9")};
      }
      if (name == "missing.test") return std::vector<IpAddress>{};
      return std::vector{*IpAddress::Parse("203.0.113.7")};
    };
    auto server = DnsServer::Start(std::move(socket), options);
    ASSERT_TRUE(server.has_value()) << server.error().message;
    server_ = std::move(*server);

    client_ = UniqueFd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    ASSERT_TRUE(client_.Valid());
    timeval timeout{10, 0};
    ASSERT_EQ(::setsockopt(client_.Get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)), 0);
  }

  Reply Ask(const std::vector<std::byte>& packet) {
    EXPECT_EQ(::sendto(client_.Get(), packet.data(), packet.size(), 0,
                       reinterpret_cast<sockaddr*>(&server_address_), sizeof(server_address_)),
              static_cast<ssize_t>(packet.size()));
    std::vector<std::byte> buffer(1500);
    ssize_t n = ::recv(client_.Get(), buffer.data(), buffer.size(), 0);
    EXPECT_GT(n, 0) << "no reply from the DNS server: " << std::strerror(errno);
    buffer.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return Decode(buffer);
  }

  std::shared_ptr<Policy> policy_;
  std::shared_ptr<FakeIpTable> table_;
  std::unique_ptr<DnsServer> server_;
  UniqueFd client_;
  sockaddr_in server_address_{};
  std::atomic<int> resolver_calls_{0};
};

TEST_F(DnsFixture, AllowedNameGetsStableVirtualAddress) {
  StartServer({"api.test", "*.glob.test"});
  Reply first = Ask(Query(0x1234, "API.test", 1));
  EXPECT_EQ(first.id, 0x1234);
  EXPECT_EQ(first.rcode, 0);
  ASSERT_TRUE(first.address.has_value());
  EXPECT_TRUE(first.address->starts_with("198.18.") || first.address->starts_with("198.19."))
      << *first.address;
  Reply again = Ask(Query(7, "api.test", 1));
  EXPECT_EQ(again.address, first.address);
  Reply other = Ask(Query(8, "x.glob.test", 1));
  ASSERT_TRUE(other.address.has_value());
  EXPECT_NE(other.address, first.address);

  in_addr virtual_address;
  ASSERT_EQ(inet_pton(AF_INET, first.address->c_str(), &virtual_address), 1);
  EXPECT_EQ(server_->NameForVirtualAddress(virtual_address), "api.test");
  // The proxy connects to what the host resolved.
  auto resolved = table_->Resolved("api.test");
  ASSERT_TRUE(resolved.has_value());
  ASSERT_EQ(resolved->size(), 1u);
  EXPECT_EQ((*resolved)[0].ToString(), "203.0.113.7");
}

TEST_F(DnsFixture, BlockedNameIsRefusedWithoutHostLookup) {
  StartServer({"api.test"});
  Reply reply = Ask(Query(9, "evil.test", 1));
  EXPECT_EQ(reply.rcode, 5);
  EXPECT_EQ(reply.answers, 0);
  Reply aaaa = Ask(Query(10, "evil.test", 28));
  EXPECT_EQ(aaaa.rcode, 5);
  EXPECT_EQ(resolver_calls_.load(), 0);
}

TEST_F(DnsFixture, RebindingToPrivateAddressIsRefused) {
  StartServer({"rebind.test", "mixed.test"});
  EXPECT_EQ(Ask(Query(1, "rebind.test", 1)).rcode, 5);
  // One public address is enough; only it is kept for the proxy.
  Reply mixed = Ask(Query(2, "mixed.test", 1));
  EXPECT_EQ(mixed.rcode, 0);
  auto resolved = table_->Resolved("mixed.test");
  ASSERT_TRUE(resolved.has_value());
  ASSERT_EQ(resolved->size(), 1u);
  EXPECT_EQ((*resolved)[0].ToString(), "203.0.113.9");
}

// --allow-private opens the LAN, not the host's own loopback: a name that
// resolves there stays refused (only --allow-host-loopback opens it).
TEST_F(DnsFixture, RebindingAllowedWithAllowPrivateExceptToTheHostLoopback) {
  StartServer({"rebind.test", "lan.test"}, /*allow_private=*/true);
  Reply lan = Ask(Query(1, "lan.test", 1));
  EXPECT_EQ(lan.rcode, 0);
  EXPECT_TRUE(lan.address.has_value());
  Reply loopback = Ask(Query(2, "rebind.test", 1));
  EXPECT_EQ(loopback.rcode, 5);
  EXPECT_FALSE(loopback.address.has_value());
}

// A literal address as a "name" used to get a virtual address, behind which
// the proxy skipped its address checks and opened the host's loopback.
TEST_F(DnsFixture, AddressLiteralsAreAnsweredAsThemselvesNeverVirtual) {
  // Loopback literals are the host's own addresses: --allow-private alone
  // refuses them (checked below), --allow-host-loopback lets them be asked.
  StartServer({"api.test"}, /*allow_private=*/true, {}, /*allow_host_loopback=*/true);
  for (const char* literal : {"127.0.0.1", "0.0.0.0", "127.0.0.2", "10.0.2.2"}) {
    Reply reply = Ask(Query(3, literal, 1));
    EXPECT_EQ(reply.rcode, 0) << literal;
    ASSERT_TRUE(reply.address.has_value()) << literal;
    EXPECT_EQ(*reply.address, literal);
    in_addr address;
    ASSERT_EQ(inet_pton(AF_INET, literal, &address), 1);
    EXPECT_FALSE(server_->NameForVirtualAddress(address).has_value()) << literal;
  }
  EXPECT_EQ(resolver_calls_.load(), 0);
}

TEST_F(DnsFixture, LoopbackLiteralsAreRefusedWithoutAllowHostLoopback) {
  StartServer({"api.test"}, /*allow_private=*/true);
  for (const char* literal : {"127.0.0.1", "0.0.0.0"}) {
    Reply reply = Ask(Query(4, literal, 1));
    EXPECT_EQ(reply.rcode, 5) << literal;
    EXPECT_FALSE(reply.address.has_value()) << literal;
  }
  EXPECT_EQ(Ask(Query(5, "10.0.2.2", 1)).rcode, 0);
  EXPECT_EQ(resolver_calls_.load(), 0);
}

TEST_F(DnsFixture, PinnedNameIsAnsweredWithoutHostLookup) {
  StartServer({"pinned.test"}, false,
              {Pin{"pinned.test", 80, Endpoint{*IpAddress::Parse("127.0.0.1"), 8080}}});
  Reply reply = Ask(Query(1, "pinned.test", 1));
  EXPECT_EQ(reply.rcode, 0);
  EXPECT_TRUE(reply.address.has_value());
  EXPECT_EQ(resolver_calls_.load(), 0);
}

TEST_F(DnsFixture, AaaaGetsNoRecordsAndUnknownNamesNxdomain) {
  StartServer({"api.test", "missing.test"});
  Reply aaaa = Ask(Query(3, "api.test", 28));
  EXPECT_EQ(aaaa.rcode, 0);
  EXPECT_EQ(aaaa.answers, 0);
  EXPECT_EQ(Ask(Query(4, "missing.test", 1)).rcode, 3);
}

TEST_F(DnsFixture, MalformedQueriesGetFormerr) {
  StartServer({"api.test"});
  EXPECT_EQ(Ask(Query(5, "api.test", 1, /*questions=*/2)).rcode, 1);
  // A compression pointer where the question's name should be.
  auto pointer = Query(6, "", 1);
  pointer.insert(pointer.begin() + 12, {std::byte{0xc0}, std::byte{0x0c}});
  pointer.erase(pointer.begin() + 14);  // drop the root label
  EXPECT_EQ(Ask(pointer).rcode, 1);
  EXPECT_EQ(Ask(Query(7, std::string(64, 'a') + ".test", 1)).rcode, 1);
  std::string long_name;
  for (int i = 0; i < 5; ++i) long_name += std::string(60, 'b') + ".";
  long_name += "test";
  EXPECT_EQ(Ask(Query(8, long_name, 1)).rcode, 1);
}

TEST(NetDns, ParserRefusesResponsesAndTrailingBytes) {
  auto packet = Query(1, "api.test", 1);
  ASSERT_TRUE(ParseDnsQuery(packet).has_value());
  auto response = packet;
  response[2] = std::byte{0x81};
  EXPECT_FALSE(ParseDnsQuery(response).has_value());
  auto trailing = packet;
  trailing.push_back(std::byte{0});
  EXPECT_FALSE(ParseDnsQuery(trailing).has_value());
  auto truncated = packet;
  truncated.resize(truncated.size() - 3);
  EXPECT_FALSE(ParseDnsQuery(truncated).has_value());
}

TEST(NetDns, VirtualAddressesStayInsideTheBlock) {
  FakeIpTable table;
  auto first = table.AddressFor("a.test");
  ASSERT_TRUE(first.has_value());
  EXPECT_TRUE(FakeIpTable::IsVirtual(*first));
  in_addr outside;
  ASSERT_EQ(inet_pton(AF_INET, "198.20.0.1", &outside), 1);
  EXPECT_FALSE(FakeIpTable::IsVirtual(outside));
  EXPECT_FALSE(table.NameFor(outside).has_value());
  ASSERT_EQ(inet_pton(AF_INET, "198.19.255.1", &outside), 1);
  EXPECT_TRUE(FakeIpTable::IsVirtual(outside));
  EXPECT_FALSE(table.NameFor(outside).has_value());  // never handed out
}

TEST(NetDns, FakeIpTableSurvivesExportAndRefusesWhatItCannotTrust) {
  FakeIpTable table;
  auto a = table.AddressFor("a.test");
  auto b = table.AddressFor("b.example.com");
  ASSERT_TRUE(a && b);
  FakeIpTable restored;
  ASSERT_TRUE(restored.Import(table.Export()));
  // The guest's cached answers still point at the same names.
  EXPECT_EQ(restored.NameFor(*a), "a.test");
  EXPECT_EQ(restored.NameFor(*b), "b.example.com");
  auto again = restored.AddressFor("a.test");
  ASSERT_TRUE(again);
  EXPECT_EQ(again->s_addr, a->s_addr);
  // A new name never takes an address a restored one holds.
  auto c = restored.AddressFor("c.test");
  ASSERT_TRUE(c);
  EXPECT_NE(c->s_addr, a->s_addr);
  EXPECT_NE(c->s_addr, b->s_addr);
  EXPECT_FALSE(restored.Import(table.Export())) << "a table in use is not overwritten";

  auto refused = [](const std::string& text) {
    FakeIpTable t;
    return !t.Import(text);
  };
  EXPECT_FALSE(refused("cella-fake-ips 1\n"));
  EXPECT_FALSE(refused("cella-fake-ips 1\n5 a.test\n9 b.test\n"));
  EXPECT_TRUE(refused("")) << "no header";
  EXPECT_TRUE(refused("cella-fake-ips 2\n1 a.test\n")) << "another version";
  EXPECT_TRUE(refused("cella-fake-ips 1\n1 a.test")) << "unterminated";
  EXPECT_TRUE(refused("cella-fake-ips 1\n0 a.test\n")) << "offset 0";
  EXPECT_TRUE(refused("cella-fake-ips 1\n131071 a.test\n")) << "outside the block";
  EXPECT_TRUE(refused("cella-fake-ips 1\n1 a.test\n1 b.test\n")) << "offset twice";
  EXPECT_TRUE(refused("cella-fake-ips 1\n1 a.test\n2 a.test\n")) << "name twice";
  EXPECT_TRUE(refused("cella-fake-ips 1\n1 a test\n")) << "space in a name";
  EXPECT_TRUE(refused("cella-fake-ips 1\n1 \n")) << "empty name";
  EXPECT_TRUE(refused("cella-fake-ips 1\nx a.test\n")) << "not a number";
  EXPECT_TRUE(refused("cella-fake-ips 1\n1 " + std::string(256, 'a') + "\n")) << "too long";

  // A failed import leaves the table empty: the first name gets the first
  // address, as in a fresh table.
  FakeIpTable after_fault;
  ASSERT_FALSE(after_fault.Import("cella-fake-ips 1\n7 a.test\n7 b.test\n"));
  FakeIpTable fresh;
  auto want = fresh.AddressFor("z.test");
  auto got = after_fault.AddressFor("z.test");
  ASSERT_TRUE(want && got);
  EXPECT_EQ(got->s_addr, want->s_addr);
}

}  // namespace
}  // namespace cella::net
