// Guest kernel manifest, module dependency ordering and the initramfs.
#include <archive.h>
#include <archive_entry.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "base/io.h"
#include "guest/init/format.h"
#include "host/kernel/initramfs.h"
#include "host/kernel/kernel.h"
#include "host/kernel/modules.h"
#include "host/os/digest.h"
#include "host/os/paths.h"

namespace cella::kernel {
namespace {

// The shape of Debian 6.1 cloud kernel's modules.dep (trimmed).
constexpr std::string_view kModulesDep =
    "kernel/drivers/virtio/virtio_ring.ko:\n"
    "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
    "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko "
    "kernel/drivers/virtio/virtio_ring.ko\n"
    "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko "
    "kernel/drivers/virtio/virtio_ring.ko\n"
    "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko "
    "kernel/drivers/virtio/virtio_ring.ko\n"
    "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "
    "kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko "
    "kernel/drivers/virtio/virtio_ring.ko\n"
    "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
    "kernel/net/core/failover.ko:\n"
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: "
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko "
    "kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n"
    "kernel/net/vmw_vsock/vsock.ko:\n"
    "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n"
    "kernel/lib/libcrc32c.ko:\n"
    "kernel/fs/overlayfs/overlay.ko:\n"
    "kernel/fs/fuse/fuse.ko:\n";
constexpr std::string_view kBuiltin = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n";

size_t IndexOf(const std::vector<std::string>& v, std::string_view name) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (ModuleNameFromPath(v[i]) == name) return i;
  }
  return v.size();
}

TEST(Modules, DefaultSetInDependencyOrder) {
  auto index = ParseModulesDep(kModulesDep, kBuiltin);
  ASSERT_TRUE(index) << index.error().message;
  auto wanted = DefaultGuestModules();
  auto order = ResolveLoadOrder(*index, wanted);
  ASSERT_TRUE(order) << order.error().message;
  // Every module once, after all of its dependencies.
  for (size_t i = 0; i < order->size(); ++i) {
    for (const std::string& dep : index->deps_by_path.at((*order)[i])) {
      size_t at = IndexOf(*order, ModuleNameFromPath(dep));
      ASSERT_LT(at, i) << dep << " must load before " << (*order)[i];
    }
  }
  std::vector<std::string> names;
  for (const auto& p : *order) names.push_back(ModuleNameFromPath(p));
  // No vsock, no virtio_pci: microvm gets neither device.
  EXPECT_EQ(names, (std::vector<std::string>{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk",
                                             "virtio_console", "libcrc32c", "erofs", "overlay",
                                             "failover", "net_failover", "virtio_net", "fuse"}));
  // ext4 is built in here: required but not listed; virtiofs is not a module
  // of this index (kIfModular).
  EXPECT_EQ(IndexOf(*order, "ext4"), order->size());
  EXPECT_EQ(IndexOf(*order, "virtiofs"), order->size());
}

TEST(Modules, GroupsSplitTheOrder) {
  auto index = ParseModulesDep(kModulesDep, kBuiltin);
  ASSERT_TRUE(index) << index.error().message;
  auto groups = ResolveLoadGroups(*index, DefaultGuestModules());
  ASSERT_TRUE(groups) << groups.error().message;
  auto names = [](const std::vector<std::string>& paths) {
    std::vector<std::string> out;
    for (const auto& p : paths) out.push_back(ModuleNameFromPath(p));
    return out;
  };
  ASSERT_EQ(groups->size(), 3u);
  EXPECT_EQ((*groups)[0].name, "");
  EXPECT_EQ(names((*groups)[0].paths),
            (std::vector<std::string>{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk",
                                      "virtio_console", "libcrc32c", "erofs", "overlay"}));
  // virtio_net's virtio deps are loaded at boot already: only what it adds.
  EXPECT_EQ((*groups)[1].name, kModuleGroupNetwork);
  EXPECT_EQ(names((*groups)[1].paths),
            (std::vector<std::string>{"failover", "net_failover", "virtio_net"}));
  EXPECT_EQ((*groups)[2].name, kModuleGroupShares);
  EXPECT_EQ(names((*groups)[2].paths), (std::vector<std::string>{"fuse"}));
  // The names are a contract with the guest init, which defers these.
  EXPECT_EQ(kModuleGroupNetwork, init::kModuleGroupNetwork);
  EXPECT_EQ(kModuleGroupShares, init::kModuleGroupShares);
  EXPECT_TRUE(init::ModuleGroupDeferrable(kModuleGroupNetwork));
  EXPECT_TRUE(init::ModuleGroupDeferrable(kModuleGroupShares));
  // Without a boot module the boot group is still first, and empty.
  std::vector<WantedModule> only_net = {{"virtio_net", Need::kRequired, "network"}};
  auto net = ResolveLoadGroups(*index, only_net);
  ASSERT_TRUE(net);
  ASSERT_EQ(net->size(), 2u);
  EXPECT_TRUE((*net)[0].paths.empty());
  EXPECT_EQ(names((*net)[1].paths), (std::vector<std::string>{"virtio_ring", "virtio", "failover",
                                                              "net_failover", "virtio_net"}));
}

