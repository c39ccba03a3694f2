#include "cli/format_template.h"

#include <algorithm>
#include <cctype>

namespace cella::cli {
namespace {

using nlohmann::json;

constexpr std::string_view kSupported =
    "cella's --format knows {{.Field}}, {{.A.B}}, {{.}}, {{json .X}}, {{upper .X}}, "
    "{{lower .X}} and {{index .X \"key\"}}";

std::string Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return std::string(s);
}

// docker replaces the two escapes a shell leaves alone.
std::string Unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == 't' || s[i + 1] == 'n')) {
      out += s[i + 1] == 't' ? '\t' : '\n';
      ++i;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string Folded(std::string_view name) {
  std::string out;
  for (char c : name)
    if (c != '_') out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// .A.B.C -> {A, B, C}; "." -> {}.
Result<std::vector<std::string>> ParsePath(std::string_view text, std::string_view action) {
  if (text.empty() || text.front() != '.')
    return Fail("--format: {{" + std::string(action) + "}}: want a field such as .ID (" +
                std::string(kSupported) + ")");
  std::vector<std::string> path;
  if (text == ".") return path;
  size_t start = 1;
  while (start <= text.size()) {
    size_t dot = text.find('.', start);
    std::string name(text.substr(start, dot == std::string_view::npos ? dot : dot - start));
    if (name.empty() || !std::ranges::all_of(name, [](char c) {
          return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
        }))
      return Fail("--format: {{" + std::string(action) + "}}: \"" + std::string(text) +
                  "\" is not a field path (" + std::string(kSupported) + ")");
    path.push_back(std::move(name));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return path;
}

const json* Lookup(const json& data, const std::vector<std::string>& path) {
  const json* at = &data;
  for (const std::string& name : path) {
    if (!at->is_object()) return nullptr;
    auto exact = at->find(name);
    if (exact != at->end()) {
      at = &*exact;
      continue;
    }
    const json* found = nullptr;
    std::string folded = Folded(name);
    for (auto it = at->begin(); it != at->end(); ++it) {
      if (Folded(it.key()) == folded) {
        found = &*it;
        break;
      }
    }
    if (!found) return nullptr;
    at = found;
  }
  return at;
}

std::string Plain(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_null()) return "<no value>";
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace

FormatTemplate::Piece FormatTemplate::Literal(std::string text) {
  Piece piece;
  piece.text = std::move(text);
  return piece;
}

Result<FormatTemplate> FormatTemplate::Parse(std::string_view format) {
  FormatTemplate t;
  std::string text = Trim(format);
  if (text == "json") text = "{{json .}}";  // docker's --format json
  if (text.starts_with("table")) {
    t.table_ = true;
    text = Trim(std::string_view(text).substr(5));
  }
  text = Unescape(text);
  size_t at = 0;
  while (at < text.size()) {
    size_t open = text.find("{{", at);
    if (open == std::string::npos) {
      t.pieces_.push_back(Literal(text.substr(at)));
      break;
    }
    if (open > at) t.pieces_.push_back(Literal(text.substr(at, open - at)));
    size_t close = text.find("}}", open + 2);
    if (close == std::string::npos)
      return Fail("--format: \"{{\" without its \"}}\" in \"" + std::string(format) + "\"");
    std::string action = Trim(std::string_view(text).substr(open + 2, close - open - 2));
    Piece piece;
    piece.is_action = true;
    std::string_view rest = action;
    auto word_end = rest.find(' ');
    std::string_view first = rest.substr(0, word_end);
    if (first == "json" || first == "upper" || first == "lower" || first == "index") {
      piece.fn = first == "json"    ? Fn::kJson
                 : first == "upper" ? Fn::kUpper
                 : first == "lower" ? Fn::kLower
                                    : Fn::kIndex;
      rest = word_end == std::string_view::npos ? std::string_view() : rest.substr(word_end + 1);
      std::string arg = Trim(rest);
      if (piece.fn == Fn::kIndex) {
        size_t space = arg.find(' ');
        std::string key = space == std::string::npos ? std::string() : Trim(arg.substr(space + 1));
        if (key.size() < 2 || key.front() != '"' || key.back() != '"')
          return Fail("--format: {{" + action + "}}: want index .Field \"key\"");
        piece.key = key.substr(1, key.size() - 2);
        arg = arg.substr(0, space);
      }
      piece.path = CELLA_TRY(ParsePath(arg, action));
    } else {
      piece.path = CELLA_TRY(ParsePath(action, action));
    }
    t.pieces_.push_back(std::move(piece));
    at = close + 2;
  }
  return t;
}

std::string FormatTemplate::Render(const json& data) const {
  std::string out;
  for (const Piece& p : pieces_) {
    if (!p.is_action) {
      out += p.text;
      continue;
    }
    const json* value = Lookup(data, p.path);
    static const json kNull;
    const json& v = value ? *value : kNull;
    switch (p.fn) {
      case Fn::kNone:
        out += Plain(v);
        break;
      case Fn::kJson:
        out += v.dump(-1, ' ', false, json::error_handler_t::replace);
        break;
      case Fn::kUpper:
      case Fn::kLower: {
        std::string s = Plain(v);
        for (char& c : s)
          c = static_cast<char>(p.fn == Fn::kUpper ? std::toupper(static_cast<unsigned char>(c))
                                                   : std::tolower(static_cast<unsigned char>(c)));
        out += s;
        break;
      }
      case Fn::kIndex: {
        const json* item = v.is_object() && v.contains(p.key) ? &v[p.key] : nullptr;
        out += item ? Plain(*item) : "<no value>";
        break;
      }
    }
  }
  return out;
}

std::string FormatTemplate::Header(const std::map<std::string, std::string>& headers) const {
  std::string out;
  for (const Piece& p : pieces_) {
    if (!p.is_action) {
      out += p.text;
      continue;
    }
    std::string name = p.path.empty() ? "" : p.path.back();
    if (auto it = headers.find(name); it != headers.end()) {
      out += it->second;
      continue;
    }
    for (char c : name) out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return out;
}

std::string AlignColumns(const std::vector<std::string>& rows) {
  constexpr size_t kMinWidth = 10, kPadding = 3;
  std::vector<std::vector<std::string>> cells;
  std::vector<size_t> widths;
  for (const std::string& row : rows) {
    std::vector<std::string> line;
    size_t start = 0;
    for (;;) {
      size_t tab = row.find('\t', start);
      line.push_back(row.substr(start, tab == std::string::npos ? tab : tab - start));
      if (tab == std::string::npos) break;
      start = tab + 1;
    }
    // The last cell is not a column: it is never padded.
    for (size_t i = 0; i + 1 < line.size(); ++i) {
      if (widths.size() <= i) widths.push_back(0);
      widths[i] = std::max(widths[i], std::max(line[i].size() + kPadding, kMinWidth));
    }
    cells.push_back(std::move(line));
  }
  std::string out;
  for (const auto& line : cells) {
    for (size_t i = 0; i < line.size(); ++i) {
      out += line[i];
      if (i + 1 < line.size()) out.append(widths[i] - line[i].size(), ' ');
    }
    out += '\n';
  }
  return out;
}

std::string RenderAll(const FormatTemplate& format, const std::vector<json>& items,
                      const std::map<std::string, std::string>& headers) {
  std::vector<std::string> rows;
  if (format.table()) rows.push_back(format.Header(headers));
  for (const json& item : items) rows.push_back(format.Render(item));
  if (format.table()) return AlignColumns(rows);
  std::string out;
  for (const std::string& row : rows) out += row + "\n";
  return out;
}

}  // namespace cella::cli
