// The guest side of a restore (guest/agent/resume.h) that can be checked
// without a VM: the RNG reseed refuses seeds it must not take and reports a
// device it cannot reseed instead of claiming success; the resume count is
// left alone when the reseed fails. (That two restored copies really draw
// different bytes is proved in tests/e2e/fork_test.cc.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "base/io.h"
#include "guest/agent/resume.h"
#include "host/sandbox/snapshot.h"

namespace cella::agent {
namespace {

class ReseedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cella-reseed-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ASSERT_TRUE(WriteStringToFile(dir_ + "/plain", "not a random device", 0600));
  }
  void TearDown() override {
    ::unlink((dir_ + "/plain").c_str());
    ::rmdir(dir_.c_str());
  }
  std::string dir_;
};

TEST_F(ReseedTest, RefusesAnEmptyOrOversizedSeedBeforeTouchingTheDevice) {
  auto empty = ReseedKernelRngAt(dir_ + "/missing", {});
  ASSERT_FALSE(empty);
  EXPECT_NE(empty.error().message.find("empty seed"), std::string::npos);
  std::vector<uint8_t> big(protocol::kMaxRngSeed + 1, 7);
  auto oversized = ReseedKernelRngAt(dir_ + "/missing", big);
  ASSERT_FALSE(oversized);
  EXPECT_NE(oversized.error().message.find("above"), std::string::npos);
}

TEST_F(ReseedTest, ADeviceThatIsNotTheRngFailsAtTheIoctlNamingIt) {
  std::vector<uint8_t> seed(64, 0x42);
  auto missing = ReseedKernelRngAt(dir_ + "/missing", seed);
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("open"), std::string::npos) << missing.error().message;
  auto plain = ReseedKernelRngAt(dir_ + "/plain", seed);
  ASSERT_FALSE(plain) << "a regular file took the entropy ioctl";
  EXPECT_NE(plain.error().message.find("RNDADDENTROPY"), std::string::npos)
      << plain.error().message;
}

TEST(HostRngSeed, EveryRestoreGetsFreshBytesOfTheSentSize) {
  auto a = sandbox::FreshRngSeed();
  auto b = sandbox::FreshRngSeed();
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->size(), sandbox::kRngSeedBytes);
  EXPECT_GE(a->size(), protocol::kMinRngSeed);
  EXPECT_LE(a->size(), protocol::kMaxRngSeed);
  EXPECT_NE(*a, *b);
}

}  // namespace
}  // namespace cella::agent
