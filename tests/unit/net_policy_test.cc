#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <sstream>
#include <thread>

#include "host/net/policy.h"

namespace cella::net {
namespace {

IpAddress Ip(const char* text) {
  auto ip = IpAddress::Parse(text);
  EXPECT_TRUE(ip.has_value()) << text;
  return ip.value_or(IpAddress{});
}

std::shared_ptr<Policy> MakePolicy(std::vector<std::string> allow, bool allow_private = false) {
  PolicyConfig config;
  config.allow = std::move(allow);
  config.allow_private = allow_private;
  auto policy = Policy::Create(std::move(config));
  EXPECT_TRUE(policy.has_value()) << policy.error().message;
  return *policy;
}

TEST(NetPolicy, PrivateAndSpecialRangesAreExactlyTheIssueList) {
  for (const char* blocked :
       {"10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1", "127.0.0.1",
        "127.255.0.9", "169.254.169.254", "100.64.0.1", "100.127.255.255", "0.0.0.0", "0.1.2.3",
        "224.0.0.1", "239.255.255.250", "255.255.255.255", "::1", "::", "fc00::1", "fd12:3456::1",
        "fe80::1", "febf::1", "ff02::1", "::ffff:10.1.2.3", "::ffff:127.0.0.1",
        // Added with the hardening issue: reserved, benchmarking, IETF,
        // site-local, and IPv6 prefixes that embed a private IPv4 address.
        "240.0.0.1", "250.1.2.3", "198.18.0.1", "198.19.255.255", "192.0.0.8", "fec0::1", "feff::1",
        "64:ff9b::7f00:1", "64:ff9b::a00:202", "2002::1", "2002:7f00:1::"}) {
    EXPECT_TRUE(IsPrivateOrSpecial(Ip(blocked))) << blocked;
  }
  for (const char* open :
       {"9.255.255.255", "11.0.0.1", "172.15.255.255", "172.32.0.1", "192.167.255.255",
        "192.169.0.1", "100.63.255.255", "100.128.0.0", "169.253.255.255", "203.0.113.7",
        "198.51.100.1", "2001:db8::1", "::ffff:203.0.113.7", "198.17.255.255", "198.20.0.0",
        "192.0.1.0", "64:ff9b::cb00:7107"}) {
    EXPECT_FALSE(IsPrivateOrSpecial(Ip(open))) << open;
  }
}

TEST(NetPolicy, SockaddrOverloadAgrees) {
  sockaddr_in v4{};
  v4.sin_family = AF_INET;
  ASSERT_EQ(inet_pton(AF_INET, "192.168.0.9", &v4.sin_addr), 1);
  EXPECT_TRUE(IsPrivateOrSpecial(reinterpret_cast<sockaddr*>(&v4), sizeof(v4)));
  ASSERT_EQ(inet_pton(AF_INET, "203.0.113.7", &v4.sin_addr), 1);
  EXPECT_FALSE(IsPrivateOrSpecial(reinterpret_cast<sockaddr*>(&v4), sizeof(v4)));
  sockaddr_in6 v6{};
  v6.sin6_family = AF_INET6;
  ASSERT_EQ(inet_pton(AF_INET6, "fe80::2", &v6.sin6_addr), 1);
  EXPECT_TRUE(IsPrivateOrSpecial(reinterpret_cast<sockaddr*>(&v6), sizeof(v6)));
}

TEST(NetPolicy, ExactNamesIgnoreCaseAndTrailingDot) {
  auto policy = MakePolicy({"API.Example.test."});
  EXPECT_TRUE(policy->Check("api.example.test").allowed);
  EXPECT_TRUE(policy->Check("API.EXAMPLE.TEST.").allowed);
  EXPECT_FALSE(policy->Check("sub.api.example.test").allowed);
  EXPECT_FALSE(policy->Check("example.test").allowed);
  Decision blocked = policy->Check("other.test");
  EXPECT_FALSE(blocked.allowed);
  EXPECT_FALSE(blocked.reason.empty());
  EXPECT_FALSE(policy->Check("bad name.test").allowed);
  EXPECT_FALSE(policy->Check("").allowed);
}

TEST(NetPolicy, GlobMatchesAnyDepthButNotTheApex) {
  auto policy = MakePolicy({"*.example.test"});
  EXPECT_TRUE(policy->Check("a.example.test").allowed);
  EXPECT_TRUE(policy->Check("a.b.c.example.test").allowed);
  EXPECT_FALSE(policy->Check("example.test").allowed);
  EXPECT_FALSE(policy->Check("badexample.test").allowed);
  EXPECT_FALSE(policy->Check("example.test.evil.test").allowed);
}

TEST(NetPolicy, AddressEntriesAndCidrs) {
  auto policy = MakePolicy({"203.0.113.7", "198.51.100.0/24", "2001:db8::/32", "10.9.0.0/16"});
  EXPECT_TRUE(policy->Check("203.0.113.7").allowed);
  EXPECT_FALSE(policy->Check("203.0.113.8").allowed);
  EXPECT_TRUE(policy->Check("198.51.100.200").allowed);
  EXPECT_TRUE(policy->Check("[2001:db8::5]").allowed);
  EXPECT_FALSE(policy->Check("2001:db9::5").allowed);
  // A private address named by an entry is allowed without --allow-private.
  EXPECT_TRUE(policy->CheckAddress(Ip("10.9.1.1")).allowed);
  EXPECT_FALSE(policy->CheckAddress(Ip("10.8.1.1")).allowed);
  // Canonical text: host bits cleared.
  auto pattern = HostPattern::Parse("198.51.100.77/24");
  ASSERT_TRUE(pattern.has_value());
  EXPECT_EQ(pattern->text(), "198.51.100.0/24");
}

TEST(NetPolicy, PrivateLiteralNeedsAllowPrivate) {
  auto closed = MakePolicy({"api.test"});
  EXPECT_FALSE(closed->CheckAddress(Ip("127.0.0.1")).allowed);
  EXPECT_FALSE(closed->CheckAddress(Ip("169.254.169.254")).allowed);
  // A public literal is not reachable without naming it either.
  EXPECT_FALSE(closed->CheckAddress(Ip("203.0.113.7")).allowed);
  EXPECT_FALSE(closed->MayConnectToResolved(Ip("192.168.0.4")));
  EXPECT_TRUE(closed->MayConnectToResolved(Ip("203.0.113.7")));

  auto open = MakePolicy({"api.test"}, /*allow_private=*/true);
  EXPECT_TRUE(open->CheckAddress(Ip("169.254.169.254")).allowed);
  EXPECT_TRUE(open->MayConnectToResolved(Ip("192.168.0.4")));
  EXPECT_FALSE(open->CheckAddress(Ip("203.0.113.7")).allowed);
  // The host's own loopback is not the LAN: --allow-private leaves it shut.
  EXPECT_FALSE(open->CheckAddress(Ip("127.0.0.1")).allowed);
  EXPECT_FALSE(open->MayConnectToResolved(Ip("127.0.0.1")));
  EXPECT_FALSE(open->MayConnectToResolved(Ip("0.0.0.0")));
  EXPECT_FALSE(open->MayConnectToResolved(Ip("::1")));

  PolicyConfig loopback;
  loopback.allow = {"api.test"};
  loopback.allow_host_loopback = true;
  auto host = Policy::Create(loopback);
  ASSERT_TRUE(host);
  EXPECT_TRUE((*host)->CheckAddress(Ip("127.0.0.1")).allowed);
  EXPECT_TRUE((*host)->MayConnectToResolved(Ip("127.0.0.1")));
  EXPECT_FALSE((*host)->MayConnectToResolved(Ip("192.168.0.4")));
  // An entry naming the address opens it too.
  EXPECT_TRUE(MakePolicy({"127.0.0.1"})->CheckAddress(Ip("127.0.0.1")).allowed);
}

// The default network (no policy flag): every public host by name or
// address; private, special and the host's own addresses stay closed.
TEST(NetPolicy, AllPublicOpensPublicHostsOnly) {
  PolicyConfig config;
  config.allow_all_public = true;
  auto policy = Policy::Create(config);
  ASSERT_TRUE(policy) << policy.error().message;
  EXPECT_TRUE((*policy)->Check("anything.example.com").allowed);
  EXPECT_TRUE((*policy)->CheckAddress(Ip("203.0.113.7")).allowed);
  EXPECT_TRUE((*policy)->CheckAddress(Ip("2001:db8::1")).allowed);
  for (const char* closed : {"127.0.0.1", "10.0.2.2", "192.168.1.1", "172.16.0.1", "10.1.2.3",
                             "169.254.169.254", "100.64.0.1", "fe80::1", "fd00::1", "::1"}) {
    EXPECT_FALSE((*policy)->CheckAddress(Ip(closed)).allowed) << closed;
    EXPECT_FALSE((*policy)->MayConnectToResolved(Ip(closed))) << closed;
  }
  EXPECT_FALSE((*policy)->MayReachHostGateway(Ip("10.0.2.2")));
  EXPECT_FALSE((*policy)->intercept());

  config.allow_private = true;
  auto lan = Policy::Create(config);
  ASSERT_TRUE(lan);
  EXPECT_TRUE((*lan)->CheckAddress(Ip("192.168.1.1")).allowed);
  EXPECT_TRUE((*lan)->CheckAddress(Ip("169.254.169.254")).allowed);
  // --allow-private is the LAN, not the host itself.
  EXPECT_FALSE((*lan)->MayReachHostGateway(Ip("10.0.2.2")));
}

TEST(NetPolicy, HostGatewayOpensOnlyWithTheFlagOrAnExactEntry) {
  PolicyConfig config;
  config.allow_all_public = true;
  config.allow_host_loopback = true;
  auto policy = Policy::Create(config);
  ASSERT_TRUE(policy);
  EXPECT_TRUE((*policy)->MayReachHostGateway(Ip("10.0.2.2")));
  // The flag is about the gateway only: LAN stays closed.
  EXPECT_FALSE((*policy)->CheckAddress(Ip("192.168.1.1")).allowed);
  EXPECT_TRUE(MakePolicy({"10.0.2.2"})->MayReachHostGateway(Ip("10.0.2.2")));
  EXPECT_FALSE(MakePolicy({"10.0.0.0/8"})->MayReachHostGateway(Ip("10.0.2.2")));
}

TEST(NetPolicy, AllPublicHasNoListToEdit) {
  PolicyConfig config;
  config.allow_all_public = true;
  auto policy = Policy::Create(config);
  ASSERT_TRUE(policy);
  auto added = (*policy)->AddAllowed("a.test");
  ASSERT_FALSE(added);
  EXPECT_NE(added.error().message.find("every public host"), std::string::npos);
  EXPECT_FALSE((*policy)->RemoveAllowed("a.test"));
  std::vector<std::string> add = {"a.test"};
  auto edited = (*policy)->EditAllowed(add, {}, [](const std::vector<std::string>&) -> Status {
    ADD_FAILURE() << "nothing may be stored";
    return {};
  });
  EXPECT_FALSE(edited);
  // Still open to everything public: a refused edit changed nothing.
  EXPECT_TRUE((*policy)->Check("b.test").allowed);

  config.allow = {"a.test"};
  EXPECT_FALSE(Policy::Create(config));
}

TEST(NetPolicy, RuntimeAddAndRemove) {
  auto policy = MakePolicy({"a.test"});
  EXPECT_FALSE(policy->Check("b.test").allowed);
  ASSERT_TRUE(policy->AddAllowed("B.test"));
  ASSERT_TRUE(policy->AddAllowed("b.test"));  // idempotent
  EXPECT_TRUE(policy->Check("b.test").allowed);
  EXPECT_EQ(policy->AllowedEntries(), (std::vector<std::string>{"a.test", "b.test"}));
  auto removed = policy->RemoveAllowed("b.test.");
  ASSERT_TRUE(removed.has_value());
  EXPECT_TRUE(*removed);
  EXPECT_FALSE(policy->Check("b.test").allowed);
  auto again = policy->RemoveAllowed("b.test");
  ASSERT_TRUE(again.has_value());
  EXPECT_FALSE(*again);
  EXPECT_FALSE(policy->AddAllowed("not a host").has_value());
}

TEST(NetPolicy, AnEditIsAllOrNothingAndStoredBeforeItTakesEffect) {
  auto policy = MakePolicy({"a.test"});
  std::vector<std::vector<std::string>> stored;
  auto store = [&](const std::vector<std::string>& entries) -> Status {
    stored.push_back(entries);
    return {};
  };
  const std::vector<std::string> none;
  // One bad entry among good ones: nothing is added, nothing stored.
  std::vector<std::string> mixed = {"b.test", "bad!name.test"};
  EXPECT_FALSE(policy->EditAllowed(mixed, none, store));
  // Removing what is not there fails the whole edit too.
  std::vector<std::string> add_c = {"c.test"};
  std::vector<std::string> remove_missing = {"zzz.test"};
  EXPECT_FALSE(policy->EditAllowed(add_c, remove_missing, store));
  EXPECT_TRUE(stored.empty());
  EXPECT_EQ(policy->AllowedEntries(), (std::vector<std::string>{"a.test"}));
  // A store that fails leaves the live list as it was.
  auto broken = [](const std::vector<std::string>&) -> Status { return Fail("disk full"); };
  auto failed = policy->EditAllowed(add_c, none, broken);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().message, "disk full");
  EXPECT_FALSE(policy->Check("c.test").allowed);
  // A good edit: canonical texts, stored, then in force.
  std::vector<std::string> add_upper = {"C.Test."};
  std::vector<std::string> remove_a = {"a.test"};
  auto done = policy->EditAllowed(add_upper, remove_a, store);
  ASSERT_TRUE(done) << done.error().message;
  EXPECT_EQ(*done, (std::vector<std::string>{"c.test"}));
  ASSERT_EQ(stored.size(), 1u);
  EXPECT_EQ(stored[0], *done);
  EXPECT_TRUE(policy->Check("c.test").allowed);
  EXPECT_FALSE(policy->Check("a.test").allowed);
}

TEST(NetPolicy, ConcurrentEditsAreAllKept) {
  auto policy = MakePolicy({});
  std::vector<std::thread> editors;
  std::atomic<int> failures{0};
  for (int i = 0; i < 20; ++i) {
    editors.emplace_back([&, i] {
      std::vector<std::string> add = {"host" + std::to_string(i) + ".test"};
      auto slow_store = [](const std::vector<std::string>&) -> Status {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        return {};
      };
      if (!policy->EditAllowed(add, {}, slow_store)) ++failures;
    });
  }
  for (auto& t : editors) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(policy->AllowedEntries().size(), 20u);
}

TEST(NetPolicy, InvalidEntriesAreRefusedWithTheEntryNamed) {
  for (const char* bad : {"*", "*.", "a..b", "10.0.0.0/33", "10.0.0.0/x", "host/8", "-", "a b"}) {
    auto pattern = HostPattern::Parse(bad);
    EXPECT_FALSE(pattern.has_value()) << bad;
  }
  PolicyConfig config;
  config.allow = {"ok.test", "bad..test"};
  auto policy = Policy::Create(config);
  ASSERT_FALSE(policy.has_value());
  EXPECT_NE(policy.error().message.find("bad..test"), std::string::npos);
}

TEST(NetPolicy, PlaceholdersAreRandomHex) {
  std::set<std::string> seen;
  for (int i = 0; i < 20; ++i) {
    auto placeholder = NewPlaceholder();
    ASSERT_TRUE(placeholder.has_value());
    ASSERT_EQ(placeholder->size(), 13u + 32u);
    EXPECT_TRUE(placeholder->starts_with("CELLA_SECRET_"));
    for (char c : placeholder->substr(13)) {
      EXPECT_TRUE((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << *placeholder;
    }
    seen.insert(*placeholder);
  }
  EXPECT_EQ(seen.size(), 20u);
}

Secret MakeSecret(std::string name, std::string value, std::vector<std::string> hosts) {
  Secret secret;
  secret.name = std::move(name);
  secret.value = std::move(value);
  for (const std::string& host : hosts) {
    auto pattern = HostPattern::Parse(host);
    EXPECT_TRUE(pattern.has_value());
    secret.hosts.push_back(*pattern);
  }
  return secret;
}

TEST(NetPolicy, SecretsAreRedactedWhenFormatted) {
  PolicyConfig config;
  config.secrets.push_back(MakeSecret("API_TOKEN", "hunter2-real-value", {"*.api.test"}));
  auto policy = Policy::Create(config);
  ASSERT_TRUE(policy.has_value()) << policy.error().message;
  const Secret& secret = (*policy)->secrets()[0];
  EXPECT_TRUE(secret.placeholder.starts_with("CELLA_SECRET_"));  // generated when empty
  std::string formatted = FormatRedacted(secret);
  EXPECT_EQ(formatted.find("hunter2"), std::string::npos);
  EXPECT_NE(formatted.find("API_TOKEN"), std::string::npos);
  EXPECT_NE(formatted.find("<redacted>"), std::string::npos);
  std::ostringstream stream;
  stream << secret;
  EXPECT_EQ(stream.str().find("hunter2"), std::string::npos);
  EXPECT_TRUE(Policy::SecretAppliesTo(secret, "v1.api.test"));
  EXPECT_FALSE(Policy::SecretAppliesTo(secret, "api.test"));
}

TEST(NetPolicy, BadSecretErrorsNeverContainTheValue) {
  PolicyConfig config;
  config.secrets.push_back(MakeSecret("TOKEN", "line1-hunter2\r\nInjected: x", {"a.test"}));
  auto policy = Policy::Create(config);
  ASSERT_FALSE(policy.has_value());
  EXPECT_EQ(policy.error().message.find("hunter2"), std::string::npos);
  EXPECT_NE(policy.error().message.find("TOKEN"), std::string::npos);

  PolicyConfig no_hosts;
  no_hosts.secrets.push_back(MakeSecret("TOKEN", "hunter2", {}));
  auto refused = Policy::Create(no_hosts);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().message.find("hunter2"), std::string::npos);
}

TEST(NetPolicy, PinsMatchNameAndPort) {
  PolicyConfig config;
  config.pins.push_back(Pin{"API.test.", 443, Endpoint{Ip("127.0.0.1"), 8443}});
  auto policy = Policy::Create(config);
  ASSERT_TRUE(policy.has_value()) << policy.error().message;
  auto pin = (*policy)->PinFor("api.test", 443);
  ASSERT_TRUE(pin.has_value());
  EXPECT_EQ(pin->ToString(), "127.0.0.1:8443");
  EXPECT_FALSE((*policy)->PinFor("api.test", 80).has_value());
  EXPECT_TRUE((*policy)->HasPin("api.test"));
  EXPECT_FALSE((*policy)->HasPin("other.test"));
}

}  // namespace
}  // namespace cella::net

namespace cella::net {
namespace {

TEST(PolicyAllowAll, InterceptionWithoutAListAllowsPublicHostsOnly) {
  PolicyConfig config;
  config.intercept = true;
  auto policy = Policy::Create(config);
  ASSERT_TRUE(policy) << policy.error().message;
  EXPECT_TRUE((*policy)->Check("anything.test"));
  EXPECT_TRUE((*policy)->CheckAddress(*IpAddress::Parse("203.0.113.5")));
  EXPECT_FALSE((*policy)->CheckAddress(*IpAddress::Parse("10.1.2.3")));  // still private
  // Asking for a list ends "everything"; emptying it again does not reopen.
  ASSERT_TRUE((*policy)->AddAllowed("api.test"));
  EXPECT_FALSE((*policy)->Check("anything.test"));
  ASSERT_TRUE((*policy)->RemoveAllowed("api.test"));
  EXPECT_FALSE((*policy)->Check("api.test"));
}

TEST(PolicyAllowAll, AListWithoutInterceptionIsNeverEverything) {
  PolicyConfig config;
  auto policy = Policy::Create(config);
  ASSERT_TRUE(policy);
  EXPECT_FALSE((*policy)->Check("anything.test"));
}

}  // namespace
}  // namespace cella::net
