#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <memory>
#include <set>
#include <thread>

#include "host/registry/archive_extract.h"
#include "host/registry/blob_store.h"
#include "host/registry/image_store.h"
#include "registry_test_support.h"

namespace cella::registry {
namespace {

using testing::LayerWithFile;
using testing::MakeImage;
using testing::ReadAll;
using testing::Sha;
using testing::TarBuilder;
using testing::TempDir;
using testing::WriteOciLayout;

bool PathExists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::set<std::string> DirEntries(const std::string& dir) {
  std::set<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.insert(n);
  }
  ::closedir(d);
  return out;
}

// Stored blobs only (no locks, no partial files).
std::set<std::string> StoredBlobs(const ImageStore& store) {
  std::set<std::string> out;
  for (const auto& n : DirEntries(store.blobs().Dir()))
    if (n.find('.') == std::string::npos) out.insert("sha256:" + n);
  return out;
}

TEST(RegistryBlobStore, DigestMismatchLeavesNothing) {
  TempDir dir;
  BlobStore store(dir / "blobs");
  const std::string digest = Sha("hello");
  auto w = BlobWriter::Open(store, digest, 5, ResumeMode::kResume);
  ASSERT_TRUE(w.has_value()) << w.error().message;
  ASSERT_TRUE(w->Write("hellx"));
  auto commit = w->Commit();
  ASSERT_FALSE(commit.has_value());
  EXPECT_NE(commit.error().message.find("digest mismatch"), std::string::npos)
      << commit.error().message;
  EXPECT_FALSE(*store.Has(digest));
  EXPECT_FALSE(PathExists(store.PathFor(digest) + ".partial"));
}

TEST(RegistryBlobStore, SizeMismatchRefused) {
  TempDir dir;
  BlobStore store(dir / "blobs");
  const std::string digest = Sha("hello");
  {
    auto w = BlobWriter::Open(store, digest, 4, ResumeMode::kStartOver);
    ASSERT_TRUE(w.has_value());
    auto write = w->Write("hello");  // one byte more than announced
    ASSERT_FALSE(write.has_value());
    EXPECT_NE(write.error().message.find("size mismatch"), std::string::npos);
  }
  {
    auto w = BlobWriter::Open(store, digest, 6, ResumeMode::kStartOver);
    ASSERT_TRUE(w.has_value());
    ASSERT_TRUE(w->Write("hello"));
    auto commit = w->Commit();  // one byte short
    ASSERT_FALSE(commit.has_value());
    EXPECT_NE(commit.error().message.find("size mismatch"), std::string::npos);
  }
  EXPECT_FALSE(*store.Has(digest));
  EXPECT_TRUE(StoredBlobs(*ImageStore::Open(dir.path())).empty());
}

TEST(RegistryBlobStore, InterruptedWriteResumes) {
  TempDir dir;
  BlobStore store(dir / "blobs");
  const std::string content = rootfs::testing::TarBuilder::Pattern(0, 100000);
  const std::string digest = Sha(content);
  {
    auto w = BlobWriter::Open(store, digest, content.size(), ResumeMode::kResume);
    ASSERT_TRUE(w.has_value());
    ASSERT_TRUE(w->Write(std::string_view(content).substr(0, 40000)));
    // Dropped without Commit: an interrupted download.
  }
  EXPECT_FALSE(*store.Has(digest));
  auto w = BlobWriter::Open(store, digest, content.size(), ResumeMode::kResume);
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(w->Offset(), 40000);
  ASSERT_TRUE(w->Write(std::string_view(content).substr(40000)));
  ASSERT_TRUE(w->Commit());
  EXPECT_TRUE(*store.Has(digest, content.size()));
  EXPECT_EQ(ReadAll(store.PathFor(digest)), content);
  EXPECT_FALSE(PathExists(store.PathFor(digest) + ".partial"));
}

TEST(RegistryBlobStore, CorruptPartialIsCaughtByWholeFileHash) {
  TempDir dir;
  BlobStore store(dir / "blobs");
  const std::string content(5000, 'x');
  const std::string digest = Sha(content);
  ASSERT_TRUE(host::MakeDirs(store.Dir(), 0755));
  ASSERT_TRUE(WriteStringToFile(store.PathFor(digest) + ".partial", std::string(1000, 'y'), 0644));
  auto w = BlobWriter::Open(store, digest, content.size(), ResumeMode::kResume);
  ASSERT_TRUE(w.has_value());
  ASSERT_EQ(w->Offset(), 1000);
  ASSERT_TRUE(w->Write(std::string_view(content).substr(1000)));
  auto commit = w->Commit();
  ASSERT_FALSE(commit.has_value());
  EXPECT_NE(commit.error().message.find("digest mismatch"), std::string::npos);
  EXPECT_FALSE(*store.Has(digest));
}

TEST(RegistryBlobStore, ConcurrentWritersStoreOnce) {
  TempDir dir;
  BlobStore store(dir / "blobs");
  const std::string content = rootfs::testing::TarBuilder::Pattern(7, 300000);
  const std::string digest = Sha(content);
  std::atomic<int> fetched{0}, present{0}, failed{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      auto w = BlobWriter::Open(store, digest, content.size(), ResumeMode::kResume);
      if (!w) return void(++failed);
      if (w->AlreadyStored()) return void(++present);
      for (size_t off = 0; off < content.size(); off += 4096)
        if (!w->Write(std::string_view(content).substr(off, 4096))) return void(++failed);
      if (!w->Commit()) return void(++failed);
      ++fetched;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(fetched, 1);
  EXPECT_EQ(present, 3);
  EXPECT_EQ(ReadAll(store.PathFor(digest)), content);
}

class RegistryImageStoreTest : public ::testing::Test {
 protected:
  TempDir home;
  TempDir work;
  ImageStore store = std::move(ImageStore::Open(home.path()).value());
};

TEST_F(RegistryImageStoreTest, ImportOciLayoutSharedLayerStoredOnceAndGc) {
  std::string base = LayerWithFile(work, "etc/base", "base layer");
  std::string top_a = LayerWithFile(work, "a.txt", "only in a");
  std::string top_b = LayerWithFile(work, "b.txt", "only in b");
  auto img_a = MakeImage({base, top_a});
  auto img_b = MakeImage({base, top_b}, "amd64", "/sbin/init");
  WriteOciLayout(work / "a", img_a, "v1");
  WriteOciLayout(work / "b", img_b, "");

  auto a = store.Import(work / "a", *ParseReference("example.com/team/a:v1"));
  ASSERT_TRUE(a.has_value()) << a.error().message;
  auto b = store.Import(work / "b", *ParseReference("localhost:5000/b"));
  ASSERT_TRUE(b.has_value()) << b.error().message;

  EXPECT_EQ(a->reference, "example.com/team/a:v1");
  EXPECT_EQ(a->manifest_digest, img_a.manifest_digest());
  EXPECT_EQ(a->config.digest, Sha(img_a.config));
  ASSERT_EQ(a->layers.size(), 2u);
  EXPECT_EQ(a->layers[0].digest, Sha(base));
  EXPECT_EQ(a->platform.String(), "linux/amd64");
  EXPECT_EQ(a->created, "2024-05-06T07:08:09Z");
  EXPECT_EQ(a->size, static_cast<int64_t>(img_a.config.size() + base.size() + top_a.size()));

  // Two manifests, two configs, three distinct layers: the shared one once.
  EXPECT_EQ(StoredBlobs(store).size(), 7u);
  EXPECT_TRUE(StoredBlobs(store).contains(Sha(base)));

  auto list = store.List();
  ASSERT_TRUE(list.has_value()) << list.error().message;
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].reference, "example.com/team/a:v1");
  EXPECT_EQ((*list)[1].reference, "localhost:5000/b:latest");

