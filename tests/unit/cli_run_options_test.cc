#include <gtest/gtest.h>

#include <cstring>

#include "cli/run_options.h"

namespace cella::cli {
namespace {

const char* FakeHostEnv(const char* name) {
  if (std::strcmp(name, "FROM_HOST") == 0) return "host value";
  return nullptr;
}

TEST(RunOptions, EnvAssignmentsFollowDocker) {
  std::map<std::string, std::string> env;
  ASSERT_TRUE(ApplyEnvAssignment("A=1", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("B=x=y", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("EMPTY=", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("FROM_HOST", FakeHostEnv, env));
  ASSERT_TRUE(ApplyEnvAssignment("UNSET_ON_HOST", FakeHostEnv, env));
  EXPECT_EQ(env, (std::map<std::string, std::string>{
                     {"A", "1"}, {"B", "x=y"}, {"EMPTY", ""}, {"FROM_HOST", "host value"}}));
  auto bad = ApplyEnvAssignment("=oops", FakeHostEnv, env);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("invalid name"), std::string::npos);
}

TEST(RunOptions, EnvFileSkipsCommentsAndNamesTheBadLine) {
  std::map<std::string, std::string> env;
  ASSERT_TRUE(
      ApplyEnvFile("# comment\n\nA=1\r\n  B=two words\nFROM_HOST\n", "vars.env", FakeHostEnv, env));
  EXPECT_EQ(env, (std::map<std::string, std::string>{
                     {"A", "1"}, {"B", "two words"}, {"FROM_HOST", "host value"}}));
  auto bad = ApplyEnvFile("OK=1\n=x\n", "vars.env", FakeHostEnv, env);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message.rfind("vars.env:2: ", 0), 0u) << bad.error().message;
}

TEST(RunOptions, MemorySizes) {
  EXPECT_EQ(ParseMemoryMiB("512").value(), 512);
  EXPECT_EQ(ParseMemoryMiB("512m").value(), 512);
  EXPECT_EQ(ParseMemoryMiB("2G").value(), 2048);
  EXPECT_EQ(ParseMemoryMiB("1.5g").value(), 1536);
  EXPECT_EQ(ParseMemoryMiB("256MiB").value(), 256);
  EXPECT_FALSE(ParseMemoryMiB("lots"));
  EXPECT_FALSE(ParseMemoryMiB("12"));  // below the 64 MiB floor
  EXPECT_FALSE(ParseMemoryMiB("5t"));
  EXPECT_FALSE(ParseMemoryMiB("-1g"));
}

TEST(RunOptions, FractionalCpus) {
  EXPECT_DOUBLE_EQ(ParseCpus("0.5").value(), 0.5);
  EXPECT_DOUBLE_EQ(ParseCpus("2").value(), 2.0);
  EXPECT_FALSE(ParseCpus("0"));
  EXPECT_FALSE(ParseCpus("two"));
  EXPECT_FALSE(ParseCpus("1.5x"));
  EXPECT_FALSE(ParseCpus("100"));
}

TEST(RunOptions, AddHost) {
  auto v4 = ParseAddHost("db.test:10.1.2.3");
  ASSERT_TRUE(v4);
  EXPECT_EQ(v4->host, "db.test");
  EXPECT_EQ(v4->ip, "10.1.2.3");
  auto v6 = ParseAddHost("v6.test:fd00::1");
  ASSERT_TRUE(v6);
  EXPECT_EQ(v6->ip, "fd00::1");
  EXPECT_FALSE(ParseAddHost("nocolon"));
  EXPECT_FALSE(ParseAddHost("host:not-an-ip"));
  EXPECT_FALSE(ParseAddHost(":1.2.3.4"));
}

}  // namespace
}  // namespace cella::cli
