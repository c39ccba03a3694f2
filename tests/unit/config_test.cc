#include "protocol/config.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace cella::protocol {
namespace {

using nlohmann::ordered_json;

// Exactly what Go's encoding/json writes for a zero vmconfig.Config: nil
// slices and maps as null, non-omitempty strings as "".
constexpr std::string_view kGoZeroConfig =
    R"({"entrypoint":null,"cmd":null,"workdir":"","env":null,"network_enabled":false,"init_mode":""})";

// Every seed field set, in the Go struct's order, with Go's HTML escaping of
// '<', '>' and '&' (\u003c, \u003e, \u0026) and its sorted map keys.
constexpr std::string_view kGoFullConfig =
    R"({"entrypoint":["/docker-entrypoint.sh"],"cmd":["nginx","-g","daemon off;"],)"
    R"("workdir":"/usr/share/nginx","env":{"GREETING":"a \u003c b \u0026\u0026 c \u003e d",)"
    R"("HOME":"/root","PATH":"/usr/local/sbin:/usr/local/bin:/usr/bin"},"network_enabled":true,)"
    R"("guest_ip":"10.100.0.2","guest_cidr":16,"guest_gw":"10.100.0.1","guest_dns":"1.1.1.1",)"
    R"("volume_mounts":[{"device":"/dev/vdd","path":"/data","mode":"rw"},)"
    R"({"device":"/dev/vde","path":"/models","mode":"ro"},)"
    R"({"device":"/dev/disk/by-id/virtio-base","path":"/cache","mode":"overlay","overlay_device":"/dev/vdf"}],)"
    R"("init_mode":"systemd","skip_kernel_headers":true,"skip_guest_agent":true})";

Config FullConfig() {
  Config c;
  c.entrypoint = {"/bin/sh", "-c"};
  c.cmd = {"echo hi; exit 3"};
  c.workdir = "/work";
  c.env = {{"A", "1"}, {"EMPTY", ""}, {"UNICODE", "h\xc3\xa9llo"}};
  c.network_enabled = true;
  c.guest_ip = "192.168.100.2";
  c.guest_cidr = 24;
  c.guest_gw = "192.168.100.1";
  c.guest_dns = "8.8.8.8";
  c.volume_mounts = {{"/dev/vdd", "/data", MountMode::kReadWrite, ""},
                     {"/dev/vde", "/base", MountMode::kOverlay, "/dev/vdf"}};
  c.init_mode = InitMode::kSystemd;
  c.skip_kernel_headers = true;
  c.skip_guest_agent = true;
  c.has_gpu = true;
  c.hostname = "box-1";
  c.dns_servers = {"1.1.1.1", "2606:4700:4700::1111"};
  c.extra_hosts = {{"db.internal", "10.0.0.5"}};
  c.mtu = 1400;
  c.guest_mac = "02:ab:cd:ef:01:23";
  c.no_network = false;
  c.privileged = true;
  c.overlay_root = OverlayRoot{{{"/dev/disk/by-id/virtio-cella-lower0", "erofs"},
                                {"/dev/disk/by-id/virtio-cella-lower1", ""}},
                               "/dev/disk/by-id/virtio-cella-upper",
                               "ext4"};
  c.disks = {{"/dev/vdg", "/var/lib/buildkit", true}};
  c.user = "nobody:nogroup";
  c.cpus = 1.5;
  c.keep_alive = true;
  c.tty = true;
  c.ca_certificates = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
  c.agent_port = "custom.port";
  return c;
}

std::vector<std::string> Keys(const std::string& json) {
  std::vector<std::string> keys;
  ordered_json doc = ordered_json::parse(json);
  for (const auto& [k, v] : doc.items()) keys.push_back(k);
  return keys;
}

std::string ParseError(std::string_view json) {
  auto r = ParseConfig(json);
  if (r) return "<parsed>";
  return r.error().message;
}

TEST(Config, ReadsGoZeroValueWithNulls) {
  auto c = ParseConfig(kGoZeroConfig);
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_TRUE(c->entrypoint.empty());
  EXPECT_TRUE(c->cmd.empty());
  EXPECT_TRUE(c->env.empty());
  EXPECT_EQ(c->init_mode, InitMode::kExec);  // "" means the default
  EXPECT_FALSE(c->network_enabled);
  EXPECT_EQ(c->agent_port, kDefaultAgentPort);
  EXPECT_FALSE(c->overlay_root.has_value());
}

TEST(Config, ReadsGoConfigWithEverySeedField) {
  auto c = ParseConfig(kGoFullConfig);
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->entrypoint, std::vector<std::string>{"/docker-entrypoint.sh"});
  EXPECT_EQ(c->cmd, (std::vector<std::string>{"nginx", "-g", "daemon off;"}));
  EXPECT_EQ(c->workdir, "/usr/share/nginx");
  EXPECT_EQ(c->env.at("GREETING"), "a < b && c > d");
  EXPECT_EQ(c->env.at("PATH"), "/usr/local/sbin:/usr/local/bin:/usr/bin");
  EXPECT_EQ(c->env.size(), 3u);
  EXPECT_TRUE(c->network_enabled);
  EXPECT_EQ(c->guest_ip, "10.100.0.2");
  EXPECT_EQ(c->guest_cidr, 16);
  EXPECT_EQ(c->guest_gw, "10.100.0.1");
  EXPECT_EQ(c->guest_dns, "1.1.1.1");
  ASSERT_EQ(c->volume_mounts.size(), 3u);
  EXPECT_EQ(c->volume_mounts[0], (VolumeMount{"/dev/vdd", "/data", MountMode::kReadWrite, ""}));
  EXPECT_EQ(c->volume_mounts[1], (VolumeMount{"/dev/vde", "/models", MountMode::kReadOnly, ""}));
  EXPECT_EQ(c->volume_mounts[2], (VolumeMount{"/dev/disk/by-id/virtio-base", "/cache",
                                              MountMode::kOverlay, "/dev/vdf"}));
  EXPECT_EQ(c->init_mode, InitMode::kSystemd);
  EXPECT_TRUE(c->skip_kernel_headers);
  EXPECT_TRUE(c->skip_guest_agent);
}