  auto by_digest = store.Find(*ParseReference("example.com/team/a@" + img_a.manifest_digest()));
  ASSERT_TRUE(by_digest.has_value()) << by_digest.error().message;
  EXPECT_EQ(by_digest->reference, "example.com/team/a:v1");
  auto config = store.Config(*b);
  ASSERT_TRUE(config.has_value()) << config.error().message;
  EXPECT_TRUE(config->IsSystemdInit());

  // Nothing unreferenced yet.
  auto gc0 = store.Gc();
  ASSERT_TRUE(gc0.has_value()) << gc0.error().message;
  EXPECT_EQ(gc0->blobs_removed, 0u);

  ASSERT_TRUE(store.Remove(*ParseReference("example.com/team/a:v1")));
  auto missing = store.Find(*ParseReference("example.com/team/a:v1"));
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().errno_value, ENOENT);
  auto again = store.Remove(*ParseReference("example.com/team/a:v1"));
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().errno_value, ENOENT);

  auto gc1 = store.Gc();
  ASSERT_TRUE(gc1.has_value()) << gc1.error().message;
  EXPECT_EQ(gc1->blobs_removed, 3u);  // a's manifest, config, top layer
  std::set<std::string> expected{Sha(base), Sha(top_b), Sha(img_b.config), img_b.manifest_digest()};
  EXPECT_EQ(StoredBlobs(store), expected);

  ASSERT_TRUE(store.Remove(*ParseReference("localhost:5000/b")));
  ASSERT_TRUE(store.Gc());
  EXPECT_TRUE(DirEntries(store.blobs().Dir()).empty());
}

