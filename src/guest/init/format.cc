#include "guest/init/format.h"

#include <arpa/inet.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>

namespace cella::init {

std::string HostsFileContent(const protocol::Config& config) {
  std::string out = "# Written by cella-init at boot.\n";
  out += "127.0.0.1\tlocalhost\n";
  out += "::1\tlocalhost ip6-localhost ip6-loopback\n";
  if (!config.hostname.empty()) {
    bool network_up = config.network_enabled && !config.no_network && !config.guest_ip.empty();
    out +=
        (network_up ? config.guest_ip : std::string("127.0.1.1")) + "\t" + config.hostname + "\n";
  }
  for (const auto& entry : config.extra_hosts) out += entry.ip + "\t" + entry.host + "\n";
  return out;
}

std::vector<std::string> EffectiveDnsServers(const protocol::Config& config) {
  if (config.no_network || !config.network_enabled) return {};
  if (!config.dns_servers.empty()) return config.dns_servers;
  if (!config.guest_dns.empty()) return {config.guest_dns};
  return {};
}

std::string ResolvConfContent(const std::vector<std::string>& servers) {
  std::string out = "# Written by cella-init at boot.\n";
  for (const auto& server : servers) out += "nameserver " + server + "\n";
  return out;
}

Result<uint32_t> NetmaskFromCidr(int prefix_length) {
  if (prefix_length < 0 || prefix_length > 32)
    return Fail("prefix length " + std::to_string(prefix_length) + " is out of range 0..32");
  uint32_t host_order = prefix_length == 0 ? 0 : ~uint32_t{0} << (32 - prefix_length);
  return htonl(host_order);
}

Result<std::string> CpuMaxContent(double cpus) {
  if (!std::isfinite(cpus) || cpus <= 0 || cpus > protocol::kMaxCpus)
    return Fail("cpus " + std::to_string(cpus) + " is not a usable CPU limit");
  // The kernel refuses quotas below 1 ms.
  int64_t quota = std::max<int64_t>(1000, std::llround(cpus * kCpuPeriodUs));
  return std::to_string(quota) + " " + std::to_string(kCpuPeriodUs);
}

std::string EnvLookup(const std::vector<std::string>& env, std::string_view name) {
  for (const auto& kv : env) {
    if (kv.size() > name.size() && kv.starts_with(name) && kv[name.size()] == '=')
      return kv.substr(name.size() + 1);
  }
  return {};
}

std::string EnvEntry(std::string_view key, std::string_view value) {
  std::string entry;
  entry.reserve(key.size() + 1 + value.size());
  entry.append(key).append("=").append(value);
  return entry;
}

std::vector<std::string> WorkloadEnvironment(const std::map<std::string, std::string>& env,
                                             std::string_view home) {
  std::vector<std::string> out;
  out.reserve(env.size() + 2);  // + PATH and HOME
  for (const auto& [key, value] : env) out.push_back(EnvEntry(key, value));
  if (!env.contains("PATH")) out.push_back("PATH=" + std::string(kDefaultPath));
  if (!env.contains("HOME")) out.push_back("HOME=" + std::string(home.empty() ? "/" : home));
  return out;
}

std::vector<std::string> WorkloadArgv(const protocol::Config& config) {
  std::vector<std::string> argv = config.entrypoint;
  argv.insert(argv.end(), config.cmd.begin(), config.cmd.end());
  return argv;
}

namespace {
std::string_view Trim(std::string_view s) {
  while (!s.empty() &&
         (s.front() == ' ' || s.front() == '\t' || s.front() == '\r' || s.front() == '\n'))
    s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n'))
    s.remove_suffix(1);
  return s;
}
}  // namespace

Result<std::vector<ModuleGroup>> ParseModuleOrder(std::string_view text) {
  std::vector<ModuleGroup> out = {ModuleGroup{}};
  size_t line_number = 0;
  while (!text.empty()) {
    ++line_number;
    size_t end = text.find('\n');
    std::string_view line = Trim(text.substr(0, end));
    text = end == std::string_view::npos ? std::string_view{} : text.substr(end + 1);
    if (line.empty() || line.front() == '#') continue;
    if (line.front() == '@') {
      std::string_view name = line.substr(1);
      bool valid = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
      });
      if (!valid)
        return Fail("line " + std::to_string(line_number) + ": bad module group \"" +
                    std::string(line) + "\"");
      for (const ModuleGroup& group : out) {
        if (group.name == name)
          return Fail("line " + std::to_string(line_number) + ": module group \"" +
                      std::string(name) + "\" repeated");
      }
      out.push_back(ModuleGroup{std::string(name), {}});
      continue;
    }
    if (line.front() != '/')
      return Fail("line " + std::to_string(line_number) + ": module path \"" + std::string(line) +
                  "\" is not absolute");
    out.back().paths.emplace_back(line);
  }
  return out;
}

