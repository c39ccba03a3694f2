// One piece (~650 lines) on purpose: config.json's reader, writer and the
// semantic checks the host runs at the edge and the guest runs at boot are
// one schema; apart, they would drift.
#include "protocol/config.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "protocol/network.h"

namespace cella::protocol {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

std::string Quote(std::string_view s) { return "\"" + std::string(s) + "\""; }

std::string_view TypeName(const Json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number_float()) return "number";
  return v.type_name();
}

Error WrongType(const std::string& field, std::string_view want, const Json& got) {
  return Error::Msg(field + ": want " + std::string(want) + ", got " + std::string(TypeName(got)));
}

std::string Join(const std::string& prefix, std::string_view key) {
  return prefix.empty() ? std::string(key) : prefix + "." + std::string(key);
}

std::string Index(const std::string& field, size_t i) {
  return field + "[" + std::to_string(i) + "]";
}

// Returns the member, or nullptr when absent or null (Go's zero value).
const Json* Member(const Json& obj, std::string_view key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

Status ReadString(const Json& obj, std::string_view key, const std::string& prefix,
                  std::string& out) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return {};
  if (!v->is_string()) return std::unexpected(WrongType(Join(prefix, key), "a string", *v));
  out = v->get<std::string>();
  return {};
}

Status ReadBool(const Json& obj, std::string_view key, const std::string& prefix, bool& out) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return {};
  if (!v->is_boolean()) return std::unexpected(WrongType(Join(prefix, key), "a boolean", *v));
  out = v->get<bool>();
  return {};
}

// Go's int fields refuse fractions ("24.0" included), so do we.
Status ReadInt(const Json& obj, std::string_view key, const std::string& prefix, int& out) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return {};
  std::string field = Join(prefix, key);
  if (!v->is_number_integer()) return std::unexpected(WrongType(field, "an integer", *v));
  if (v->is_number_unsigned()) {
    auto u = v->get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int>::max()))
      return Fail(field + ": " + std::to_string(u) + " is out of range");
    out = static_cast<int>(u);
    return {};
  }
  auto s = v->get<int64_t>();
  if (s < std::numeric_limits<int>::min() || s > std::numeric_limits<int>::max())
    return Fail(field + ": " + std::to_string(s) + " is out of range");
  out = static_cast<int>(s);
  return {};
}

Status ReadDouble(const Json& obj, std::string_view key, const std::string& prefix, double& out) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return {};
  if (!v->is_number()) return std::unexpected(WrongType(Join(prefix, key), "a number", *v));
  out = v->get<double>();
  return {};
}

Status ReadStringList(const Json& obj, std::string_view key, const std::string& prefix,
                      std::vector<std::string>& out) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return {};
  std::string field = Join(prefix, key);
  if (!v->is_array()) return std::unexpected(WrongType(field, "an array of strings", *v));
  out.clear();
  for (size_t i = 0; i < v->size(); ++i) {
    const Json& item = (*v)[i];
    if (!item.is_string()) return std::unexpected(WrongType(Index(field, i), "a string", item));
    out.push_back(item.get<std::string>());
  }
  return {};
}

Status ReadStringMap(const Json& obj, std::string_view key, const std::string& prefix,
                     std::map<std::string, std::string>& out) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return {};
  std::string field = Join(prefix, key);
  if (!v->is_object()) return std::unexpected(WrongType(field, "an object of strings", *v));
  out.clear();
  for (const auto& [k, item] : v->items()) {
    if (!item.is_string())
      return std::unexpected(WrongType(field + "[" + Quote(k) + "]", "a string", item));
    out[k] = item.get<std::string>();
  }
  return {};
}

