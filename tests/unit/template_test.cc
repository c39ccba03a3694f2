// Warm starts without a VM: the handshake lines, the template key, and the
// QEMU command lines of a template capture and of its clone.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "host/template/template_store.h"
#include "host/vmm/qemu_argv.h"
#include "protocol/warm.h"
#include "support/temp_dir.h"

namespace cella {
namespace {

TEST(WarmGo, RoundTripsClockAndSeed) {
  protocol::WarmGo go;
  go.realtime_ns = 1'765'000'000'123'456'789ull;
  for (size_t i = 0; i < protocol::kWarmSeedBytes; ++i) go.seed.push_back(uint8_t(i * 7 + 3));
  std::string line = protocol::FormatWarmGo(go);
  ASSERT_EQ(line.back(), '\n');
  EXPECT_LE(line.size(), protocol::kMaxWarmLine);
  auto parsed = protocol::ParseWarmGo(line);
  ASSERT_TRUE(parsed) << parsed.error().message;
  EXPECT_EQ(parsed->realtime_ns, go.realtime_ns);
  EXPECT_EQ(parsed->seed, go.seed);
}

TEST(WarmGo, CarriesTheConfigAfterTheLine) {
  protocol::WarmGo go;
  go.realtime_ns = 42;
  go.seed.assign(protocol::kWarmSeedBytes, 0xab);
  go.config_json = "{\"cmd\":[\"true\"],\n\"x\":1}";
  std::string text = protocol::FormatWarmGo(go);
  size_t nl = text.find('\n');
  ASSERT_NE(nl, std::string::npos);
  EXPECT_LE(nl + 1, protocol::kMaxWarmLine);
  EXPECT_EQ(text.substr(nl + 1), go.config_json);
  auto parsed = protocol::ParseWarmGo(text.substr(0, nl + 1));
  ASSERT_TRUE(parsed) << parsed.error().message;
  EXPECT_EQ(parsed->config_bytes, go.config_json.size());
  EXPECT_EQ(parsed->seed, go.seed);
  // Without a config the line has no size field, and means "none".
  go.config_json.clear();
  auto plain = protocol::ParseWarmGo(protocol::FormatWarmGo(go));
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->config_bytes, 0u);
  std::string seed(2 * protocol::kWarmSeedBytes, 'a');
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go 5 " + seed + " "));         // empty size
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go 5 " + seed + " 12x"));      // not a number
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go 5 " + seed + " 9999999"));  // over the bound
}

TEST(WarmGo, RefusesMalformedLines) {
  std::string seed(2 * protocol::kWarmSeedBytes, 'a');
  EXPECT_TRUE(protocol::ParseWarmGo("cella-go 5 " + seed + "\n"));
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go 5 " + seed.substr(2)));  // short seed
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go 5 " + seed + "ab"));     // long seed
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go x5 " + seed));           // bad clock
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go 0 " + seed));            // no clock
  EXPECT_FALSE(protocol::ParseWarmGo("cella-go 5 " + std::string(128, 'G')));
  EXPECT_FALSE(protocol::ParseWarmGo("cella-gone 5 " + seed));
  EXPECT_FALSE(protocol::ParseWarmGo(std::string(600, 'x')));
}

TEST(WarmGo, CmdlineFlagIsAWholeWord) {
  EXPECT_TRUE(protocol::CmdlineWantsTemplate("console=ttyS0 cella.template=1 quiet"));
  EXPECT_TRUE(protocol::CmdlineWantsTemplate("cella.template=1"));
  EXPECT_FALSE(protocol::CmdlineWantsTemplate("console=ttyS0 xcella.template=1"));
  EXPECT_FALSE(protocol::CmdlineWantsTemplate("cella.template=10"));
  EXPECT_TRUE(protocol::CmdlineWantsColdGo("console=ttyS0 cella.go=1"));
  EXPECT_FALSE(protocol::CmdlineWantsColdGo("console=ttyS0 cella.go=10 cella.template=1"));
}

class TemplateKeyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : {"vmlinuz", "initrd", "lower0.erofs", "other.erofs", "vol.img"})
      std::ofstream(dir_.path() + "/" + name) << name;
    vm_.ID = "sb1";
    vm_.KernelPath = dir_.path() + "/vmlinuz";
    vm_.InitramfsPath = dir_.path() + "/initrd";
    vm_.OverlayEnabled = true;
    vm_.OverlayLowerPaths = {dir_.path() + "/lower0.erofs"};
    vm_.OverlayLowerFSTypes = {"erofs"};
    vm_.OverlayUpperPath = dir_.path() + "/upper.img";
    vm_.ConfigDiskPath = dir_.path() + "/config.img";
    vm_.MemoryMB = 256;
    vm_.StateDir = dir_.path();
    options_.qemu_binary = "/bin/sh";  // any file: the key takes its identity
    options_.tsc_khz = 1000;
  }
  std::string Key(const vmm::VMConfig& vm) {
    auto shape = warm::ShapeText(vm, options_);
    EXPECT_TRUE(shape) << shape.error().message;
    return shape ? warm::KeyOf(*shape) : "";
  }
  testing::TempDir dir_;
  vmm::VMConfig vm_;
  vmm::QemuBackendOptions options_;
};

