#include "host/rpc/params.h"

#include <cmath>
#include <initializer_list>
#include <string_view>

namespace cella::rpc {
namespace {

using nlohmann::json;

// Checks that `obj` is an object whose keys are all in `known`; `refused`
// names keys matchlock has and cella does not (yet), so the message says so.
Status CheckKeys(const json& obj, const std::string& where,
                 std::initializer_list<const char*> known,
                 std::initializer_list<const char*> refused = {}) {
  if (!obj.is_object()) return Fail(where + ": want an object");
  for (const auto& [key, value] : obj.items()) {
    bool ok = false;
    for (const char* k : known) ok = ok || key == k;
    if (ok) continue;
    const std::string name = where.empty() ? key : where + "." + key;
    for (const char* r : refused) {
      // A refused field left at its zero value asks for nothing: fine.
      if (key == r && !value.is_null() && value != json::object() && value != json::array() &&
          value != json("") && value != json(false) && value != json(0))
        return Fail(name + ": not supported by cella yet");
      if (key == r) ok = true;
    }
    if (!ok) return Fail(name + ": unknown field");
  }
  return {};
}

std::string Name(const std::string& where, const char* key) {
  return where.empty() ? std::string(key) : where + "." + key;
}

Result<std::string> GetString(const json& obj, const std::string& where, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::string();
  if (!it->is_string()) return Fail(Name(where, key) + ": want a string");
  return it->get<std::string>();
}

Result<bool> GetBool(const json& obj, const std::string& where, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return false;
  if (!it->is_boolean()) return Fail(Name(where, key) + ": want true or false");
  return it->get<bool>();
}

Result<int64_t> GetInt(const json& obj, const std::string& where, const char* key, int64_t max) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return int64_t{0};
  if (!it->is_number_integer() && !it->is_number_unsigned())
    return Fail(Name(where, key) + ": want a whole number");
  // An unsigned above int64's range reads as negative here: refused below.
  int64_t v = it->get<int64_t>();
  if (v < 0 || v > max) return Fail(Name(where, key) + ": want 0.." + std::to_string(max));
  return v;
}

Result<std::vector<std::string>> GetStrings(const json& obj, const std::string& where,
                                            const char* key) {
  std::vector<std::string> out;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return out;
  if (!it->is_array()) return Fail(Name(where, key) + ": want an array of strings");
  for (const auto& item : *it) {
    if (!item.is_string()) return Fail(Name(where, key) + ": want an array of strings");
    out.push_back(item.get<std::string>());
  }
  return out;
}

Result<std::map<std::string, std::string>> GetStringMap(const json& obj, const std::string& where,
                                                        const char* key) {
  std::map<std::string, std::string> out;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return out;
  if (!it->is_object()) return Fail(Name(where, key) + ": want an object of strings");
  for (const auto& [k, v] : it->items()) {
    if (!v.is_string()) return Fail(Name(where, key) + "." + k + ": want a string");
    if (k.empty() || k.find('=') != std::string::npos || k.find('\0') != std::string::npos)
      return Fail(Name(where, key) + ": \"" + k + "\" is not a variable name");
    out[k] = v.get<std::string>();
  }
  return out;
}

Status ParseResources(const json& r, CreateParams& p) {
  CELLA_TRY(CheckKeys(r, "resources", {"cpus", "memory_mb", "disk_size_mb"}, {"timeout_seconds"}));
  if (auto it = r.find("cpus"); it != r.end() && !it->is_null()) {
    if (!it->is_number()) return Fail("resources.cpus: want a number");
    double cpus = it->get<double>();
    if (!std::isfinite(cpus) || cpus < 0 || cpus > 256) return Fail("resources.cpus: want 0..256");
    if (cpus > 0) p.cpus = cpus;  // 0: the default, as in matchlock
  }
  if (int64_t mb = CELLA_TRY(GetInt(r, "resources", "memory_mb", 1 << 20)); mb > 0)
    p.memory_mb = static_cast<int>(mb);
  p.disk_size_mb = static_cast<int>(CELLA_TRY(GetInt(r, "resources", "disk_size_mb", 1 << 24)));
  return {};
}

Status ParseNetwork(const json& n, CreateParams& p) {
  CELLA_TRY(CheckKeys(n, "network",
                      {"allowed_hosts", "add_hosts", "block_private_ips", "no_network", "intercept",
                       "secrets", "dns_servers", "hostname", "mtu"},
                      {"interception", "policy_script"}));
  p.allowed_hosts = CELLA_TRY(GetStrings(n, "network", "allowed_hosts"));
  if (auto it = n.find("add_hosts"); it != n.end() && !it->is_null()) {
    if (!it->is_array()) return Fail("network.add_hosts: want an array of {host, ip}");
    for (const auto& entry : *it) {
      CELLA_TRY(CheckKeys(entry, "network.add_hosts[]", {"host", "ip"}));
      std::string host = CELLA_TRY(GetString(entry, "network.add_hosts[]", "host"));
      std::string ip = CELLA_TRY(GetString(entry, "network.add_hosts[]", "ip"));
      if (host.empty() || ip.empty()) return Fail("network.add_hosts[]: want both host and ip");
      p.add_hosts.emplace_back(host, ip);
    }
  }
  bool block_private = true;
  if (auto it = n.find("block_private_ips"); it != n.end() && !it->is_null())
    block_private = CELLA_TRY(GetBool(n, "network", "block_private_ips"));
  p.no_network = CELLA_TRY(GetBool(n, "network", "no_network"));
  p.intercept = CELLA_TRY(GetBool(n, "network", "intercept"));
  if (auto it = n.find("secrets"); it != n.end() && !it->is_null()) {
    if (!it->is_object()) return Fail("network.secrets: want an object NAME: {value, hosts}");
    for (const auto& [name, secret] : it->items()) {
      const std::string where = "network.secrets." + name;
      CELLA_TRY(CheckKeys(secret, where, {"value", "hosts"}, {"placeholder"}));
      SecretParam s;
      s.name = name;
      auto value = secret.find("value");
      if (value == secret.end() || !value->is_string())
        return Fail(where + ".value: want a string");  // never the value itself
      s.value = value->get<std::string>();
      s.hosts = CELLA_TRY(GetStrings(secret, where, "hosts"));
      if (s.hosts.empty()) return Fail(where + ".hosts: name at least one host");
      p.secrets.push_back(std::move(s));
    }
  }
  p.dns_servers = CELLA_TRY(GetStrings(n, "network", "dns_servers"));
  p.hostname = CELLA_TRY(GetString(n, "network", "hostname"));
  p.mtu = static_cast<int>(CELLA_TRY(GetInt(n, "network", "mtu", 65535)));
  if (p.mtu != 0 && p.mtu < 576) return Fail("network.mtu: want 576..65535");
  if (p.no_network && (!p.allowed_hosts.empty() || !p.secrets.empty() || p.intercept))
    return Fail("network.no_network cannot be combined with allowed_hosts, secrets or intercept");
  p.allow_private = !block_private && p.allowed_hosts.empty() && p.secrets.empty();
  return {};
}

Status ParseImageConfig(const json& c, CreateParams& p) {
  CELLA_TRY(CheckKeys(c, "image_config", {"user", "working_dir", "entrypoint", "cmd", "env"}));
  p.user = CELLA_TRY(GetString(c, "image_config", "user"));
  p.working_dir = CELLA_TRY(GetString(c, "image_config", "working_dir"));
  p.entrypoint = CELLA_TRY(GetStrings(c, "image_config", "entrypoint"));
  p.cmd = CELLA_TRY(GetStrings(c, "image_config", "cmd"));
  p.image_env = CELLA_TRY(GetStringMap(c, "image_config", "env"));
  return {};
}

Result<std::string> MountHostPath(const json& m, const std::string& where) {
  std::string host = CELLA_TRY(GetString(m, where, "host_path"));
  if (host.empty()) return Fail(where + ".host_path: required");
  // Absolute only: a relative one would name the rpc process's cwd, and a
  // bare name would turn into a named volume on the way through `-v`.
  if (!host.starts_with('/')) return Fail(where + ".host_path: want an absolute path");
  // The path travels as `-v HOST:GUEST:MODE`.
  if (host.find(':') != std::string::npos) return Fail(where + ".host_path: may not contain ':'");
  return host;
}

// matchlock's VFS, mapped onto cella's host shares (virtiofs) and tmpfs
// mounts (type memory): what cella cannot serve (interception hooks) is
// refused by name.
Status ParseVfs(const json& v, CreateParams& p) {
  CELLA_TRY(CheckKeys(v, "vfs", {"workspace", "direct_mounts", "mounts"}, {"interception"}));
  std::string workspace = CELLA_TRY(GetString(v, "vfs", "workspace"));
  while (workspace.size() > 1 && workspace.back() == '/') workspace.pop_back();
  auto check_guest = [](const std::string& where, const std::string& guest) -> Status {
    if (guest.empty() || guest[0] != '/' || guest.find(':') != std::string::npos)
      return Fail(where + ": want an absolute guest path without ':'");
    return {};
  };
  if (auto it = v.find("mounts"); it != v.end() && !it->is_null()) {
    if (!it->is_object()) return Fail("vfs.mounts: want an object GUEST_PATH: {type, ...}");
    if (!it->empty() && workspace.empty())
      return Fail("vfs.workspace: required when vfs.mounts is set");
    for (const auto& [guest, m] : it->items()) {
      const std::string where = "vfs.mounts." + guest;
      CELLA_TRY(check_guest(where, guest));
      if (guest != workspace && !guest.starts_with(workspace + "/"))
        return Fail(where + ": must be under vfs.workspace (" + workspace + ")");
      CELLA_TRY(CheckKeys(m, where, {"type", "host_path", "readonly", "upper", "lower"}));
      std::string type = CELLA_TRY(GetString(m, where, "type"));
      ShareParam share{"", guest, ""};
      if (type == "host_fs") {
        share.host_path = CELLA_TRY(MountHostPath(m, where));
        share.mode = CELLA_TRY(GetBool(m, where, "readonly")) ? "ro" : "rw";
      } else if (type == "overlay") {
        auto lower = m.find("lower");
        if (lower == m.end() || !lower->is_object() || lower->value("type", "") != "host_fs")
          return Fail(where + ".lower: cella's overlay needs a host_fs lower");
        CELLA_TRY(CheckKeys(*lower, where + ".lower", {"type", "host_path", "readonly"}));
        share.host_path = CELLA_TRY(MountHostPath(*lower, where + ".lower"));
        if (auto upper = m.find("upper"); upper != m.end() && !upper->is_null()) {
          if (!upper->is_object() || upper->value("type", "") != "memory")
            return Fail(where +
                        ".upper: cella's overlay keeps its writes in the sandbox "
                        "(type memory, or leave it out)");
          CELLA_TRY(CheckKeys(*upper, where + ".upper", {"type"}));
        }
        share.mode = "overlay";
      } else if (type == "memory") {
        // A tmpfs in the guest; one above a share is refused by the guest
        // config check (it would hide the share).
        p.memory_mounts.push_back(guest);
        continue;
      } else {
        return Fail(where + ".type: unknown type \"" + type +
                    "\" (want host_fs, overlay or memory)");
      }
      p.shares.push_back(std::move(share));
    }
  } else if (!workspace.empty()) {
    return Fail("vfs.workspace: requires at least one vfs.mounts entry");
  }
  if (auto it = v.find("direct_mounts"); it != v.end() && !it->is_null()) {
    if (!it->is_object())
      return Fail("vfs.direct_mounts: want an object GUEST_PATH: {host_path, readonly}");
    for (const auto& [guest, m] : it->items()) {
      const std::string where = "vfs.direct_mounts." + guest;
      CELLA_TRY(check_guest(where, guest));
      CELLA_TRY(CheckKeys(m, where, {"host_path", "readonly"}));
      ShareParam share{CELLA_TRY(MountHostPath(m, where)), guest, ""};
      share.mode = CELLA_TRY(GetBool(m, where, "readonly")) ? "ro" : "rw";
      p.shares.push_back(std::move(share));
    }
  }
  return {};
}

}  // namespace