// Calls read(element, "field[i]") for each object in the array at key.
template <class T, class ReadFn>
Status ReadObjectList(const Json& obj, std::string_view key, const std::string& prefix,
                      std::vector<T>& out, ReadFn read) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return {};
  std::string field = Join(prefix, key);
  if (!v->is_array()) return std::unexpected(WrongType(field, "an array of objects", *v));
  out.clear();
  for (size_t i = 0; i < v->size(); ++i) {
    const Json& item = (*v)[i];
    std::string where = Index(field, i);
    if (!item.is_object()) return std::unexpected(WrongType(where, "an object", item));
    T value;
    CELLA_TRY(read(item, where, value));
    out.push_back(std::move(value));
  }
  return {};
}

// "mode": "ro" | "rw" | "overlay" (volumes and host shares alike).
Status ReadMountMode(const Json& obj, const std::string& where, MountMode& out) {
  std::string mode;
  CELLA_TRY(ReadString(obj, "mode", where, mode));
  if (mode == "ro") {
    out = MountMode::kReadOnly;
  } else if (mode == "rw") {
    out = MountMode::kReadWrite;
  } else if (mode == "overlay") {
    out = MountMode::kOverlay;
  } else {
    return Fail(where + ".mode: unknown mode " + Quote(mode) + " (want ro, rw or overlay)");
  }
  return {};
}

Status ReadVolumeMount(const Json& obj, const std::string& where, VolumeMount& out) {
  CELLA_TRY(ReadString(obj, "device", where, out.device));
  CELLA_TRY(ReadString(obj, "path", where, out.path));
  CELLA_TRY(ReadMountMode(obj, where, out.mode));
  CELLA_TRY(ReadString(obj, "overlay_device", where, out.overlay_device));
  return {};
}

Status ReadHostShare(const Json& obj, const std::string& where, HostShare& out) {
  CELLA_TRY(ReadString(obj, "tag", where, out.tag));
  CELLA_TRY(ReadString(obj, "path", where, out.path));
  CELLA_TRY(ReadMountMode(obj, where, out.mode));
  CELLA_TRY(ReadString(obj, "file", where, out.file));
  CELLA_TRY(ReadBool(obj, "fuse", where, out.fuse));
  return {};
}

Status ReadHostEntry(const Json& obj, const std::string& where, HostEntry& out) {
  CELLA_TRY(ReadString(obj, "host", where, out.host));
  CELLA_TRY(ReadString(obj, "ip", where, out.ip));
  return {};
}

Status ReadLowerLayer(const Json& obj, const std::string& where, LowerLayer& out) {
  CELLA_TRY(ReadString(obj, "device", where, out.device));
  CELLA_TRY(ReadString(obj, "fstype", where, out.fstype));
  return {};
}

Status ReadDisk(const Json& obj, const std::string& where, Disk& out) {
  CELLA_TRY(ReadString(obj, "device", where, out.device));
  CELLA_TRY(ReadString(obj, "path", where, out.path));
  CELLA_TRY(ReadBool(obj, "read_only", where, out.read_only));
  return {};
}

Status ReadTmpfs(const Json& obj, const std::string& where, TmpfsMount& out) {
  CELLA_TRY(ReadString(obj, "path", where, out.path));
  CELLA_TRY(ReadInt(obj, "size_mib", where, out.size_mib));
  return {};
}

Status ReadOverlayRoot(const Json& obj, std::optional<OverlayRoot>& out) {
  const Json* v = Member(obj, "overlay_root");
  if (v == nullptr) return {};
  if (!v->is_object()) return std::unexpected(WrongType("overlay_root", "an object", *v));
  OverlayRoot root;
  CELLA_TRY(ReadObjectList(*v, "lower", "overlay_root", root.lower, ReadLowerLayer));
  CELLA_TRY(ReadString(*v, "upper_device", "overlay_root", root.upper_device));
  CELLA_TRY(ReadString(*v, "upper_fstype", "overlay_root", root.upper_fstype));
  out = std::move(root);
  return {};
}