TEST(Config, GoConfigSurvivesOurRoundTrip) {
  auto first = ParseConfig(kGoFullConfig);
  ASSERT_TRUE(first) << first.error().message;
  auto second = ParseConfig(SerializeConfig(*first));
  ASSERT_TRUE(second) << second.error().message;
  EXPECT_EQ(*first, *second);
}

TEST(Config, RoundTripsEveryField) {
  Config c = FullConfig();
  ASSERT_TRUE(ValidateConfig(c)) << ValidateConfig(c).error().message;
  std::string json = SerializeConfig(c);
  auto back = ParseConfig(json);
  ASSERT_TRUE(back) << back.error().message << "\n" << json;
  EXPECT_EQ(*back, c);
}

TEST(Config, GuestMacIsAUnicastAddressOfSixHexPairs) {
  auto mac = ParseMac("02:AB:cd:0f:10:ff");
  ASSERT_TRUE(mac.has_value());
  EXPECT_EQ(*mac, (std::array<uint8_t, 6>{0x02, 0xab, 0xcd, 0x0f, 0x10, 0xff}));
  for (const char* bad :
       {"", "02:ab:cd:ef:01", "02:ab:cd:ef:01:23:45", "02-ab-cd-ef-01-23", "02:ab:cd:ef:01:2g",
        "01:00:5e:00:00:01" /* multicast */, "00:00:00:00:00:00", "02:ab:cd:ef:01:23 "})
    EXPECT_FALSE(ParseMac(bad).has_value()) << bad;
  Config c;
  c.guest_mac = "03:00:00:00:00:01";
  EXPECT_FALSE(ValidateConfig(c).has_value());
  auto parsed = ParseConfig(R"({"guest_mac":"ff:ff:ff:ff:ff:ff"})");
  EXPECT_FALSE(parsed.has_value());
}

