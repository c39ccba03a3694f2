// The config disk (mkfs.ext4 -d) and the built-in busybox image
// (mkfs.erofs): real tools, no root, no VM.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <string>

#include "base/io.h"
#include "host/image/default_rootfs.h"
#include "host/vmm/config_disk.h"
#include "host/os/process.h"

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