TEST(Modules, MissingRequiredModuleIsAnError) {
  auto index = ParseModulesDep("kernel/a.ko:\n", "");
  ASSERT_TRUE(index);
  std::vector<WantedModule> wanted = {{"virtio_blk", Need::kRequired}};
  auto order = ResolveLoadOrder(*index, wanted);
  ASSERT_FALSE(order);
  EXPECT_NE(order.error().message.find("virtio_blk"), std::string::npos);
  wanted = {{"virtio_blk", Need::kIfModular}};
  EXPECT_TRUE(ResolveLoadOrder(*index, wanted).value().empty());
}

TEST(Modules, RejectsHostileAndBrokenIndexes) {
  EXPECT_FALSE(ParseModulesDep("../../etc/shadow.ko:\n", ""));
  EXPECT_FALSE(ParseModulesDep("/abs.ko:\n", ""));
  EXPECT_FALSE(ParseModulesDep("kernel/a.ko: ../b.ko\n", ""));
  EXPECT_FALSE(ParseModulesDep("no colon here\n", ""));
  auto dangling = ParseModulesDep("kernel/a.ko: kernel/b.ko\n", "");
  ASSERT_TRUE(dangling);
  std::vector<WantedModule> want_a = {{"a", Need::kRequired}};
  EXPECT_FALSE(ResolveLoadOrder(*dangling, want_a));
  auto compressed = ParseModulesDep("kernel/a.ko.xz:\n", "");
  ASSERT_TRUE(compressed);
  auto order = ResolveLoadOrder(*compressed, want_a);
  ASSERT_FALSE(order);
  EXPECT_NE(order.error().message.find("compressed"), std::string::npos);
}

TEST(Modules, NamesNormalised) {
  EXPECT_EQ(ModuleNameFromPath("kernel/drivers/net/virtio-net.ko"), "virtio_net");
  EXPECT_EQ(ModuleNameFromPath("kernel/fs/erofs/erofs.ko.zst"), "erofs");
}

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cella-kernel-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& rel, const std::string& content) {
    std::filesystem::create_directories(std::filesystem::path(dir_ + "/" + rel).parent_path());
    ASSERT_TRUE(WriteStringToFile(dir_ + "/" + rel, content, 0644));
  }
  std::string dir_;
};

TEST_F(TempDir, FindKernelExplainsWhatToRun) {
  auto k = FindKernel(dir_);
  ASSERT_FALSE(k);
  EXPECT_NE(k.error().message.find("fetch-kernel.sh"), std::string::npos) << k.error().message;
  EXPECT_EQ(k.error().errno_value, ENOENT);
}

TEST_F(TempDir, FindKernelReadsManifest) {
  Write("kernel/1/boot/vmlinuz", "bz");
  Write("kernel/1/lib/modules/6.1/modules.dep", "");
  Write("kernel/manifest",
        "package=linux-image-x\nversion=1\nkernel_release=6.1\n"
        "deb_sha256=ab\nvmlinuz=" +
            dir_ +
            "/kernel/1/boot/vmlinuz\n"
            "modules_dir=" +
            dir_ + "/kernel/1/lib/modules/6.1\n");
  auto k = FindKernel(dir_);
  ASSERT_TRUE(k) << k.error().message;
  EXPECT_EQ(k->vmlinuz, dir_ + "/kernel/1/boot/vmlinuz");
  EXPECT_EQ(k->release, "6.1");
  EXPECT_EQ(k->package, "linux-image-x");
  // A manifest pointing at a deleted kernel says how to repair it.
  std::filesystem::remove(dir_ + "/kernel/1/boot/vmlinuz");
  auto gone = FindKernel(dir_);
  ASSERT_FALSE(gone);
  EXPECT_NE(gone.error().message.find("fetch-kernel.sh"), std::string::npos);
}

