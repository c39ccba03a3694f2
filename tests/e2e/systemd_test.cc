// init_mode "systemd" end to end: a Debian image with systemd boots with the
// image's systemd as PID 1, the agent runs as a systemd service and serves the
// host, the host name files from config.json survive systemd's boot, and a
// host Stop powers the guest off through systemd (not by killing QEMU).
//
// The Debian rootfs comes from tests/fixtures/build_systemd_rootfs.sh
// (mmdebstrap from Debian's archive, cached per machine); when it cannot be
// built the test fails with the script's output.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>

#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/rootfs/rootfs.h"
#include "host/sandbox/compose.h"
#include "host/vmm/qemu_backend.h"
#include "vm_test_base.h"

namespace cella::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr const char* kHostname = "sysd-guest";

class SystemdTest : public VmTestBase {
 protected:
  // The cached Debian+systemd tarball, built on first use (~1 min).
  Result<std::string> SystemdRootfsTar() {
    std::string script = std::string(CELLA_SOURCE_DIR) + "/tests/fixtures/build_systemd_rootfs.sh";
    auto r = CELLA_TRY(host::RunCommand({script, dir_ + "/fixture"}, 600s));
    if (r.exit_code != 0) return Fail("build_systemd_rootfs.sh failed:\n" + r.output);
    // stdout and stderr come interleaved: the path is the last line.
    std::string out = r.output;
    while (!out.empty() && out.back() == '\n') out.pop_back();
    std::string tar = out.substr(out.rfind('\n') + 1);
    if (!fs::exists(tar)) return Fail("build_systemd_rootfs.sh printed no tar path:\n" + r.output);
    return tar;
  }
};

TEST_F(SystemdTest, BootsSystemdServesAgentAndPowersOffOnStop) {
  auto tar = SystemdRootfsTar();
  ASSERT_TRUE(tar) << tar.error().message;
  std::string image = dir_ + "/root.erofs";
  fs::create_directories(dir_ + "/work");
  auto build_at = std::chrono::steady_clock::now();
  auto built = rootfs::BuildRootfsImage({*tar}, image, dir_ + "/work");
  ASSERT_TRUE(built) << built.error().message;
  std::printf("systemd rootfs: erofs built in %lld ms\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         std::chrono::steady_clock::now() - build_at)
                                         .count()));

  protocol::Config guest;
  guest.init_mode = protocol::InitMode::kSystemd;
  guest.hostname = kHostname;
  guest.extra_hosts = {{"registry.internal", "10.1.2.3"}};
  std::string state = dir_ + "/state";
  fs::create_directories(state);
  auto vm = sandbox::Compose(assets_, guest, {1, 512}, {}, {}, "systemdtest", state, image);
  ASSERT_TRUE(vm) << vm.error().message;
  ASSERT_TRUE(sandbox::WriteGuestConfig(guest, *vm));
  auto options = vmm::DetectQemuHost(vmm::AccelMode::kAuto);
  ASSERT_TRUE(options) << options.error().message;
  // systemd under TCG on a shared 2-core host is slow to reach the agent.
  options->boot_timeout = 180s;
  vmm::QemuBackend backend(*options);
  auto machine = backend.Create(*vm);
  ASSERT_TRUE(machine) << machine.error().message;
  machine_ = std::move(*machine);
  auto started_at = std::chrono::steady_clock::now();
  auto started = machine_->Start();
  ASSERT_TRUE(started) << started.error().message;
  auto boot_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::steady_clock::now() - started_at)
                     .count();
  std::printf("systemd guest: agent ready %lld ms after QEMU start\n",
              static_cast<long long>(boot_ms));

  EXPECT_EQ(Sh("cat /proc/1/comm"), "systemd\n");
  // The agent is the unit cella-init wrote, supervised by systemd.
  EXPECT_EQ(Sh("systemctl is-active cella-agent.service"), "active\n");
  // The console is cella's log, not a login prompt (and, without udev in the
  // image, a getty there would hold up boot for 90 s waiting for the tty).
  EXPECT_EQ(Sh("systemctl is-enabled serial-getty@ttyS0.service"), "masked-runtime\n");

  std::string state_line = Sh("systemctl is-system-running --wait", 150000);
  EXPECT_TRUE(state_line == "running\n" || state_line == "degraded\n")
      << "system state: " << state_line << "failed units:\n"
      << Sh("systemctl --failed --no-legend --no-pager");
  std::printf("systemd guest: system state %s", state_line.c_str());
  std::printf("systemd guest: %s", Sh("systemd-analyze time 2>&1 | head -1").c_str());

  EXPECT_EQ(Sh("hostname"), std::string(kHostname) + "\n");
  EXPECT_EQ(Sh("cat /etc/hostname"), std::string(kHostname) + "\n");
  std::string hosts = Sh("cat /etc/hosts");
  EXPECT_NE(hosts.find(kHostname), std::string::npos) << hosts;
  EXPECT_NE(hosts.find("10.1.2.3\tregistry.internal"), std::string::npos) << hosts;

  auto stop_at = std::chrono::steady_clock::now();
  // The test is how it ends (a clean power-off), not how fast: a grace a
  // loaded TCG machine's systemd shutdown cannot run out of.
  ASSERT_TRUE(machine_->Stop(120s));
  auto exited = machine_->Wait(120s);
  ASSERT_TRUE(exited) << exited.error().message;
  auto stop_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::steady_clock::now() - stop_at)
                     .count();
  std::printf("systemd guest: powered off %lld ms after Stop\n", static_cast<long long>(stop_ms));
  // Stop kills QEMU when the guest does not power off within the grace; a
  // clean QEMU exit means systemd itself ran the poweroff.
  EXPECT_EQ(exited->hypervisor.signal, 0) << exited->console_tail;
  EXPECT_EQ(exited->hypervisor.exit_code, 0) << exited->console_tail;
  EXPECT_NE(exited->console_tail.find("reboot: Power down"), std::string::npos)
      << exited->console_tail;
}

}  // namespace
}  // namespace cella::test
