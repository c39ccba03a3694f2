// The proxy's decisions without sockets: one table of flows (destination,
// SNI or Host header, secret placement) and the verdict each must get.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "host/net/egress_decision.h"
#include "host/net/secrets.h"

namespace cella::net {
namespace {

constexpr const char* kPlaceholder = "CELLA_SECRET_0123456789abcdef0123456789abcdef";
constexpr const char* kValue = "sk-real-value-42";

Secret ApiSecret() {
  Secret secret;
  secret.name = "API_KEY";
  secret.placeholder = kPlaceholder;
  secret.value = kValue;
  secret.hosts.push_back(*HostPattern::Parse("api.test"));
  return secret;
}

// The policies the rows name.
std::shared_ptr<Policy> PolicyNamed(const std::string& name) {
  PolicyConfig config;
  if (name == "list") {
    config.allow = {"api.test", "*.cdn.test", "other.test", "203.0.113.7"};
    config.secrets = {ApiSecret()};
  } else if (name == "list+private") {
    config.allow = {"api.test"};
    config.allow_private = true;
  } else if (name == "list+gateway-entry") {
    config.allow = {"api.test", "10.0.2.2"};
  } else if (name == "default") {
    config.allow_all_public = true;
  } else if (name == "default+private") {
    config.allow_all_public = true;
    config.allow_private = true;
  } else if (name == "default+loopback") {
    config.allow_all_public = true;
    config.allow_host_loopback = true;
  } else if (name == "intercept-all") {
    config.intercept = true;
    config.secrets = {ApiSecret()};
  } else {
    ADD_FAILURE() << "no policy " << name;
  }
  auto policy = Policy::Create(config);
  EXPECT_TRUE(policy) << policy.error().message;
  return *policy;
}

enum class Kind { kRaw, kTls, kHttp };

struct Row {
  const char* what;
  const char* policy;
  // Destination: "v:NAME" a virtual address handed out for NAME, "v?" one
  // never handed out, "gw" the host gateway, else an address literal.
  const char* destination;
  Kind kind;
  const char* sni_or_host;  // SNI (kTls), Host header (kHttp); "" = none
  const char* header;       // kHttp: one extra "Name: value" header, "" = none
  const char* target;       // kHttp: request-target
  bool allowed;
  const char* reason;  // substring of the refusal ("" when allowed)
};

const Row kRows[] = {
    // --- destinations ---
    {"virtual name on the list", "list", "v:api.test", Kind::kRaw, "", "", "/", true, ""},
    {"virtual name under a glob", "list", "v:img.cdn.test", Kind::kRaw, "", "", "/", true, ""},
    {"glob never matches its apex", "list", "v:cdn.test", Kind::kRaw, "", "", "/", false,
     "not in allow list"},
    {"unknown virtual address", "list", "v?", Kind::kRaw, "", "", "/", false,
     "unknown virtual address"},
    {"literal behind a virtual address", "default", "v:127.0.0.1", Kind::kRaw, "", "", "/", false,
     "address literal"},
    {"public literal named by an entry", "list", "203.0.113.7", Kind::kRaw, "", "", "/", true, ""},
    {"public literal not named", "list", "198.51.100.1", Kind::kRaw, "", "", "/", false,
     "connect by an allowed name"},
    {"private literal under a list", "list", "192.168.1.10", Kind::kRaw, "", "", "/", false,
     "private"},
    {"private literal with --allow-private", "list+private", "192.168.1.10", Kind::kRaw, "", "",
     "/", true, ""},
    {"metadata address closed by default", "default", "169.254.169.254", Kind::kHttp,
     "169.254.169.254", "", "/latest/meta-data", false, "private"},
    {"metadata address with --allow-private", "default+private", "169.254.169.254", Kind::kHttp,
     "169.254.169.254", "", "/", true, ""},
    {"gateway closed by default", "default", "gw", Kind::kHttp, "10.0.2.2", "", "/", false,
     "--allow-host-loopback"},
    {"gateway not opened by --allow-private", "default+private", "gw", Kind::kRaw, "", "", "/",
     false, "gateway"},
    {"gateway with --allow-host-loopback", "default+loopback", "gw", Kind::kRaw, "", "", "/", true,
     ""},
    {"gateway named exactly", "list+gateway-entry", "gw", Kind::kRaw, "", "", "/", true, ""},
    {"HTTP to the gateway with --allow-host-loopback", "default+loopback", "gw", Kind::kHttp,
     "10.0.2.2", "", "/", true, ""},
    {"HTTP to the gateway named exactly", "list+gateway-entry", "gw", Kind::kHttp, "10.0.2.2", "",
     "/", true, ""},
    {"loopback literal not opened by --allow-private", "list+private", "127.0.0.1", Kind::kRaw, "",
     "", "/", false, "loopback"},
    {"default: any public literal", "default", "198.51.100.1", Kind::kRaw, "", "", "/", true, ""},
    {"default: any public name", "default", "v:anything.example", Kind::kRaw, "", "", "/", true,
     ""},
    {"default: LAN literal closed", "default", "10.1.2.3", Kind::kRaw, "", "", "/", false,
     "private"},
    // --- TLS by SNI ---
    {"SNI equal to the virtual name", "list", "v:api.test", Kind::kTls, "api.test", "", "/", true,
     ""},
    {"SNI differs from the virtual name", "list", "v:api.test", Kind::kTls, "other.test", "", "/",
     false, "does not match the resolved name"},
    {"SNI not allowed on a named literal", "list", "203.0.113.7", Kind::kTls, "evil.test", "", "/",
     false, "not in allow list"},
    {"SNI allowed on a named literal", "list", "203.0.113.7", Kind::kTls, "api.test", "", "/", true,
     ""},
    {"invalid SNI", "list", "v:api.test", Kind::kTls, "bad_-.-name", "", "/", false, "invalid SNI"},
    {"SNI is case-insensitive", "list", "v:api.test", Kind::kTls, "API.Test", "", "/", true, ""},
    {"default: SNI any public name", "default", "v:shop.example", Kind::kTls, "shop.example", "",
     "/", true, ""},
    {"TLS without SNI follows the destination", "list", "v:api.test", Kind::kTls, "", "", "/", true,
     ""},
    // --- HTTP by Host ---
    {"Host equal to the virtual name", "list", "v:api.test", Kind::kHttp, "api.test", "", "/", true,
     ""},
    {"Host spoofed on a virtual address", "list", "v:other.test", Kind::kHttp, "api.test", "", "/",
     false, "does not match the connection's host"},
    {"Host spoofed on a public literal", "list", "203.0.113.7", Kind::kHttp, "evil.test", "", "/",
     false, "not in allow list"},
    {"invalid Host", "list", "v:api.test", Kind::kHttp, "exa mple", "", "/", false,
     "invalid Host header"},
    {"CONNECT refused", "default", "v:api.test", Kind::kHttp, "api.test", "", "CONNECT", false,
     "CONNECT"},
    // --- secrets ---
    {"secret to its host in Authorization", "list", "v:api.test", Kind::kHttp, "api.test",
     "Authorization: Bearer {P}", "/", true, ""},
    {"secret to its host in the query", "list", "v:api.test", Kind::kHttp, "api.test", "",
     "/q?key={P}", true, ""},
    {"secret to the wrong host", "list", "v:other.test", Kind::kHttp, "other.test",
     "Authorization: Bearer {P}", "/", false, "may not be sent to other.test"},
    {"secret to the wrong host in the query", "list", "v:other.test", Kind::kHttp, "other.test", "",
     "/q?key={P}", false, "may not be sent"},
    {"real value to the wrong host", "list", "v:other.test", Kind::kHttp, "other.test",
     "X-Echo: {V}", "/", false, "the value of secret API_KEY"},
    {"secret via a spoofed Host on a literal", "list", "203.0.113.7", Kind::kHttp, "api.test",
     "Authorization: {P}", "/", false, "may not be sent"},
    {"intercept-all: secret to its host", "intercept-all", "v:api.test", Kind::kHttp, "api.test",
     "X-Api-Key: {P}", "/", true, ""},
    {"intercept-all: secret elsewhere", "intercept-all", "v:elsewhere.test", Kind::kHttp,
     "elsewhere.test", "X-Api-Key: {P}", "/", false, "may not be sent"},
};

std::string Expand(std::string text) {
  for (auto [from, to] : {std::pair{"{P}", kPlaceholder}, std::pair{"{V}", kValue}}) {
    for (size_t at = text.find(from); at != std::string::npos; at = text.find(from))
      text.replace(at, std::string_view(from).size(), to);
  }
  return text;
}

TEST(EgressDecision, TableOfFlows) {
  ASSERT_GE(std::size(kRows), 30u);
  const IpAddress gateway = *IpAddress::Parse("10.0.2.2");
  for (const Row& row : kRows) {
    SCOPED_TRACE(row.what);
    auto policy = PolicyNamed(row.policy);
    DestinationFacts facts;
    std::string destination = row.destination;
    if (destination == "gw") {
      facts.address = {gateway, 80};
      facts.is_host_gateway = true;
    } else if (destination.starts_with("v")) {
      facts.address = {*IpAddress::Parse("198.18.0.9"), 443};
      facts.is_virtual = true;
      if (destination.starts_with("v:")) facts.virtual_name = destination.substr(2);
    } else {
      facts.address = {*IpAddress::Parse(destination), 443};
    }
    DestinationVerdict judged = DecideDestination(*policy, facts);
    Verdict verdict;
    if (row.kind == Kind::kHttp) {
      http::RequestHead head;
      head.method = std::string(row.target) == "CONNECT" ? "CONNECT" : "GET";
      head.target = head.method == "CONNECT" ? "api.test:443" : Expand(row.target);
      head.version = "HTTP/1.1";
      head.headers.push_back({"Host", row.sni_or_host});
      std::string header = Expand(row.header);
      if (!header.empty()) {
        auto colon = header.find(": ");
        head.headers.push_back({header.substr(0, colon), header.substr(colon + 2)});
      }
      verdict = DecideHttpRequest(*policy, judged.decision,
                                  {row.sni_or_host, judged.name, judged.name.has_value()}, head);
      if (verdict) {
        // Allowed: no placeholder is left where it was swapped in.
        std::string all = head.target;
        for (const auto& h : head.headers) all += h.value;
        EXPECT_EQ(all.find(kPlaceholder), std::string::npos) << all;
      }
    } else {
      std::optional<std::string> sni;
      if (row.kind == Kind::kTls && *row.sni_or_host) sni = row.sni_or_host;
      verdict = DecideStream(*policy, judged, sni);
    }
    EXPECT_EQ(verdict.allowed, row.allowed) << verdict.reason;
    if (!row.allowed) {
      EXPECT_NE(verdict.reason.find(row.reason), std::string::npos) << verdict.reason;
    }
    EXPECT_EQ(verdict.reason.find(kValue), std::string::npos) << "a reason never holds a value";
  }
}

// Secrets travel only in credential headers, custom headers and the query:
// never in the body (not even looked at), the path, or a standard header.
TEST(EgressDecision, SecretsAreSubstitutedOnlyWhereCredentialsTravel) {
  auto policy = PolicyNamed("list");
  http::RequestHead head;
  head.method = "POST";
  head.target = std::string("/path/") + kPlaceholder + "?key=" + kPlaceholder;
  head.version = "HTTP/1.1";
  head.headers = {{"Host", "api.test"},
                  {"Authorization", std::string("Bearer ") + kPlaceholder},
                  {"Proxy-Authorization", kPlaceholder},
                  {"X-Api-Key", kPlaceholder},
                  {"Cookie", std::string("session=") + kPlaceholder},
                  {"Referer", std::string("https://api.test/?k=") + kPlaceholder},
                  {"User-Agent", kPlaceholder}};
  ASSERT_FALSE(SubstituteSecrets(*policy, "api.test", head).has_value());
  EXPECT_EQ(head.target, std::string("/path/") + kPlaceholder + "?key=" + kValue);
  std::map<std::string, std::string> got;
  for (const auto& h : head.headers) got[h.name] = h.value;
  EXPECT_EQ(got["Authorization"], std::string("Bearer ") + kValue);
  EXPECT_EQ(got["Proxy-Authorization"], kValue);
  EXPECT_EQ(got["X-Api-Key"], kValue);
  EXPECT_EQ(got["Cookie"], std::string("session=") + kPlaceholder);
  EXPECT_EQ(got["Referer"], std::string("https://api.test/?k=") + kPlaceholder);
  EXPECT_EQ(got["User-Agent"], kPlaceholder);
  EXPECT_TRUE(SecretMayTravelInHeader("x-custom"));
  EXPECT_TRUE(SecretMayTravelInHeader("AUTHORIZATION"));
  EXPECT_FALSE(SecretMayTravelInHeader("HOST"));
  EXPECT_FALSE(SecretMayTravelInHeader("Content-Length"));
}

}  // namespace
}  // namespace cella::net