bool ModuleGroupDeferrable(std::string_view group) {
  return group == kModuleGroupNetwork || group == kModuleGroupShares;
}

bool ModuleGroupNeeded(std::string_view group, const protocol::Config& config) {
  if (group == kModuleGroupNetwork) return config.network_enabled && !config.no_network;
  if (group == kModuleGroupShares) return !config.host_shares.empty() || config.privileged;
  return true;
}

bool KernelCmdlineWantsDebug(std::string_view cmdline) {
  size_t pos = 0;
  while (pos < cmdline.size()) {
    size_t end = cmdline.find_first_of(" \t\n", pos);
    if (end == std::string_view::npos) end = cmdline.size();
    if (cmdline.substr(pos, end - pos) == "cella.debug=1") return true;
    pos = end + 1;
  }
  return false;
}

std::vector<std::string> KernelConsoleTtys(std::string_view cmdline) {
  constexpr std::string_view kKey = "console=";
  std::vector<std::string> ttys;
  size_t pos = 0;
  while (pos < cmdline.size()) {
    size_t end = cmdline.find_first_of(" \t\n", pos);
    if (end == std::string_view::npos) end = cmdline.size();
    std::string_view arg = cmdline.substr(pos, end - pos);
    pos = end + 1;
    if (!arg.starts_with(kKey)) continue;
    std::string_view tty = arg.substr(kKey.size());
    tty = tty.substr(0, tty.find(','));
    bool plain = !tty.empty();
    for (char c : tty) {
      bool ok =
          (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
      if (!ok) plain = false;
    }
    if (plain) ttys.emplace_back(tty);
  }
  return ttys;
}

std::string SystemdAgentUnit(const protocol::Config& config, std::string_view agent_path) {
  // DefaultDependencies=no: the host waits for the agent, so it must not wait
  // for the rest of boot (basic.target, sockets, timers). That also leaves out
  // Conflicts=shutdown.target: the agent keeps serving until the final kill,
  // so the reply to the host's shutdown op is not cut off by its own stop.
  return "# Written by cella-init: the cella agent serves the host link in systemd mode.\n"
         "[Unit]\n"
         "Description=cella guest agent\n"
         "DefaultDependencies=no\n"
         "After=local-fs.target\n"
         "\n"
         "[Service]\n"
         "ExecStart=" +
         std::string(agent_path) + " --virtio-port " + config.agent_port +
         " --on-shutdown poweroff" + (config.privileged ? "" : " --harden") +
         "\n"
         "Restart=always\n"
         "RestartSec=1\n"
         "\n"
         "[Install]\n"
         "WantedBy=multi-user.target\n";
}

Result<std::string> OverlayMountOptions(const std::vector<std::string>& lower_dirs,
                                        std::string_view upper_dir, std::string_view work_dir) {
  if (lower_dirs.empty()) return Fail("overlay needs at least one lower directory");
  auto check = [](std::string_view dir) -> Status {
    if (dir.find_first_of(":,") != std::string_view::npos)
      return Fail("overlay directory \"" + std::string(dir) + "\" contains ':' or ','");
    return {};
  };
  std::string out = "lowerdir=";
  for (size_t i = 0; i < lower_dirs.size(); ++i) {
    CELLA_TRY(check(lower_dirs[i]));
    if (i > 0) out += ':';
    out += lower_dirs[i];
  }
  if (!upper_dir.empty()) {
    CELLA_TRY(check(upper_dir));
    CELLA_TRY(check(work_dir));
    out += ",upperdir=" + std::string(upper_dir) + ",workdir=" + std::string(work_dir);
  }
  return out;
}

std::string DiskIdLinkName(std::string_view serial) {
  std::string out = "virtio-";
  for (char ch : Trim(serial)) {
    bool safe = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                std::string_view("#+-.:=@_").find(ch) != std::string_view::npos;
    out += safe ? ch : '_';
  }
  return out;
}

std::string MainExitLine(int wait_status) {
  if (WIFSIGNALED(wait_status))
    return "main exited signal=" + std::to_string(WTERMSIG(wait_status));
  return "main exited code=" + std::to_string(WEXITSTATUS(wait_status));
}

}  // namespace cella::init
