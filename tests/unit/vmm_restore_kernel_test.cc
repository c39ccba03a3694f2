#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "base/io.h"
#include "host/vmm/restore_kernel.h"
#include "support/temp_dir.h"

namespace cella::vmm {
namespace {

// A bzImage-shaped file: the boot-protocol header fields the stub depends
// on, then distinguishable bytes to the end.
std::string FakeBzImage(unsigned char setup_sects, size_t size) {
  std::string image(size, '\0');
  for (size_t i = 0; i < size; ++i) image[i] = static_cast<char>('a' + i % 23);
  image[0x1f1] = static_cast<char>(setup_sects);
  image.replace(0x202, 4, "HdrS");
  return image;
}

TEST(RestoreKernel, KeepsTheSetupSectorsAndOnePage) {
  testing::TempDir dir;
  std::string kernel = FakeBzImage(39, size_t{1} << 20);
  ASSERT_TRUE(WriteStringToFile(dir / "vmlinuz", kernel, 0644));
  auto wrote = WriteRestoreKernel(dir / "vmlinuz", dir / "stub");
  ASSERT_TRUE(wrote.has_value()) << wrote.error().message;
  EXPECT_TRUE(*wrote);
  auto stub = ReadFileToString(dir / "stub", size_t{1} << 20);
  ASSERT_TRUE(stub.has_value()) << stub.error().message;
  EXPECT_EQ(stub->size(), (39 + 1) * 512 + kRestoreKernelPayload);
  EXPECT_EQ(*stub, kernel.substr(0, stub->size()));
}

TEST(RestoreKernel, SetupSectsZeroMeansFour) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteStringToFile(dir / "vmlinuz", FakeBzImage(0, 65536), 0644));
  ASSERT_TRUE(WriteRestoreKernel(dir / "vmlinuz", dir / "stub").value_or(false));
  EXPECT_EQ(std::filesystem::file_size(dir / "stub"), (4 + 1) * 512 + kRestoreKernelPayload);
}

TEST(RestoreKernel, AnythingButAWholeBzImageIsLeftToTheRealFiles) {
  testing::TempDir dir;
  // An ELF vmlinux (no boot-protocol signature).
  std::string elf = FakeBzImage(39, 65536);
  elf.replace(0x202, 4,
              "\x7f"
              "ELF");
  ASSERT_TRUE(WriteStringToFile(dir / "vmlinux", elf, 0644));
  auto not_bz = WriteRestoreKernel(dir / "vmlinux", dir / "stub");
  ASSERT_TRUE(not_bz.has_value()) << not_bz.error().message;
  EXPECT_FALSE(*not_bz);
  // Shorter than its header says, and shorter than a header.
  ASSERT_TRUE(WriteStringToFile(dir / "short", FakeBzImage(39, 8192), 0644));
  EXPECT_FALSE(WriteRestoreKernel(dir / "short", dir / "stub").value_or(true));
  ASSERT_TRUE(WriteStringToFile(dir / "tiny", "HdrS", 0644));
  EXPECT_FALSE(WriteRestoreKernel(dir / "tiny", dir / "stub").value_or(true));
  EXPECT_FALSE(std::filesystem::exists(dir / "stub"));
  // A kernel that is not there is an error naming it.
  auto missing = WriteRestoreKernel(dir / "nope", dir / "stub");
  ASSERT_FALSE(missing.has_value());
  EXPECT_NE(missing.error().message.find(dir / "nope"), std::string::npos);
}

}  // namespace
}  // namespace cella::vmm
