// `ps --format` / `inspect -f`: the Go-template subset docker users type.
#include <gtest/gtest.h>

#include "cli/format_template.h"

namespace cella::cli {
namespace {

using nlohmann::json;

const json kBox = {{"ID", "0123456789ab"},
                   {"Names", "web"},
                   {"Status", "Up 3 minutes"},
                   {"exit_code", 143},
                   {"State", {{"Status", "running"}, {"Running", true}, {"ExitCode", 0}}},
                   {"Config", {{"Labels", {{"team", "infra"}}}}}};

std::string Render(std::string_view format, const json& data = kBox) {
  auto t = FormatTemplate::Parse(format);
  EXPECT_TRUE(t) << t.error().message;
  return t ? t->Render(data) : std::string();
}

TEST(FormatTemplate, FieldsNestedFieldsAndFunctions) {
  EXPECT_EQ(Render("{{.ID}} {{.Names}}"), "0123456789ab web");
  EXPECT_EQ(Render("{{.State.Status}}"), "running");
  EXPECT_EQ(Render("{{ .State.Running }}/{{.State.ExitCode}}"), "true/0");
  // docker's CamelCase finds cella's snake_case.
  EXPECT_EQ(Render("{{.ExitCode}}"), "143");
  EXPECT_EQ(Render("{{.NoSuchField}}"), "<no value>");
  EXPECT_EQ(Render("{{json .State}}"), R"({"ExitCode":0,"Running":true,"Status":"running"})");
  EXPECT_EQ(Render("{{upper .Names}}"), "WEB");
  EXPECT_EQ(Render("{{index .Config.Labels \"team\"}}"), "infra");
  EXPECT_EQ(Render("{{json .}}"), kBox.dump());
  EXPECT_EQ(Render("json"), kBox.dump());
  EXPECT_EQ(Render("{{.ID}}\\t{{.Names}}"), "0123456789ab\tweb");
}

TEST(FormatTemplate, WhatItCannotDoIsRefusedByName) {
  for (const char* bad : {"{{.ID", "{{if .State.Running}}x{{end}}", "{{range .Ports}}{{end}}",
                          "{{.ID | printf \"%s\"}}", "{{index .Config.Labels team}}"}) {
    auto t = FormatTemplate::Parse(bad);
    ASSERT_FALSE(t) << bad;
    EXPECT_NE(t.error().message.find("--format"), std::string::npos) << t.error().message;
  }
}

TEST(FormatTemplate, TableHasAHeaderAndAlignedColumns) {
  auto t = FormatTemplate::Parse("table {{.ID}}\\t{{.Names}}\\t{{.Status}}");
  ASSERT_TRUE(t) << t.error().message;
  EXPECT_TRUE(t->table());
  json other = kBox;
  other["ID"] = "fedcba987654";
  other["Names"] = "a-much-longer-name";
  other["Status"] = "Exited (0) 1 second ago";
  std::string text = RenderAll(*t, {kBox, other}, {{"ID", "SANDBOX ID"}});
  EXPECT_EQ(text,
            "SANDBOX ID     NAMES                STATUS\n"
            "0123456789ab   web                  Up 3 minutes\n"
            "fedcba987654   a-much-longer-name   Exited (0) 1 second ago\n");
  // Without `table`: one line per item, no header.
  auto plain = FormatTemplate::Parse("{{.Names}}");
  ASSERT_TRUE(plain);
  EXPECT_EQ(RenderAll(*plain, {kBox, other}), "web\na-much-longer-name\n");
}

}  // namespace
}  // namespace cella::cli