TEST(Config, WritesSeedFieldsInGoOrderAndOmitsEmptyOnes) {
  std::string json = SerializeConfig(Config{});
  EXPECT_EQ(Keys(json), (std::vector<std::string>{"entrypoint", "cmd", "workdir", "env",
                                                  "network_enabled", "init_mode"}));
  auto doc = ordered_json::parse(json);
  EXPECT_EQ(doc["init_mode"], "exec");
  EXPECT_EQ(doc["network_enabled"], false);
  EXPECT_TRUE(doc["env"].is_object());
  EXPECT_TRUE(doc["cmd"].is_array());
}

TEST(Config, WritesEveryFieldWhenSet) {
  std::string json = SerializeConfig(FullConfig());
  EXPECT_EQ(Keys(json), (std::vector<std::string>{"entrypoint",
                                                  "cmd",
                                                  "workdir",
                                                  "env",
                                                  "network_enabled",
                                                  "guest_ip",
                                                  "guest_cidr",
                                                  "guest_gw",
                                                  "guest_dns",
                                                  "volume_mounts",
                                                  "init_mode",
                                                  "skip_kernel_headers",
                                                  "skip_guest_agent",
                                                  "has_gpu",
                                                  "hostname",
                                                  "dns_servers",
                                                  "extra_hosts",
                                                  "mtu",
                                                  "guest_mac",
                                                  "privileged",
                                                  "overlay_root",
                                                  "disks",
                                                  "user",
                                                  "cpus",
                                                  "keep_alive",
                                                  "tty",
                                                  "ca_certificates",
                                                  "agent_port"}));
  auto doc = ordered_json::parse(json);
  // omitempty inside nested objects too.
  EXPECT_FALSE(doc["volume_mounts"][0].contains("overlay_device"));
  EXPECT_EQ(doc["volume_mounts"][1]["overlay_device"], "/dev/vdf");
  EXPECT_FALSE(doc["overlay_root"]["lower"][1].contains("fstype"));
  EXPECT_EQ(doc["cpus"], 1.5);
}

TEST(Config, ReadOnlyRootAndTmpfsRoundTripAndTmpfsPathsAreChecked) {
  Config c;
  c.read_only_root = true;
  c.tmpfs = {{"/cache", 64}, {"/scratch", 0}};
  auto back = ParseConfig(SerializeConfig(c));
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(*back, c);
  c.tmpfs = {{"relative", 0}};
  auto bad = ParseConfig(SerializeConfig(c));
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("tmpfs[0].path"), std::string::npos) << bad.error().message;

  // A tmpfs is mounted last: one above a share or volume would hide it.
  c.tmpfs = {{"/data", 0}};
  c.host_shares = {{"share0", "/data/in", MountMode::kReadWrite, ""}};
  auto hidden = ValidateConfig(c);
  ASSERT_FALSE(hidden);
  EXPECT_NE(hidden.error().message.find("host_shares[0].path"), std::string::npos)
      << hidden.error().message;
  c.host_shares = {{"share0", "/database", MountMode::kReadWrite, ""}};  // beside, not inside
  EXPECT_TRUE(ValidateConfig(c)) << ValidateConfig(c).error().message;
  c.tmpfs.clear();
  c.host_shares.clear();
  c.volume_mounts = {{"/dev/vdb", "/tmp/cache", MountMode::kReadWrite, ""}};
  hidden = ValidateConfig(c);  // --read-only's own /tmp
  ASSERT_FALSE(hidden);
  EXPECT_NE(hidden.error().message.find("/tmp"), std::string::npos) << hidden.error().message;
}

TEST(Config, DefaultAgentPortIsNotWritten) {
  Config c;
  c.agent_port = std::string(kDefaultAgentPort);
  EXPECT_FALSE(ordered_json::parse(SerializeConfig(c)).contains("agent_port"));
}

TEST(Config, NullReadsAsZeroValueForAnyField) {
  auto c = ParseConfig(R"({"volume_mounts":null,"overlay_root":null,"cpus":null,"mtu":null,
                            "dns_servers":null,"user":null,"agent_port":null})");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(*c, Config{});
}

