// `--format` for `ps` and `inspect`: the small subset of Go's text/template
// that docker users type, applied to a JSON object per sandbox.
//
//   {{.Field}} {{.A.B}}       a field (exact name first, then the same name
//                             ignoring case and underscores: .ExitCode finds
//                             exit_code); a missing one prints <no value>
//   {{.}}                     the whole object
//   {{json .X}} {{json .}}    compact JSON
//   {{upper .X}} {{lower .X}} {{index .X "key"}}
//   table ...                 a header row, then columns aligned as docker's
//                             tabwriter does (cells split on tabs)
//   \t and \n in the text     a tab and a newline, as docker reads them
//   json                      the whole format string: {{json .}}
//
// Strings print as themselves, numbers and booleans as JSON, objects and
// arrays as compact JSON (Go would print map[...]). Anything else in {{ }}
// is refused when parsed, naming what cella supports. Pure; no I/O.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::cli {

class FormatTemplate {
 public:
  static Result<FormatTemplate> Parse(std::string_view format);

  bool table() const { return table_; }
  // One row (no newline added; the caller joins rows).
  std::string Render(const nlohmann::json& data) const;
  // The header row of a table: each field's header from `headers` (by the
  // field's last name, e.g. "ID" -> "SANDBOX ID"), else the name upper-cased.
  std::string Header(const std::map<std::string, std::string>& headers) const;

 private:
  enum class Fn { kNone, kJson, kUpper, kLower, kIndex };
  struct Piece {
    std::string text;  // literal, when path is empty and !is_action
    bool is_action = false;
    std::vector<std::string> path;  // empty: the dot itself
    Fn fn = Fn::kNone;
    std::string key;  // index's key
  };
  static Piece Literal(std::string text);
  std::vector<Piece> pieces_;
  bool table_ = false;
};

// docker's tabwriter (minimum width 10, padding 3): every tab-separated cell
// but a line's last is padded to its column's widest cell.
std::string AlignColumns(const std::vector<std::string>& rows);

// Renders every object (`table` adds the header and aligns): the text `ps
// --format` and `inspect --format` print, one row a line.
std::string RenderAll(const FormatTemplate& format, const std::vector<nlohmann::json>& items,
                      const std::map<std::string, std::string>& headers = {});

}  // namespace cella::cli