Result<Config> Decode(const Json& doc) {
  if (!doc.is_object()) return std::unexpected(WrongType("config", "a JSON object", doc));
  Config c;
  const std::string top;
  CELLA_TRY(ReadStringList(doc, "entrypoint", top, c.entrypoint));
  CELLA_TRY(ReadStringList(doc, "cmd", top, c.cmd));
  CELLA_TRY(ReadString(doc, "workdir", top, c.workdir));
  CELLA_TRY(ReadStringMap(doc, "env", top, c.env));
  CELLA_TRY(ReadBool(doc, "network_enabled", top, c.network_enabled));
  CELLA_TRY(ReadString(doc, "guest_ip", top, c.guest_ip));
  CELLA_TRY(ReadInt(doc, "guest_cidr", top, c.guest_cidr));
  CELLA_TRY(ReadString(doc, "guest_gw", top, c.guest_gw));
  CELLA_TRY(ReadString(doc, "guest_dns", top, c.guest_dns));
  CELLA_TRY(ReadObjectList(doc, "volume_mounts", top, c.volume_mounts, ReadVolumeMount));
  std::string init_mode;
  CELLA_TRY(ReadString(doc, "init_mode", top, init_mode));
  if (init_mode.empty() || init_mode == "exec") {
    c.init_mode = InitMode::kExec;
  } else if (init_mode == "systemd") {
    c.init_mode = InitMode::kSystemd;
  } else {
    return Fail("init_mode: unknown mode " + Quote(init_mode) + " (want exec or systemd)");
  }
  CELLA_TRY(ReadBool(doc, "skip_kernel_headers", top, c.skip_kernel_headers));
  CELLA_TRY(ReadBool(doc, "skip_guest_agent", top, c.skip_guest_agent));
  CELLA_TRY(ReadBool(doc, "has_gpu", top, c.has_gpu));

  CELLA_TRY(ReadString(doc, "hostname", top, c.hostname));
  CELLA_TRY(ReadStringList(doc, "dns_servers", top, c.dns_servers));
  CELLA_TRY(ReadObjectList(doc, "extra_hosts", top, c.extra_hosts, ReadHostEntry));
  CELLA_TRY(ReadInt(doc, "mtu", top, c.mtu));
  CELLA_TRY(ReadString(doc, "guest_mac", top, c.guest_mac));
  CELLA_TRY(ReadBool(doc, "no_network", top, c.no_network));
  CELLA_TRY(ReadBool(doc, "privileged", top, c.privileged));
  CELLA_TRY(ReadOverlayRoot(doc, c.overlay_root));
  CELLA_TRY(ReadString(doc, "root_device", top, c.root_device));
  CELLA_TRY(ReadString(doc, "root_fstype", top, c.root_fstype));
  CELLA_TRY(ReadObjectList(doc, "disks", top, c.disks, ReadDisk));
  CELLA_TRY(ReadObjectList(doc, "host_shares", top, c.host_shares, ReadHostShare));
  CELLA_TRY(ReadString(doc, "user", top, c.user));
  CELLA_TRY(ReadDouble(doc, "cpus", top, c.cpus));
  CELLA_TRY(ReadBool(doc, "keep_alive", top, c.keep_alive));
  CELLA_TRY(ReadBool(doc, "tty", top, c.tty));
  CELLA_TRY(ReadString(doc, "ca_certificates", top, c.ca_certificates));
  CELLA_TRY(ReadString(doc, "agent_port", top, c.agent_port));
  CELLA_TRY(ReadBool(doc, "read_only_root", top, c.read_only_root));
  CELLA_TRY(ReadObjectList(doc, "tmpfs", top, c.tmpfs, ReadTmpfs));
  if (c.agent_port.empty()) c.agent_port = std::string(kDefaultAgentPort);
  return c;
}

// ---- Validation ----

bool HasNul(std::string_view s) { return s.find('\0') != std::string_view::npos; }

bool IsIPv4(const std::string& s) {
  in_addr a{};
  return !HasNul(s) && inet_pton(AF_INET, s.c_str(), &a) == 1;
}

