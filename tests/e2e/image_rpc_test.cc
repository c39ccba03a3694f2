// `cella rpc` end to end: a JSON-RPC client written here (tests/e2e/
// rpc_check.py, plain python3) drives one sandbox of the Debian fixture
// image through every implemented method, the error codes, cancel, and the
// owner being killed; then cella's Python SDK (sdk/python) drives another
// (closed), and a third whose client ends without close (stdin EOF); and
// eight rpc processes create their sandboxes at the same moment.
#include <gtest/gtest.h>

#include <string>

#include "image_fixture.h"
#include "process.h"

namespace cella::test {
namespace {

class Rpc : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(ImageFixture::Get().ok()) << "image fixtures unavailable";
    home_ = FreshCellaHome();
    image_ = ImageFixture::Get().Value("PLAIN_REGISTRY") + "/test/debian";
  }
  void TearDown() override {
    if (!HasFailure()) RemoveCellaHomes();
  }
  ProcessResult Python(const std::vector<std::string>& args,
                       std::map<std::string, std::string> env = {}) {
    std::vector<std::string> argv{"python3"};
    argv.insert(argv.end(), args.begin(), args.end());
    env["CELLA_HOME"] = home_;
    return RunProcess(argv, "", std::chrono::seconds(500), env);
  }
  std::string home_;
  std::string image_;
};

TEST_F(Rpc, ProtocolMethodsErrorsCancelAndNoOrphanAfterKill) {
  auto r =
      Python({std::string(CELLA_SOURCE_DIR) + "/tests/e2e/rpc_check.py", CELLA_BINARY, image_});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
}

TEST_F(Rpc, PythonSdkDrivesASandboxAndCloseRemovesIt) {
  auto r =
      Python({std::string(CELLA_SOURCE_DIR) + "/tests/e2e/rpc_sdk_check.py", CELLA_BINARY, image_});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
}

// Issue 13: "8 rpc processes started at once each get their own sandbox"
// (the built-in image, small memory: eight TCG guests at once).
TEST_F(Rpc, EightRpcProcessesStartedAtOnceEachGetTheirOwnSandbox) {
  auto r = Python({std::string(CELLA_SOURCE_DIR) + "/tests/e2e/rpc_many_check.py", CELLA_BINARY});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
}

}  // namespace
}  // namespace cella::test
