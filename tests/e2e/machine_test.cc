// The VM layer end to end through its library API (seed: Backend/Machine):
// boot, exec, files, pause/resume, stop; the init's volume modes and extra
// disks checked from inside the guest and on the host images afterwards; a
// guest-side failure reported promptly instead of a hang.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/sandbox/compose.h"
#include "host/vmm/qemu_backend.h"
#include "process.h"
#include "vm_test_base.h"

namespace cella::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class MachineTest : public VmTestBase {
 protected:
  // An ext4 image of `size` holding `files` (name -> content).
  std::string MakeExt4(const std::string& name, const std::map<std::string, std::string>& files) {
    fs::path content = fs::path(dir_) / (name + ".d");
    fs::create_directories(content);
    for (const auto& [file, text] : files) std::ofstream(content / file) << text;
    std::string image = dir_ + "/" + name + ".img";
    auto made =
        host::CheckCommand({"mkfs.ext4", "-q", "-F", "-d", content.string(), image, "16M"}, 60s);
    EXPECT_TRUE(made) << made.error().message;
    return image;
  }

  // debugfs reads an ext4 image without mounting it (no root needed).
  std::string CatFromImage(const std::string& image, const std::string& path) {
    std::string out = dir_ + "/dumped";
    std::error_code ec;
    fs::remove(out, ec);
    auto r = host::RunCommand({"debugfs", "-R", "dump " + path + " " + out, image}, 30s);
    if (!r || r->exit_code != 0) return "<debugfs failed>";
    std::ifstream in(out);
    if (!in) return "<missing>";
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  Status Boot(protocol::Config guest, const std::vector<sandbox::VolumeAttachment>& volumes,
              const std::vector<vmm::DiskConfig>& disks) {
    return BootGuest(std::move(guest), "machinetest", volumes, disks);
  }
};

TEST_F(MachineTest, ExecFilesPauseResumeAndStop) {
  protocol::Config guest;
  guest.keep_alive = true;
  ASSERT_TRUE(Boot(guest, {}, {}));
  EXPECT_GT(machine_->PID(), 0);
  EXPECT_FALSE(machine_->RootfsPath().empty());

  protocol::ExecRequest echo;
  echo.argv = {"/bin/echo", "from", "exec"};
  auto r = machine_->Exec(echo);
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->status.exit_code, 0);
  EXPECT_EQ(r->stdout_data, "from exec\n");

  std::string payload(300 * 1024, 'x');
  payload += "end";
  ASSERT_TRUE(machine_->WriteFile("/tmp/blob", payload, 0640));
  auto back = machine_->ReadFile("/tmp/blob");
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(*back, payload);
  auto listing = machine_->ListFiles("/tmp");
  ASSERT_TRUE(listing) << listing.error().message;
  bool found = false;
  for (const auto& f : *listing)
    if (f.name == "blob") {
      found = true;
      EXPECT_EQ(f.size, payload.size());
      EXPECT_EQ(f.mode & 07777, 0640u);
    }
  EXPECT_TRUE(found);
  auto missing = machine_->ReadFile("/no/such/file");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().errno_value, ENOENT);

  // Orphans are re-parented to PID 1, which must reap them: no zombies.
  EXPECT_EQ(Sh("(sleep 0.2 &); sleep 1; ps -o stat | grep -c '^Z'"), "0\n");

  ASSERT_TRUE(machine_->Pause());
  ASSERT_TRUE(machine_->Resume());
  EXPECT_EQ(Sh("echo alive"), "alive\n");

  ASSERT_TRUE(machine_->Stop(10s));
  auto exited = machine_->Wait(30s);
  ASSERT_TRUE(exited) << exited.error().message;
  EXPECT_EQ(machine_->PID(), -1);
}

TEST_F(MachineTest, VolumeModesAndExtraDisks) {
  std::string ro = MakeExt4("ro", {{"data.txt", "read-only data\n"}});
  std::string rw = MakeExt4("rw", {});
  std::string base = MakeExt4("base", {{"base.txt", "shared base\n"}});
  std::string layer = MakeExt4("layer", {});
  std::string extra = MakeExt4("extra", {{"marker", "extra disk\n"}});
  protocol::Config guest;
  guest.keep_alive = true;
  ASSERT_TRUE(Boot(guest,
                   {{ro, "/data/ro", protocol::MountMode::kReadOnly, ""},
                    {rw, "/data/rw", protocol::MountMode::kReadWrite, ""},
                    {base, "/data/ov", protocol::MountMode::kOverlay, layer}},
                   {{extra, "/mnt/extra", true}}));

  EXPECT_EQ(Sh("cat /data/ro/data.txt"), "read-only data\n");
  EXPECT_NE(Sh("echo x > /data/ro/new 2>&1; echo rc=$?"), "rc=0\n");
  EXPECT_EQ(Sh("echo persisted > /data/rw/out.txt && cat /data/rw/out.txt"), "persisted\n");
  EXPECT_EQ(
      Sh("cat /data/ov/base.txt && echo private > /data/ov/mine.txt && cat /data/ov/mine.txt"),
      "shared base\nprivate\n");
  EXPECT_EQ(Sh("cat /mnt/extra/marker"), "extra disk\n");
  EXPECT_NE(Sh("touch /mnt/extra/x 2>&1; echo rc=$?"), "rc=0\n");

  // A graceful stop flushes: the data is on the host images afterwards.
  ASSERT_TRUE(machine_->Stop(20s));
  ASSERT_TRUE(machine_->Wait(30s));
  EXPECT_EQ(CatFromImage(rw, "/out.txt"), "persisted\n");
  EXPECT_EQ(CatFromImage(layer, "/upper/mine.txt"), "private\n");
  EXPECT_EQ(CatFromImage(base, "/mine.txt"), "<missing>") << "the shared base was written";
}

TEST_F(MachineTest, GuestSideFailureIsReportedNotHung) {
  protocol::Config guest;
  guest.keep_alive = true;
  std::string state = dir_ + "/state";
  fs::create_directories(state);
  auto vm = sandbox::Compose(assets_, guest, {1, 256}, {}, {}, "failtest", state);
  ASSERT_TRUE(vm) << vm.error().message;
  // A disk whose device never appears: the init must say so and power off.
  guest.disks.push_back({"/dev/disk/by-id/virtio-not-attached", "/mnt/x", true});
  ASSERT_TRUE(sandbox::WriteGuestConfig(guest, *vm));
  auto options = vmm::DetectQemuHost(vmm::AccelMode::kAuto);
  ASSERT_TRUE(options);
  options->boot_timeout = 120s;
  vmm::QemuBackend backend(*options);
  auto machine = backend.Create(*vm);
  ASSERT_TRUE(machine) << machine.error().message;
  machine_ = std::move(*machine);
  auto st = machine_->Start();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("cella-init: error"), std::string::npos) << st.error().message;
  EXPECT_NE(st.error().message.find("virtio-not-attached"), std::string::npos)
      << st.error().message;
  // The init's own line, not a boot timeout, is what the host reports.
  EXPECT_EQ(st.error().message.find("timed out"), std::string::npos) << st.error().message;
}

}  // namespace
}  // namespace cella::test