bool IsIP(const std::string& s) {
  in6_addr a{};
  return IsIPv4(s) || (!HasNul(s) && inet_pton(AF_INET6, s.c_str(), &a) == 1);
}

Status CheckIPv4(const std::string& field, const std::string& value) {
  if (!IsIPv4(value)) return Fail(field + ": " + Quote(value) + " is not an IPv4 address");
  return {};
}

Status CheckIP(const std::string& field, const std::string& value) {
  if (!IsIP(value)) return Fail(field + ": " + Quote(value) + " is not an IP address");
  return {};
}

Status CheckNoNul(const std::string& field, std::string_view value) {
  if (HasNul(value)) return Fail(field + ": contains a NUL byte");
  return {};
}

enum class Presence { kRequired, kOptional };

Status CheckDevice(const std::string& field, const std::string& value,
                   Presence presence = Presence::kRequired) {
  if (value.empty()) {
    if (presence == Presence::kOptional) return {};
    return Fail(field + ": required");
  }
  auto normal = NormalizeGuestPath(value);
  if (!normal) return Fail(field + ": " + normal.error().message);
  if (!normal->starts_with("/dev/"))
    return Fail(field + ": " + Quote(value) + " is not a device path (want /dev/...)");
  return {};
}

// Names the kernel understands are short lowercase words; anything else is
// certainly a mistake and would otherwise surface as a vague mount error.
Status CheckFsType(const std::string& field, const std::string& value) {
  if (value.empty()) return {};
  if (value.size() > 32) return Fail(field + ": filesystem type is too long");
  for (char ch : value) {
    if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_'))
      return Fail(field + ": " + Quote(value) + " is not a filesystem type name");
  }
  return {};
}

// The project's one host-name rule (protocol/network.h), within the length
// the field allows (sethostname takes 64).
Status CheckHostName(const std::string& field, const std::string& value, size_t max_len) {
  if (value.empty()) return Fail(field + ": empty host name");
  if (value.size() > max_len)
    return Fail(field + ": " + Quote(value) + " is longer than " + std::to_string(max_len) +
                " characters");
  if (!IsValidHostName(value))
    return Fail(field + ": " + Quote(value) +
                " is not a valid host name (letters, digits, '-', '_' in dot-separated labels of "
                "1-63, none starting or ending with '-')");
  return {};
}

Status CheckMountPath(const std::string& field, const std::string& value,
                      std::map<std::string, std::string>& seen) {
  if (value.empty()) return Fail(field + ": required");
  auto normal = NormalizeGuestPath(value);
  if (!normal) return Fail(field + ": " + normal.error().message);
  if (*normal == "/") return Fail(field + ": cannot mount over the root directory");
  auto [it, inserted] = seen.emplace(*normal, field);
  if (!inserted)
    return Fail(field + ": " + Quote(*normal) + " is already mounted by " + it->second);
  return {};
}

}  // namespace

std::string_view ToString(MountMode mode) {
  switch (mode) {
    case MountMode::kReadOnly:
      return "ro";
    case MountMode::kReadWrite:
      return "rw";
    case MountMode::kOverlay:
      return "overlay";
  }
  return "ro";
}

std::string_view ToString(InitMode mode) {
  switch (mode) {
    case InitMode::kExec:
      return "exec";
    case InitMode::kSystemd:
      return "systemd";
  }
  return "exec";
}

Result<std::string> NormalizeGuestPath(std::string_view path) {
  if (HasNul(path)) return Fail("path contains a NUL byte");
  if (!path.starts_with('/')) return Fail(Quote(path) + " is not an absolute path");
  std::string out;
  size_t pos = 0;
  while (pos < path.size()) {
    size_t next = path.find('/', pos);
    if (next == std::string_view::npos) next = path.size();
    std::string_view part = path.substr(pos, next - pos);
    pos = next + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") return Fail(Quote(path) + " contains a '..' component");
    out += '/';
    out += part;
  }
  if (out.empty()) out = "/";
  return out;
}

