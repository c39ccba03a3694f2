// Applying OCI layers to the in-memory tree: whiteouts, metadata, and
// hostile layers refused with an error naming the entry.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "host/rootfs/layer.h"
#include "host/rootfs/rootfs.h"
#include "host/rootfs/tree.h"
#include "rootfs_test_layers.h"

namespace cella::rootfs {
namespace {

using testing::Compression;
using testing::EntryMeta;
using testing::TarBuilder;
using testing::TempDir;

const Inode* Lookup(const Tree& tree, const std::string& path) {
  const Inode* node = &tree.root();
  auto parts = NormaliseLayerPath(path, Limits{});
  if (!parts) return nullptr;
  for (const std::string& part : *parts) {
    auto it = node->children.find(part);
    if (it == node->children.end()) return nullptr;
    node = it->second.inode.get();
  }
  return node;
}

std::vector<std::string> Names(const Inode& dir) {
  std::vector<std::string> out;
  for (const auto& [name, dentry] : dir.children) out.push_back(name);
  return out;
}

// Applies the layer and expects failure; returns the error message.
std::string ApplyExpectingError(Tree& tree, const std::string& layer, const Limits& limits = {}) {
  auto result = ApplyLayerFile(tree, layer, limits);
  EXPECT_FALSE(result.has_value()) << "layer " << layer << " was accepted";
  return result ? "" : result.error().message;
}

size_t RoundUp512(size_t n) { return (n + 511) / 512 * 512; }

// A 512-byte ustar header, built by hand so it can declare sizes no test
// should ever write out.
std::string UstarHeader(const std::string& name, const char* size_octal, char type = '0') {
  std::string h(512, '\0');
  std::memcpy(h.data(), name.data(), std::min<size_t>(name.size(), 100));
  std::memcpy(h.data() + 100, "0000644", 7);
  std::memcpy(h.data() + 108, "0000000", 7);
  std::memcpy(h.data() + 116, "0000000", 7);
  std::memcpy(h.data() + 124, size_octal, std::strlen(size_octal));
  std::memcpy(h.data() + 136, "14540000000", 11);
  h[156] = type;
  std::memcpy(h.data() + 257, "ustar", 6);
  std::memcpy(h.data() + 263, "00", 2);
  std::memset(h.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  std::snprintf(h.data() + 148, 8, "%06o", sum);
  h[155] = ' ';
  return h;
}

// A pax extended header ('x') carrying one "path" record, then the entry.
std::string PaxEntryWithPath(const std::string& path, const std::string& content) {
  std::string body = " path=" + path + "\n";
  size_t length = body.size() + 2;
  if (std::to_string(length).size() + body.size() != length) ++length;
  std::string record = std::to_string(length) + body;
  char size_octal[12];
  std::snprintf(size_octal, sizeof(size_octal), "%011o", static_cast<unsigned>(record.size()));
  std::string out = UstarHeader("PaxHeaders/x", size_octal, 'x') + record;
  out.resize(RoundUp512(out.size()), '\0');
  std::snprintf(size_octal, sizeof(size_octal), "%011o", static_cast<unsigned>(content.size()));
  out += UstarHeader("ascii-fallback", size_octal) + content;
  out.resize(RoundUp512(out.size()), '\0');
  return out + std::string(1024, '\0');
}

TEST(RootfsLayer, KeepsUtf8PaxNamesAsTheirBytes) {
  TempDir dir;
  std::string tar = PaxEntryWithPath("caf\xc3\xa9/\xe6\x97\xa5\xe6\x9c\xac", "x");
  auto tree = Tree::Create(dir.path());
  ASSERT_TRUE(tree);
  auto stats = ApplyLayerBytes(*tree, std::as_bytes(std::span(tar)), {});
  ASSERT_TRUE(stats) << stats.error().message;
  EXPECT_TRUE(stats->warnings.empty()) << stats->warnings.front();
  const Inode* file = Lookup(*tree, "caf\xc3\xa9/\xe6\x97\xa5\xe6\x9c\xac");
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(file->size, 1u);
}

TEST(RootfsPath, NormalisesLikeDocker) {
  Limits limits;
  EXPECT_EQ(*NormaliseLayerPath("./a//b/./c/", limits), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(*NormaliseLayerPath("/abs/x", limits), (std::vector<std::string>{"abs", "x"}));
  EXPECT_EQ(*NormaliseLayerPath("a/b/../c", limits), (std::vector<std::string>{"a", "c"}));
  EXPECT_TRUE(NormaliseLayerPath("./", limits)->empty());
  EXPECT_FALSE(NormaliseLayerPath("../x", limits).has_value());
  EXPECT_FALSE(NormaliseLayerPath("a/../../x", limits).has_value());
  EXPECT_FALSE(NormaliseLayerPath("/../x", limits).has_value());
  EXPECT_FALSE(NormaliseLayerPath(std::string(256, 'n'), limits).has_value());
  EXPECT_TRUE(NormaliseLayerPath(std::string(255, 'n'), limits).has_value());
}

TEST(RootfsLayer, AppliesWhiteoutsAndOpaqueDirectoriesAcrossCompressedLayers) {
  TempDir dir;
  TarBuilder(dir / "l1.tar")
      .Dir("etc")
      .File("etc/keep", "old")
      .File("etc/gone", "x")
      .Dir("var/cache")
      .File("var/cache/a", "a")
      .Dir("var/cache/sub")
      .File("var/cache/sub/c", "c")
      .Dir("opt/tree")
      .File("opt/tree/deep", "d");
  TarBuilder(dir / "l2.tar.gz", Compression::kGzip)
      .File("etc/.wh.gone", "")
      .File("var/cache/new-before-marker", "n1")
      .File("var/cache/.wh..wh..opq", "")
      .File("var/cache/new-after-marker", "n2")
      .File("opt/.wh.tree", "")
      .File("etc/.wh.never-existed", "")
      .File("nodir/.wh.x", "");
  TarBuilder(dir / "l3.tar.zst", Compression::kZstd).File("etc/keep", "new").File("opt/tree", "f");
  auto tree = Tree::Create(dir.path());
  ASSERT_TRUE(tree) << tree.error().message;
  for (const char* layer : {"l1.tar", "l2.tar.gz", "l3.tar.zst"}) {
    auto stats = ApplyLayerFile(*tree, dir / layer, Limits{});
    ASSERT_TRUE(stats) << stats.error().message;
  }
  EXPECT_EQ(Lookup(*tree, "etc/gone"), nullptr);
  ASSERT_NE(Lookup(*tree, "etc/keep"), nullptr);
  EXPECT_EQ(Lookup(*tree, "etc/keep")->size, 3u);
  EXPECT_EQ(Names(*Lookup(*tree, "var/cache")),
            (std::vector<std::string>{"new-after-marker", "new-before-marker"}));
  ASSERT_NE(Lookup(*tree, "opt/tree"), nullptr);
  EXPECT_EQ(Lookup(*tree, "opt/tree")->type, InodeType::kRegular);
  EXPECT_EQ(Lookup(*tree, "nodir"), nullptr) << "a whiteout must not create its parent";
  EXPECT_EQ(tree->layers_applied, 3u);
}

TEST(RootfsLayer, KeepsOwnershipModesXattrsAndMergesDirectoryMetadata) {
  TempDir dir;
  TarBuilder(dir / "l1.tar")
      .Dir("d", {.mode = 0700, .uid = 5})
      .File("d/x", "x")
      .File("suid", "s", {.mode = 04755, .uid = 100000, .gid = 200000})
      .File("cap", "c", {.xattrs = {{"security.capability", std::string("\x01\0\0\x02", 4)}}});
  TarBuilder(dir / "l2.tar").Dir("d", {.mode = 01777, .uid = 7, .gid = 8});
  auto tree = Tree::Create(dir.path());
  ASSERT_TRUE(tree);
  ASSERT_TRUE(ApplyLayerFile(*tree, dir / "l1.tar", {}));
  ASSERT_TRUE(ApplyLayerFile(*tree, dir / "l2.tar", {}));
  const Inode* d = Lookup(*tree, "d");
  EXPECT_EQ(d->permissions, 01777u);
  EXPECT_EQ(d->uid, 7u);
  EXPECT_EQ(d->gid, 8u);
  EXPECT_NE(Lookup(*tree, "d/x"), nullptr) << "a directory entry over a directory keeps children";
  EXPECT_EQ(Lookup(*tree, "suid")->permissions, 04755u);
  EXPECT_EQ(Lookup(*tree, "suid")->uid, 100000u);
  ASSERT_EQ(Lookup(*tree, "cap")->xattrs.size(), 1u);
  EXPECT_EQ(Lookup(*tree, "cap")->xattrs[0].value, std::string("\x01\0\0\x02", 4));
}

TEST(RootfsLayer, RefusesDotDotEscapes) {
  TempDir dir;
  for (const char* path : {"../evil", "a/../../evil", "/../../etc/evil"}) {
    std::string layer = dir / "escape.tar";
    TarBuilder(layer).File(path, "x");
    auto tree = Tree::Create(dir.path());
    ASSERT_TRUE(tree);
    std::string error = ApplyExpectingError(*tree, layer);
    EXPECT_NE(error.find(path), std::string::npos) << error;
    EXPECT_NE(error.find("escapes the image root"), std::string::npos) << error;
  }
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(dir.path()).parent_path() / "evil"));
}

TEST(RootfsLayer, AbsolutePathsLandInsideTheRoot) {
  TempDir dir;
  TarBuilder(dir / "abs.tar").File("/abs/file", "x");
  auto tree = Tree::Create(dir.path());
  ASSERT_TRUE(tree);
  ASSERT_TRUE(ApplyLayerFile(*tree, dir / "abs.tar", {}));
  EXPECT_NE(Lookup(*tree, "abs/file"), nullptr);
}

TEST(RootfsLayer, NeverWritesThroughASymlink) {
  TempDir dir;
  TarBuilder(dir / "same.tar").Symlink("link", "/etc").File("link/passwd", "pwned");
  TarBuilder(dir / "lower.tar").Symlink("up", "../../..");
  TarBuilder(dir / "upper.tar").File("up/escape", "pwned");
  auto tree = Tree::Create(dir.path());
  ASSERT_TRUE(tree);
  std::string error = ApplyExpectingError(*tree, dir / "same.tar");
  EXPECT_NE(error.find("\"link/passwd\""), std::string::npos) << error;
  EXPECT_NE(error.find("symlink"), std::string::npos) << error;

  auto tree2 = Tree::Create(dir.path());
  ASSERT_TRUE(ApplyLayerFile(*tree2, dir / "lower.tar", {}));
  error = ApplyExpectingError(*tree2, dir / "upper.tar");
  EXPECT_NE(error.find("\"up/escape\""), std::string::npos) << error;
  EXPECT_NE(error.find("symlink"), std::string::npos) << error;
}

TEST(RootfsLayer, RefusesBadHardlinks) {
  struct Case {
    const char* target;
    const char* expected;
  };
  for (Case c :
       {Case{"../../etc/shadow", "escapes the image root"}, Case{"missing", "does not exist"},
        Case{"dir", "is a directory"}, Case{"link/target", "symlink"}}) {
    TempDir dir;
    TarBuilder(dir / "l.tar").Dir("dir").Symlink("link", "/").Hardlink("hl", c.target);
    auto tree = Tree::Create(dir.path());
    ASSERT_TRUE(tree);
    std::string error = ApplyExpectingError(*tree, dir / "l.tar");
    EXPECT_NE(error.find("\"hl\""), std::string::npos) << error;
    EXPECT_NE(error.find(c.expected), std::string::npos) << c.target << ": " << error;
  }
}

TEST(RootfsLayer, HardlinkSharesTheInodeOfAnEarlierLayer) {
  TempDir dir;
  TarBuilder(dir / "l1.tar").File("bin/a", "content");
  TarBuilder(dir / "l2.tar").Hardlink("bin/b", "bin/a");
  auto tree = Tree::Create(dir.path());
  ASSERT_TRUE(ApplyLayerFile(*tree, dir / "l1.tar", {}));
  ASSERT_TRUE(ApplyLayerFile(*tree, dir / "l2.tar", {}));
  EXPECT_EQ(Lookup(*tree, "bin/a"), Lookup(*tree, "bin/b"));
}

TEST(RootfsLayer, CapsDeclaredSizeBeforeReadingContent) {
  TempDir dir;
  // Declares 8 GiB - 1 and carries nothing: the cap must fire on the header,
  // not as a truncation error after trying to read it.
  std::string tar = UstarHeader("bomb", "77777777777") + std::string(1024, '\0');
  auto tree = Tree::Create(dir.path());
  ASSERT_TRUE(tree);
  auto result =
      ApplyLayerBytes(*tree, std::as_bytes(std::span(tar)), Limits{.max_content_bytes = 1 << 20});
  ASSERT_FALSE(result);
  EXPECT_NE(result.error().message.find("\"bomb\""), std::string::npos) << result.error().message;
  EXPECT_NE(result.error().message.find("declares 8589934591 bytes"), std::string::npos)
      << result.error().message;
}

TEST(RootfsLayer, CapsTotalContentAcrossFilesAndLayers) {
  TempDir dir;
  TarBuilder(dir / "l1.tar").File("a", std::string(600 << 10, 'a'));
  TarBuilder(dir / "l2.tar").File("b", std::string(600 << 10, 'b'));
  auto tree = Tree::Create(dir.path());
  Limits limits{.max_content_bytes = 1 << 20};
  ASSERT_TRUE(ApplyLayerFile(*tree, dir / "l1.tar", limits));
  std::string error = ApplyExpectingError(*tree, dir / "l2.tar", limits);
  EXPECT_NE(error.find("\"b\""), std::string::npos) << error;
  EXPECT_NE(error.find("(limit)"), std::string::npos) << error;
}

TEST(RootfsLayer, CapsEntryCount) {
  TempDir dir;
  {
    TarBuilder many(dir / "many.tar");
    for (int i = 0; i < 100; ++i) many.Dir("d" + std::to_string(i));
  }
  auto tree = Tree::Create(dir.path());
  std::string error = ApplyExpectingError(*tree, dir / "many.tar", Limits{.max_entries = 50});
  EXPECT_NE(error.find("more than 50 entries"), std::string::npos) << error;
}

TEST(RootfsLayer, CapsPathLength) {
  TempDir dir;
  std::string long_component(256, 'x');
  std::string long_path;
  for (int i = 0; i < 20; ++i) long_path += std::string(250, 'p') + "/";
  long_path += "f";
  TarBuilder(dir / "component.tar").File("ok/" + long_component, "x");
  TarBuilder(dir / "path.tar").File(long_path, "x");
  auto tree = Tree::Create(dir.path());
  std::string error = ApplyExpectingError(*tree, dir / "component.tar");
  EXPECT_NE(error.find("longer than 255 bytes"), std::string::npos) << error;
  error = ApplyExpectingError(*tree, dir / "path.tar");
  EXPECT_NE(error.find("longer than 4096 bytes"), std::string::npos) << error;
}

TEST(RootfsLayer, RefusesGarbageAndTruncatedLayers) {
  TempDir dir;
  auto tree = Tree::Create(dir.path());
  std::string garbage(4096, '\x5a');
  auto result = ApplyLayerBytes(*tree, std::as_bytes(std::span(garbage)), {});
  ASSERT_FALSE(result);
  EXPECT_FALSE(result.error().message.empty());

  TarBuilder(dir / "full.tar").File("big", std::string(100000, 'b'));
  std::filesystem::resize_file(dir / "full.tar", 20000);
  std::string error = ApplyExpectingError(*tree, dir / "full.tar");
  EXPECT_NE(error.find("\"big\""), std::string::npos) << error;
}

TEST(RootfsLayer, RefusesXattrsErofsCannotStore) {
  TempDir dir;
  TarBuilder(dir / "l.tar").File("f", "x", {.xattrs = {{"system.weird", "v"}}});
  auto tree = Tree::Create(dir.path());
  std::string error = ApplyExpectingError(*tree, dir / "l.tar");
  EXPECT_NE(error.find("system.weird"), std::string::npos) << error;
}

TEST(RootfsLayer, RefusesWhiteoutPrefixInDirectoriesAndEmptyWhiteouts) {
  TempDir dir;
  TarBuilder(dir / "dir.tar").File("a/.wh.b/c", "x");
  TarBuilder(dir / "dot.tar").File("a/.wh..", "");
  auto tree = Tree::Create(dir.path());
  std::string error = ApplyExpectingError(*tree, dir / "dir.tar");
  EXPECT_NE(error.find("whiteout"), std::string::npos) << error;
  error = ApplyExpectingError(*tree, dir / "dot.tar");
  EXPECT_NE(error.find("whiteout"), std::string::npos) << error;
}

TEST(RootfsBuild, HostileLayerLeavesNothingBehind) {
  TempDir dir;
  std::filesystem::create_directories(dir / "work");
  std::filesystem::create_directories(dir / "out");
  TarBuilder(dir / "ok.tar").File("fine", "x");
  TarBuilder(dir / "bad.tar").Symlink("s", "/").File("s/etc/passwd", "x");
  auto result =
      BuildRootfsImage({dir / "ok.tar", dir / "bad.tar"}, dir / "out/root.erofs", dir / "work");
  ASSERT_FALSE(result);
  EXPECT_NE(result.error().message.find("bad.tar"), std::string::npos) << result.error().message;
  EXPECT_TRUE(std::filesystem::is_empty(dir / "work"));
  EXPECT_TRUE(std::filesystem::is_empty(dir / "out"));
}

}  // namespace
}  // namespace cella::rootfs