Result<CreateParams> ParseCreateParams(const json& params) {
  CreateParams p;
  if (params.is_null()) return Fail("image is required (e.g., alpine:latest)");
  // "id" names the VM in matchlock; cella makes its own IDs.
  CELLA_TRY(CheckKeys(params, "",
                      {"image", "privileged", "launch_entrypoint", "resources", "network", "env",
                       "image_config", "vfs"},
                      {"id", "extra_disks"}));
  p.image = CELLA_TRY(GetString(params, "", "image"));
  if (p.image.empty()) return Fail("image is required (e.g., alpine:latest)");
  p.privileged = CELLA_TRY(GetBool(params, "", "privileged"));
  p.launch_entrypoint = CELLA_TRY(GetBool(params, "", "launch_entrypoint"));
  if (auto it = params.find("resources"); it != params.end() && !it->is_null())
    CELLA_TRY(ParseResources(*it, p));
  if (auto it = params.find("network"); it != params.end() && !it->is_null())
    CELLA_TRY(ParseNetwork(*it, p));
  p.env = CELLA_TRY(GetStringMap(params, "", "env"));
  if (auto it = params.find("image_config"); it != params.end() && !it->is_null())
    CELLA_TRY(ParseImageConfig(*it, p));
  if (auto it = params.find("vfs"); it != params.end() && !it->is_null())
    CELLA_TRY(ParseVfs(*it, p));
  if (!p.launch_entrypoint && (!p.entrypoint.empty() || !p.cmd.empty()))
    return Fail("image_config.entrypoint/cmd: only used with launch_entrypoint");
  return p;
}

}  // namespace cella::rpc
