// Shared set-up for e2e tests that drive the VM layer through its library
// API: the guest assets (kernel, initramfs, default image) and a scratch
// directory per test, booting a composed guest and running shell in it;
// whatever Machine the test started is closed after it.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "host/os/paths.h"
#include "host/sandbox/compose.h"
#include "host/vmm/machine.h"
#include "host/vmm/qemu_backend.h"

namespace cella::test {

class VmTestBase : public ::testing::Test {
 protected:
  void SetUp() override {
    auto home = host::CellaHome();
    ASSERT_TRUE(home) << home.error().message;
    auto assets = sandbox::EnsureGuestAssets(
        *home, std::filesystem::path(CELLA_BINARY).parent_path().string(), std::nullopt);
    ASSERT_TRUE(assets) << assets.error().message;
    assets_ = *assets;
    char tmpl[] = "/tmp/cella-vm-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    if (machine_) (void)machine_->Close();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Composes a VM of `guest` (1 CPU, 256 MiB, the default image) with
  // `volumes` and `disks`, writes its config disk and boots it into
  // machine_ (within 120 s); `tap_fd` (when not -1) is its network.
  Status BootGuest(protocol::Config guest, const std::string& id,
                   const std::vector<sandbox::VolumeAttachment>& volumes = {},
                   const std::vector<vmm::DiskConfig>& disks = {}, int tap_fd = -1) {
    std::string state = dir_ + "/state";
    std::filesystem::create_directories(state);
    auto vm = sandbox::Compose(assets_, guest, {1, 256}, volumes, disks, id, state);
    if (!vm) return std::unexpected(vm.error());
    if (tap_fd != -1) vm->NetworkFD = tap_fd;
    CELLA_TRY(sandbox::WriteGuestConfig(guest, *vm));
    auto options = CELLA_TRY(vmm::DetectQemuHost(vmm::AccelMode::kAuto));
    options.boot_timeout = std::chrono::seconds(120);
    vmm::QemuBackend backend(options);
    machine_ = CELLA_TRY(backend.Create(*vm));
    return machine_->Start();
  }

  // `sh -c SCRIPT` in the guest (bounded by `timeout_ms`): its stdout then
  // its stderr, or "<exec failed: ...>".
  std::string Sh(const std::string& script, uint32_t timeout_ms = 60000, bool privileged = false) {
    protocol::ExecRequest request;
    request.argv = {"sh", "-c", script};
    request.env = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin"};
    request.timeout_ms = timeout_ms;
    request.privileged = privileged;
    auto r = machine_->Exec(request);
    if (!r) return "<exec failed: " + r.error().message + ">";
    return r->stdout_data + r->stderr_data;
  }

  sandbox::GuestAssets assets_;
  std::string dir_;
  std::unique_ptr<vmm::Machine> machine_;
};

}  // namespace cella::test