TEST_F(RegistryImageStoreTest, ImportOciTarballTakesRecordedName) {
  std::string layer = LayerWithFile(work, "hello.txt", "hi");
  auto img = MakeImage({layer});
  WriteOciLayout(work / "layout", img, "127.0.0.1:5000/demo:2");
  std::string tarball = work / "image.tar";
  {
    TarBuilder tar(tarball);
    tar.File("oci-layout", ReadAll(work / "layout/oci-layout"));
    tar.File("index.json", ReadAll(work / "layout/index.json"));
    for (const auto& [digest, bytes] : img.Blobs())
      tar.File("blobs/sha256/" + digest.substr(7), bytes);
    tar.Close();
  }
  auto r = store.Import(tarball, std::nullopt);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->reference, "127.0.0.1:5000/demo:2");
  EXPECT_EQ(r->manifest_digest, img.manifest_digest());
  EXPECT_TRUE(DirEntries(home / "images/tmp").empty());  // extraction cleaned up
}

TEST_F(RegistryImageStoreTest, ImportRefusesTamperedBlob) {
  std::string layer = LayerWithFile(work, "x", "original");
  auto img = MakeImage({layer});
  WriteOciLayout(work / "layout", img, "");
  std::string tampered = layer;
  tampered[tampered.size() / 2] ^= 1;
  ASSERT_TRUE(
      WriteStringToFile(work / ("layout/blobs/sha256/" + Sha(layer).substr(7)), tampered, 0644));
  auto r = store.Import(work / "layout", *ParseReference("x/y"));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("digest mismatch"), std::string::npos) << r.error().message;
  EXPECT_FALSE(*store.blobs().Has(Sha(layer)));
  EXPECT_FALSE(*store.blobs().Has(Sha(tampered)));
  EXPECT_FALSE(store.Find(*ParseReference("x/y")).has_value());

  auto unnamed = store.Import(work / "layout", std::nullopt);
  ASSERT_FALSE(unnamed.has_value());
}

// The pre-25 `docker save` layout: manifest.json, <config hex>.json, <id>/layer.tar.
TEST_F(RegistryImageStoreTest, ImportDockerSaveTarball) {
  std::string layer1 = LayerWithFile(work, "bin/tool", "#!/bin/sh\n");
  std::string layer2 = LayerWithFile(work, "etc/motd", "welcome\n");
  auto img = MakeImage({layer1, layer2});
  std::string config_hex = Sha(img.config).substr(7);
  auto build = [&](const std::string& path, const std::string& second_layer) {
    TarBuilder tar(path);
    tar.File(
        "manifest.json",
        R"([{"Config":")" + config_hex +
            R"(.json","RepoTags":["busybox:saved"],"Layers":["l1/layer.tar","l2/layer.tar"]}])");
    tar.File(config_hex + ".json", img.config);
    tar.File("l1/layer.tar", layer1);
    tar.File("l2/layer.tar", second_layer);
    tar.File("repositories", "{}");
    tar.Close();
  };
  build(work / "saved.tar", layer2);
  auto r = store.Import(work / "saved.tar", std::nullopt);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->reference, "docker.io/library/busybox:saved");
  EXPECT_EQ(r->config.digest, Sha(img.config));
  ASSERT_EQ(r->layers.size(), 2u);
  EXPECT_EQ(r->layers[1].digest, Sha(layer2));
  EXPECT_EQ(r->layers[1].media_type, media::kDockerLayerTar);
  EXPECT_TRUE(*store.blobs().Has(r->manifest_digest));
  auto config = store.Config(*r);
  ASSERT_TRUE(config.has_value());
  EXPECT_EQ(config->cmd, std::vector<std::string>{"/bin/sh"});

  // A layer that does not match the config's diff_id is refused.
  std::string other = LayerWithFile(work, "etc/motd", "tampered\n");
  build(work / "bad.tar", other);
  auto bad = store.Import(work / "bad.tar", *ParseReference("bad/image"));
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("diff_id"), std::string::npos) << bad.error().message;
  EXPECT_FALSE(store.Find(*ParseReference("bad/image")).has_value());

  // Entries escaping the archive are refused by name.
  {
    TarBuilder tar(work / "evil.tar");
    tar.File("../escape", "x");
    tar.Close();
  }
  auto evil = store.Import(work / "evil.tar", *ParseReference("evil/image"));
  ASSERT_FALSE(evil.has_value());
  EXPECT_NE(evil.error().message.find("\"..\""), std::string::npos) << evil.error().message;
  EXPECT_FALSE(PathExists(home / "images/escape"));
}

