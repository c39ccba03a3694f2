// Host shares without a VM: -v parsing (host path or named volume, relative
// paths, files, missing paths), the spec and config.json round trips, the
// QEMU devices and shared memory, and virtiofsd's argv. The daemon itself is
// exercised end to end in tests/e2e/share_test.cc.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/run_options.h"
#include "host/rpc/params.h"
#include "host/sandbox/compose.h"
#include "host/sandbox/share.h"
#include "host/sandbox/spec.h"
#include "host/vmm/qemu_argv.h"
#include "protocol/config.h"
#include "support/temp_dir.h"

namespace cella {
namespace {

using protocol::MountMode;

bool Contains(const std::vector<std::string>& v, const std::string& item) {
  return std::find(v.begin(), v.end(), item) != v.end();
}

TEST(MountFlag, HostPathsNamedVolumesAndModes) {
  testing::TempDir dir;
  std::filesystem::create_directories(dir / "src/sub");
  std::ofstream(dir / "file.txt") << "x";
  std::filesystem::create_symlink(dir / "src", dir / "link");

  auto abs = cli::ParseMountFlag(dir / "src:/work", "/");
  ASSERT_TRUE(abs) << abs.error().message;
  EXPECT_TRUE(abs->is_host);
  EXPECT_FALSE(abs->is_file);
  EXPECT_EQ(abs->host_path, dir / "src");
  EXPECT_EQ(abs->guest_path, "/work");
  EXPECT_EQ(abs->mode, MountMode::kReadWrite);

  // Relative to the caller's directory, as docker; symlinks resolved.
  auto rel = cli::ParseMountFlag("./src/sub:/w:ro", dir.path());
  ASSERT_TRUE(rel) << rel.error().message;
  EXPECT_EQ(rel->host_path, dir / "src/sub");
  EXPECT_EQ(rel->mode, MountMode::kReadOnly);
  auto dotdot = cli::ParseMountFlag(
      "../../" + std::filesystem::path(dir.path()).filename().string() + "/link:/w/:overlay",
      dir / "src");
  ASSERT_TRUE(dotdot) << dotdot.error().message;
  EXPECT_EQ(dotdot->host_path, dir / "src");
  EXPECT_EQ(dotdot->guest_path, "/w");
  EXPECT_EQ(dotdot->mode, MountMode::kOverlay);
  auto dot = cli::ParseMountFlag(".:/w", dir.path());
  ASSERT_TRUE(dot) << dot.error().message;
  EXPECT_EQ(dot->host_path, dir.path());

  auto file = cli::ParseMountFlag(dir / "file.txt:/etc/app.conf:ro", "/");
  ASSERT_TRUE(file) << file.error().message;
  EXPECT_TRUE(file->is_file);

  // No slash: a named volume, as before.
  auto named = cli::ParseMountFlag("data:/data:overlay", dir.path());
  ASSERT_TRUE(named) << named.error().message;
  EXPECT_FALSE(named->is_host);
  EXPECT_EQ(named->name, "data");
  EXPECT_EQ(named->mode, MountMode::kOverlay);
}

// docker's option lists, as typed in docker run and compose files.
TEST(MountFlag, DockersOptionListsAreTakenAndThoseThatMeanNothingHereChangeNothing) {
  testing::TempDir dir;
  auto relabelled = cli::ParseMountFlag(dir.path() + ":/w:ro,z", "/");
  ASSERT_TRUE(relabelled) << relabelled.error().message;
  EXPECT_EQ(relabelled->mode, MountMode::kReadOnly);
  for (const char* options :
       {"z", "Z", "cached", "delegated", "consistent", "rw,cached", "Z,rprivate", "private"}) {
    auto m = cli::ParseMountFlag(dir.path() + ":/w:" + options, "/");
    ASSERT_TRUE(m) << options << ": " << m.error().message;
    EXPECT_EQ(m->mode, MountMode::kReadWrite) << options;
  }
  auto overlay = cli::ParseMountFlag(dir.path() + ":/w:cached,overlay", "/");
  ASSERT_TRUE(overlay) << overlay.error().message;
  EXPECT_EQ(overlay->mode, MountMode::kOverlay);
  auto volume = cli::ParseMountFlag("cache:/w:nocopy", "/");
  ASSERT_TRUE(volume) << volume.error().message;
  EXPECT_EQ(volume->name, "cache");

  auto two = cli::ParseMountFlag(dir.path() + ":/w:ro,rw", "/");
  ASSERT_FALSE(two);
  EXPECT_NE(two.error().message.find("more than one access mode"), std::string::npos)
      << two.error().message;
  auto shared = cli::ParseMountFlag(dir.path() + ":/w:rshared", "/");
  ASSERT_FALSE(shared);
  EXPECT_NE(shared.error().message.find("not supported"), std::string::npos)
      << shared.error().message;
  EXPECT_FALSE(cli::ParseMountFlag(dir.path() + ":/w:nocopy", "/"));  // named volumes only
  EXPECT_FALSE(cli::ParseMountFlag(dir.path() + ":/w:ro,", "/"));     // an empty option
}

TEST(MountFlag, MistakesAreNamedBeforeAnythingBoots) {
  testing::TempDir dir;
  auto missing = cli::ParseMountFlag("./nope:/w", dir.path());
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find(dir / "nope does not exist"), std::string::npos)
      << missing.error().message;
  EXPECT_FALSE(cli::ParseMountFlag(dir.path() + ":relative", "/"));
  EXPECT_FALSE(cli::ParseMountFlag(dir.path() + ":/", "/"));
  EXPECT_FALSE(cli::ParseMountFlag(dir.path() + ":/w/../x", "/"));
  auto mode = cli::ParseMountFlag(dir.path() + ":/w:rx", "/");
  ASSERT_FALSE(mode);
  EXPECT_NE(mode.error().message.find("unknown option \"rx\""), std::string::npos)
      << mode.error().message;
  // A bare absolute path is docker's anonymous volume at that guest path,
  // whatever exists on the host there.
  auto bare = cli::ParseMountFlag(dir.path(), "/");
  ASSERT_TRUE(bare) << bare.error().message;
  EXPECT_TRUE(bare->anonymous && !bare->is_host);
  auto device = cli::ParseMountFlag("/dev/null:/n", "/");
  ASSERT_FALSE(device);
  EXPECT_NE(device.error().message.find("neither a directory nor a regular file"),
            std::string::npos);
}

TEST(HostShares, SpecAndConfigRoundTrip) {
  sandbox::SandboxSpec spec;
  spec.shares.push_back({"/home/u/src", "/work", MountMode::kOverlay, false});
  spec.shares.push_back({"/home/u/app.conf", "/etc/app.conf", MountMode::kReadOnly, true});
  auto back = sandbox::DecodeSpec(sandbox::EncodeSpec(spec));
  ASSERT_TRUE(back) << back.error().message;
  ASSERT_EQ(back->shares.size(), 2u);
  EXPECT_EQ(back->shares[0].host_path, "/home/u/src");
  EXPECT_EQ(back->shares[0].mode, MountMode::kOverlay);
  EXPECT_TRUE(back->shares[1].is_file);

  // Both halves from one call: device tags and config.json entries agree.
  protocol::Config guest;
  vmm::VMConfig vm;
  ASSERT_TRUE(
      sandbox::AttachShares({{"/s/fs0.sock", "/work", MountMode::kReadWrite, ""},
                             {"/s/fs1.sock", "/etc/app.conf", MountMode::kReadOnly, "app.conf"}},
                            guest, vm));
  ASSERT_EQ(vm.Shares.size(), 2u);
  ASSERT_EQ(guest.host_shares.size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(vm.Shares[i].Tag, guest.host_shares[i].tag);
  EXPECT_EQ(guest.host_shares[1].file, "app.conf");
  auto parsed = protocol::ParseConfig(protocol::SerializeConfig(guest));
  ASSERT_TRUE(parsed) << parsed.error().message;
  EXPECT_EQ(parsed->host_shares, guest.host_shares);

  // FUSE shares get no device, only their config entry (mounted by the
  // agent on serve_share); overlay is never FUSE.
  protocol::Config fuse_guest;
  vmm::VMConfig fuse_vm;
  ASSERT_TRUE(sandbox::AttachShares({{"", "/work", MountMode::kReadWrite, "", true},
                                     {"/s/fs1.sock", "/ov", MountMode::kOverlay, ""},
                                     {"", "/etc/app.conf", MountMode::kReadOnly, "app.conf", true}},
                                    fuse_guest, fuse_vm));
  ASSERT_EQ(fuse_vm.Shares.size(), 1u);
  EXPECT_EQ(fuse_vm.Shares[0].Tag, fuse_guest.host_shares[1].tag);
  EXPECT_TRUE(fuse_guest.host_shares[0].fuse);
  EXPECT_FALSE(fuse_guest.host_shares[1].fuse);
  auto fuse_parsed = protocol::ParseConfig(protocol::SerializeConfig(fuse_guest));
  ASSERT_TRUE(fuse_parsed) << fuse_parsed.error().message;
  EXPECT_EQ(fuse_parsed->host_shares, fuse_guest.host_shares);
  // Overlay shares are served over FUSE too (read-only; the guest's
  // overlayfs keeps its writes).
  fuse_guest.host_shares[1].fuse = true;
  EXPECT_TRUE(protocol::ValidateConfig(fuse_guest));

  // The guest is told nothing it could misuse as a mount source or path.
  protocol::Config bad = guest;
  bad.host_shares[0].tag = "a,b";
  EXPECT_FALSE(protocol::ValidateConfig(bad));
  bad = guest;
  bad.host_shares[1].file = "../x";
  EXPECT_FALSE(protocol::ValidateConfig(bad));
  bad = guest;
  bad.host_shares[1].path = "/work";  // two mounts on one path
  EXPECT_FALSE(protocol::ValidateConfig(bad));
}

TEST(HostShares, QemuSharesGuestMemoryOnlyWithShares) {
  vmm::VMConfig c;
  c.KernelPath = "/k/vmlinuz";
  c.InitramfsPath = "/k/initrd";
  c.RootfsPath = "/r.erofs";
  c.MemoryMB = 256;
  c.StateDir = "/s";
  vmm::QemuLaunch l;
  l.agent_socket = "/s/a.sock";
  l.qmp_socket = "/s/q.sock";
  l.console_log = "/s/c.log";
  auto plain = vmm::BuildQemuArgv(c, l);
  ASSERT_TRUE(plain) << plain.error().message;
  EXPECT_TRUE(Contains(*plain, "microvm,memory-backend=mem"));
  EXPECT_TRUE(Contains(*plain, "memory-backend-ram,id=mem,size=256M"));

  int transports = vmm::CountVirtioTransports(c);
  c.Shares.push_back({"/s/fs0.sock", "cella-share0"});
  EXPECT_EQ(vmm::CountVirtioTransports(c), transports + 1);
  auto shared = vmm::BuildQemuArgv(c, l);
  ASSERT_TRUE(shared) << shared.error().message;
  EXPECT_TRUE(Contains(*shared, "memory-backend-memfd,id=mem,share=on,size=256M"));
  EXPECT_TRUE(Contains(*shared, "microvm,memory-backend=mem"));
  EXPECT_TRUE(Contains(*shared, "socket,id=fs0,path=/s/fs0.sock"));
  EXPECT_TRUE(Contains(*shared, "vhost-user-fs-device,chardev=fs0,tag=cella-share0"));

  c.Shares[0].SocketPath = "relative.sock";
  EXPECT_FALSE(vmm::BuildQemuArgv(c, l));
}

TEST(HostShares, VirtiofsdIsConfinedAndBounded) {
  sandbox::ShareDaemonOptions o;
  o.stage_dir = "/s/share0";
  o.socket_path = "/s/fs0.sock";
  auto argv = sandbox::VirtiofsdArgv(o);
  EXPECT_EQ(argv[0], sandbox::kDefaultVirtiofsd);
  EXPECT_TRUE(Contains(argv, "source=/s/share0"));
  EXPECT_TRUE(Contains(argv, "--socket-path=/s/fs0.sock"));
  EXPECT_TRUE(Contains(argv, "sandbox=namespace"));
  EXPECT_TRUE(Contains(argv, "modcaps=-mknod:-setfcap:-fsetid"));
  EXPECT_TRUE(Contains(argv, "no_xattr"));
  EXPECT_TRUE(Contains(argv, "cache=auto"));
  EXPECT_TRUE(Contains(argv, "--rlimit-nofile=" + std::to_string(sandbox::kShareMaxFds)));
}

// A shared path whose component became a symlink since the sandbox was
// created (a guest with another rw share can do that) is refused before
// any daemon starts: the bind must never follow it out.
TEST(HostShares, APathThatGrewASymlinkIsRefusedAtStart) {
  testing::TempDir dir("cella-share");
  std::filesystem::create_directories(dir / "data/sub");
  std::filesystem::create_directories(dir / "secret");
  sandbox::ShareDaemonOptions options;
  options.virtiofsd = "/bin/false";  // never reached
  options.stage_dir = dir / "stage";
  options.socket_path = dir / "fs.sock";
  options.log_path = dir / "virtiofsd.log";
  std::filesystem::create_directories(options.stage_dir);
  // The guest swaps data/sub for a symlink to somewhere else on the host.
  std::filesystem::remove(dir / "data/sub");
  std::filesystem::create_directory_symlink(dir / "secret", dir / "data/sub");
  options.host_path = dir / "data/sub";
  auto daemon = sandbox::ShareDaemon::Start(options);
  ASSERT_FALSE(daemon.has_value());
  EXPECT_NE(daemon.error().message.find("is a symlink"), std::string::npos)
      << daemon.error().message;
  // A file share whose file became a symlink (to /etc/shadow, say) too.
  std::ofstream(dir / "data/f") << "x";
  std::filesystem::remove(dir / "data/f");
  std::filesystem::create_symlink("/etc/shadow", dir / "data/f");
  options.host_path = dir / "data/f";
  options.is_file = true;
  daemon = sandbox::ShareDaemon::Start(options);
  ASSERT_FALSE(daemon.has_value());
  EXPECT_NE(daemon.error().message.find("is a symlink"), std::string::npos)
      << daemon.error().message;
}

TEST(HostShares, MatchlockVfsBecomesShares) {
  auto parsed = rpc::ParseCreateParams(nlohmann::json::parse(R"({
    "image": "alpine",
    "vfs": {
      "workspace": "/workspace",
      "mounts": {
        "/workspace": {"type": "host_fs", "host_path": "/home/u/proj"},
        "/workspace/ref": {"type": "host_fs", "host_path": "/home/u/ref", "readonly": true},
        "/workspace/scratch": {"type": "overlay", "lower": {"type": "host_fs", "host_path": "/d"},
                               "upper": {"type": "memory"}}
      },
      "direct_mounts": {"/etc/app.toml": {"host_path": "/home/u/app.toml", "readonly": true}}
    }})"));
  ASSERT_TRUE(parsed) << parsed.error().message;
  std::vector<std::string> got;
  for (const auto& s : parsed->shares)
    got.push_back(s.host_path + ":" + s.guest_path + ":" + s.mode);
  std::sort(got.begin(), got.end());
  EXPECT_EQ(got, (std::vector<std::string>{
                     "/d:/workspace/scratch:overlay", "/home/u/app.toml:/etc/app.toml:ro",
                     "/home/u/proj:/workspace:rw", "/home/u/ref:/workspace/ref:ro"}));

  auto refused = [](const char* vfs) {
    auto r = rpc::ParseCreateParams(
        nlohmann::json::parse(std::string(R"({"image":"alpine","vfs":)") + vfs + "}"));
    return r ? std::string() : r.error().message;
  };
  // type memory is a tmpfs in the guest.
  auto memory = rpc::ParseCreateParams(nlohmann::json::parse(
      R"({"image":"alpine","vfs":{"workspace":"/w","mounts":{"/w/tmp":{"type":"memory"}}}})"));
  ASSERT_TRUE(memory) << memory.error().message;
  EXPECT_EQ(memory->memory_mounts, std::vector<std::string>{"/w/tmp"});
  EXPECT_TRUE(memory->shares.empty());
  EXPECT_NE(refused(R"({"workspace":"/w","mounts":{"/x":{"type":"host_fs","host_path":"/h"}}})")
                .find("under vfs.workspace"),
            std::string::npos);
  EXPECT_NE(refused(R"({"mounts":{"/x":{"type":"host_fs","host_path":"/h"}}})").find("workspace"),
            std::string::npos);
  EXPECT_NE(refused(R"({"direct_mounts":{"/x":{"host_path":"/a:b"}}})").find("':'"),
            std::string::npos);
  EXPECT_NE(refused(R"({"interception":{"rules":[1]}})").find("vfs.interception"),
            std::string::npos);
}

}  // namespace
}  // namespace cella
