// Accelerator choice, TSC frequency and data-directory rules, against fake
// host trees so each host kind can be tested on any machine.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <map>
#include <string>

#include "base/io.h"
#include "host/os/paths.h"
#include "host/vmm/accel.h"
#include "host/vmm/tsc.h"

namespace cella::vmm {
namespace {

class FakeHost : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cella-fakehost-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  void Dir(const std::string& rel) { std::filesystem::create_directories(root_ + "/" + rel); }
  void File(const std::string& rel, const std::string& content, mode_t mode = 0644) {
    std::filesystem::create_directories(std::filesystem::path(root_ + "/" + rel).parent_path());
    ASSERT_TRUE(WriteStringToFile(root_ + "/" + rel, content, mode));
    ASSERT_EQ(::chmod((root_ + "/" + rel).c_str(), mode), 0);
  }
  std::string root_;
};

TEST_F(FakeHost, KvmChosenWithVendorModule) {
  File("dev/kvm", "");
  Dir("sys/module/kvm_intel");
  auto d = ChooseAccel(AccelMode::kAuto, root_);
  ASSERT_TRUE(d) << d.error().message;
  EXPECT_EQ(d->chosen, Accel::kKvm);
  EXPECT_TRUE(d->notice.empty());
  auto forced = ChooseAccel(AccelMode::kKvm, root_);
  ASSERT_TRUE(forced);
  EXPECT_EQ(forced->chosen, Accel::kKvm);
}

TEST_F(FakeHost, PvmHostFallsBackToTcgWithOneNotice) {
  File("dev/kvm", "");
  Dir("sys/module/kvm");
  Dir("sys/module/kvm_pvm");
  auto d = ChooseAccel(AccelMode::kAuto, root_);
  ASSERT_TRUE(d) << d.error().message;
  EXPECT_EQ(d->chosen, Accel::kTcg);
  EXPECT_NE(d->reason.find("PVM"), std::string::npos) << d->reason;
  EXPECT_FALSE(d->notice.empty());
  EXPECT_EQ(d->notice.find('\n'), std::string::npos);
}

TEST_F(FakeHost, ForcedKvmOnPvmHostIsAnError) {
  File("dev/kvm", "");
  Dir("sys/module/kvm_pvm");
  auto d = ChooseAccel(AccelMode::kKvm, root_);
  ASSERT_FALSE(d);
  EXPECT_NE(d.error().message.find("PVM"), std::string::npos) << d.error().message;
  EXPECT_NE(d.error().message.find("--accel tcg"), std::string::npos);
}

TEST_F(FakeHost, NoKvmDeviceMeansTcg) {
  Dir("sys/module/kvm_amd");
  auto d = ChooseAccel(AccelMode::kAuto, root_);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->chosen, Accel::kTcg);
  EXPECT_NE(d->reason.find("/dev/kvm"), std::string::npos) << d->reason;
  EXPECT_FALSE(ChooseAccel(AccelMode::kKvm, root_));
}

TEST_F(FakeHost, TcgRequestedNeedsNoProbe) {
  auto d = ChooseAccel(AccelMode::kTcg, root_);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->chosen, Accel::kTcg);
}

TEST(AccelMode, Parse) {
  EXPECT_EQ(ParseAccelMode("auto").value(), AccelMode::kAuto);
  EXPECT_EQ(ParseAccelMode("kvm").value(), AccelMode::kKvm);
  EXPECT_EQ(ParseAccelMode("tcg").value(), AccelMode::kTcg);
  EXPECT_FALSE(ParseAccelMode("hvf"));
}

TEST(Tsc, KernelLogPrefersRefinedCalibration) {
  std::string log =
      "[    0.000058] tsc: Detected 2596.148 MHz processor\n"
      "[    1.234567] tsc: Refined TSC clocksource calibration: 2596.001 MHz\n";
  EXPECT_EQ(ParseTscKhzFromKernelLog(log), 2596001u);
  EXPECT_EQ(ParseTscKhzFromKernelLog("[0.0] tsc: Detected 2596.148 MHz processor\n"), 2596148u);
  // /dev/kmsg record format.
  EXPECT_EQ(ParseTscKhzFromKernelLog("6,58,42,-;tsc: Detected 3000.5 MHz processor\n"), 3000500u);
  EXPECT_EQ(ParseTscKhzFromKernelLog("nothing here\n"), std::nullopt);
  EXPECT_EQ(ParseTscKhzFromKernelLog("tsc: Detected garbage MHz\n"), std::nullopt);
}

TEST(Tsc, CpuinfoMhz) {
  EXPECT_EQ(ParseCpuMhzFromCpuinfo("processor\t: 0\ncpu MHz\t\t: 2596.148\ncache size : 1\n"),
            2596148u);
  EXPECT_EQ(ParseCpuMhzFromCpuinfo("processor\t: 0\n"), std::nullopt);
}

TEST_F(FakeHost, TscSourcesInOrder) {
  File("proc/cpuinfo", "cpu MHz : 1000.000\n");
  EXPECT_EQ(HostTscKhz(root_).value(), 1000000u);
  File("dev/kmsg", "6,1,1,-;tsc: Detected 2000.000 MHz processor\n");
  EXPECT_EQ(HostTscKhz(root_).value(), 2000000u);
  File("sys/devices/system/cpu/cpu0/tsc_freq_khz", "3000000\n");
  EXPECT_EQ(HostTscKhz(root_).value(), 3000000u);
}

TEST_F(FakeHost, TscUnknownIsAnError) { EXPECT_FALSE(HostTscKhz(root_)); }

TEST(Paths, HomeResolution) {
  using host::ResolveCellaHome;
  static std::map<std::string, std::string> env;
  auto lookup = [](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  env = {{"HOME", "/home/u"}};
  EXPECT_EQ(ResolveCellaHome(lookup, 1000).value(), "/home/u/.local/share/cella");
  EXPECT_EQ(ResolveCellaHome(lookup, 0).value(), "/var/lib/cella");
  env["XDG_DATA_HOME"] = "/xdg";
  EXPECT_EQ(ResolveCellaHome(lookup, 1000).value(), "/xdg/cella");
  env["CELLA_HOME"] = "/tmp/ch";
  EXPECT_EQ(ResolveCellaHome(lookup, 0).value(), "/tmp/ch");
  env["CELLA_HOME"] = "relative";
  EXPECT_FALSE(ResolveCellaHome(lookup, 0));
  env = {};
  EXPECT_FALSE(ResolveCellaHome(lookup, 1000));
}

}  // namespace
}  // namespace cella::vmm
