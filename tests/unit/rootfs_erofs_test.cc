// The erofs writer, checked by the real tools: fsck.erofs, and the kernel
// (a read-only loop mount, as root: what a user's sandbox will see).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "host/rootfs/rootfs.h"
#include "rootfs_test_layers.h"

namespace cella::rootfs {
namespace {

using testing::Compression;
using testing::EntryMeta;
using testing::MountedImage;
using testing::RunCommand;
using testing::TarBuilder;
using testing::TempDir;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string GetXattr(const std::string& path, const std::string& name) {
  char buf[65536];
  ssize_t n = ::lgetxattr(path.c_str(), name.c_str(), buf, sizeof(buf));
  return n < 0 ? "<" + std::string(strerror(errno)) + ">" : std::string(buf, n);
}

struct stat Lstat(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path << ": " << strerror(errno);
  return st;
}

void ExpectFsckClean(const std::string& image) {
  auto [status, output] = RunCommand("fsck.erofs '" + image + "'");
  EXPECT_EQ(status, 0) << output;
}

// Mounting needs root. As root a failed mount is a test failure (the image
// must be mountable); otherwise the test reports itself skipped.
#define MOUNT_OR_SKIP(var, image, mountpoint)                                 \
  if (::geteuid() != 0) GTEST_SKIP() << "loop-mounting the image needs root"; \
  MountedImage var(image, mountpoint);                                        \
  ASSERT_TRUE(var.mounted()) << "mount -t erofs -o loop,ro failed: " << var.error()

Result<RootfsStats> Build(const TempDir& dir, const std::vector<std::string>& layers,
                          const std::string& out = "root.erofs") {
  std::filesystem::create_directories(dir / "work");
  std::vector<std::string> paths;
  for (const std::string& l : layers) paths.push_back(dir / l);
  return BuildRootfsImage(paths, dir / out, dir / "work", Limits{},
                          WriteOptions{.durability = Durability::kNoFsync});
}

TEST(RootfsErofs, MultiLayerImageMountsWithWhiteoutsApplied) {
  TempDir dir;
  TarBuilder(dir / "l1.tar")
      .Dir("etc")
      .File("etc/keep", "old")
      .File("etc/gone", "x")
      .Dir("var/cache")
      .File("var/cache/a", "a")
      .File("var/cache/sub/c", "c");
  TarBuilder(dir / "l2.tar.gz", Compression::kGzip)
      .File("etc/.wh.gone", "")
      .File("var/cache/.wh..wh..opq", "")
      .File("var/cache/new", "n");
  TarBuilder(dir / "l3.tar.zst", Compression::kZstd).File("etc/keep", "new content");
  auto stats = Build(dir, {"l1.tar", "l2.tar.gz", "l3.tar.zst"});
  ASSERT_TRUE(stats) << stats.error().message;
  EXPECT_EQ(stats->layers.size(), 3u);
  ExpectFsckClean(dir / "root.erofs");
  MOUNT_OR_SKIP(m, dir / "root.erofs", dir / "mnt");
  EXPECT_EQ(ReadFile(m / "etc/keep"), "new content");
  EXPECT_FALSE(std::filesystem::exists(m / "etc/gone"));
  std::set<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(m / "var/cache")) {
    names.insert(e.path().filename());
  }
  EXPECT_EQ(names, (std::set<std::string>{"new"}));
}

TEST(RootfsErofs, PreservesOwnershipModesXattrsLinksAndDevices) {
  TempDir dir;
  std::string cap(
      "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", 20);
  std::string long_name(255, 'L');
  TarBuilder(dir / "l1.tar")
      .Dir("", {.mode = 0755})
      .File("owned", "o", {.mode = 0640, .uid = 1000, .gid = 1001})
      .File("bigids", "b", {.mode = 0600, .uid = 100000, .gid = 4000000000})
      .File("suid", "s", {.mode = 04755})
      .Dir("sgid", {.mode = 02775, .gid = 50})
      .Dir("tmp", {.mode = 01777})
      .File("caps", "c", {.mode = 0755, .xattrs = {{"security.capability", cap}, {"user.k", "v"}}})
      .Dir("xdir", {.mode = 0755, .xattrs = {{"trusted.t", std::string(3000, 'T')}}})
      .File("empty", "")
      .File("mtime", "m", {.mtime = 1234567890, .mtime_nsec = 123456789})
      .File(long_name, "long")
      .Symlink("rel", "suid")
      .Symlink("abs", "/etc/passwd")
      .Symlink("longlink", std::string(4000, 'x'))
      .File("bin/orig", "shared")
      .Hardlink("bin/link", "bin/orig")
      .Device("dev/null", AE_IFCHR, 1, 3, {.mode = 0666})
      .Device("dev/sda1", AE_IFBLK, 8, 1, {.mode = 0660, .gid = 6})
      .Device("dev/bignum", AE_IFCHR, 511, 1048000)
      .Fifo("dev/fifo", {.mode = 0600});
  auto stats = Build(dir, {"l1.tar"});
  ASSERT_TRUE(stats) << stats.error().message;
  ExpectFsckClean(dir / "root.erofs");
  MOUNT_OR_SKIP(m, dir / "root.erofs", dir / "mnt");

  struct stat st = Lstat(m / "owned");
  EXPECT_EQ(st.st_uid, 1000u);
  EXPECT_EQ(st.st_gid, 1001u);
  EXPECT_EQ(st.st_mode, S_IFREG | 0640u);
  st = Lstat(m / "bigids");
  EXPECT_EQ(st.st_uid, 100000u);
  EXPECT_EQ(st.st_gid, 4000000000u);
  EXPECT_EQ(Lstat(m / "suid").st_mode, S_IFREG | 04755u);
  EXPECT_EQ(Lstat(m / "sgid").st_mode, S_IFDIR | 02775u);
  EXPECT_EQ(Lstat(m / "sgid").st_gid, 50u);
  EXPECT_EQ(Lstat(m / "tmp").st_mode, S_IFDIR | 01777u);
  EXPECT_EQ(GetXattr(m / "caps", "security.capability"), cap);
  EXPECT_EQ(GetXattr(m / "caps", "user.k"), "v");
  EXPECT_EQ(GetXattr(m / "xdir", "trusted.t"), std::string(3000, 'T'));
  st = Lstat(m / "empty");
  EXPECT_EQ(st.st_size, 0);
  EXPECT_EQ(ReadFile(m / "empty"), "");
  st = Lstat(m / "mtime");
  EXPECT_EQ(st.st_mtim.tv_sec, 1234567890);
  EXPECT_EQ(st.st_mtim.tv_nsec, 123456789);
  EXPECT_EQ(ReadFile(m / long_name), "long");
  EXPECT_EQ(std::filesystem::read_symlink(m / "rel"), "suid");
  EXPECT_EQ(std::filesystem::read_symlink(m / "abs"), "/etc/passwd");
  EXPECT_EQ(std::filesystem::read_symlink(m / "longlink"), std::string(4000, 'x'));
  struct stat a = Lstat(m / "bin/orig"), b = Lstat(m / "bin/link");
  EXPECT_EQ(a.st_ino, b.st_ino);
  EXPECT_EQ(a.st_nlink, 2u);
  EXPECT_EQ(ReadFile(m / "bin/link"), "shared");
  st = Lstat(m / "dev/null");
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0666u);
  EXPECT_EQ(major(st.st_rdev), 1u);
  EXPECT_EQ(minor(st.st_rdev), 3u);
  st = Lstat(m / "dev/sda1");
  EXPECT_TRUE(S_ISBLK(st.st_mode));
  EXPECT_EQ(major(st.st_rdev), 8u);
  EXPECT_EQ(minor(st.st_rdev), 1u);
  EXPECT_EQ(st.st_gid, 6u);
  st = Lstat(m / "dev/bignum");
  EXPECT_EQ(major(st.st_rdev), 511u);
  EXPECT_EQ(minor(st.st_rdev), 1048000u);
  EXPECT_TRUE(S_ISFIFO(Lstat(m / "dev/fifo").st_mode));
  // Directory link counts: 2 + subdirectories.
  EXPECT_EQ(Lstat(m / "tmp").st_nlink, 2u);
  EXPECT_EQ(Lstat(m / ".").st_nlink, 2u + 5u);  // sgid tmp xdir bin dev
}

