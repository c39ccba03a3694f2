// Pure text builders and parsers for the guest init: no I/O, so every rule
// about what ends up in /etc/hosts, /etc/resolv.conf, cpu.max, the workload's
// environment and the console is unit-tested on the host.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "protocol/config.h"

namespace cella::init {

using protocol::kDefaultPath;
// cgroup v2 cpu.max period: the kernel default, 100 ms.
inline constexpr int64_t kCpuPeriodUs = 100000;

// /etc/hosts: localhost (v4 and v6), the sandbox's own name (on guest_ip when
// the network is up, else 127.0.1.1 as Debian does), then extra_hosts in order.
std::string HostsFileContent(const protocol::Config& config);

// The name servers the guest uses: dns_servers when set, else guest_dns, and
// none when the network is off.
std::vector<std::string> EffectiveDnsServers(const protocol::Config& config);

// /etc/resolv.conf for those servers ("nameserver X" lines).
std::string ResolvConfContent(const std::vector<std::string>& servers);

// Network byte order netmask for a prefix length 0..32.
Result<uint32_t> NetmaskFromCidr(int prefix_length);

// cgroup v2 cpu.max content "<quota> <period>" for fractional CPUs (> 0).
Result<std::string> CpuMaxContent(double cpus);

// "KEY=VALUE", the form execve's environment takes.
std::string EnvEntry(std::string_view key, std::string_view value);

// "K=V" strings for the workload: the config's env (sorted by name), plus
// PATH (kDefaultPath) and HOME when the config does not set them.
std::vector<std::string> WorkloadEnvironment(const std::map<std::string, std::string>& env,
                                             std::string_view home);

// The value of NAME in a "K=V" list, or empty.
std::string EnvLookup(const std::vector<std::string>& env, std::string_view name);

// argv = entrypoint ++ cmd (the OCI/docker rule).
std::vector<std::string> WorkloadArgv(const protocol::Config& config);

// Module groups of cella.order: one absolute path per line; blank lines and
// '#' comments are skipped, surrounding whitespace trimmed. A line "@name"
// ([a-z0-9_]+) starts a group; paths before any such line form the boot group
// (name ""), which is always first in the result (maybe empty). A relative
// path, a bad or repeated group name is an error naming its line.
struct ModuleGroup {
  std::string name;
  std::vector<std::string> paths;

  bool operator==(const ModuleGroup&) const = default;
};
Result<std::vector<ModuleGroup>> ParseModuleOrder(std::string_view text);

// Groups the host may put in cella.order (src/host/kernel/modules.h) that a
// cold boot loads only once the config shows it needs them.
inline constexpr std::string_view kModuleGroupNetwork = "network";
inline constexpr std::string_view kModuleGroupShares = "shares";

// Whether a group may wait for the config (a known optional group). Any other
// group, and every group of a template boot, is loaded at boot.
bool ModuleGroupDeferrable(std::string_view group);
// Whether this sandbox needs a deferrable group: "network" when the network
// is on, "shares" when there are host shares or the sandbox is privileged
// (its workload may mount FUSE itself, as it could after a warm start).
bool ModuleGroupNeeded(std::string_view group, const protocol::Config& config);

// True when the kernel command line has cella.debug=1.
bool KernelCmdlineWantsDebug(std::string_view cmdline);

// The tty names of the kernel command line's console= arguments, in order,
// options cut off ("console=ttyS0,115200n8" gives "ttyS0"). Names that are
// not plain [A-Za-z0-9_] (e.g. "/dev/x", empty) are left out: they become
// systemd unit instance names.
std::vector<std::string> KernelConsoleTtys(std::string_view cmdline);

// systemd mode: the cella-agent.service unit that runs the agent binary at
// agent_path on config.agent_port, asking systemd to power off on the host's
// shutdown op, hardened unless config.privileged.
std::string SystemdAgentUnit(const protocol::Config& config, std::string_view agent_path);

// "lowerdir=A:B,upperdir=U,workdir=W". Refuses paths containing ':' or ','
// (they would be read as separators by overlayfs).
Result<std::string> OverlayMountOptions(const std::vector<std::string>& lower_dirs,
                                        std::string_view upper_dir, std::string_view work_dir);

// udev's name for a virtio disk with that serial: characters outside
// [A-Za-z0-9#+-.:=@_] become '_', surrounding whitespace is trimmed.
std::string DiskIdLinkName(std::string_view serial);

// The console line (after the "cella-init: " prefix) for the main
// process's end, from a waitpid status: "main exited code=N" or
// "main exited signal=N". The host parses it from the console log.
std::string MainExitLine(int wait_status);

// Finds argv0 in a PATH list the way execvp would, using is_executable to
// test candidates. A name containing '/' is returned as is. Empty result:
// not found.
template <class IsExecutable>
std::string SearchPath(std::string_view argv0, std::string_view path_list,
                       IsExecutable is_executable) {
  if (argv0.find('/') != std::string_view::npos) return std::string(argv0);
  size_t pos = 0;
  while (pos <= path_list.size()) {
    size_t end = path_list.find(':', pos);
    if (end == std::string_view::npos) end = path_list.size();
    std::string dir(path_list.substr(pos, end - pos));
    if (dir.empty()) dir = ".";  // POSIX: an empty PATH entry is the current directory
    std::string candidate = dir + "/" + std::string(argv0);
    if (is_executable(candidate)) return candidate;
    pos = end + 1;
  }
  return {};
}

}  // namespace cella::init
