// The guest init's FUSE share bookkeeping that runs without a VM: which
// mounts wait for a share (they are staged and placed once it is served),
// and serve_share's refusals.
#include <gtest/gtest.h>

#include "guest/init/fuse_share.h"

namespace cella::init {
namespace {

protocol::Config WithShares() {
  protocol::Config config;
  config.host_shares.push_back({"t0", "/work", protocol::MountMode::kReadWrite, "", true});
  config.host_shares.push_back({"t1", "/ref", protocol::MountMode::kOverlay, "", false});
  return config;
}

TEST(InitFuseShare, OnlyMountsStrictlyBeneathAFuseShareWaitForIt) {
  protocol::Config config = WithShares();
  EXPECT_TRUE(BeneathFuseShare(config, "/work/vol"));
  EXPECT_TRUE(BeneathFuseShare(config, "/work/a/b"));
  EXPECT_FALSE(BeneathFuseShare(config, "/work"));       // the share itself
  EXPECT_FALSE(BeneathFuseShare(config, "/workspace"));  // a sibling sharing a prefix
  EXPECT_FALSE(BeneathFuseShare(config, "/ref/inner"));  // a virtiofs share (mounted at boot)
  EXPECT_FALSE(BeneathFuseShare(config, "/data"));
}

TEST(InitFuseShare, ServeShareRefusesWhatIsNotAStagedFuseShare) {
  protocol::Config config = WithShares();
  auto out_of_range = ServeFuseShare(config, 2);
  ASSERT_FALSE(out_of_range);
  EXPECT_EQ(out_of_range.error().errno_value, EINVAL);
  auto virtiofs = ServeFuseShare(config, 1);
  ASSERT_FALSE(virtiofs);
  EXPECT_EQ(virtiofs.error().errno_value, EINVAL);
  auto not_staged = ServeFuseShare(config, 0);  // nothing was mounted in this process
  ASSERT_FALSE(not_staged);
  EXPECT_EQ(not_staged.error().errno_value, ENOENT);
  // Nothing staged: shares_mounted has its answer at once.
  auto placed = SharesPlacedResult();
  ASSERT_TRUE(placed.has_value());
  EXPECT_TRUE(*placed);
  EXPECT_EQ(SharesPlacedFd(), -1);
}

}  // namespace
}  // namespace cella::init
