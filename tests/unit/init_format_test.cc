#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <set>
#include <string>
#include <vector>

#include "guest/init/format.h"

namespace cella::init {
namespace {

protocol::Config NetworkedConfig() {
  protocol::Config c;
  c.network_enabled = true;
  c.guest_ip = "10.0.2.15";
  c.guest_cidr = 24;
  return c;
}

TEST(InitHosts, LocalhostOnlyByDefault) {
  EXPECT_EQ(HostsFileContent(protocol::Config{}),
            "# Written by cella-init at boot.\n"
            "127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n");
}

TEST(InitHosts, HostnameOnGuestIpThenExtraHostsInOrder) {
  protocol::Config c = NetworkedConfig();
  c.hostname = "box1";
  c.extra_hosts = {{"db.internal", "10.0.0.5"}, {"v6", "fd00::1"}};
  EXPECT_EQ(HostsFileContent(c),
            "# Written by cella-init at boot.\n"
            "127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "10.0.2.15\tbox1\n"
            "10.0.0.5\tdb.internal\n"
            "fd00::1\tv6\n");
}

TEST(InitHosts, HostnameOnLoopbackAliasWhenNetworkIsOff) {
  protocol::Config c = NetworkedConfig();
  c.no_network = true;
  c.hostname = "box1";
  EXPECT_NE(HostsFileContent(c).find("127.0.1.1\tbox1\n"), std::string::npos);
  EXPECT_EQ(HostsFileContent(c).find("10.0.2.15"), std::string::npos);
}

TEST(InitDns, DnsServersWinOverGuestDns) {
  protocol::Config c = NetworkedConfig();
  c.guest_dns = "10.0.2.3";
  EXPECT_EQ(EffectiveDnsServers(c), std::vector<std::string>{"10.0.2.3"});
  c.dns_servers = {"1.1.1.1", "8.8.8.8"};
  EXPECT_EQ(EffectiveDnsServers(c), (std::vector<std::string>{"1.1.1.1", "8.8.8.8"}));
  c.no_network = true;
  EXPECT_TRUE(EffectiveDnsServers(c).empty());
}

TEST(InitDns, ResolvConfListsEachServer) {
  EXPECT_EQ(ResolvConfContent({"1.1.1.1", "2606:4700:4700::1111"}),
            "# Written by cella-init at boot.\n"
            "nameserver 1.1.1.1\n"
            "nameserver 2606:4700:4700::1111\n");
}

std::string MaskText(int prefix) {
  auto mask = NetmaskFromCidr(prefix);
  if (!mask) return "error: " + mask.error().message;
  in_addr addr{*mask};
  char text[INET_ADDRSTRLEN];
  return inet_ntop(AF_INET, &addr, text, sizeof(text));
}

TEST(InitNetmask, FromPrefixLength) {
  EXPECT_EQ(MaskText(0), "0.0.0.0");
  EXPECT_EQ(MaskText(1), "128.0.0.0");
  EXPECT_EQ(MaskText(16), "255.255.0.0");
  EXPECT_EQ(MaskText(24), "255.255.255.0");
  EXPECT_EQ(MaskText(30), "255.255.255.252");
  EXPECT_EQ(MaskText(32), "255.255.255.255");
  EXPECT_FALSE(NetmaskFromCidr(33).has_value());
  EXPECT_FALSE(NetmaskFromCidr(-1).has_value());
}

TEST(InitCpuMax, QuotaIsCpusTimesPeriod) {
  EXPECT_EQ(CpuMaxContent(1).value(), "100000 100000");
  EXPECT_EQ(CpuMaxContent(0.5).value(), "50000 100000");
  EXPECT_EQ(CpuMaxContent(1.5).value(), "150000 100000");
  EXPECT_EQ(CpuMaxContent(0.333).value(), "33300 100000");
  EXPECT_EQ(CpuMaxContent(0.001).value(), "1000 100000");  // the kernel's 1 ms floor
  EXPECT_FALSE(CpuMaxContent(0).has_value());
  EXPECT_FALSE(CpuMaxContent(-1).has_value());
}

TEST(InitEnv, AddsPathAndHomeOnlyWhenMissing) {
  auto env = WorkloadEnvironment({{"FOO", "bar"}, {"A", "1"}}, "/home/u");
  EXPECT_EQ(env, (std::vector<std::string>{"A=1", "FOO=bar", "PATH=" + std::string(kDefaultPath),
                                           "HOME=/home/u"}));
  auto own = WorkloadEnvironment({{"PATH", "/opt/bin"}, {"HOME", "/data"}}, "/root");
  EXPECT_EQ(own, (std::vector<std::string>{"HOME=/data", "PATH=/opt/bin"}));
  EXPECT_EQ(EnvLookup(own, "PATH"), "/opt/bin");
  EXPECT_EQ(EnvLookup(own, "PAT"), "");
}

TEST(InitArgv, EntrypointThenCmd) {
  protocol::Config c;
  c.entrypoint = {"/docker-entrypoint.sh"};
  c.cmd = {"nginx", "-g", "daemon off;"};
  EXPECT_EQ(WorkloadArgv(c),
            (std::vector<std::string>{"/docker-entrypoint.sh", "nginx", "-g", "daemon off;"}));
}

TEST(InitSearchPath, FindsFirstExecutableInPathOrder) {
  std::set<std::string> executables = {"/usr/bin/python3", "/bin/python3"};
  auto is_exec = [&](const std::string& p) { return executables.contains(p); };
  EXPECT_EQ(SearchPath("python3", "/usr/local/bin:/usr/bin:/bin", is_exec), "/usr/bin/python3");
  EXPECT_EQ(SearchPath("missing", "/usr/bin:/bin", is_exec), "");
  EXPECT_EQ(SearchPath("./run.sh", "/usr/bin", is_exec), "./run.sh");
  std::set<std::string> cwd = {"./tool"};
  EXPECT_EQ(SearchPath("tool", "/usr/bin:", [&](const std::string& p) { return cwd.contains(p); }),
            "./tool");
}

TEST(InitModules, ParsesOrderFile) {
  auto modules = ParseModuleOrder(
      "/lib/modules/virtio.ko\n\n# comment\n  /lib/modules/virtio_blk.ko  \r\n/lib/modules/x.ko");
  ASSERT_TRUE(modules) << modules.error().message;
  EXPECT_EQ(
      *modules,
      (std::vector<ModuleGroup>{
          {"", {"/lib/modules/virtio.ko", "/lib/modules/virtio_blk.ko", "/lib/modules/x.ko"}}}));
  auto bad = ParseModuleOrder("/lib/a.ko\nkernel/b.ko\n");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("line 2"), std::string::npos) << bad.error().message;
}

TEST(InitModules, ParsesGroups) {
  auto modules = ParseModuleOrder("@network\n/lib/net.ko\n@shares\n/lib/fuse.ko\n/lib/vfs.ko\n");
  ASSERT_TRUE(modules) << modules.error().message;
  // The boot group is always first, here empty.
  EXPECT_EQ(*modules, (std::vector<ModuleGroup>{{"", {}},
                                                {"network", {"/lib/net.ko"}},
                                                {"shares", {"/lib/fuse.ko", "/lib/vfs.ko"}}}));
  for (std::string_view text : {"@\n", "@Net\n", "@a b\n", "/a.ko\n@x\n@x\n"}) {
    auto bad = ParseModuleOrder(text);
    EXPECT_FALSE(bad) << text;
  }
}

TEST(InitModules, OptionalGroupsFollowTheConfig) {
  protocol::Config config;
  config.network_enabled = true;
  EXPECT_TRUE(ModuleGroupDeferrable("network"));
  EXPECT_TRUE(ModuleGroupDeferrable("shares"));
  // A group this init does not know is loaded at boot.
  EXPECT_FALSE(ModuleGroupDeferrable("gpu"));
  EXPECT_FALSE(ModuleGroupDeferrable(""));
  EXPECT_TRUE(ModuleGroupNeeded("network", config));
  EXPECT_FALSE(ModuleGroupNeeded("shares", config));
  config.no_network = true;
  EXPECT_FALSE(ModuleGroupNeeded("network", config));
  config.no_network = false;
  config.network_enabled = false;
  EXPECT_FALSE(ModuleGroupNeeded("network", config));
  protocol::HostShare share;
  share.tag = "s0";
  share.path = "/data";
  config.host_shares.push_back(share);
  EXPECT_TRUE(ModuleGroupNeeded("shares", config));
  config.host_shares.clear();
  config.privileged = true;
  EXPECT_TRUE(ModuleGroupNeeded("shares", config));
  EXPECT_TRUE(ModuleGroupNeeded("gpu", config));
}

TEST(InitCmdline, DebugFlag) {
  EXPECT_TRUE(KernelCmdlineWantsDebug("console=ttyS0 cella.debug=1 quiet\n"));
  EXPECT_TRUE(KernelCmdlineWantsDebug("cella.debug=1"));
  EXPECT_FALSE(KernelCmdlineWantsDebug("console=ttyS0 cella.debug=0"));
  EXPECT_FALSE(KernelCmdlineWantsDebug("xcella.debug=1 cella.debug=10"));
}

TEST(InitOverlay, MountOptions) {
  EXPECT_EQ(OverlayMountOptions({"/cella/lower0", "/cella/lower1"}, "/cella/upper/upper",
                                "/cella/upper/work")
                .value(),
            "lowerdir=/cella/lower0:/cella/lower1,upperdir=/cella/upper/upper,"
            "workdir=/cella/upper/work");
  EXPECT_EQ(OverlayMountOptions({"/l"}, "", "").value(), "lowerdir=/l");
  EXPECT_FALSE(OverlayMountOptions({}, "/u", "/w").has_value());
  EXPECT_FALSE(OverlayMountOptions({"/a:b"}, "/u", "/w").has_value());
  EXPECT_FALSE(OverlayMountOptions({"/a"}, "/u,x", "/w").has_value());
}

TEST(InitDisks, LinkNameLikeUdev) {
  EXPECT_EQ(DiskIdLinkName("cella-config\n"), "virtio-cella-config");
  EXPECT_EQ(DiskIdLinkName("a b/c"), "virtio-a_b_c");
}

TEST(InitExitLine, CodeOrSignal) {
  EXPECT_EQ(MainExitLine(7 << 8), "main exited code=7");
  EXPECT_EQ(MainExitLine(0), "main exited code=0");
  EXPECT_EQ(MainExitLine(SIGKILL), "main exited signal=9");
}

}  // namespace
}  // namespace cella::init
