#include "base/log.h"

#include <gtest/gtest.h>

namespace cella::log {
namespace {

TEST(Log, FormatsKeyValuesAndQuotesWhenNeeded) {
  EXPECT_EQ(Format(Level::kNotice, "using tcg", {{"accel", "tcg"}, {"vcpus", 2}}),
            "level=notice msg=\"using tcg\" accel=tcg vcpus=2\n");
  EXPECT_EQ(Format(Level::kError, "boom", {{"path", "a b\"c\n"}}),
            "level=error msg=boom path=\"a b\\\"c\\n\"\n");
  EXPECT_EQ(Format(Level::kDebug, "", {{"empty", ""}}), "level=debug msg=\"\" empty=\"\"\n");
}

TEST(Log, QuietByDefaultAndDebugLowersTheBar) {
  Level saved = CurrentLevel();
  SetLevel(Level::kNotice);
  EXPECT_FALSE(Enabled(Level::kInfo));
  EXPECT_TRUE(Enabled(Level::kNotice));
  SetLevel(Level::kDebug);
  EXPECT_TRUE(Enabled(Level::kDebug));
  SetLevel(saved);
}

}  // namespace
}  // namespace cella::log