TEST(RootfsErofs, DirectoriesWithThousandsOfEntriesSpanBlocks) {
  TempDir dir;
  {
    TarBuilder layer(dir / "l.tar");
    for (int i = 0; i < 5000; ++i) layer.File("many/file-" + std::to_string(i), std::to_string(i));
    // Names sorting around "." and "..", and high bytes (unsigned order).
    layer.File("many/-dash", "d").File("many/.hidden", "h").File("many/\xc3\xa9t\xc3\xa9", "e");
    for (int i = 0; i < 40; ++i)
      layer.File("wide/" + std::string(200, 'a' + i % 26) + std::to_string(i), "w");
  }
  auto stats = Build(dir, {"l.tar"});
  ASSERT_TRUE(stats) << stats.error().message;
  ExpectFsckClean(dir / "root.erofs");
  MOUNT_OR_SKIP(m, dir / "root.erofs", dir / "mnt");
  size_t count = 0;
  for (const auto& e : std::filesystem::directory_iterator(m / "many")) {
    (void)e;
    ++count;
  }
  EXPECT_EQ(count, 5003u);
  for (int i = 0; i < 5000; i += 97) {
    EXPECT_EQ(ReadFile(m / ("many/file-" + std::to_string(i))), std::to_string(i));
  }
  EXPECT_EQ(ReadFile(m / "many/file-4999"), "4999");
  EXPECT_EQ(ReadFile(m / "many/-dash"), "d");
  EXPECT_EQ(ReadFile(m / "many/.hidden"), "h");
  EXPECT_EQ(ReadFile(m / "many/\xc3\xa9t\xc3\xa9"), "e");
  count = 0;
  for (const auto& e : std::filesystem::directory_iterator(m / "wide")) {
    EXPECT_EQ(ReadFile(e.path()), "w");
    ++count;
  }
  EXPECT_EQ(count, 40u);
}