TEST_F(RegistryImageStoreTest, EnsureRootfsBuildsOnceAndGcRemovesIt) {
  std::string layer = LayerWithFile(work, "etc/hostname", "cella\n");
  auto img = MakeImage({layer});
  WriteOciLayout(work / "layout", img, "");
  auto r = store.Import(work / "layout", *ParseReference("rootfs/test"));
  ASSERT_TRUE(r.has_value()) << r.error().message;
  auto path = EnsureImageRootfs(store, *r);
  ASSERT_TRUE(path.has_value()) << path.error().message;
  EXPECT_EQ(*path, home / ("images/rootfs/" + img.manifest_digest().substr(7) + ".erofs"));
  struct stat first {};
  ASSERT_EQ(::stat(path->c_str(), &first), 0);
  EXPECT_GT(first.st_size, 0);
  auto again = store.EnsureRootfs(*r);
  ASSERT_TRUE(again.has_value());
  struct stat second {};
  ASSERT_EQ(::stat(again->c_str(), &second), 0);
  EXPECT_EQ(first.st_ino, second.st_ino);  // cached, not rebuilt

  ASSERT_TRUE(store.Remove(*ParseReference("rootfs/test")));
  auto gc = store.Gc();
  ASSERT_TRUE(gc.has_value()) << gc.error().message;
  EXPECT_EQ(gc->rootfs_removed, 1u);
  EXPECT_FALSE(PathExists(*path));
}

}  // namespace
}  // namespace cella::registry

namespace cella::registry {
namespace {

using rootfs::testing::Compression;

// A relative symlink followed by entries beneath it used to create files
// wherever the link pointed (as root: anywhere on the host).
TEST(RegistryArchiveExtract, EntriesBeneathAPlantedSymlinkAreRefused) {
  testing::TempDir dir;
  const std::string outside = dir / "outside";
  ASSERT_EQ(::mkdir(outside.c_str(), 0755), 0);
  const std::string dest = dir / "dest";
  ASSERT_EQ(::mkdir(dest.c_str(), 0755), 0);
  {
    TarBuilder tar(dir / "evil.tar");
    tar.Symlink("x", "../outside");
    tar.File("x/planted", "owned");
    tar.Close();
  }
  auto r = ExtractImageArchive(dir / "evil.tar", dest);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("symlink"), std::string::npos) << r.error().message;
  EXPECT_FALSE(PathExists(outside + "/planted"));