TEST_F(TempDir, KernelOverrideNeedsNoManifest) {
  Write("my/bzImage", "bz");
  auto k = FindKernel(dir_, KernelOverride{dir_ + "/my/bzImage", ""});
  ASSERT_TRUE(k) << k.error().message;
  EXPECT_TRUE(k->modules_dir.empty());
  EXPECT_FALSE(FindKernel(dir_, KernelOverride{dir_ + "/my/missing", ""}));
  EXPECT_FALSE(FindKernel(dir_, KernelOverride{dir_ + "/my/bzImage", dir_ + "/nomods"}));
}

TEST(KernelManifest, RejectsBadLines) {
  EXPECT_FALSE(ParseKernelManifest("vmlinuz\n"));
  EXPECT_FALSE(ParseKernelManifest("version=1\n"));  // no vmlinuz
  EXPECT_FALSE(ParseKernelManifest("vmlinuz=relative/path\n"));
}

struct CpioEntry {
  mode_t mode;
  int64_t uid, gid, mtime, size;
  std::string content;
};

std::map<std::string, CpioEntry> ReadCpio(const std::string& path) {
  std::map<std::string, CpioEntry> out;
  archive* a = archive_read_new();
  archive_read_support_format_cpio(a);
  archive_read_support_filter_all(a);
  EXPECT_EQ(archive_read_open_filename(a, path.c_str(), 16384), ARCHIVE_OK);
  archive_entry* e;
  while (archive_read_next_header(a, &e) == ARCHIVE_OK) {
    CpioEntry ce{archive_entry_mode(e),  archive_entry_uid(e),  archive_entry_gid(e),
                 archive_entry_mtime(e), archive_entry_size(e), {}};
    ce.content.resize(static_cast<size_t>(ce.size));
    if (ce.size > 0) archive_read_data(a, ce.content.data(), ce.content.size());
    out[archive_entry_pathname(e)] = ce;
  }
  archive_read_free(a);
  return out;
}

class Initramfs : public TempDir {
 protected:
  void SetUp() override {
    TempDir::SetUp();
    Write("bin/init", "INIT-v1");
    Write("bin/agent", "AGENT");
    Write("mods/6.1-test/modules.dep", std::string(kModulesDep));
    Write("mods/6.1-test/modules.builtin", std::string(kBuiltin));
    auto index = ParseModulesDep(kModulesDep, "");
    for (const auto& [path, deps] : index->deps_by_path) {
      Write("mods/6.1-test/" + path, "module " + path);
    }
    spec_.init_binary = dir_ + "/bin/init";
    spec_.agent_binary = dir_ + "/bin/agent";
    spec_.modules_dir = dir_ + "/mods/6.1-test";
    home_ = dir_ + "/home";
  }
  InitramfsSpec spec_;
  std::string home_;
};

TEST_F(Initramfs, ContentsAndLoadOrder) {
  spec_.compression = InitramfsCompression::kGzip;
  auto file = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(file) << file.error().message;
  EXPECT_TRUE(file->built);
  EXPECT_TRUE(file->path.starts_with(host::InitramfsCacheDir(home_) + "/"));
  EXPECT_TRUE(file->path.ends_with(".cpio.gz"));
  auto entries = ReadCpio(file->path);
  ASSERT_TRUE(entries.contains("init"));
  EXPECT_EQ(entries["init"].content, "INIT-v1");
  EXPECT_EQ(entries["init"].mode & 07777, 0755u);
  EXPECT_EQ(entries["cella-agent"].content, "AGENT");
  EXPECT_TRUE(S_ISCHR(entries["dev/console"].mode));
  std::string order = entries["lib/modules/cella.order"].content;
  EXPECT_EQ(order.substr(0, order.find('\n')),
            "/lib/modules/6.1-test/kernel/drivers/virtio/virtio_ring.ko");
  // Each listed module is in the archive, in the listed order; the optional
  // groups follow the boot group under their headers.
  size_t count = 0;
  std::vector<std::string> headers;
  for (size_t pos = 0; pos < order.size();) {
    size_t nl = order.find('\n', pos);
    std::string path = order.substr(pos, nl - pos);
    pos = nl + 1;
    if (path.starts_with("@")) {
      headers.push_back(path);
      continue;
    }
    ASSERT_TRUE(entries.contains(path.substr(1))) << path;
    EXPECT_EQ(file->load_order[count++], path);
  }
  EXPECT_EQ(count, 12u);
  EXPECT_EQ(headers, (std::vector<std::string>{"@network", "@shares"}));
  EXPECT_TRUE(entries.contains("lib/modules/6.1-test/kernel/fs/fuse/fuse.ko"));
  EXPECT_FALSE(entries.contains("lib/modules/6.1-test/kernel/net/vmw_vsock/vsock.ko"));
  for (const auto& [path, e] : entries) {
    EXPECT_EQ(e.uid, 0) << path;
    EXPECT_EQ(e.gid, 0) << path;
    EXPECT_EQ(e.mtime, 0) << path;
  }
}

