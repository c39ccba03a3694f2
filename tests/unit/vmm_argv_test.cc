#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "host/vmm/qemu_argv.h"
#include "protocol/warm.h"

namespace cella::vmm {
namespace {

VMConfig BaseConfig() {
  VMConfig c;
  c.ID = "vm1";
  c.KernelPath = "/k/vmlinuz";
  c.InitramfsPath = "/k/initrd.cpio.gz";
  c.RootfsPath = "/img/root.erofs";
  c.CPUs = 1.5;
  c.MemoryMB = 256;
  c.StateDir = "/run/cella/vm1";
  c.ConfigDiskPath = "/run/cella/vm1/config.ext4";
  return c;
}

QemuLaunch Launch(Accel accel = Accel::kTcg) {
  QemuLaunch l;
  l.accel = accel;
  l.tsc_khz = 2596148;
  l.agent_socket = "/run/cella/vm1/agent.sock";
  l.qmp_socket = "/run/cella/vm1/qmp.sock";
  l.console_log = "/run/cella/vm1/console.log";
  return l;
}

// Value following `flag` (first occurrence), or "" when absent.
std::string After(const std::vector<std::string>& argv, const std::string& flag) {
  auto it = std::find(argv.begin(), argv.end(), flag);
  return it == argv.end() || it + 1 == argv.end() ? "" : *(it + 1);
}

std::vector<std::string> AllAfter(const std::vector<std::string>& argv, const std::string& flag) {
  std::vector<std::string> out;
  for (size_t i = 0; i + 1 < argv.size(); ++i) {
    if (argv[i] == flag) out.push_back(argv[i + 1]);
  }
  return out;
}

bool Has(const std::vector<std::string>& argv, const std::string& item) {
  return std::find(argv.begin(), argv.end(), item) != argv.end();
}

TEST(QemuArgv, MicrovmTcgBasics) {
  auto argv = BuildQemuArgv(BaseConfig(), Launch());
  ASSERT_TRUE(argv) << argv.error().message;
  EXPECT_EQ((*argv)[0], "qemu-system-x86_64");
  EXPECT_EQ(After(*argv, "-M"), "microvm,memory-backend=mem");
  EXPECT_EQ(After(*argv, "-object"), "memory-backend-ram,id=mem,size=256M");
  EXPECT_EQ(After(*argv, "-accel"), "tcg");
  EXPECT_EQ(After(*argv, "-cpu"), "max");
  EXPECT_EQ(After(*argv, "-smp"), "2");  // ceil(1.5)
  EXPECT_EQ(After(*argv, "-m"), "256M");
  EXPECT_TRUE(Has(*argv, "-nodefaults"));
  EXPECT_TRUE(Has(*argv, "-no-reboot"));
  EXPECT_FALSE(Has(*argv, "-daemonize"));
  EXPECT_EQ(After(*argv, "-kernel"), "/k/vmlinuz");
  EXPECT_EQ(After(*argv, "-initrd"), "/k/initrd.cpio.gz");
  std::string append = After(*argv, "-append");
  EXPECT_NE(append.find("console=ttyS0"), std::string::npos);
  EXPECT_NE(append.find("panic=-1"), std::string::npos);
  EXPECT_NE(append.find("tsc_early_khz=2596148"), std::string::npos);
  EXPECT_NE(append.find("no_timer_check"), std::string::npos);
}

TEST(QemuArgv, KvmUsesHostCpu) {
  auto argv = BuildQemuArgv(BaseConfig(), Launch(Accel::kKvm));
  ASSERT_TRUE(argv) << argv.error().message;
  EXPECT_EQ(After(*argv, "-accel"), "kvm");
  EXPECT_EQ(After(*argv, "-cpu"), "host");
}

TEST(QemuArgv, DiskOrderAndSerials) {
  VMConfig c = BaseConfig();
  c.RootfsPath.clear();
  c.OverlayEnabled = true;
  c.OverlayLowerPaths = {"/l/top.erofs", "/l/base.erofs"};
  c.OverlayLowerFSTypes = {"erofs", "erofs"};
  c.OverlayUpperPath = "/s/upper.ext4";
  c.Volumes = {{"/v/data.ext4", "/data", false}};
  c.ExtraDisks = {{"/d/cache.ext4", "/cache", true}};
  auto argv = BuildQemuArgv(c, Launch());
  ASSERT_TRUE(argv) << argv.error().message;
  std::vector<std::string> serials;
  for (const std::string& dev : AllAfter(*argv, "-device")) {
    if (!dev.starts_with("virtio-blk-device")) continue;
    serials.push_back(dev.substr(dev.find("serial=") + 7));
  }
  EXPECT_EQ(serials, (std::vector<std::string>{"cella-lower0", "cella-lower1", "cella-upper",
                                               "cella-config", "cella-vol0", "cella-disk0"}));
  std::vector<std::string> drives = AllAfter(*argv, "-drive");
  ASSERT_EQ(drives.size(), 6u);
  EXPECT_NE(drives[0].find("file=/l/top.erofs"), std::string::npos);
  EXPECT_NE(drives[0].find("readonly=on"), std::string::npos);
  EXPECT_EQ(drives[2].find("readonly=on"), std::string::npos);  // upper is writable
  EXPECT_NE(drives[3].find("readonly=on"), std::string::npos);  // config
  EXPECT_EQ(drives[4].find("readonly=on"), std::string::npos);  // rw volume
  EXPECT_NE(drives[5].find("readonly=on"), std::string::npos);  // ro extra disk
}

TEST(QemuArgv, AgentPortQmpAndConsole) {
  auto argv = BuildQemuArgv(BaseConfig(), Launch());
  ASSERT_TRUE(argv) << argv.error().message;
  std::vector<std::string> chardevs = AllAfter(*argv, "-chardev");
  auto find = [&](const std::string& prefix) {
    return std::find_if(chardevs.begin(), chardevs.end(),
                        [&](const std::string& s) { return s.starts_with(prefix); });
  };
  ASSERT_NE(find("socket,id=agent,"), chardevs.end());
  EXPECT_NE(find("socket,id=agent,")->find("path=/run/cella/vm1/agent.sock,server=on,wait=off"),
            std::string::npos);
  ASSERT_NE(find("socket,id=qmp,"), chardevs.end());
  ASSERT_NE(find("file,id=console,append=on,path=/run/cella/vm1/console.log"), chardevs.end());
  EXPECT_EQ(After(*argv, "-serial"), "chardev:console");
  EXPECT_EQ(After(*argv, "-mon"), "chardev=qmp,mode=control");
  EXPECT_TRUE(Has(*argv, "virtserialport,chardev=agent,name=cella.agent,id=agentport"));
  EXPECT_FALSE(Has(*argv, "-incoming")) << "only a restore waits for migration";
}

TEST(QemuArgv, UserNetworkUnlessNoNetwork) {
  auto with = BuildQemuArgv(BaseConfig(), Launch());
  ASSERT_TRUE(with) << with.error().message;
  EXPECT_EQ(After(*with, "-netdev"),
            "user,id=net0,ipv6=off,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3");
  EXPECT_TRUE(Has(*with, "virtio-net-device,netdev=net0"));

  VMConfig c = BaseConfig();
  c.NoNetwork = true;
  auto without = BuildQemuArgv(c, Launch());
  ASSERT_TRUE(without) << without.error().message;
  EXPECT_FALSE(Has(*without, "-netdev"));
  for (const std::string& dev : AllAfter(*without, "-device")) {
    EXPECT_FALSE(dev.starts_with("virtio-net")) << dev;
  }
}

TEST(QemuArgv, CommasInPathsAreEscaped) {
  VMConfig c = BaseConfig();
  c.RootfsPath = "/img/a,b.erofs";
  auto argv = BuildQemuArgv(c, Launch());
  ASSERT_TRUE(argv) << argv.error().message;
  EXPECT_NE(AllAfter(*argv, "-drive")[0].find("file=/img/a,,b.erofs,"), std::string::npos);
}

TEST(QemuArgv, TransportBudgetEnforced) {
  VMConfig c = BaseConfig();
  // root + config + serial + NIC = 4; 20 extra disks reach the 24 limit.
  for (int i = 0; i < 20; ++i) c.ExtraDisks.push_back({"/d/" + std::to_string(i), "", false});
  EXPECT_EQ(CountVirtioTransports(c), kMicrovmVirtioTransports);
  EXPECT_TRUE(BuildQemuArgv(c, Launch()));
  c.ExtraDisks.push_back({"/d/one-too-many", "", false});
  auto argv = BuildQemuArgv(c, Launch());
  ASSERT_FALSE(argv);
  EXPECT_NE(argv.error().message.find("virtio-mmio"), std::string::npos) << argv.error().message;
  // Dropping the NIC frees one transport.
  c.NoNetwork = true;
  EXPECT_TRUE(BuildQemuArgv(c, Launch()));
}

TEST(QemuArgv, RejectsBadConfigsNamingTheField) {
  struct Case {
    void (*mutate)(VMConfig&);
    const char* field;
  } cases[] = {
      {[](VMConfig& c) { c.KernelPath.clear(); }, "KernelPath"},
      {[](VMConfig& c) { c.InitramfsPath.clear(); }, "InitramfsPath"},
      {[](VMConfig& c) { c.CPUs = 0; }, "CPUs"},
      {[](VMConfig& c) { c.MemoryMB = 16; }, "MemoryMB"},
      {[](VMConfig& c) { c.RootfsPath.clear(); }, "root"},
      {[](VMConfig& c) {
         c.OverlayEnabled = true;
         c.OverlayLowerPaths.clear();
       },
       "OverlayLowerPaths"},
      {[](VMConfig& c) {
         c.OverlayEnabled = true;
         c.OverlayLowerPaths = {"/a", "/b"};
         c.OverlayLowerFSTypes = {"erofs"};
       },
       "OverlayLowerFSTypes"},
      {[](VMConfig& c) {
         c.ExtraDisks = {{"relative.img", "", false}};
       },
       "absolute"},
  };
  for (const Case& tc : cases) {
    VMConfig c = BaseConfig();
    tc.mutate(c);
    auto argv = BuildQemuArgv(c, Launch());
    ASSERT_FALSE(argv) << tc.field;
    EXPECT_NE(argv.error().message.find(tc.field), std::string::npos) << argv.error().message;
  }
}

TEST(QemuArgv, StatePathsDefaultsAndLimits) {
  VMConfig c = BaseConfig();
  auto paths = ResolveStatePaths(c);
  ASSERT_TRUE(paths) << paths.error().message;
  EXPECT_EQ(paths->agent_socket, "/run/cella/vm1/agent.sock");
  EXPECT_EQ(paths->qmp_socket, "/run/cella/vm1/qmp.sock");
  EXPECT_EQ(paths->console_log, "/run/cella/vm1/console.log");
  c.SocketPath = "/elsewhere/a.sock";
  c.LogPath = "/elsewhere/console";
  paths = ResolveStatePaths(c);
  ASSERT_TRUE(paths);
  EXPECT_EQ(paths->agent_socket, "/elsewhere/a.sock");
  EXPECT_EQ(paths->console_log, "/elsewhere/console");

  c.StateDir = "/" + std::string(120, 'x');
  c.SocketPath.clear();
  EXPECT_FALSE(ResolveStatePaths(c));
  c.StateDir = "relative";
  EXPECT_FALSE(ResolveStatePaths(c));
}

TEST(QemuArgv, KernelArgsAppended) {
  VMConfig c = BaseConfig();
  c.KernelArgs = "cella.debug=1";
  std::string cmdline = BuildKernelCmdline(c, 0);
  EXPECT_TRUE(cmdline.ends_with(" cella.debug=1")) << cmdline;
  EXPECT_EQ(cmdline.find("tsc_early_khz"), std::string::npos);
}

TEST(QemuArgv, OnlyAnOrdinaryColdBootAsksForItsConfigOnTheAgentPort) {
  VMConfig c = BaseConfig();
  EXPECT_TRUE(BootsWithColdGo(c));
  EXPECT_TRUE(protocol::CmdlineWantsColdGo(BuildKernelCmdline(c, 0)));
  for (TemplateRole role : {TemplateRole::kCapture, TemplateRole::kClone}) {
    VMConfig t = BaseConfig();
    t.Template = role;
    EXPECT_FALSE(BootsWithColdGo(t));
    EXPECT_FALSE(protocol::CmdlineWantsColdGo(BuildKernelCmdline(t, 0)));
  }
  VMConfig restore = BaseConfig();
  restore.IncomingMigration = "fd:3";
  EXPECT_FALSE(BootsWithColdGo(restore));
  EXPECT_FALSE(protocol::CmdlineWantsColdGo(BuildKernelCmdline(restore, 0)));
}

TEST(QemuArgv, ARestoreGetsTheHeaderOnlyKernelAndNoInitrd) {
  VMConfig c = BaseConfig();
  QemuLaunch l = Launch();
  l.restore_kernel = "/run/cella/vm1/restore-kernel";
  // A boot ignores it: the guest needs its kernel and initrd.
  auto boot = BuildQemuArgv(c, l);
  ASSERT_TRUE(boot.has_value()) << boot.error().message;
  EXPECT_EQ(After(*boot, "-kernel"), "/k/vmlinuz");
  EXPECT_EQ(After(*boot, "-initrd"), "/k/initrd.cpio.gz");
  c.IncomingMigration = "defer";
  auto restore = BuildQemuArgv(c, l);
  ASSERT_TRUE(restore.has_value()) << restore.error().message;
  EXPECT_EQ(After(*restore, "-kernel"), "/run/cella/vm1/restore-kernel");
  EXPECT_EQ(std::count(restore->begin(), restore->end(), "-initrd"), 0);
  EXPECT_EQ(After(*restore, "-incoming"), "defer");
  // Without a header-only copy (not a bzImage), the real files.
  l.restore_kernel.clear();
  auto plain = BuildQemuArgv(c, l);
  ASSERT_TRUE(plain.has_value()) << plain.error().message;
  EXPECT_EQ(After(*plain, "-kernel"), "/k/vmlinuz");
  EXPECT_EQ(After(*plain, "-initrd"), "/k/initrd.cpio.gz");
}

TEST(QemuArgv, GuestDevicePaths) {
  EXPECT_EQ(GuestDevicePath(kConfigSerial), "/dev/disk/by-id/virtio-cella-config");
  EXPECT_EQ(LowerSerial(3), "cella-lower3");
  EXPECT_EQ(VolumeSerial(0), "cella-vol0");
  EXPECT_EQ(ExtraDiskSerial(1), "cella-disk1");
}

}  // namespace
}  // namespace cella::vmm