std::optional<std::array<uint8_t, 6>> ParseMac(std::string_view text) {
  if (text.size() != 17) return std::nullopt;
  auto nibble = [](char ch) -> int {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
  };
  std::array<uint8_t, 6> mac{};
  for (size_t i = 0; i < 6; ++i) {
    if (i > 0 && text[i * 3 - 1] != ':') return std::nullopt;
    int hi = nibble(text[i * 3]);
    int lo = nibble(text[i * 3 + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    mac[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  if ((mac[0] & 1) != 0) return std::nullopt;                // a multicast group, not a NIC
  if (mac == std::array<uint8_t, 6>{}) return std::nullopt;  // the kernel refuses it
  return mac;
}

Status ValidateConfig(const Config& c) {
  for (size_t i = 0; i < c.entrypoint.size(); ++i)
    CELLA_TRY(CheckNoNul(Index("entrypoint", i), c.entrypoint[i]));
  for (size_t i = 0; i < c.cmd.size(); ++i) CELLA_TRY(CheckNoNul(Index("cmd", i), c.cmd[i]));
  if (!c.workdir.empty()) {
    auto normal = NormalizeGuestPath(c.workdir);
    if (!normal) return Fail("workdir: " + normal.error().message);
  }
  for (const auto& [key, value] : c.env) {
    std::string field = "env[" + Quote(key) + "]";
    if (key.empty()) return Fail("env: empty variable name");
    if (key.find('=') != std::string::npos) return Fail(field + ": name contains '='");
    CELLA_TRY(CheckNoNul(field, key));
    CELLA_TRY(CheckNoNul(field, value));
  }

  if (!c.guest_ip.empty()) CELLA_TRY(CheckIPv4("guest_ip", c.guest_ip));
  if (c.guest_cidr < 0 || c.guest_cidr > 32)
    return Fail("guest_cidr: " + std::to_string(c.guest_cidr) + " is out of range 0..32");
  if (!c.guest_gw.empty()) CELLA_TRY(CheckIPv4("guest_gw", c.guest_gw));
  if (!c.guest_dns.empty()) CELLA_TRY(CheckIP("guest_dns", c.guest_dns));
  if (!c.guest_mac.empty() && !ParseMac(c.guest_mac))
    return Fail("guest_mac: \"" + c.guest_mac +
                "\" is not a unicast MAC address (six hex pairs joined by ':')");
  if (c.network_enabled && !c.no_network) {
    if (c.guest_ip.empty()) return Fail("guest_ip: required when network_enabled is true");
    if (c.guest_cidr == 0) return Fail("guest_cidr: required (1..32) when guest_ip is set");
  }

  std::map<std::string, std::string> mount_paths;
  for (size_t i = 0; i < c.volume_mounts.size(); ++i) {
    const VolumeMount& m = c.volume_mounts[i];
    std::string where = Index("volume_mounts", i);
    CELLA_TRY(CheckDevice(where + ".device", m.device));
    CELLA_TRY(CheckMountPath(where + ".path", m.path, mount_paths));
    if (m.mode == MountMode::kOverlay) {
      if (m.overlay_device.empty())
        return Fail(where + ".overlay_device: required when mode is overlay");
      CELLA_TRY(CheckDevice(where + ".overlay_device", m.overlay_device));
    } else if (!m.overlay_device.empty()) {
      return Fail(where + ".overlay_device: only valid when mode is overlay (mode is " +
                  std::string(ToString(m.mode)) + ")");
    }
  }
  for (size_t i = 0; i < c.disks.size(); ++i) {
    std::string where = Index("disks", i);
    CELLA_TRY(CheckDevice(where + ".device", c.disks[i].device));
    CELLA_TRY(CheckMountPath(where + ".path", c.disks[i].path, mount_paths));
  }
  std::map<std::string, std::string> tags;
  for (size_t i = 0; i < c.host_shares.size(); ++i) {
    const HostShare& share = c.host_shares[i];
    std::string where = Index("host_shares", i);
    // The tag reaches the guest kernel's mount(2) as the source: keep it plain.
    if (share.tag.empty() || share.tag.size() > 36 ||
        share.tag.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                    "0123456789._-") != std::string::npos)
      return Fail(where + ".tag: " + Quote(share.tag) + " is not 1..36 of [A-Za-z0-9._-]");
    if (auto [it, inserted] = tags.emplace(share.tag, where); !inserted)
      return Fail(where + ".tag: " + Quote(share.tag) + " is already used by " + it->second);
    CELLA_TRY(CheckMountPath(where + ".path", share.path, mount_paths));
    if (!share.file.empty() &&
        (share.file == "." || share.file == ".." ||
         share.file.find_first_of(std::string_view("/\0", 2)) != std::string::npos))
      return Fail(where + ".file: " + Quote(share.file) + " is not a plain file name");
  }
  for (size_t i = 0; i < c.tmpfs.size(); ++i) {
    std::string where = Index("tmpfs", i);
    CELLA_TRY(CheckMountPath(where + ".path", c.tmpfs[i].path, mount_paths));
    if (c.tmpfs[i].size_mib < 0) return Fail(where + ".size_mib: negative");
  }
  // The tmpfs mounts come last (after the switch of root), so one above a
  // volume, share or disk would hide it: refuse rather than lose it.
  std::vector<std::string> tmpfs_paths;
  for (const TmpfsMount& t : c.tmpfs) tmpfs_paths.push_back(t.path);
  if (c.read_only_root) {
    tmpfs_paths.push_back("/tmp");
    tmpfs_paths.push_back("/run");
  }
  auto beneath_tmpfs = [&](const std::string& what, const std::string& path) -> Status {
    for (const std::string& t : tmpfs_paths) {
      std::string prefix = t.ends_with('/') ? t : t + "/";
      if (path.starts_with(prefix))
        return Fail(what + ": " + Quote(path) + " is inside the tmpfs at " + Quote(t) +
                    ", which would hide it; mount it elsewhere");
    }
    return {};
  };
  for (size_t i = 0; i < c.volume_mounts.size(); ++i)
    CELLA_TRY(beneath_tmpfs(Index("volume_mounts", i) + ".path", c.volume_mounts[i].path));
  for (size_t i = 0; i < c.host_shares.size(); ++i)
    CELLA_TRY(beneath_tmpfs(Index("host_shares", i) + ".path", c.host_shares[i].path));
  for (size_t i = 0; i < c.disks.size(); ++i)
    CELLA_TRY(beneath_tmpfs(Index("disks", i) + ".path", c.disks[i].path));

  if (!c.hostname.empty()) CELLA_TRY(CheckHostName("hostname", c.hostname, 64));
  for (size_t i = 0; i < c.dns_servers.size(); ++i)
    CELLA_TRY(CheckIP(Index("dns_servers", i), c.dns_servers[i]));
  for (size_t i = 0; i < c.extra_hosts.size(); ++i) {
    std::string where = Index("extra_hosts", i);
    CELLA_TRY(CheckHostName(where + ".host", c.extra_hosts[i].host, 253));
    CELLA_TRY(CheckIP(where + ".ip", c.extra_hosts[i].ip));
  }
  if (c.mtu != 0 && (c.mtu < kMinMtu || c.mtu > kMaxMtu))
    return Fail("mtu: " + std::to_string(c.mtu) + " is out of range " + std::to_string(kMinMtu) +
                ".." + std::to_string(kMaxMtu));

  if (c.overlay_root) {
    const OverlayRoot& r = *c.overlay_root;
    if (r.lower.empty()) return Fail("overlay_root.lower: at least one lower layer is required");
    for (size_t i = 0; i < r.lower.size(); ++i) {
      std::string where = Index("overlay_root.lower", i);
      CELLA_TRY(CheckDevice(where + ".device", r.lower[i].device));
      CELLA_TRY(CheckFsType(where + ".fstype", r.lower[i].fstype));
    }
    CELLA_TRY(CheckDevice("overlay_root.upper_device", r.upper_device, Presence::kOptional));
    CELLA_TRY(CheckFsType("overlay_root.upper_fstype", r.upper_fstype));
    if (r.upper_device.empty() && !r.upper_fstype.empty())
      return Fail("overlay_root.upper_fstype: set without upper_device");
    if (!c.root_device.empty()) return Fail("root_device: cannot be combined with overlay_root");
  }
  CELLA_TRY(CheckDevice("root_device", c.root_device, Presence::kOptional));
  CELLA_TRY(CheckFsType("root_fstype", c.root_fstype));

  CELLA_TRY(CheckNoNul("user", c.user));
  if (std::count(c.user.begin(), c.user.end(), ':') > 1)
    return Fail("user: " + Quote(c.user) + " has more than one ':' (want user or user:group)");
  if (!c.user.empty() && (c.user.front() == ':' || c.user.back() == ':'))
    return Fail("user: " + Quote(c.user) + " has an empty user or group part");
  if (!std::isfinite(c.cpus) || c.cpus < 0 || c.cpus > kMaxCpus)
    return Fail("cpus: " + std::to_string(c.cpus) + " is out of range 0.." +
                std::to_string(static_cast<int>(kMaxCpus)));
  if (c.cpus > 0 && c.cpus < 0.01) return Fail("cpus: must be at least 0.01 when set");
  if (c.agent_port.empty() || c.agent_port.size() > 64)
    return Fail("agent_port: want 1..64 characters");
  for (char ch : c.agent_port) {
    bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '-' || ch == '_';
    if (!ok)
      return Fail("agent_port: " + Quote(c.agent_port) +
                  " has a character other than [A-Za-z0-9._-]");
  }
  return {};
}

Result<Config> ParseConfig(std::string_view json) {
  if (json.size() > kMaxConfigBytes)
    return Fail("config: " + std::to_string(json.size()) + " bytes is larger than the limit of " +
                std::to_string(kMaxConfigBytes));
  // nlohmann reports syntax errors by exception; this is that boundary.
  Json doc;
  try {
    doc = Json::parse(json);
  } catch (const Json::exception& e) {
    return Fail(std::string("config: invalid JSON: ") + e.what());
  }
  Result<Config> config;
  try {
    config = Decode(doc);
  } catch (const Json::exception& e) {
    return Fail(std::string("config: ") + e.what());
  }
  if (!config) return config;
  CELLA_TRY(ValidateConfig(*config));
  return config;
}

std::string SerializeConfig(const Config& c) {
  OrderedJson out = OrderedJson::object();
  // Seed fields: the Go struct's order and omitempty rules.
  out["entrypoint"] = c.entrypoint;
  out["cmd"] = c.cmd;
  out["workdir"] = c.workdir;
  out["env"] = OrderedJson::object();
  for (const auto& [k, v] : c.env) out["env"][k] = v;
  out["network_enabled"] = c.network_enabled;
  if (!c.guest_ip.empty()) out["guest_ip"] = c.guest_ip;
  if (c.guest_cidr != 0) out["guest_cidr"] = c.guest_cidr;
  if (!c.guest_gw.empty()) out["guest_gw"] = c.guest_gw;
  if (!c.guest_dns.empty()) out["guest_dns"] = c.guest_dns;
  if (!c.volume_mounts.empty()) {
    OrderedJson mounts = OrderedJson::array();
    for (const VolumeMount& m : c.volume_mounts) {
      OrderedJson j = OrderedJson::object();
      j["device"] = m.device;
      j["path"] = m.path;
      j["mode"] = ToString(m.mode);
      if (!m.overlay_device.empty()) j["overlay_device"] = m.overlay_device;
      mounts.push_back(std::move(j));
    }
    out["volume_mounts"] = std::move(mounts);
  }
  out["init_mode"] = ToString(c.init_mode);
  if (c.skip_kernel_headers) out["skip_kernel_headers"] = true;
  if (c.skip_guest_agent) out["skip_guest_agent"] = true;

  // Extensions: all omitempty.
  if (c.has_gpu) out["has_gpu"] = true;
  if (!c.hostname.empty()) out["hostname"] = c.hostname;
  if (!c.dns_servers.empty()) out["dns_servers"] = c.dns_servers;
  if (!c.extra_hosts.empty()) {
    OrderedJson hosts = OrderedJson::array();
    for (const HostEntry& h : c.extra_hosts) {
      OrderedJson j = OrderedJson::object();
      j["host"] = h.host;
      j["ip"] = h.ip;
      hosts.push_back(std::move(j));
    }
    out["extra_hosts"] = std::move(hosts);
  }
  if (c.mtu != 0) out["mtu"] = c.mtu;
  if (!c.guest_mac.empty()) out["guest_mac"] = c.guest_mac;
  if (c.no_network) out["no_network"] = true;
  if (c.privileged) out["privileged"] = true;
  if (c.overlay_root) {
    OrderedJson root = OrderedJson::object();
    OrderedJson lower = OrderedJson::array();
    for (const LowerLayer& l : c.overlay_root->lower) {
      OrderedJson j = OrderedJson::object();
      j["device"] = l.device;
      if (!l.fstype.empty()) j["fstype"] = l.fstype;
      lower.push_back(std::move(j));
    }
    root["lower"] = std::move(lower);
    if (!c.overlay_root->upper_device.empty()) root["upper_device"] = c.overlay_root->upper_device;
    if (!c.overlay_root->upper_fstype.empty()) root["upper_fstype"] = c.overlay_root->upper_fstype;
    out["overlay_root"] = std::move(root);
  }
  if (!c.root_device.empty()) out["root_device"] = c.root_device;
  if (!c.root_fstype.empty()) out["root_fstype"] = c.root_fstype;
  if (!c.disks.empty()) {
    OrderedJson disks = OrderedJson::array();
    for (const Disk& d : c.disks) {
      OrderedJson j = OrderedJson::object();
      j["device"] = d.device;
      j["path"] = d.path;
      if (d.read_only) j["read_only"] = true;
      disks.push_back(std::move(j));
    }
    out["disks"] = std::move(disks);
  }
  if (!c.host_shares.empty()) {
    OrderedJson shares = OrderedJson::array();
    for (const HostShare& share : c.host_shares) {
      OrderedJson j = OrderedJson::object();
      j["tag"] = share.tag;
      j["path"] = share.path;
      j["mode"] = ToString(share.mode);
      if (!share.file.empty()) j["file"] = share.file;
      if (share.fuse) j["fuse"] = true;
      shares.push_back(std::move(j));
    }
    out["host_shares"] = std::move(shares);
  }
  if (!c.user.empty()) out["user"] = c.user;
  if (c.cpus != 0) out["cpus"] = c.cpus;
  if (c.keep_alive) out["keep_alive"] = true;
  if (c.tty) out["tty"] = true;
  if (!c.ca_certificates.empty()) out["ca_certificates"] = c.ca_certificates;
  if (!c.agent_port.empty() && c.agent_port != kDefaultAgentPort) out["agent_port"] = c.agent_port;
  if (c.read_only_root) out["read_only_root"] = true;
  if (!c.tmpfs.empty()) {
    OrderedJson mounts = OrderedJson::array();
    for (const TmpfsMount& t : c.tmpfs) {
      OrderedJson j = OrderedJson::object();
      j["path"] = t.path;
      if (t.size_mib != 0) j["size_mib"] = t.size_mib;
      mounts.push_back(std::move(j));
    }
    out["tmpfs"] = std::move(mounts);
  }
  // replace: a Config built in code with invalid UTF-8 must not throw here.
  return out.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

}  // namespace cella::protocol