TEST_F(TemplateKeyTest, SandboxFilesDoNotChangeTheKeyButTheShapeDoes) {
  std::string key = Key(vm_);
  EXPECT_EQ(key.size(), 16u);
  vmm::VMConfig other = vm_;
  other.ID = "sb2";
  other.StateDir = "/elsewhere";
  other.OverlayUpperPath = "/elsewhere/upper.img";
  other.ConfigDiskPath = "/elsewhere/config.img";
  other.Hostname = "another";
  other.NetworkFD = 7;
  EXPECT_EQ(Key(other), key) << "a sandbox's own files and identity are not part of the key";

  auto changed = [&](auto&& mutate) {
    vmm::VMConfig v = vm_;
    mutate(v);
    return Key(v);
  };
  EXPECT_NE(changed([](vmm::VMConfig& v) { v.MemoryMB = 512; }), key);
  EXPECT_NE(changed([](vmm::VMConfig& v) { v.CPUs = 2; }), key);
  EXPECT_NE(changed([](vmm::VMConfig& v) { v.NoNetwork = true; }), key);
  EXPECT_NE(changed([](vmm::VMConfig& v) { v.OverlayUpperPath.clear(); }), key);
  EXPECT_NE(changed([&](vmm::VMConfig& v) {
              v.Volumes.push_back({dir_.path() + "/vol.img", "/d", false});
            }),
            key);
  EXPECT_NE(
      changed([&](vmm::VMConfig& v) { v.OverlayLowerPaths = {dir_.path() + "/other.erofs"}; }), key)
      << "another image";
  EXPECT_NE(changed([](vmm::VMConfig& v) { v.KernelArgs = "cella.debug=1"; }), key);
  // A rebuilt kernel (same path, new content) is a new key.
  std::ofstream(vm_.KernelPath) << "a rebuilt kernel";
  EXPECT_NE(Key(vm_), key);
}

TEST_F(TemplateKeyTest, ASeededUpperIsItsOwnKeyAndNamesTheDiskSize) {
  ASSERT_EQ(::truncate(vm_.OverlayUpperPath.c_str(), 0), -1);  // not there yet
  std::ofstream(vm_.OverlayUpperPath) << "";
  ASSERT_EQ(::truncate(vm_.OverlayUpperPath.c_str(), 64 << 20), 0);
  std::string plain = Key(vm_);
  vmm::VMConfig seeded = vm_;
  seeded.KernelArgs = std::string(protocol::kSeededUpperCmdlineFlag);
  std::string seeded_key = Key(seeded);
  EXPECT_NE(seeded_key, plain);
  auto shape = warm::ShapeText(seeded, options_);
  ASSERT_TRUE(shape);
  EXPECT_NE(shape->find("\ndisk upper rw seeded 67108864\n"), std::string::npos) << *shape;
  // The template's ext4 is the size of the sandbox's: another size, another key.
  ASSERT_EQ(::truncate(vm_.OverlayUpperPath.c_str(), 128 << 20), 0);
  EXPECT_NE(Key(seeded), seeded_key);
  EXPECT_EQ(Key(vm_), plain) << "an unseeded upper is attached as it is, whatever its size";
}