TEST(Config, IgnoresUnknownKeysLikeGo) {
  auto c = ParseConfig(R"({"cmd":["x"],"future_field":{"a":1},"volume_mounts":
      [{"device":"/dev/vdb","path":"/v","mode":"ro","future":true}]})");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->cmd, std::vector<std::string>{"x"});
  EXPECT_EQ(c->volume_mounts.size(), 1u);
}

TEST(Config, AcceptsFractionalAndIntegerCpus) {
  auto a = ParseConfig(R"({"cpus":0.5})");
  ASSERT_TRUE(a) << a.error().message;
  EXPECT_DOUBLE_EQ(a->cpus, 0.5);
  auto b = ParseConfig(R"({"cpus":2})");
  ASSERT_TRUE(b) << b.error().message;
  EXPECT_DOUBLE_EQ(b->cpus, 2.0);
}

struct ErrorCase {
  std::string json;
  std::string want;  // substring of the error message
};

class ConfigErrors : public testing::TestWithParam<ErrorCase> {};

TEST_P(ConfigErrors, NamesTheField) {
  std::string message = ParseError(GetParam().json);
  EXPECT_NE(message.find(GetParam().want), std::string::npos)
      << "json: " << GetParam().json << "\nerror: " << message;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ConfigErrors,
    testing::Values(
        ErrorCase{R"({"cmd":"echo hi"})", "cmd: want an array of strings, got string"},
        ErrorCase{R"({"cmd":["a",1]})", "cmd[1]: want a string, got integer"},
        ErrorCase{R"({"env":{"A":1}})", R"(env["A"]: want a string, got integer)"},
        ErrorCase{R"({"env":{"A=B":"1"}})", R"(env["A=B"]: name contains '=')"},
        ErrorCase{R"({"network_enabled":"yes"})", "network_enabled: want a boolean, got string"},
        ErrorCase{R"({"guest_cidr":24.5})", "guest_cidr: want an integer, got number"},
        ErrorCase{R"({"guest_cidr":33})", "guest_cidr: 33 is out of range 0..32"},
        ErrorCase{R"({"guest_cidr":-1})", "guest_cidr: -1 is out of range 0..32"},
        ErrorCase{R"({"guest_ip":"10.0.0.300"})", R"(guest_ip: "10.0.0.300" is not an IPv4)"},
        ErrorCase{R"({"guest_gw":"::1"})", R"(guest_gw: "::1" is not an IPv4)"},
        ErrorCase{R"({"guest_dns":"dns.example"})", "guest_dns: \"dns.example\" is not an IP"},
        ErrorCase{R"({"network_enabled":true})", "guest_ip: required when network_enabled"},
        ErrorCase{R"({"network_enabled":true,"guest_ip":"10.0.0.2"})", "guest_cidr: required"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/a","mode":"ro"},
                      {"device":"/dev/vdc","path":"/b","mode":"rx"}]})",
                  R"(volume_mounts[1].mode: unknown mode "rx" (want ro, rw or overlay))"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/a"}]})",
                  R"(volume_mounts[0].mode: unknown mode "")"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"data","mode":"ro"}]})",
                  "volume_mounts[0].path: \"data\" is not an absolute path"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/a/../etc","mode":"ro"}]})",
                  "volume_mounts[0].path: \"/a/../etc\" contains a '..' component"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/","mode":"ro"}]})",
                  "volume_mounts[0].path: cannot mount over the root directory"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/data","mode":"ro"}],
                      "disks":[{"device":"/dev/vdc","path":"/data/"}]})",
                  R"(disks[0].path: "/data" is already mounted by volume_mounts[0].path)"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/x","mode":"ro"},
                      {"device":"/dev/vdc","path":"//x/.","mode":"rw"}]})",
                  "volume_mounts[1].path: \"/x\" is already mounted"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/c","mode":"overlay"}]})",
                  "volume_mounts[0].overlay_device: required when mode is overlay"},
        ErrorCase{R"({"volume_mounts":[{"device":"/dev/vdb","path":"/c","mode":"rw",
                      "overlay_device":"/dev/vdc"}]})",
                  "volume_mounts[0].overlay_device: only valid when mode is overlay"},
        ErrorCase{R"({"volume_mounts":[{"device":"vdb","path":"/c","mode":"rw"}]})",
                  "volume_mounts[0].device: \"vdb\" is not an absolute path"},
        ErrorCase{R"({"volume_mounts":[{"device":"/etc/passwd","path":"/c","mode":"rw"}]})",
                  "volume_mounts[0].device: \"/etc/passwd\" is not a device path"},
        ErrorCase{R"({"volume_mounts":{"device":"/dev/vdb"}})",
                  "volume_mounts: want an array of objects, got object"},
        ErrorCase{R"({"init_mode":"runit"})",
                  R"(init_mode: unknown mode "runit" (want exec or systemd))"},
        ErrorCase{R"({"mtu":67})", "mtu: 67 is out of range 68..65535"},
        ErrorCase{R"({"mtu":70000})", "mtu: 70000 is out of range"},
        ErrorCase{R"({"mtu":99999999999})", "mtu: 99999999999 is out of range"},
        ErrorCase{R"({"hostname":"bad host"})", "hostname: \"bad host\" is not a valid host name"},
        ErrorCase{R"({"dns_servers":["1.1.1.1","x"]})", "dns_servers[1]: \"x\" is not an IP"},
        ErrorCase{R"({"extra_hosts":[{"host":"db","ip":"nope"}]})",
                  "extra_hosts[0].ip: \"nope\" is not an IP"},
        ErrorCase{R"({"extra_hosts":[{"host":"a b","ip":"1.2.3.4"}]})",
                  "extra_hosts[0].host: \"a b\" is not a valid host name"},
        ErrorCase{R"({"overlay_root":{"lower":[]}})", "overlay_root.lower: at least one"},
        ErrorCase{R"({"overlay_root":{"lower":[{"device":"/dev/vda","fstype":"Ext 4"}]}})",
                  "overlay_root.lower[0].fstype: \"Ext 4\" is not a filesystem type name"},
        ErrorCase{R"({"overlay_root":{"lower":[{"fstype":"erofs"}]}})",
                  "overlay_root.lower[0].device: required"},
        ErrorCase{R"({"overlay_root":[]})", "overlay_root: want an object, got array"},
        ErrorCase{R"({"disks":[{"device":"/dev/vdb","path":"/d","read_only":"yes"}]})",
                  "disks[0].read_only: want a boolean, got string"},
        ErrorCase{R"({"cpus":-1})", "cpus: -1"},
        ErrorCase{R"({"cpus":"2"})", "cpus: want a number, got string"},
        ErrorCase{R"({"user":"a:b:c"})", "user: \"a:b:c\" has more than one ':'"},
        ErrorCase{R"({"workdir":"app"})", "workdir: \"app\" is not an absolute path"},
        ErrorCase{R"({"agent_port":"../x"})", "agent_port: \"../x\" has a character"},
        ErrorCase{R"({"keep_alive":1})", "keep_alive: want a boolean, got integer"},
        ErrorCase{R"([1,2])", "config: want a JSON object, got array"},
        ErrorCase{R"({"cmd":)", "config: invalid JSON"}));

TEST(Config, RefusesOversizedInput) {
  std::string big = R"({"workdir":")" + std::string(kMaxConfigBytes, 'a') + R"("})";
  EXPECT_NE(ParseError(big).find("larger than the limit"), std::string::npos);
}

TEST(Config, NormalizesGuestPaths) {
  EXPECT_EQ(NormalizeGuestPath("//a/./b//").value(), "/a/b");
  EXPECT_EQ(NormalizeGuestPath("/").value(), "/");
  EXPECT_FALSE(NormalizeGuestPath("/a/..").has_value());
  EXPECT_FALSE(NormalizeGuestPath("a/b").has_value());
  EXPECT_FALSE(NormalizeGuestPath(std::string_view("/a\0b", 4)).has_value());
}

}  // namespace
}  // namespace cella::protocol