TEST(RootfsErofs, LargeFileContentIsExact) {
  TempDir dir;
  constexpr uint64_t kSize = 100ull << 20;
  TarBuilder(dir / "l.tar.gz", Compression::kGzip)
      .PatternFile("big", kSize)
      .PatternFile("odd", 4096 * 3 + 17)
      .File("after", "after");
  auto stats = Build(dir, {"l.tar.gz"});
  ASSERT_TRUE(stats) << stats.error().message;
  EXPECT_EQ(stats->image.content_bytes, kSize + 4096 * 3 + 17 + 5);
  ExpectFsckClean(dir / "root.erofs");
  MOUNT_OR_SKIP(m, dir / "root.erofs", dir / "mnt");
  std::ifstream in(m / "big", std::ios::binary);
  std::string chunk(1 << 20, '\0');
  uint64_t offset = 0;
  while (in.read(chunk.data(), chunk.size()) || in.gcount() > 0) {
    size_t n = static_cast<size_t>(in.gcount());
    ASSERT_EQ(chunk.substr(0, n), TarBuilder::Pattern(offset, n)) << "at offset " << offset;
    offset += n;
  }
  EXPECT_EQ(offset, kSize);
  EXPECT_EQ(ReadFile(m / "odd"), TarBuilder::Pattern(0, 4096 * 3 + 17));
  EXPECT_EQ(ReadFile(m / "after"), "after");
}

TEST(RootfsErofs, OverwrittenContentIsNotCopiedAndImageIsDeterministic) {
  TempDir dir;
  TarBuilder(dir / "l1.tar").PatternFile("dead", 8 << 20).File("live", "live");
  TarBuilder(dir / "l2.tar").File(".wh.dead", "");
  auto first = Build(dir, {"l1.tar", "l2.tar"}, "a.erofs");
  auto second = Build(dir, {"l1.tar", "l2.tar"}, "b.erofs");
  ASSERT_TRUE(first && second);
  EXPECT_EQ(ReadFile(dir / "a.erofs"), ReadFile(dir / "b.erofs"));
  struct stat st = Lstat(dir / "a.erofs");
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 1u << 20)
      << "deleted content must stay a hole in the image";
  ExpectFsckClean(dir / "a.erofs");
  EXPECT_TRUE(std::filesystem::is_empty(dir / "work")) << "the spool must leave no file behind";
}

TEST(RootfsErofs, EmptyLayerListGivesAnEmptyRoot) {
  TempDir dir;
  auto stats = Build(dir, {});
  ASSERT_TRUE(stats) << stats.error().message;
  EXPECT_EQ(stats->image.inodes, 1u);
  ExpectFsckClean(dir / "root.erofs");
  MOUNT_OR_SKIP(m, dir / "root.erofs", dir / "mnt");
  EXPECT_TRUE(std::filesystem::is_empty(m / "."));
}

}  // namespace
}  // namespace cella::rootfs
