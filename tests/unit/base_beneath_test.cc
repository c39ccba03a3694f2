// The one walk every untrusted path goes through (base/beneath.h): a symlink
// at any component is refused, never followed; ".." is refused; missing
// directories are created only when asked.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "base/beneath.h"
#include "support/temp_dir.h"

namespace cella {
namespace {

namespace fs = std::filesystem;

class Beneath : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(tmp_ / "root/a/b");
    fs::create_directories(tmp_ / "outside");
    std::ofstream(tmp_ / "root/a/file") << "x";
    std::ofstream(tmp_ / "outside/secret") << "s";
    fs::create_directory_symlink(tmp_ / "outside", tmp_ / "root/a/escape");
    fs::create_symlink("file", tmp_ / "root/a/link");
    root_ = UniqueFd(::open((tmp_ / "root").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    ASSERT_TRUE(root_);
  }
  static std::string PathOf(const UniqueFd& fd) {
    return fs::read_symlink("/proc/self/fd/" + std::to_string(fd.Get())).string();
  }
  testing::TempDir tmp_;
  UniqueFd root_;
};

TEST_F(Beneath, OpensADirectoryBeneathTheRootWhateverTheLeadingSlash) {
  for (const char* path : {"a/b", "/a/b", "a/./b/", "//a//b"}) {
    auto dir = OpenDirBeneath(root_.Get(), path, MissingDirs::kFail, "test");
    ASSERT_TRUE(dir) << path << ": " << dir.error().message;
    EXPECT_EQ(PathOf(*dir), tmp_ / "root/a/b") << path;
  }
  auto same = OpenDirBeneath(root_.Get(), "", MissingDirs::kFail, "test");
  ASSERT_TRUE(same);
  EXPECT_EQ(PathOf(*same), tmp_ / "root");
}

TEST_F(Beneath, ASymlinkAtAnyComponentIsRefusedAndNothingIsCreatedThroughIt) {
  for (MissingDirs missing : {MissingDirs::kFail, MissingDirs::kCreate}) {
    auto dir = OpenDirBeneath(root_.Get(), "a/escape/new", missing, "test");
    ASSERT_FALSE(dir);
    EXPECT_NE(dir.error().message.find("\"a/escape\" is a symlink"), std::string::npos)
        << dir.error().message;
  }
  EXPECT_FALSE(fs::exists(tmp_ / "outside/new"));
  auto leaf = OpenPathBeneath(root_.Get(), "a/escape/secret", "test");
  EXPECT_FALSE(leaf);
  auto link = OpenPathBeneath(root_.Get(), "/a/link", "test");
  ASSERT_FALSE(link);
  EXPECT_NE(link.error().message.find("is a symlink"), std::string::npos) << link.error().message;
}

TEST_F(Beneath, DotDotIsRefusedEvenWhenItWouldStayInside) {
  EXPECT_FALSE(OpenDirBeneath(root_.Get(), "a/../a", MissingDirs::kFail, "test"));
  EXPECT_FALSE(OpenDirBeneath(root_.Get(), "..", MissingDirs::kCreate, "test"));
  auto leaf = OpenPathBeneath(root_.Get(), "a/b/..", "test");
  ASSERT_FALSE(leaf);
  EXPECT_NE(leaf.error().message.find("'..'"), std::string::npos) << leaf.error().message;
}

TEST_F(Beneath, ANulByteInAComponentIsRefused) {
  using namespace std::string_view_literals;
  EXPECT_FALSE(OpenDirBeneath(root_.Get(), "a/..\0x"sv, MissingDirs::kCreate, "test"));
  EXPECT_FALSE(OpenPathBeneath(root_.Get(), "a/b\0/file"sv, "test"));
  EXPECT_FALSE(OpenPathBeneath(root_.Get(), "a/..\0"sv, "test"));
}

TEST_F(Beneath, MissingDirectoriesAreCreatedOnlyWhenAsked) {
  auto refused = OpenDirBeneath(root_.Get(), "x/y", MissingDirs::kFail, "test");
  ASSERT_FALSE(refused);
  EXPECT_FALSE(fs::exists(tmp_ / "root/x"));
  auto made = OpenDirBeneath(root_.Get(), "x/y", MissingDirs::kCreate, "test");
  ASSERT_TRUE(made) << made.error().message;
  EXPECT_TRUE(fs::is_directory(tmp_ / "root/x/y"));
  // A file where a directory is wanted is named, not replaced.
  auto file = OpenDirBeneath(root_.Get(), "a/file/z", MissingDirs::kCreate, "test");
  ASSERT_FALSE(file);
  EXPECT_NE(file.error().message.find("not a directory"), std::string::npos);
}

TEST_F(Beneath, APathOfAnyTypeOpensWithoutReadingIt) {
  ASSERT_EQ(::mkfifo((tmp_ / "root/a/fifo").c_str(), 0600), 0);
  for (const char* path : {"a/file", "a/fifo", "a/b", "/"}) {
    auto fd = OpenPathBeneath(root_.Get(), path, "test");  // a FIFO must not block
    ASSERT_TRUE(fd) << path << ": " << fd.error().message;
  }
  auto missing = OpenPathBeneath(root_.Get(), "a/none", "test");
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("test: open a/none"), std::string::npos)
      << missing.error().message;
}

}  // namespace
}  // namespace cella