// What scripts/sign-file appends: the signature, struct module_signature
// (id_type 2 = PKCS#7, the signature's length big-endian last), the marker.
std::string Signed(const std::string& module, size_t signature_bytes) {
  std::string info(12, '\0');
  info[2] = 2;
  info[8] = static_cast<char>((signature_bytes >> 24) & 0xff);
  info[9] = static_cast<char>((signature_bytes >> 16) & 0xff);
  info[10] = static_cast<char>((signature_bytes >> 8) & 0xff);
  info[11] = static_cast<char>(signature_bytes & 0xff);
  return module + std::string(signature_bytes, 'S') + info + "~Module signature appended~\n";
}

TEST(Modules, TheAppendedSignatureIsMeasuredOff) {
  std::string module =
      "\x7f"
      "ELF module bytes";
  std::string file = Signed(module, 681);
  EXPECT_EQ(UnsignedModuleSize(file.substr(file.size() - kModuleTrailerBytes), file.size()),
            module.size());
  // Unsigned: as it is, however short.
  EXPECT_EQ(UnsignedModuleSize(module, module.size()), module.size());
  EXPECT_EQ(UnsignedModuleSize("", 0), size_t{0});
  // A stated length that runs past the file is refused.
  std::string tail = file.substr(file.size() - kModuleTrailerBytes);
  EXPECT_FALSE(UnsignedModuleSize(tail, kModuleTrailerBytes + 680).has_value());
  EXPECT_EQ(UnsignedModuleSize(tail, kModuleTrailerBytes + 681), size_t{0});
  std::string huge = Signed("", 0);
  huge[huge.size() - 32] = '\x7f';  // the length's top byte (info[8])
  EXPECT_FALSE(UnsignedModuleSize(huge, huge.size()).has_value());
}

TEST_F(Initramfs, ModulesGoInWithoutTheirSignaturesOnlyWhenAsked) {
  const std::string rel = "kernel/fs/erofs/erofs.ko";
  const std::string signed_module = Signed("module erofs", 100);
  Write("mods/6.1-test/" + rel, signed_module);
  auto kept = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(kept) << kept.error().message;
  EXPECT_EQ(ReadCpio(kept->path)["lib/modules/6.1-test/" + rel].content, signed_module);
  spec_.strip_module_signatures = true;
  auto file = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(file) << file.error().message;
  EXPECT_NE(file->path, kept->path);
  auto entries = ReadCpio(file->path);
  EXPECT_EQ(entries["lib/modules/6.1-test/" + rel].content, "module erofs");
  // Signed again with another signature: the same module bytes go in.
  Write("mods/6.1-test/" + rel, Signed("module erofs", 90));
  auto again = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(ReadCpio(again->path)["lib/modules/6.1-test/" + rel].content, "module erofs");
}

TEST_F(TempDir, UnsignedModulesOnlyForAKernelThatDoesNotEnforceSignatures) {
  KernelInfo k;
  k.vmlinuz = dir_ + "/boot/vmlinuz-6.1-test";
  k.release = "6.1-test";
  Write("boot/vmlinuz-6.1-test", "bzImage");
  EXPECT_FALSE(KernelAcceptsUnsignedModules(k)) << "no config: keep the signatures";
  Write("boot/config-6.1-test", "CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n");
  EXPECT_TRUE(KernelAcceptsUnsignedModules(k));
  Write("boot/config-6.1-test", "CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\n");
  EXPECT_FALSE(KernelAcceptsUnsignedModules(k));
}

TEST_F(Initramfs, ReproducibleAndCachedByContent) {
  spec_.compression = InitramfsCompression::kGzip;
  auto first = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(first) << first.error().message;
  auto again = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(again);
  EXPECT_FALSE(again->built);
  EXPECT_EQ(again->path, first->path);

  // Written twice from scratch, the bytes are identical (gzip header
  // carries no timestamp).
  auto a = WriteInitramfs(spec_, dir_ + "/a.cpio.gz");
  ASSERT_TRUE(a) << a.error().message;
  ::sleep(1);
  auto b = WriteInitramfs(spec_, dir_ + "/b.cpio.gz");
  ASSERT_TRUE(b);
  std::string bytes_a = ReadFileToString(a->path, 1 << 24).value();
  EXPECT_EQ(bytes_a, ReadFileToString(b->path, 1 << 24).value());
  EXPECT_EQ(bytes_a, ReadFileToString(first->path, 1 << 24).value());

  // A rebuilt init gives a new archive.
  Write("bin/init", "INIT-v2");
  auto rebuilt = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(rebuilt);
  EXPECT_TRUE(rebuilt->built);
  EXPECT_NE(rebuilt->path, first->path);
  EXPECT_EQ(ReadCpio(rebuilt->path)["init"].content, "INIT-v2");
}