TEST_F(TemplateKeyTest, ASeededTemplateWithoutItsUpperDiskIsDamaged) {
  std::string home = dir_.path() + "/home";
  std::string shape = "format 1\ndisk upper rw seeded 4096\n";
  std::string key = warm::KeyOf(shape);
  std::string tdir = home + "/templates/" + key;
  ASSERT_EQ(::system(("mkdir -p " + tdir + " && truncate -s 256M " + tdir +
                      "/memory && echo state > " + tdir + "/state")
                         .c_str()),
            0);
  nlohmann::json manifest = {{"format", 1},      {"key", key},
                             {"shape", shape},   {"image", "/i.erofs"},
                             {"memory_mb", 256}, {"cpus", 1.0},
                             {"created", 1},     {"memory_bytes", 256 << 20},
                             {"state_bytes", 6}, {"upper_seed_bytes", 4096}};
  auto write_manifest = [&] { std::ofstream(tdir + "/manifest.json") << manifest.dump(); };
  write_manifest();
  ASSERT_EQ(::system(("truncate -s 4096 " + tdir + "/upper.seed").c_str()), 0);
  auto found = warm::Find(home, key);
  ASSERT_TRUE(found) << found.error().message;
  ASSERT_TRUE(found->has_value()) << "a whole seeded template is found";
  EXPECT_EQ((*found)->upper_seed, tdir + "/upper.seed");
  // A seed of another size: never cloned from.
  ASSERT_EQ(::system(("truncate -s 8192 " + tdir + "/upper.seed").c_str()), 0);
  auto resized = warm::Find(home, key);
  ASSERT_TRUE(resized);
  EXPECT_FALSE(resized->has_value());
  EXPECT_NE(::access(tdir.c_str(), F_OK), 0) << "removed";
  // No seed at all: the same.
  ASSERT_EQ(::system(("mkdir -p " + tdir + " && truncate -s 256M " + tdir +
                      "/memory && echo state > " + tdir + "/state")
                         .c_str()),
            0);
  write_manifest();
  auto seedless = warm::Find(home, key);
  ASSERT_TRUE(seedless);
  EXPECT_FALSE(seedless->has_value());
  EXPECT_NE(::access(tdir.c_str(), F_OK), 0) << "removed";
}

TEST_F(TemplateKeyTest, SharesAndSystemdBootCold) {
  EXPECT_EQ(warm::WhyCold(vm_, false), "");
  EXPECT_NE(warm::WhyCold(vm_, true), "");
  vmm::VMConfig shared = vm_;
  shared.Shares.push_back({"/s/fs0.sock", "cella-share0"});
  EXPECT_NE(warm::WhyCold(shared, false), "");
}

TEST_F(TemplateKeyTest, NoTemplateUntilCommitted) {
  std::string key = Key(vm_);
  std::string home = dir_.path() + "/home";
  auto none = warm::Find(home, key);
  ASSERT_TRUE(none) << none.error().message;
  EXPECT_FALSE(none->has_value());
  // A half-built template (a killed builder) is never found or listed.
  ASSERT_EQ(::system(("mkdir -p " + home + "/templates/" + key + ".partial.1 && touch " + home +
                      "/templates/" + key + ".partial.1/memory")
                         .c_str()),
            0);
  auto still_none = warm::Find(home, key);
  ASSERT_TRUE(still_none);
  EXPECT_FALSE(still_none->has_value());
  auto listed = warm::List(home);
  ASSERT_TRUE(listed);
  EXPECT_TRUE(listed->empty());
  // A committed directory whose files do not match its manifest is removed.
  ASSERT_EQ(::system(("mkdir -p " + home + "/templates/" + key + " && echo '{}' > " + home +
                      "/templates/" + key + "/manifest.json")
                         .c_str()),
            0);
  auto damaged = warm::Find(home, key);
  ASSERT_TRUE(damaged);
  EXPECT_FALSE(damaged->has_value());
  EXPECT_NE(::access((home + "/templates/" + key).c_str(), F_OK), 0);
  EXPECT_FALSE(warm::Find(home, "../../etc"));
}

