// Docker's rules for running an image: what `cella run --image` relies on.
#include <gtest/gtest.h>

#include "host/sandbox/compose.h"

namespace cella::sandbox {
namespace {

ImageDefaults WebImage() {
  ImageDefaults image;
  image.entrypoint = {"/entry.sh"};
  image.cmd = {"serve", "--port", "80"};
  image.env = {"PATH=/image/bin", "MODE=prod", "EMPTY="};
  image.workdir = "/app";
  image.user = "1000:1000";
  return image;
}

TEST(ApplyImageDefaults, ImageCommandEnvWorkdirUserApplyWhenUserGivesNone) {
  protocol::Config guest;
  guest.env["PATH"] = "/default";
  guest.env["HOME"] = "/root";
  ASSERT_TRUE(ApplyImageDefaults(WebImage(), {}, guest));
  EXPECT_EQ(guest.entrypoint, (std::vector<std::string>{"/entry.sh"}));
  EXPECT_EQ(guest.cmd, (std::vector<std::string>{"serve", "--port", "80"}));
  EXPECT_EQ(guest.env["PATH"], "/image/bin");
  EXPECT_EQ(guest.env["HOME"], "/root");
  EXPECT_EQ(guest.env["MODE"], "prod");
  EXPECT_EQ(guest.env["EMPTY"], "");
  EXPECT_EQ(guest.workdir, "/app");
  EXPECT_EQ(guest.user, "1000:1000");
  EXPECT_EQ(guest.init_mode, protocol::InitMode::kExec);
}

TEST(ApplyImageDefaults, UserCommandReplacesCmdButKeepsEntrypoint) {
  protocol::Config guest;
  ASSERT_TRUE(ApplyImageDefaults(WebImage(), {"debug"}, guest));
  EXPECT_EQ(guest.entrypoint, (std::vector<std::string>{"/entry.sh"}));
  EXPECT_EQ(guest.cmd, (std::vector<std::string>{"debug"}));
}

TEST(ApplyImageDefaults, UserWorkdirAndUserWin) {
  protocol::Config guest;
  guest.workdir = "/tmp";
  guest.user = "0";
  ASSERT_TRUE(ApplyImageDefaults(WebImage(), {}, guest));
  EXPECT_EQ(guest.workdir, "/tmp");
  EXPECT_EQ(guest.user, "0");
}

TEST(ApplyImageDefaults, SystemdImageRunsInSystemdMode) {
  ImageDefaults image;
  image.cmd = {"/sbin/init"};
  image.init_mode = protocol::InitMode::kSystemd;
  protocol::Config guest;
  ASSERT_TRUE(ApplyImageDefaults(image, {}, guest));
  EXPECT_EQ(guest.init_mode, protocol::InitMode::kSystemd);
}

TEST(ApplyImageDefaults, AUserCommandOnASystemdImageRunsInExecMode) {
  ImageDefaults image;
  image.cmd = {"/sbin/init"};
  image.init_mode = protocol::InitMode::kSystemd;
  protocol::Config guest;
  ASSERT_TRUE(ApplyImageDefaults(image, {"sh", "-c", "echo hi"}, guest));
  EXPECT_EQ(guest.init_mode, protocol::InitMode::kExec);
  EXPECT_EQ(guest.cmd, (std::vector<std::string>{"sh", "-c", "echo hi"}));
}

TEST(ApplyImageDefaults, NoCommandAnywhereIsAClearError) {
  protocol::Config guest;
  auto st = ApplyImageDefaults(ImageDefaults{}, {}, guest);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("neither Entrypoint nor Cmd"), std::string::npos)
      << st.error().message;
}

TEST(ApplyImageDefaults, MalformedEnvItemIsRefused) {
  ImageDefaults image = WebImage();
  image.env.push_back("NOEQUALS");
  protocol::Config guest;
  auto st = ApplyImageDefaults(image, {}, guest);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("NOEQUALS"), std::string::npos) << st.error().message;
}

}  // namespace
}  // namespace cella::sandbox
