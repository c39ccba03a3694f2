#include <gtest/gtest.h>

#include <cstring>

#include "cli/run_options.h"
#include "host/sandbox/spec.h"

namespace cella::cli {
namespace {

const char* FakeHostEnv(const char* name) {
  if (std::strcmp(name, "FROM_HOST") == 0) return "host value";
  return nullptr;
}

TEST(RunOptions, EnvAssignmentsFollowDocker) {
  std::map<std::string, std::string> env;
  ASSERT_TRUE(ApplyEnvAssignment("A=1", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("B=x=y", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("EMPTY=", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("FROM_HOST", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("UNSET_ON_HOST", FakeHostEnv, env));
  EXPECT_EQ(env, (std::map<std::string, std::string>{
                     {"A", "1"}, {"B", "x=y"}, {"EMPTY", ""}, {"FROM_HOST", "host value"}}));
  auto bad = ApplyEnvAssignment("=oops", FakeHostEnv, env);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("invalid name"), std::string::npos);
}

TEST(RunOptions, EnvFileSkipsCommentsAndNamesTheBadLine) {
  std::map<std::string, std::string> env;
  ASSERT_TRUE(
      ApplyEnvFile("# comment\n\nA=1\r\n  B=two words\nFROM_HOST\n", "vars.env", FakeHostEnv, env));
  EXPECT_EQ(env, (std::map<std::string, std::string>{
                     {"A", "1"}, {"B", "two words"}, {"FROM_HOST", "host value"}}));
  auto bad = ApplyEnvFile("OK=1\n=x\n", "vars.env", FakeHostEnv, env);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message.rfind("vars.env:2: ", 0), 0u) << bad.error().message;
}

TEST(RunOptions, MemorySizes) {
  EXPECT_EQ(ParseMemoryMiB("512").value(), 512);
  EXPECT_EQ(ParseMemoryMiB("512m").value(), 512);
  EXPECT_EQ(ParseMemoryMiB("2G").value(), 2048);
  EXPECT_EQ(ParseMemoryMiB("1.5g").value(), 1536);
  EXPECT_EQ(ParseMemoryMiB("256MiB").value(), 256);
  EXPECT_FALSE(ParseMemoryMiB("lots"));
  EXPECT_FALSE(ParseMemoryMiB("12"));  // below the 64 MiB floor
  EXPECT_FALSE(ParseMemoryMiB("5t"));
  EXPECT_FALSE(ParseMemoryMiB("-1g"));
}

TEST(RunOptions, FractionalCpus) {
  EXPECT_DOUBLE_EQ(ParseCpus("0.5").value(), 0.5);
  EXPECT_DOUBLE_EQ(ParseCpus("2").value(), 2.0);
  EXPECT_FALSE(ParseCpus("0"));
  EXPECT_FALSE(ParseCpus("two"));
  EXPECT_FALSE(ParseCpus("1.5x"));
  EXPECT_FALSE(ParseCpus("100"));
}

TEST(RunOptions, AddHost) {
  auto v4 = ParseAddHost("db.test:10.1.2.3");
  ASSERT_TRUE(v4);
  EXPECT_EQ(v4->host, "db.test");
  EXPECT_EQ(v4->ip, "10.1.2.3");
  auto v6 = ParseAddHost("v6.test:fd00::1");
  ASSERT_TRUE(v6);
  EXPECT_EQ(v6->ip, "fd00::1");
  EXPECT_FALSE(ParseAddHost("nocolon"));
  EXPECT_FALSE(ParseAddHost("host:not-an-ip"));
  EXPECT_FALSE(ParseAddHost(":1.2.3.4"));
}

}  // namespace
}  // namespace cella::cli

namespace cella::cli {
namespace {

const char* FakeSecretEnv(const char* name) {
  return std::string_view(name) == "API_KEY" ? "sk-live-123@x" : nullptr;
}

TEST(EgressFlags, HostListsSplitOnCommasAndRepeat) {
  auto hosts = SplitHostList({"a.test,*.b.test", "10.0.0.1"});
  ASSERT_TRUE(hosts);
  EXPECT_EQ(*hosts, (std::vector<std::string>{"a.test", "*.b.test", "10.0.0.1"}));
  EXPECT_FALSE(SplitHostList({"a.test,,b.test"}));
  EXPECT_FALSE(SplitHostList({"http://a.test"}));
}

TEST(EgressFlags, HostListsUseThePolicysOneRuleAndItsCanonicalText) {
  // What the supervisor's policy would refuse is refused here, before any
  // record is written (a stored bad entry used to break every later start).
  for (const char* bad : {"bad!name.test", "a..test", "-a.test", "*.", "10.0.0.0/33", "a b"}) {
    EXPECT_FALSE(SplitHostList({bad})) << bad;
  }
  auto hosts = SplitHostList({"API.Test.,10.1.2.3/16"});
  ASSERT_TRUE(hosts) << hosts.error().message;
  EXPECT_EQ(*hosts, (std::vector<std::string>{"api.test", "10.1.0.0/16"}));
}

TEST(EgressFlags, SecretFromTheEnvironmentOrLiteral) {
  auto from_env = ParseSecretFlag("API_KEY@api.test,*.api.test", &FakeSecretEnv);
  ASSERT_TRUE(from_env) << from_env.error().message;
  EXPECT_EQ(from_env->name, "API_KEY");
  EXPECT_EQ(from_env->value, "sk-live-123@x");
  EXPECT_TRUE(from_env->from_env);
  EXPECT_EQ(from_env->hosts, (std::vector<std::string>{"api.test", "*.api.test"}));
  auto literal = ParseSecretFlag("TOKEN=p@ss@word@api.test", &FakeSecretEnv);
  ASSERT_TRUE(literal) << literal.error().message;
  EXPECT_EQ(literal->value, "p@ss@word");
  EXPECT_FALSE(literal->from_env);
  auto missing = ParseSecretFlag("NOPE@api.test", &FakeSecretEnv);
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("export it"), std::string::npos);
  auto bad = ParseSecretFlag("TOKEN=hunter2", &FakeSecretEnv);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message.find("hunter2"), std::string::npos);  // never echo a value
  EXPECT_FALSE(ParseSecretFlag("1BAD=v@h.test", &FakeSecretEnv));
}

TEST(EgressFlags, ResolvePinsCurlStyle) {
  auto same = ParseResolveFlag("api.test:443:127.0.0.1");
  ASSERT_TRUE(same) << same.error().message;
  EXPECT_EQ(same->name, "api.test");
  EXPECT_EQ(same->port, 443);
  EXPECT_EQ(same->address, "127.0.0.1");
  EXPECT_EQ(same->address_port, 443);
  auto moved = ParseResolveFlag("api.test:443:127.0.0.1:8443");
  ASSERT_TRUE(moved);
  EXPECT_EQ(moved->address_port, 8443);
  auto v6 = ParseResolveFlag("api.test:80:[::1]:8080");
  ASSERT_TRUE(v6) << v6.error().message;
  EXPECT_EQ(v6->address, "::1");
  EXPECT_EQ(v6->address_port, 8080);
  EXPECT_FALSE(ParseResolveFlag("api.test:443"));
  EXPECT_FALSE(ParseResolveFlag("api.test:0:127.0.0.1"));
  EXPECT_FALSE(ParseResolveFlag("api.test:443:not-an-ip"));
}

// What `cella run` writes into the spec for each combination of network
// flags.
TEST(RunOptions, NoPolicyFlagMeansTheSealedNetworkOpenToPublicHosts) {
  sandbox::EgressSpec egress;
  std::vector<std::string> guest_dns = {"stale"};
  ASSERT_TRUE(PlanNetwork(false, {}, egress, guest_dns));
  EXPECT_TRUE(egress.enabled);
  EXPECT_TRUE(egress.all_public);
  EXPECT_FALSE(egress.intercept);
  EXPECT_FALSE(egress.host_loopback);
  EXPECT_FALSE(egress.allow_private);
  EXPECT_TRUE(guest_dns.empty());  // Compose gives the guest 10.0.2.3
}

TEST(RunOptions, HostLoopbackAndPrivateKeepTheDefaultOpenToPublicHosts) {
  sandbox::EgressSpec egress;
  egress.host_loopback = true;
  egress.allow_private = true;
  std::vector<std::string> guest_dns;
  ASSERT_TRUE(PlanNetwork(false, {}, egress, guest_dns));
  EXPECT_TRUE(egress.enabled);
  EXPECT_TRUE(egress.all_public);
  EXPECT_TRUE(egress.host_loopback);
  EXPECT_TRUE(egress.allow_private);
}

TEST(RunOptions, AnyPolicyFlagMakesAnExplicitPolicy) {
  auto plan = [](auto set) {
    sandbox::EgressSpec egress;
    set(egress);
    std::vector<std::string> guest_dns;
    EXPECT_TRUE(PlanNetwork(false, {}, egress, guest_dns));
    return egress;
  };
  for (const auto& egress :
       {plan([](sandbox::EgressSpec& e) { e.allow = {"api.test"}; }),
        plan([](sandbox::EgressSpec& e) { e.intercept = true; }), plan([](sandbox::EgressSpec& e) {
          e.pins.push_back({"a.test", 443, "127.0.0.1", 8443});
        }),
        plan([](sandbox::EgressSpec& e) { e.upstream_ca = "/ca.pem"; }),
        plan([](sandbox::EgressSpec& e) {
          e.secrets.push_back({"K", "p", {"a.test"}, ""});
        })}) {
    EXPECT_TRUE(egress.enabled);
    EXPECT_FALSE(egress.all_public);
  }
}

TEST(RunOptions, NoNetworkRefusesEveryNetworkFlag) {
  sandbox::EgressSpec plain;
  std::vector<std::string> guest_dns;
  ASSERT_TRUE(PlanNetwork(true, {"192.0.2.1"}, plain, guest_dns));
  EXPECT_FALSE(plain.enabled);
  EXPECT_EQ(guest_dns, std::vector<std::string>{"192.0.2.1"});
  for (auto set : std::vector<void (*)(sandbox::EgressSpec&)>{
           [](sandbox::EgressSpec& e) { e.allow = {"api.test"}; },
           [](sandbox::EgressSpec& e) { e.allow_private = true; },
           [](sandbox::EgressSpec& e) { e.host_loopback = true; },
           [](sandbox::EgressSpec& e) { e.intercept = true; }}) {
    sandbox::EgressSpec egress;
    set(egress);
    auto refused = PlanNetwork(true, {}, egress, guest_dns);
    ASSERT_FALSE(refused);
    EXPECT_NE(refused.error().message.find("--no-network"), std::string::npos);
  }
}

// --dns under the sealed network: the guest keeps asking 10.0.2.3 (the only
// UDP its namespace lets out) and cella's resolver asks the given servers.
TEST(RunOptions, DnsServersGoToCellasResolverNotTheGuest) {
  sandbox::EgressSpec egress;
  egress.allow = {"api.test"};
  std::vector<std::string> guest_dns;
  ASSERT_TRUE(PlanNetwork(false, {"192.0.2.53", "10.0.2.3", "2001:db8::53", "192.0.2.53"}, egress,
                          guest_dns));
  EXPECT_TRUE(guest_dns.empty());
  EXPECT_EQ(egress.dns_servers, (std::vector<std::string>{"192.0.2.53", "2001:db8::53"}));
  sandbox::EgressSpec by_name;
  auto refused = PlanNetwork(false, {"dns.example"}, by_name, guest_dns);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("not an IP address"), std::string::npos);
}

}  // namespace
}  // namespace cella::cli