// `image gc` prunes the cache: an entry whose file is gone or changed can
// never be hit again; the entry of an unchanged file stays and still hits.
TEST_F(TempDir, PruningTheDigestCacheKeepsOnlyEntriesThatCanHit) {
  std::string cache = dir_ + "/digests";
  const std::string settled = "/bin/sh";  // unchanged for long: remembered
  auto direct = host::Sha256OfFile(settled);
  ASSERT_TRUE(direct) << direct.error().message;
  ASSERT_TRUE(host::CachedSha256OfFile(settled, cache));
  std::vector<std::string> kept;
  for (const auto& e : std::filesystem::directory_iterator(cache))
    kept.push_back(e.path().filename().string());
  ASSERT_EQ(kept.size(), 1u);
  const std::string digest(64, 'a');
  auto entry = [&](const std::string& name, const std::string& text) {
    ASSERT_TRUE(WriteStringToFile(cache + "/" + name, text, 0644));
  };
  // Gone: its file was removed. Changed: the path exists, the identity is
  // another. Older form: no path. Not the cache's: left alone.
  entry(std::string(64, '1'), digest + "\n" + dir_ + "/removed-long-ago\n");
  entry(std::string(64, '2'), digest + "\n" + settled + "\n");
  entry(std::string(64, '3'), digest + "\n");
  entry("README", "mine\n");
  auto pruned = host::PruneDigestCache(cache);
  ASSERT_TRUE(pruned) << pruned.error().message;
  EXPECT_EQ(*pruned, 3u);
  std::set<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(cache))
    left.insert(e.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{kept[0], "README"}));
  auto again = host::CachedSha256OfFile(settled, cache);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *direct);
  auto none = host::PruneDigestCache(dir_ + "/no-such-cache");
  ASSERT_TRUE(none);
  EXPECT_EQ(*none, 0u);
}

// The initramfs key hashes its inputs through this cache on every run.
TEST_F(TempDir, CachedDigestIsNeverStale) {
  std::string cache = dir_ + "/digests";
  std::string file = dir_ + "/input";
  Write("input", "first content");
  auto first = host::CachedSha256OfFile(file, cache);
  ASSERT_TRUE(first) << first.error().message;
  EXPECT_EQ(*first, host::Sha256Hex("first content"));
  // Same size, rewritten at once: the new content's digest, not a cached one.
  Write("input", "other content");
  auto second = host::CachedSha256OfFile(file, cache);
  ASSERT_TRUE(second) << second.error().message;
  EXPECT_EQ(*second, host::Sha256Hex("other content"));
  EXPECT_FALSE(host::CachedSha256OfFile(dir_ + "/missing", cache));

  // A file that has not changed for long (a system binary) is remembered,
  // and the remembered digest is its content's.
  const std::string settled = "/bin/sh";
  auto direct = host::Sha256OfFile(settled);
  ASSERT_TRUE(direct) << direct.error().message;
  auto cached = host::CachedSha256OfFile(settled, cache);
  ASSERT_TRUE(cached) << cached.error().message;
  EXPECT_EQ(*cached, *direct);
  size_t entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(cache)) entries += e.is_regular_file();
  EXPECT_EQ(entries, 1u);
  auto again = host::CachedSha256OfFile(settled, cache);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *direct);
}

TEST_F(Initramfs, UncompressedIsPlainNewc) {
  spec_.compression = InitramfsCompression::kNone;
  auto file = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(file) << file.error().message;
  EXPECT_TRUE(file->path.ends_with(".cpio"));
  spec_.compression = InitramfsCompression::kGzip;
  auto gz = EnsureInitramfs(home_, spec_);
  ASSERT_TRUE(gz);
  // The compression is part of the cache key, not just the file suffix.
  EXPECT_NE(gz->path.substr(0, gz->path.find('.')), file->path.substr(0, file->path.find('.')));
  std::string bytes = ReadFileToString(file->path, 1 << 24).value();
  EXPECT_EQ(bytes.substr(0, 6), "070701");  // newc magic
}

TEST_F(Initramfs, MissingInputsNamed) {
  spec_.init_binary = dir_ + "/bin/nope";
  auto file = EnsureInitramfs(home_, spec_);
  ASSERT_FALSE(file);
  EXPECT_NE(file.error().message.find("/bin/nope"), std::string::npos);
}

}  // namespace
}  // namespace cella::kernel
