#include "cli/run_options.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <filesystem>

#include "host/net/netns.h"
#include "host/net/policy.h"
#include "host/store/state_store.h"

namespace cella::cli {
namespace {

bool ValidEnvName(std::string_view name) {
  if (name.empty()) return false;
  for (char c : name)
    if (c == '=' || c == '\0' || c == ' ' || c == '\t' || c == '\n') return false;
  return true;
}

bool ValidIp(const std::string& ip) {
  unsigned char buf[16];
  return inet_pton(AF_INET, ip.c_str(), buf) == 1 || inet_pton(AF_INET6, ip.c_str(), buf) == 1;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r'))
    s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

}  // namespace

Status ApplyEnvAssignment(std::string_view item, EnvLookup lookup,
                          std::map<std::string, std::string>& env) {
  auto eq = item.find('=');
  std::string name(item.substr(0, eq));
  if (!ValidEnvName(name))
    return Fail("environment variable \"" + std::string(item) + "\": invalid name");
  if (eq != std::string_view::npos) {
    env[name] = std::string(item.substr(eq + 1));
    return {};
  }
  if (const char* value = lookup(name.c_str())) env[name] = value;
  return {};
}

Status ApplyEnvFile(std::string_view contents, std::string_view file_name, EnvLookup lookup,
                    std::map<std::string, std::string>& env) {
  int line_no = 0;
  while (!contents.empty()) {
    auto nl = contents.find('\n');
    std::string_view line = contents.substr(0, nl);
    contents = nl == std::string_view::npos ? std::string_view{} : contents.substr(nl + 1);
    ++line_no;
    // Only leading whitespace is insignificant: a value keeps its spaces.
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || line.front() == '#') continue;
    auto applied = ApplyEnvAssignment(line, lookup, env);
    if (!applied)
      return std::unexpected(
          std::move(applied.error())
              .WithContext(std::string(file_name) + ":" + std::to_string(line_no)));
  }
  return {};
}

Result<int> ParseMemoryMiB(std::string_view text) {
  std::string_view t = Trim(text);
  double value = 0;
  auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  if (ec != std::errc() || ptr == t.data() || !(value > 0))
    return Fail("--memory \"" + std::string(text) + "\": expected a positive size like 512m or 2g");
  std::string unit(ptr, t.data() + t.size());
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double mib;
  if (unit.empty() || unit == "m" || unit == "mb" || unit == "mib") {
    mib = value;
  } else if (unit == "g" || unit == "gb" || unit == "gib") {
    mib = value * 1024;
  } else if (unit == "k" || unit == "kb" || unit == "kib") {
    mib = value / 1024;
  } else {
    return Fail("--memory \"" + std::string(text) + "\": unknown unit \"" + unit +
                "\" (use k, m or g)");
  }
  if (mib < 64 || mib > 1024 * 1024)
    return Fail("--memory \"" + std::string(text) + "\": must be between 64m and 1024g");
  return static_cast<int>(std::lround(mib));
}

Result<double> ParseCpus(std::string_view text) {
  std::string_view t = Trim(text);
  double value = 0;
  auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  if (ec != std::errc() || ptr != t.data() + t.size() || !(value >= 0.01) || value > 64)
    return Fail("--cpus \"" + std::string(text) +
                "\": expected a number of CPUs between 0.01 and 64");
  return value;
}

Result<HostEntry> ParseAddHost(std::string_view text) {
  auto colon = text.find(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size())
    return Fail("--add-host \"" + std::string(text) + "\": expected HOST:IP");
  HostEntry entry{std::string(text.substr(0, colon)), std::string(text.substr(colon + 1))};
  if (!ValidIp(entry.ip))
    return Fail("--add-host \"" + std::string(text) + "\": \"" + entry.ip +
                "\" is not an IP address");
  for (char c : entry.host)
    if (c == ' ' || c == '\t' || c == '\n' || c == '#')
      return Fail("--add-host \"" + std::string(text) + "\": invalid host name");
  return entry;
}

namespace {

bool ValidSecretName(std::string_view name) {
  if (name.empty() || std::isdigit(static_cast<unsigned char>(name[0]))) return false;
  for (char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_') return false;
  return true;
}

Result<uint16_t> ParsePortNumber(std::string_view text, std::string_view what) {
  unsigned value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value == 0 || value > 65535)
    return Fail(std::string(what) + ": port \"" + std::string(text) + "\" is not 1-65535");
  return static_cast<uint16_t>(value);
}

}  // namespace

Result<std::vector<std::string>> SplitHostList(const std::vector<std::string>& items) {
  std::vector<std::string> out;
  for (const std::string& item : items) {
    size_t start = 0;
    while (start <= item.size()) {
      size_t comma = item.find(',', start);
      if (comma == std::string::npos) comma = item.size();
      std::string host = item.substr(start, comma - start);
      if (host.empty()) return Fail("host list \"" + item + "\": empty entry");
      // The one rule the supervisor's policy applies, checked here so a bad
      // entry is refused before anything is stored.
      auto pattern = net::HostPattern::Parse(host);
      if (!pattern) return Fail("host list \"" + item + "\": " + pattern.error().message);
      out.push_back(pattern->text());
      start = comma + 1;
    }
  }
  return out;
}

Result<SecretFlag> ParseSecretFlag(std::string_view text, EnvLookup lookup) {
  SecretFlag flag;
  auto at = text.rfind('@');
  if (at == std::string_view::npos)
    return Fail("--secret: want NAME@host[,host] or NAME=VALUE@host[,host]");
  std::string_view left = text.substr(0, at);
  flag.hosts = CELLA_TRY(SplitHostList({std::string(text.substr(at + 1))}));
  if (auto eq = left.find('='); eq != std::string_view::npos) {
    flag.name = std::string(left.substr(0, eq));
    flag.value = std::string(left.substr(eq + 1));
  } else {
    flag.name = std::string(left);
    flag.from_env = true;
  }
  if (!ValidSecretName(flag.name))
    return Fail("--secret: \"" + flag.name + "\" is not an environment variable name");
  if (flag.from_env) {
    const char* value = lookup(flag.name.c_str());
    if (!value)
      return Fail("--secret " + flag.name + ": the host environment has no " + flag.name +
                  " (export it, or give NAME=VALUE@host)");
    flag.value = value;
  }
  if (flag.value.empty()) return Fail("--secret " + flag.name + ": the value is empty");
  return flag;
}

Result<ResolveFlag> ParseResolveFlag(std::string_view text) {
  ResolveFlag flag;
  const std::string what = "--resolve " + std::string(text);
  auto first = text.find(':');
  if (first == std::string_view::npos) return Fail(what + ": want NAME:PORT:ADDR[:PORT]");
  flag.name = std::string(text.substr(0, first));
  std::string_view rest = text.substr(first + 1);
  auto second = rest.find(':');
  if (flag.name.empty() || second == std::string_view::npos)
    return Fail(what + ": want NAME:PORT:ADDR[:PORT]");
  flag.port = CELLA_TRY(ParsePortNumber(rest.substr(0, second), what));
  rest = rest.substr(second + 1);
  if (!rest.empty() && rest.front() == '[') {
    auto close = rest.find(']');
    if (close == std::string_view::npos) return Fail(what + ": unterminated [IPv6 address]");
    flag.address = std::string(rest.substr(1, close - 1));
    rest = rest.substr(close + 1);
    in6_addr probe{};
    if (::inet_pton(AF_INET6, flag.address.c_str(), &probe) != 1)
      return Fail(what + ": \"" + flag.address + "\" is not an IPv6 address");
    if (!rest.empty() && rest.front() != ':') return Fail(what + ": junk after the address");
    if (!rest.empty()) rest = rest.substr(1);
  } else {
    auto colon = rest.find(':');
    flag.address = std::string(rest.substr(0, colon));
    rest = colon == std::string_view::npos ? std::string_view() : rest.substr(colon + 1);
    in_addr probe{};
    if (::inet_pton(AF_INET, flag.address.c_str(), &probe) != 1)
      return Fail(what + ": \"" + flag.address + "\" is not an IPv4 address");
  }
  flag.address_port = rest.empty() ? flag.port : CELLA_TRY(ParsePortNumber(rest, what));
  return flag;
}

Status PlanNetwork(bool no_network, const std::vector<std::string>& dns,
                   sandbox::EgressSpec& egress, std::vector<std::string>& guest_dns) {
  const bool explicit_policy = !egress.allow.empty() || egress.intercept || !egress.pins.empty() ||
                               !egress.upstream_ca.empty() || !egress.secrets.empty();
  if (no_network) {
    if (explicit_policy || egress.allow_private || egress.host_loopback)
      return Fail(
          "--no-network cannot be combined with network flags (--allow-host, --secret, "
          "--allow-private, --allow-host-loopback...)");
    egress.enabled = false;
    guest_dns = dns;
    return {};
  }
  egress.enabled = true;
  egress.all_public = !explicit_policy;
  egress.dns_servers.clear();
  for (const std::string& server : dns) {
    if (!ValidIp(server))
      return Fail("--dns " + server + ": not an IP address (cella's resolver asks it directly)");
    // The guest's own resolver address already is cella's.
    if (server == net::kDnsAddress) continue;
    if (std::find(egress.dns_servers.begin(), egress.dns_servers.end(), server) ==
        egress.dns_servers.end())
      egress.dns_servers.push_back(server);
  }
  guest_dns.clear();
  return {};
}

// docker's comma-separated options after the mount point. One access mode:
// ro, rw (the default) or cella's overlay. What docker on Linux accepts and
// means nothing here is accepted too: SELinux relabelling (z, Z; the guest
// has no SELinux and the host's labels are left alone), macOS consistency
// (cached, delegated, consistent), and private/rprivate propagation (a
// share's only one). nocopy is what a new named volume does anyway: it
// starts empty. Shared or slave propagation cannot be had: refused.
Status ApplyMountOptions(const std::string& flag, std::string_view options, MountFlag& m,
                         bool& nocopy) {
  std::optional<std::string_view> access;
  while (true) {
    const size_t comma = options.find(',');
    std::string_view option = options.substr(0, comma);
    if (option == "ro" || option == "rw" || option == "overlay") {
      if (access && *access != option)
        return Fail(flag + ": more than one access mode (" + std::string(*access) + ", " +
                    std::string(option) + ")");
      access = option;
    } else if (option == "nocopy") {
      nocopy = true;
    } else if (option == "shared" || option == "rshared" || option == "slave" ||
               option == "rslave") {
      return Fail(flag + ": " + std::string(option) +
                  " propagation is not supported (a share is private to its sandbox)");
    } else if (option != "z" && option != "Z" && option != "cached" && option != "delegated" &&
               option != "consistent" && option != "private" && option != "rprivate") {
      return Fail(flag + ": unknown option \"" + std::string(option) +
                  "\" (want ro, rw or overlay; z, Z, cached, delegated, consistent, nocopy and "
                  "private are accepted and change nothing)");
    }
    if (comma == std::string_view::npos) break;
    options.remove_prefix(comma + 1);
  }
  if (access == "ro") {
    m.mode = protocol::MountMode::kReadOnly;
  } else if (access == "overlay") {
    m.mode = protocol::MountMode::kOverlay;
  } else {
    m.mode = protocol::MountMode::kReadWrite;
  }
  return {};
}

Result<MountFlag> ParseMountFlag(std::string_view text, const std::string& cwd) {
  const std::string flag = "-v " + std::string(text);
  MountFlag m;
  std::string_view rest = text;
  auto first = rest.find(':');
  if (first == std::string_view::npos && text.starts_with('/')) {
    // docker's anonymous volume: `-v /data`.
    auto normal = protocol::NormalizeGuestPath(std::string(text));
    if (!normal) return Fail(flag + ": " + normal.error().message);
    if (*normal == "/") return Fail(flag + ": cannot mount over the guest's root directory");
    m.anonymous = true;
    m.guest_path = *normal;
    return m;
  }
  if (first == std::string_view::npos)
    return Fail(flag +
                ": want NAME:/path or /host/path:/path, then optionally :ro, :rw or :overlay (or "
                "/path alone for an anonymous volume)");
  std::string source(rest.substr(0, first));
  rest = rest.substr(first + 1);
  std::string mode = "rw";
  if (auto second = rest.find(':'); second != std::string_view::npos) {
    mode = std::string(rest.substr(second + 1));
    rest = rest.substr(0, second);
  }
  m.guest_path = std::string(rest);
  if (m.guest_path.empty() || m.guest_path[0] != '/')
    return Fail(flag + ": the mount point must be an absolute path");
  auto normal = protocol::NormalizeGuestPath(m.guest_path);
  if (!normal) return Fail(flag + ": " + normal.error().message);
  if (*normal == "/") return Fail(flag + ": cannot mount over the guest's root directory");
  m.guest_path = *normal;
  bool nocopy = false;
  CELLA_TRY(ApplyMountOptions(flag, mode, m, nocopy));
  m.is_host = source.find('/') != std::string::npos || source.starts_with('.');
  if (m.is_host && nocopy)
    return Fail(flag + ": nocopy is for named volumes (a host path is shared as it is)");
  if (!m.is_host) {
    CELLA_TRY_CTX(store::CheckVolumeName(source), flag);
    m.name = source;
    return m;
  }
  std::filesystem::path path(source);
  if (path.is_relative()) path = std::filesystem::path(cwd) / path;
  std::error_code ec;
  std::filesystem::path resolved = std::filesystem::canonical(path, ec);
  if (ec)
    return Fail(flag + ": host path " + path.lexically_normal().string() + " " +
                (ec == std::errc::no_such_file_or_directory ? std::string("does not exist")
                                                            : ec.message()));
  auto status = std::filesystem::status(resolved, ec);
  if (ec) return Fail(flag + ": host path " + resolved.string() + ": " + ec.message());
  if (std::filesystem::is_regular_file(status)) {
    m.is_file = true;
  } else if (!std::filesystem::is_directory(status)) {
    return Fail(flag + ": host path " + resolved.string() +
                " is neither a directory nor a regular file");
  }
  m.host_path = resolved.string();
  return m;
}

}  // namespace cella::cli
