// The config disk (mkfs.ext4 -d) and the built-in busybox image
// (mkfs.erofs): real tools, no root, no VM.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <string>

#include "base/io.h"
#include "base/unique_fd.h"
#include "host/image/default_rootfs.h"
#include "host/os/process.h"
#include "host/vmm/config_disk.h"

namespace cella {
namespace {

using std::chrono::seconds;

class DiskImages : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cella-disk-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(DiskImages, ConfigDiskHoldsConfigJson) {
  std::string json = R"({"entrypoint":["/bin/sh"],"cmd":["-c","echo hi"],"init_mode":"exec"})";
  auto path = vmm::WriteConfigDisk(json, dir_ + "/config.ext4");
  ASSERT_TRUE(path) << path.error().message;
  auto cat = host::CheckCommand({"debugfs", "-R", "cat /config.json", *path}, seconds(30));
  ASSERT_TRUE(cat) << cat.error().message;
  EXPECT_NE(cat->find(json), std::string::npos) << *cat;
  // Nothing left behind beside the image.
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_)) {
    (void)e;
    ++files;
  }
  EXPECT_EQ(files, 1u);
  // Rewriting replaces the old content.
  ASSERT_TRUE(vmm::WriteConfigDisk(R"({"cmd":["true"]})", *path));
  cat = host::CheckCommand({"debugfs", "-R", "cat /config.json", *path}, seconds(30));
  ASSERT_TRUE(cat);
  EXPECT_NE(cat->find(R"({"cmd":["true"]})"), std::string::npos);
}

// The seed's VMConfig fields are what the guest gets: a VMConfig edited
// after the guest config was composed still means what it says.
TEST_F(DiskImages, GuestConfigDiskTakesTheSeedFieldsFromVMConfig) {
  protocol::Config guest;
  guest.cmd = {"true"};
  guest.hostname = "from-guest";
  guest.network_enabled = true;
  guest.guest_ip = "10.0.2.15";
  guest.guest_cidr = 24;
  guest.guest_gw = "10.0.2.2";
  guest.dns_servers = {"10.0.2.3"};
  guest.env = {{"KEEP", "1"}, {"OVERRIDE", "guest"}};
  guest.privileged = true;
  vmm::VMConfig vm;
  vm.ID = "vm1";
  vm.StateDir = dir_;
  vm.Hostname = "from-vm";
  vm.DNSServers = {"10.0.2.3", "192.0.2.53"};
  vm.MTU = 1400;
  vm.Privileged = false;
  vm.Env = {{"OVERRIDE", "vm"}, {"ADDED", "2"}};
  vm.AddHosts = {{"db.internal", "10.0.2.50"}};
  ASSERT_TRUE(vmm::WriteGuestConfigDisk(guest, vm));
  ASSERT_EQ(vm.ConfigDiskPath, dir_ + "/config.img");
  auto cat =
      host::CheckCommand({"debugfs", "-R", "cat /config.json", vm.ConfigDiskPath}, seconds(30));
  ASSERT_TRUE(cat) << cat.error().message;
  auto written = protocol::ParseConfig(cat->substr(cat->find('{')));
  ASSERT_TRUE(written) << written.error().message << "\n" << *cat;
  EXPECT_EQ(written->hostname, "from-vm");
  EXPECT_EQ(written->dns_servers, vm.DNSServers);
  EXPECT_EQ(written->mtu, 1400);
  EXPECT_FALSE(written->privileged);
  EXPECT_EQ(written->env, (std::map<std::string, std::string>{
                              {"ADDED", "2"}, {"KEEP", "1"}, {"OVERRIDE", "vm"}}));
  ASSERT_EQ(written->extra_hosts.size(), 1u);
  EXPECT_EQ(written->extra_hosts[0].host, "db.internal");
  EXPECT_EQ(written->guest_ip, "10.0.2.15");  // empty in the VMConfig: the guest's stays

  // A VMConfig value the guest config cannot hold is refused, naming the VM.
  vm.Hostname = "bad name!";
  auto bad = vmm::WriteGuestConfigDisk(guest, vm);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("vm1"), std::string::npos) << bad.error().message;
}