TEST_F(TemplateKeyTest, CaptureAndCloneArgvMatchButForRam) {
  vmm::QemuLaunch l;
  l.agent_socket = "/s/a.sock";
  l.qmp_socket = "/s/q.sock";
  l.console_log = "/s/c.log";
  vmm::VMConfig capture = vm_;
  capture.Template = vmm::TemplateRole::kCapture;
  capture.TemplateMemoryPath = "/t/memory";
  capture.TemplateSaveUri = "exec:cat > /t/state";
  auto a = vmm::BuildQemuArgv(capture, l);
  ASSERT_TRUE(a) << a.error().message;
  warm::TemplateInfo t;
  t.dir = "/t";
  vmm::VMConfig clone = vm_;
  warm::MakeClone(t, clone);
  auto b = vmm::BuildQemuArgv(clone, l);
  ASSERT_TRUE(b) << b.error().message;
  auto find = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  EXPECT_TRUE(find(*a, "memory-backend-file,id=mem,share=on,mem-path=/t/memory,size=256M"));
  EXPECT_TRUE(find(*b, "memory-backend-file,id=mem,share=off,mem-path=/t/memory,size=256M"));
  EXPECT_TRUE(find(*b, "-incoming"));
  EXPECT_FALSE(find(*a, "-incoming"));
  auto append = [](const std::vector<std::string>& v) {
    return *(std::find(v.begin(), v.end(), "-append") + 1);
  };
  EXPECT_NE(append(*a).find("cella.template=1"), std::string::npos);
  EXPECT_EQ(append(*a), append(*b));
  vmm::VMConfig with_share = capture;
  with_share.Shares.push_back({"/s/fs0.sock", "cella-share0"});
  EXPECT_FALSE(vmm::BuildQemuArgv(with_share, l));
}

// A committed template (made by hand here) is listed until its image file
// is gone; then RemoveOrphans (what rmi and image gc call) removes it.
TEST_F(TemplateKeyTest, TemplatesOfRemovedImagesAreRemoved) {
  std::string home = dir_.path() + "/home";
  std::string shape = "format 1\nmemory_mb 1\n";
  std::string key = warm::KeyOf(shape);
  std::string tdir = home + "/templates/" + key;
  std::filesystem::create_directories(tdir);
  std::filesystem::resize_file((std::ofstream(tdir + "/memory"), tdir + "/memory"), 1024 * 1024);
  std::ofstream(tdir + "/state") << "0123456789";
  std::string image = dir_.path() + "/image.erofs";
  std::ofstream(image) << "image";
  nlohmann::json manifest = {
      {"format", 1},      {"key", key},  {"shape", shape}, {"image", image},
      {"memory_mb", 1},   {"cpus", 1.0}, {"created", 1},   {"memory_bytes", 1 << 20},
      {"state_bytes", 10}};
  std::ofstream(tdir + "/manifest.json") << manifest.dump();
  auto found = warm::Find(home, key);
  ASSERT_TRUE(found) << found.error().message;
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->image, image);
  auto kept = warm::RemoveOrphans(home);
  ASSERT_TRUE(kept);
  EXPECT_EQ(*kept, 0);
  std::filesystem::remove(image);
  auto removed = warm::RemoveOrphans(home);
  ASSERT_TRUE(removed) << removed.error().message;
  EXPECT_EQ(*removed, 1);
  auto listed = warm::List(home);
  ASSERT_TRUE(listed);
  EXPECT_TRUE(listed->empty());
}

