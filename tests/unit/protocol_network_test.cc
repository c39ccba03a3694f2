// The one host-name rule every part of cella applies.
#include <gtest/gtest.h>

#include <string>

#include "host/net/policy.h"
#include "protocol/config.h"
#include "protocol/network.h"

namespace cella::protocol {
namespace {

TEST(HostNameRule, OneRuleForEveryCaller) {
  const std::string label63(63, 'a');
  const std::string long_name =
      label63 + "." + label63 + "." + label63 + "." + std::string(61, 'b');
  for (const std::string& good :
       {std::string("api.example.com"), std::string("API.Example.COM"), std::string("a"),
        std::string("_srv._tcp.example"), std::string("xn--bcher-kva.example"),
        std::string("1.2.3"), label63 + ".test", long_name}) {
    EXPECT_TRUE(IsValidHostName(good)) << good;
    EXPECT_TRUE(net::NormalizeHost(good).has_value()) << good;
  }
  for (const std::string& bad :
       {std::string(""), std::string("."), std::string("a..b"), std::string("a.b."),
        std::string("-a.test"), std::string("a-.test"), std::string("a b"), std::string("a/b"),
        std::string("a*b"), label63 + "a.test", long_name + "c"}) {
    EXPECT_FALSE(IsValidHostName(bad)) << bad;
  }
  // The policy's host normaliser and the guest hostname check agree.
  EXPECT_FALSE(net::NormalizeHost("a-.test").has_value());
  EXPECT_FALSE(net::HostPattern::Parse("-a.test"));
  Config config;
  config.hostname = "box-";
  EXPECT_FALSE(ValidateConfig(config));
  config.hostname = "box-1";
  EXPECT_TRUE(ValidateConfig(config)) << ValidateConfig(config).error().message;
}

}  // namespace
}  // namespace cella::protocol