  {
    TarBuilder tar(dir / "evil-dir.tar");
    tar.Symlink("a/b", "../../outside");
    tar.Dir("a/b/newdir");
    tar.File("a/b/newdir/f", "owned");
    tar.Close();
  }
  const std::string dest2 = dir / "dest2";
  ASSERT_EQ(::mkdir(dest2.c_str(), 0755), 0);
  EXPECT_FALSE(ExtractImageArchive(dir / "evil-dir.tar", dest2).has_value());
  EXPECT_FALSE(PathExists(outside + "/newdir"));
}

// Found by fuzz_archive_extract: a truncated gzip for which libarchive has
// no error message (NULL) crashed `cella import` building the error text.
TEST(RegistryArchiveExtract, AnErrorWithoutAMessageIsStillAnError) {
  testing::TempDir dir;
  static const unsigned char kTruncated[] = {
      0x1f, 0x8b, 0x08, 0x00, 0xf9, 0x29, 0x15, 0x6b, 0x02, 0xff, 0xed, 0xd4, 0xb1, 0x0a, 0xc2,
      0x30, 0x14, 0x40, 0xd1, 0x7c, 0x4a, 0xc9, 0xac, 0x35, 0xad, 0xb1, 0x42, 0xbf, 0xc1, 0xd9,
      0x45, 0x1c, 0x42, 0x1b, 0x35, 0x62, 0x5b, 0x31, 0x15, 0x15, 0xf1, 0xdf, 0x2d, 0x1d, 0x14,
      0x14, 0x71, 0xb2, 0x82, 0xde, 0xb3, 0xbc, 0x90, 0xe5, 0x2d, 0xb9, 0xa9, 0x32, 0xd7, 0xdf,
      0x98, 0x53, 0xb5, 0xaf, 0xc5, 0xc7, 0xa8, 0x46, 0xa2, 0x75, 0x3b, 0x1b, 0x8f, 0x53, 0xa9,
      0x61, 0x72, 0x3f, 0xb7, 0xf7, 0xe3, 0xf1, 0x48, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x40, 0x89,
      0x0e, 0xec, 0x7d, 0x6d, 0x76, 0xcd, 0x4a, 0xf1, 0x9f, 0xce, 0xd2, 0x15, 0x66, 0x69, 0x27,
      0xed, 0x13, 0x98, 0xda, 0x9d, 0x77, 0x55, 0x29, 0x53, 0x19, 0x85, 0x2a, 0x54, 0xf2, 0x22,
      0xf0, 0xe3, 0x5c, 0x99, 0xdb, 0x63, 0xb8, 0xf6, 0x55, 0xf9, 0xc5, 0x1c, 0xd2, 0x7f, 0x37,
      0xfd, 0xfb, 0x6c, 0x65, 0x0b, 0x73, 0x4b, 0x3f, 0xee, 0xc9, 0xc2, 0x94, 0x6e, 0x61, 0x7d,
      0xed, 0x65, 0x3a, 0x9b, 0xf3, 0x07, 0xfc, 0xb4, 0x55, 0x07, 0x3b, 0xde, 0xf6, 0xff, 0x78,
      0x8e, 0x85, 0x94, 0xc4, 0x22, 0x88, 0x06, 0xb6, 0x06, 0xb6, 0xce, 0x06, 0x5b, 0xe3, 0xfd,
      0x21, 0xa7, 0x7f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x5e,
      0xbb, 0x02, 0xea, 0x34, 0x9a, 0x0e, 0x00, 0x28};
  {
    std::ofstream out(dir / "truncated.tgz", std::ios::binary);
    out.write(reinterpret_cast<const char*>(kTruncated), sizeof kTruncated);
  }
  const std::string dest = dir / "dest";
  auto r = ExtractImageArchive(dir / "truncated.tgz", dest);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("truncated.tgz"), std::string::npos) << r.error().message;
}

TEST(RegistryArchiveExtract, LayerSharingSymlinksStillWork) {
  testing::TempDir dir;
  const std::string dest = dir / "dest";
  ASSERT_EQ(::mkdir(dest.c_str(), 0755), 0);
  {
    TarBuilder tar(dir / "saved.tar");
    tar.File("aaa/layer.tar", "layer");
    tar.Symlink("bbb/layer.tar", "../aaa/layer.tar");
    tar.Close();
  }
  auto r = ExtractImageArchive(dir / "saved.tar", dest);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  auto resolved = ResolveInside(dest, "bbb/layer.tar");
  ASSERT_TRUE(resolved.has_value()) << resolved.error().message;
}

