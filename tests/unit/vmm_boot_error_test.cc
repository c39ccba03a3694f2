// A failed boot leads with the guest's own reason (issue 17, item 8).
#include <gtest/gtest.h>

#include "host/vmm/qemu_backend.h"

namespace cella::vmm {
namespace {

TEST(GuestBootError, TheInitsErrorLineAmidKernelNoise) {
  std::string console =
      "[    0.912345] virtio_blk virtio2: [vdc] 2048 512-byte logical blocks\r\n"
      "cella-init: error: workdir /etc/passwd: Not a directory\r\n"
      "[    1.001122] reboot: Power down\r\n";
  EXPECT_EQ(GuestBootError(console), "workdir /etc/passwd: Not a directory");
}

TEST(GuestBootError, TheLastOfSeveralAndNoneWhenTheGuestSaidNothing) {
  EXPECT_EQ(GuestBootError("cella-init: error: first\ncella-init: error: second"), "second");
  EXPECT_EQ(GuestBootError("[    0.1] Kernel panic - not syncing\n"), "");
  EXPECT_EQ(GuestBootError(""), "");
}

}  // namespace
}  // namespace cella::vmm