// Remove takes the template away from its key in one rename before deleting
// it: a clone that has its files open reads them whole, nothing is left
// under the key's name, and what a killed removal leaves aside is swept.
TEST_F(TemplateKeyTest, RemoveTakesTheTemplateAsideBeforeDeletingIt) {
  std::string home = dir_.path() + "/home";
  std::string shape = "format 1\nmemory_mb 1\n";
  std::string key = warm::KeyOf(shape);
  std::string tdir = home + "/templates/" + key;
  std::filesystem::create_directories(tdir);
  std::ofstream(tdir + "/memory") << "the guest's memory";
  std::ofstream(tdir + "/state") << "0123456789";
  nlohmann::json manifest = {{"format", 1},  {"key", key},         {"shape", shape},
                             {"image", ""},  {"memory_mb", 1},     {"cpus", 1.0},
                             {"created", 1}, {"memory_bytes", 18}, {"state_bytes", 10}};
  std::ofstream(tdir + "/manifest.json") << manifest.dump();
  int clone = ::open((tdir + "/memory").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(clone, 0);
  ASSERT_TRUE(warm::Remove(home, key));
  char buf[64] = {};
  EXPECT_EQ(::pread(clone, buf, sizeof buf, 0), 18);
  EXPECT_EQ(std::string(buf), "the guest's memory");
  ::close(clone);
  for (const auto& e : std::filesystem::directory_iterator(home + "/templates"))
    EXPECT_FALSE(e.path().filename().string().starts_with(key + ".partial")) << e.path();
  EXPECT_FALSE(std::filesystem::exists(tdir));
  EXPECT_EQ(warm::Remove(home, key).error().errno_value, ENOENT);
  // A removal killed between its rename and its deletion.
  std::string aside = tdir + ".partial.removed-1-0";
  std::filesystem::create_directories(aside);
  std::ofstream(aside + "/memory") << "left";
  warm::RemoveStalePartials(home);
  EXPECT_FALSE(std::filesystem::exists(aside));
}

// A partial is stale when its key's build lock is free, whatever its pid
// says: here the pid is this (live) test process, as after a pid reuse.
TEST_F(TemplateKeyTest, StalePartialsAreFoundByTheLockNotByThePid) {
  std::string home = dir_.path() + "/home";
  std::string dir = home + "/templates";
  std::string key = "0123456789abcdef";
  std::string partial = dir + "/" + key + ".partial." + std::to_string(::getpid());
  std::filesystem::create_directories(partial);
  std::ofstream(partial + "/memory") << "half";
  // A builder holding the lock: its partial stays.
  int held = ::open((dir + "/" + key + ".lock").c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(held, 0);
  ASSERT_EQ(::flock(held, LOCK_EX | LOCK_NB), 0);
  warm::RemoveStalePartials(home);
  EXPECT_TRUE(std::filesystem::exists(partial));
  // The builder is gone (its lock released with it): the partial goes.
  ::close(held);
  warm::RemoveStalePartials(home);
  EXPECT_FALSE(std::filesystem::exists(partial));
  auto listed = warm::List(home);
  ASSERT_TRUE(listed);
  EXPECT_TRUE(listed->empty());
}

// Only a template proven bad is removed: one that cannot be read (here its
// manifest is a directory: EISDIR, standing for EIO, EMFILE...) is an
// error and stays.
TEST_F(TemplateKeyTest, FindKeepsATemplateItCannotRead) {
  std::string home = dir_.path() + "/home";
  std::string key = "fedcba9876543210";
  std::string tdir = home + "/templates/" + key;
  std::filesystem::create_directories(tdir + "/manifest.json");
  auto found = warm::Find(home, key);
  EXPECT_FALSE(found);
  EXPECT_TRUE(std::filesystem::exists(tdir));
  // Proven bad (no manifest in a committed directory): removed.
  std::filesystem::remove(tdir + "/manifest.json");
  auto damaged = warm::Find(home, key);
  ASSERT_TRUE(damaged) << damaged.error().message;
  EXPECT_FALSE(damaged->has_value());
  EXPECT_FALSE(std::filesystem::exists(tdir));
}

// Under KVM a template is only loadable on the host kernel and CPU it was
// made on; under TCG neither is part of the key (QEMU's own CPU model).
TEST_F(TemplateKeyTest, KvmKeysNameTheHostKernelAndCpu) {
  auto tcg = warm::ShapeText(vm_, options_);
  ASSERT_TRUE(tcg) << tcg.error().message;
  EXPECT_EQ(tcg->find("host_kernel "), std::string::npos);
  EXPECT_EQ(tcg->find("host_cpu "), std::string::npos);
  vmm::QemuBackendOptions kvm = options_;
  kvm.accel.chosen = vmm::Accel::kKvm;
  auto k = warm::ShapeText(vm_, kvm);
  ASSERT_TRUE(k) << k.error().message;
  utsname u{};
  ASSERT_EQ(::uname(&u), 0);
  EXPECT_NE(k->find("host_kernel " + std::string(u.release) + "\n"), std::string::npos) << *k;
  EXPECT_NE(k->find("host_cpu "), std::string::npos);
  EXPECT_NE(warm::KeyOf(*k), warm::KeyOf(*tcg));

  std::string a =
      "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon X\n"
      "flags\t\t: fpu sse avx2\n\nprocessor\t: 1\nflags\t\t: other\n";
  std::string b = a;
  b.replace(b.find("avx2"), 4, "avx5");
  EXPECT_EQ(warm::HostCpuIdentity(a).substr(0, 24), "GenuineIntel | Xeon X | ");
  EXPECT_NE(warm::HostCpuIdentity(a), warm::HostCpuIdentity(b));  // a flag differs
  EXPECT_EQ(warm::HostCpuIdentity(a), warm::HostCpuIdentity(a + "junk\n"));
}

}  // namespace
}  // namespace cella