namespace cella::cli {
namespace {

TEST(RunOptions, RestartPolicyTakesDockersForms) {
  using Kind = sandbox::RestartPolicy::Kind;
  EXPECT_EQ(sandbox::ParseRestartPolicy("no")->kind, Kind::kNo);
  EXPECT_EQ(sandbox::ParseRestartPolicy("always")->kind, Kind::kAlways);
  EXPECT_EQ(sandbox::ParseRestartPolicy("unless-stopped")->kind, Kind::kUnlessStopped);
  auto plain = sandbox::ParseRestartPolicy("on-failure");
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->kind, Kind::kOnFailure);
  EXPECT_EQ(plain->max_retries, 0);
  auto three = sandbox::ParseRestartPolicy("on-failure:3");
  ASSERT_TRUE(three);
  EXPECT_EQ(three->max_retries, 3);
  EXPECT_EQ(sandbox::ToString(*three), "on-failure:3");
  for (const char* bad : {"sometimes", "on-failure:", "on-failure:0", "on-failure:-1",
                          "on-failure:x", "always:2", "On-Failure"}) {
    auto r = sandbox::ParseRestartPolicy(bad);
    EXPECT_FALSE(r) << bad;
  }
  auto spelled = sandbox::ParseRestartPolicy("always:2");
  ASSERT_FALSE(spelled);
  EXPECT_NE(spelled.error().message.find("only on-failure takes a retry count"), std::string::npos);
}

TEST(RunOptions, RestartDecisionsAndBackOff) {
  using sandbox::ShouldRestart;
  const auto no = *sandbox::ParseRestartPolicy("no");
  const auto on_failure = *sandbox::ParseRestartPolicy("on-failure");
  const auto twice = *sandbox::ParseRestartPolicy("on-failure:2");
  const auto always = *sandbox::ParseRestartPolicy("always");
  EXPECT_FALSE(ShouldRestart(no, true, 0));
  EXPECT_TRUE(ShouldRestart(on_failure, true, 1000));
  EXPECT_FALSE(ShouldRestart(on_failure, false, 0));  // exit 0 is not a failure
  EXPECT_TRUE(ShouldRestart(twice, true, 1));
  EXPECT_FALSE(ShouldRestart(twice, true, 2));  // at most N restarts
  EXPECT_TRUE(ShouldRestart(always, false, 50));
  using sandbox::NextRestartDelay;
  using std::chrono::milliseconds;
  EXPECT_EQ(NextRestartDelay(milliseconds(0), milliseconds(5)), milliseconds(100));
  EXPECT_EQ(NextRestartDelay(milliseconds(100), milliseconds(5)), milliseconds(200));
  EXPECT_EQ(NextRestartDelay(milliseconds(40'000), milliseconds(5)), milliseconds(60'000));
  EXPECT_EQ(NextRestartDelay(milliseconds(60'000), milliseconds(5)), milliseconds(60'000));
  // A run of 10 s or more starts the series again.
  EXPECT_EQ(NextRestartDelay(milliseconds(60'000), milliseconds(10'000)), milliseconds(100));
}

TEST(RunOptions, ABareGuestPathIsAnAnonymousVolume) {
  auto m = ParseMountFlag("/data/", "/");
  ASSERT_TRUE(m) << m.error().message;
  EXPECT_TRUE(m->anonymous);
  EXPECT_FALSE(m->is_host);
  EXPECT_TRUE(m->name.empty());
  EXPECT_EQ(m->guest_path, "/data");
  EXPECT_FALSE(ParseMountFlag("/", "/"));
  EXPECT_FALSE(ParseMountFlag("data", "/"));  // neither a path nor NAME:/path
}

}  // namespace
}  // namespace cella::cli