// A warm clone's config disk: reserved (QEMU opens it at launch), filled
// while QEMU starts. Whoever opened the reserved file reads the filesystem
// that the fill wrote, at the size the reserve gave it.
TEST_F(DiskImages, ReservedConfigDiskIsFilledInPlace) {
  protocol::Config guest;
  guest.cmd = {"true"};
  guest.hostname = "in-place";
  vmm::VMConfig vm;
  vm.ID = "vm1";
  vm.StateDir = dir_;
  ASSERT_TRUE(WriteStringToFile(dir_ + "/config.img", "an earlier boot's disk", 0644));
  // Held open: its inode cannot be reused by the new file.
  UniqueFd earlier_fd(::open((dir_ + "/config.img").c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(earlier_fd);
  struct stat earlier {};
  ASSERT_EQ(::fstat(earlier_fd.Get(), &earlier), 0);
  ASSERT_TRUE(vmm::ReserveGuestConfigDisk(guest, vm));
  ASSERT_EQ(vm.ConfigDiskPath, dir_ + "/config.img");
  ASSERT_NE(vm.GuestConfigJson.find("in-place"), std::string::npos);
  struct stat reserved {};
  ASSERT_EQ(::stat(vm.ConfigDiskPath.c_str(), &reserved), 0);
  EXPECT_NE(reserved.st_ino, earlier.st_ino) << "a new file, not the earlier disk written over";
  char kept[64] = {};
  EXPECT_GT(::pread(earlier_fd.Get(), kept, sizeof kept - 1, 0), 0);
  EXPECT_STREQ(kept, "an earlier boot's disk");
  EXPECT_GE(reserved.st_size, 1 << 20);
  // Opened before the fill, as QEMU opens it at launch.
  UniqueFd opened(::open(vm.ConfigDiskPath.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(opened);
  ASSERT_TRUE(vmm::FillConfigDisk(vm.GuestConfigJson, vm.ConfigDiskPath));
  struct stat filled {};
  ASSERT_EQ(::fstat(opened.Get(), &filled), 0);
  EXPECT_EQ(filled.st_size, reserved.st_size);
  std::string copy = dir_ + "/as-opened.img";
  {
    UniqueFd out(::open(copy.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    ASSERT_TRUE(out);
    std::string bytes(static_cast<size_t>(filled.st_size), '\0');
    ASSERT_EQ(::pread(opened.Get(), bytes.data(), bytes.size(), 0),
              static_cast<ssize_t>(bytes.size()));
    ASSERT_TRUE(WriteAll(out.Get(), bytes));
  }
  auto cat = host::CheckCommand({"debugfs", "-R", "cat /config.json", copy}, seconds(30));
  ASSERT_TRUE(cat) << cat.error().message;
  EXPECT_NE(cat->find(vm.GuestConfigJson), std::string::npos) << *cat;
  // A fill for other content (another size) is refused, not written.
  EXPECT_FALSE(vmm::FillConfigDisk("{\"env\":{\"BIG\":\"" + std::string(2 << 20, 'a') + "\"}}",
                                   vm.ConfigDiskPath));
}

TEST_F(DiskImages, ConfigDiskFitsLargeConfig) {
  std::string json = "{\"env\":{\"BIG\":\"" + std::string(300 * 1024, 'a') + "\"}}";
  auto path = vmm::WriteConfigDisk(json, dir_ + "/config.ext4");
  ASSERT_TRUE(path) << path.error().message;
}

TEST_F(DiskImages, DefaultRootfsBuiltOnceFromBusybox) {
  if (::access(image::kHostBusybox, X_OK) != 0) {
    GTEST_FAIL() << image::kHostBusybox << " missing: install busybox-static (make deps)";
  }
  auto first = image::EnsureDefaultRootfs(dir_);
  ASSERT_TRUE(first) << first.error().message;
  EXPECT_TRUE(first->built);
  EXPECT_TRUE(first->path.starts_with(dir_ + "/images/default/"));
  auto again = image::EnsureDefaultRootfs(dir_);
  ASSERT_TRUE(again);
  EXPECT_FALSE(again->built);
  EXPECT_EQ(again->path, first->path);
  // erofs superblock magic 0xE0F5E1E2 at offset 1024.
  std::string bytes = ReadFileToString(first->path, 64u << 20).value();
  ASSERT_GT(bytes.size(), 1028u);
  EXPECT_EQ(static_cast<unsigned char>(bytes[1024]), 0xE2);
  EXPECT_EQ(static_cast<unsigned char>(bytes[1027]), 0xE0);
  // Only the image remains in the cache dir (the build tree was removed).
  size_t entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_ + "/images/default")) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 1u);
}

TEST_F(DiskImages, DefaultRootfsRefusesDynamicBusybox) {
  // /bin/ls on Debian is dynamically linked.
  auto r = image::EnsureDefaultRootfs(dir_, "/bin/ls");
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("static"), std::string::npos) << r.error().message;
}

}  // namespace
}  // namespace cella
