// Shared set-up for e2e tests that drive the VM layer through its library
// API: the guest assets (kernel, initramfs, default image) and a scratch
// directory per test; whatever Machine the test started is closed after it.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include "host/sandbox/compose.h"
#include "host/vmm/machine.h"
#include "host/os/paths.h"

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

  sandbox::GuestAssets assets_;
  std::string dir_;
  std::unique_ptr<vmm::Machine> machine_;
};

}  // namespace cella::test