TEST(RegistryArchiveExtract, DecompressionBombIsRefusedEarly) {
  testing::TempDir dir;
  const std::string dest = dir / "dest";
  ASSERT_EQ(::mkdir(dest.c_str(), 0755), 0);
  {
    TarBuilder tar(dir / "bomb.tar.gz", Compression::kGzip);
    tar.File("zeros", std::string(size_t{64} << 20, '\0'));
    tar.Close();
  }
  ExtractLimits limits{.max_ratio = 100, .ratio_floor_bytes = 1 << 20};
  auto r = ExtractImageArchive(dir / "bomb.tar.gz", dest, limits);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("decompression bomb"), std::string::npos) << r.error().message;
  struct stat archive {};
  ASSERT_EQ(::stat((dir / "bomb.tar.gz").c_str(), &archive), 0);
  struct stat st {};
  ASSERT_EQ(::stat((dest + "/zeros").c_str(), &st), 0);
  // Stopped at the ratio, far short of the 64 MiB the archive holds.
  EXPECT_LE(static_cast<uint64_t>(st.st_size), 100 * static_cast<uint64_t>(archive.st_size));
  EXPECT_LT(static_cast<uint64_t>(st.st_size), uint64_t{16} << 20);

  // The same archive passes under limits that allow its expansion.
  const std::string dest2 = dir / "dest2";
  ASSERT_EQ(::mkdir(dest2.c_str(), 0755), 0);
  EXPECT_TRUE(ExtractImageArchive(dir / "bomb.tar.gz", dest2).has_value());
}

// A one-file tar through libarchive's write filter `filter` (ARCHIVE_FILTER_*).
void WriteCompressedTar(const std::string& path, int filter, const std::string& body) {
  std::unique_ptr<archive, decltype(&archive_write_free)> a(archive_write_new(),
                                                            &archive_write_free);
  ASSERT_EQ(archive_write_set_format_pax_restricted(a.get()), ARCHIVE_OK);
  ASSERT_GE(archive_write_add_filter(a.get(), filter), ARCHIVE_WARN)
      << archive_error_string(a.get());
  ASSERT_EQ(archive_write_open_filename(a.get(), path.c_str()), ARCHIVE_OK);
  std::unique_ptr<archive_entry, decltype(&archive_entry_free)> e(archive_entry_new(),
                                                                  &archive_entry_free);
  archive_entry_set_pathname(e.get(), "manifest.json");
  archive_entry_set_filetype(e.get(), AE_IFREG);
  archive_entry_set_perm(e.get(), 0644);
  archive_entry_set_size(e.get(), static_cast<la_int64_t>(body.size()));
  ASSERT_EQ(archive_write_header(a.get(), e.get()), ARCHIVE_OK);
  ASSERT_EQ(archive_write_data(a.get(), body.data(), body.size()),
            static_cast<la_ssize_t>(body.size()));
  ASSERT_EQ(archive_write_close(a.get()), ARCHIVE_OK);
}

// `docker save | xz` and `| bzip2` import; a compression nobody saves images
// with (lzma-alone here) is refused rather than handed to one more parser.
TEST(RegistryArchiveExtract, TarIsReadPlainOrThroughTheCommonCompressorsOnly) {
  testing::TempDir dir;
  const std::string body = "[]";
  struct Case {
    const char* name;
    int filter;
    bool accepted;
  };
  for (const Case& c :
       {Case{"plain", ARCHIVE_FILTER_NONE, true}, Case{"xz", ARCHIVE_FILTER_XZ, true},
        Case{"bzip2", ARCHIVE_FILTER_BZIP2, true}, Case{"lzma", ARCHIVE_FILTER_LZMA, false}}) {
    SCOPED_TRACE(c.name);
    const std::string archive_path = dir / (std::string(c.name) + ".tar");
    WriteCompressedTar(archive_path, c.filter, body);
    const std::string dest = dir / (std::string(c.name) + "-dest");
    ASSERT_EQ(::mkdir(dest.c_str(), 0755), 0);
    auto r = ExtractImageArchive(archive_path, dest);
    EXPECT_EQ(r.has_value(), c.accepted) << (r ? std::string("extracted") : r.error().message);
    struct stat st {};
    EXPECT_EQ(::stat((dest + "/manifest.json").c_str(), &st) == 0, c.accepted);
  }
}

TEST_F(RegistryImageStoreTest, ImportRefusesManifestSymlinkLeadingOutside) {
  const std::string secret = work / "secret.json";
  { std::ofstream(secret) << "[]"; }
  {
    TarBuilder tar(work / "link.tar");
    tar.Symlink("manifest.json", "../../../../../../../../../.." + secret);
    tar.Close();
  }
  auto r = store.Import(work / "link.tar", *ParseReference("link/image"));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("outside"), std::string::npos) << r.error().message;
}

}  // namespace
}  // namespace cella::registry
