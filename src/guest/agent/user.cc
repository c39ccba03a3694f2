#include "guest/agent/user.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <optional>

#include "base/io.h"

namespace cella::agent {
namespace {

std::vector<std::string_view> Split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  for (;;) {
    size_t pos = s.find(sep);
    out.push_back(s.substr(0, pos));
    if (pos == std::string_view::npos) return out;
    s.remove_prefix(pos + 1);
  }
}

std::optional<uint32_t> ParseId(std::string_view s) {
  uint32_t v = 0;
  if (s.empty()) return std::nullopt;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || ptr != s.data() + s.size()) return std::nullopt;
  return v;
}

struct PasswdEntry {
  std::string_view name;
  uid_t uid;
  gid_t gid;
  std::string_view home;
};

struct GroupEntry {
  std::string_view name;
  gid_t gid;
  std::vector<std::string_view> members;
};

// Lines that do not parse are skipped, as libc does.
std::vector<PasswdEntry> ParsePasswd(std::string_view text) {
  std::vector<PasswdEntry> out;
  for (std::string_view line : Split(text, '\n')) {
    auto f = Split(line, ':');
    if (f.size() < 7) continue;
    auto uid = ParseId(f[2]);
    auto gid = ParseId(f[3]);
    if (!uid || !gid) continue;
    out.push_back({f[0], *uid, *gid, f[5]});
  }
  return out;
}

std::vector<GroupEntry> ParseGroup(std::string_view text) {
  std::vector<GroupEntry> out;
  for (std::string_view line : Split(text, '\n')) {
    auto f = Split(line, ':');
    if (f.size() < 4) continue;
    auto gid = ParseId(f[2]);
    if (!gid) continue;
    GroupEntry g{f[0], *gid, {}};
    if (!f[3].empty()) g.members = Split(f[3], ',');
    out.push_back(std::move(g));
  }
  return out;
}

std::string ReadOptional(const char* path) {
  auto text = ReadFileToString(path, 16u << 20);
  return text ? *text : std::string();
}

}  // namespace

Result<Identity> ResolveUser(std::string_view spec, std::string_view passwd_text,
                             std::string_view group_text) {
  size_t colon = spec.find(':');
  std::string_view user_part = spec.substr(0, colon);
  std::optional<std::string_view> group_part;
  if (colon != std::string_view::npos) group_part = spec.substr(colon + 1);
  if (user_part.empty() || (group_part && group_part->empty()))
    return std::unexpected(Error{"user \"" + std::string(spec) + "\": malformed", EINVAL});

  auto passwd = ParsePasswd(passwd_text);
  auto groups = ParseGroup(group_text);

  Identity id;
  const PasswdEntry* entry = nullptr;
  if (auto uid = ParseId(user_part)) {
    id.uid = *uid;
    auto it = std::find_if(passwd.begin(), passwd.end(),
                           [&](const PasswdEntry& e) { return e.uid == *uid; });
    if (it != passwd.end()) entry = &*it;
  } else {
    auto it = std::find_if(passwd.begin(), passwd.end(),
                           [&](const PasswdEntry& e) { return e.name == user_part; });
    if (it == passwd.end())
      return std::unexpected(
          Error{"user \"" + std::string(user_part) + "\" not found in /etc/passwd", ENOENT});
    entry = &*it;
    id.uid = entry->uid;
  }
  id.gid = entry ? entry->gid : 0;
  id.home = (entry && !entry->home.empty()) ? std::string(entry->home) : "/";

  if (group_part) {
    if (auto gid = ParseId(*group_part)) {
      id.gid = *gid;
    } else {
      auto it = std::find_if(groups.begin(), groups.end(),
                             [&](const GroupEntry& g) { return g.name == *group_part; });
      if (it == groups.end())
        return std::unexpected(
            Error{"group \"" + std::string(*group_part) + "\" not found in /etc/group", ENOENT});
      id.gid = it->gid;
    }
  }

  id.groups.push_back(id.gid);
  if (entry) {
    for (const auto& g : groups) {
      bool member = std::find(g.members.begin(), g.members.end(), entry->name) != g.members.end();
      if (member && std::find(id.groups.begin(), id.groups.end(), g.gid) == id.groups.end())
        id.groups.push_back(g.gid);
    }
  }
  return id;
}

Result<Identity> ResolveUser(std::string_view spec) {
  std::string passwd = ReadOptional("/etc/passwd");
  std::string group = ReadOptional("/etc/group");
  return ResolveUser(spec, passwd, group);
}

}  // namespace cella::agent
