// What it takes to boot a sandbox again: recorded in the state store when the
// sandbox is created, read by its supervisor at every (re)start. Versioned
// JSON; the guest half is the config.json schema itself.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/sandbox/compose.h"
#include "host/sandbox/log_files.h"
#include "protocol/config.h"

namespace cella::store {
class StateStore;
}

namespace cella::sandbox {

// `run --restart`: what the supervisor does when the sandbox ends without
// being asked to (its main process exited, the guest powered off, the VM
// died). A stop or kill is never undone. cella has no daemon, so nothing
// restarts a sandbox after a host reboot: `unless-stopped` behaves exactly
// as `always` (docker's difference between the two is only at daemon start).
struct RestartPolicy {
  enum class Kind { kNo, kOnFailure, kAlways, kUnlessStopped };
  Kind kind = Kind::kNo;
  int max_retries = 0;  // on-failure:N; 0 = no limit
  bool operator==(const RestartPolicy&) const = default;
};
// docker's forms: no | on-failure[:N] | always | unless-stopped (N > 0).
Result<RestartPolicy> ParseRestartPolicy(std::string_view text);
std::string ToString(const RestartPolicy& policy);  // as parsed: "on-failure:3"

// Whether a sandbox that ended by itself (not by a stop or kill) is started
// again: `failed` = a non-zero exit code or a failed sandbox; `restarts` =
// how many times the policy restarted it already.
bool ShouldRestart(const RestartPolicy& policy, bool failed, int restarts);

// docker's back-off: 100 ms, doubling with each restart in a row, at most
// one minute; a run that lasted 10 s or more starts the series again.
// `previous` is the last delay (0: none yet).
std::chrono::milliseconds NextRestartDelay(std::chrono::milliseconds previous,
                                           std::chrono::milliseconds last_run);

struct VolumeSpec {
  std::string name;
  std::string host_path;  // the volume's image
  std::string guest_path;
  protocol::MountMode mode = protocol::MountMode::kReadWrite;
  std::string overlay_path;  // kOverlay: this sandbox's private layer
  // `run -v /path`: made for this sandbox under a generated 64-hex name
  // (docker's), removed with it by `rm -v` and whenever the sandbox is
  // removed automatically (`run --rm`, a foreground run, `cella rpc`).
  bool anonymous = false;
};

// `-v /host/path:/guest/path[:mode]`: a host directory or file, served by
// virtiofsd (share.h) while the sandbox runs.
struct ShareSpec {
  std::string host_path;  // absolute, symlinks resolved when the sandbox was created
  std::string guest_path;
  protocol::MountMode mode = protocol::MountMode::kReadWrite;
  bool is_file = false;
};

struct PortSpec {
  std::string host_ip = "127.0.0.1";
  uint16_t host_port = 0;
  uint16_t guest_port = 0;
};

// An API key the sandbox uses without holding it: the guest's env has the
// placeholder; the egress proxy swaps in the value for `hosts` only. The
// value is never part of the spec (the spec is stored on disk).
struct SecretSpec {
  std::string name;
  std::string placeholder;  // CELLA_SECRET_ + 32 hex
  std::vector<std::string> hosts;
  // Host environment variable the value is read from at every (re)start;
  // empty when it was given literally (NAME=VALUE@host), which a restart
  // cannot recover.
  std::string from_env;
};

// `--resolve NAME:PORT:ADDR[:PORT]`: connections to NAME:PORT go to ADDR:PORT.
struct PinSpec {
  std::string name;
  uint16_t port = 0;
  std::string address;
  uint16_t address_port = 0;
};

// Egress policy. enabled: the sandbox gets the sealed network (own
// namespace, every flow through the supervisor's proxy and DNS). `cella run`
// enables it for every sandbox with a network; a spec stored before that
// (enabled=false) keeps QEMU's user-mode NAT.
struct EgressSpec {
  bool enabled = false;
  // No policy flag was given: every public host is reachable (no allow-list,
  // no interception); private, special and host addresses stay closed.
  bool all_public = false;
  std::vector<std::string> allow;  // names, *.globs, IP literals/CIDRs
  bool allow_private = false;
  bool host_loopback = false;  // --allow-host-loopback: 10.0.2.2 is the host's 127.0.0.1
  bool intercept = false;      // terminate TLS with cella's CA (implied by secrets)
  // --dns: the servers cella's resolver asks for the guest (which itself
  // always asks cella's DNS at 10.0.2.3); empty = the host's resolver.
  std::vector<std::string> dns_servers;
  std::vector<PinSpec> pins;
  std::string upstream_ca;  // PEM file to verify upstreams; empty = the host's trust store
  std::vector<SecretSpec> secrets;
};

struct SandboxSpec {
  // config.json before Compose: command, env, user, workdir, network knobs.
  protocol::Config guest;
  std::string image;            // as the user named it; empty = built-in
  std::string root_image_path;  // erofs; empty = the built-in image
  MachineShape shape;
  std::vector<VolumeSpec> volumes;
  std::vector<ShareSpec> shares;
  std::vector<PortSpec> ports;
  std::string kernel_path;  // empty = the cached default kernel
  std::string accel = "auto";
  int boot_timeout_s = 120;
  std::string upper_image;                       // ext4 writable layer; empty = tmpfs
  uint64_t log_max_bytes = kDefaultLogMaxBytes;  // per log file, see log_files.h
  EgressSpec egress;
  std::map<std::string, std::string> labels;  // --label K=V (ps --filter label=K=V)
  // --cold (or CELLA_COLD=1 in the CLI's environment): never start from a
  // memory template (host/template), boot the kernel.
  bool cold = false;
  RestartPolicy restart;
};

std::string EncodeSpec(const SandboxSpec& spec);
// Errors name the field; the guest half is validated by ParseConfig.
Result<SandboxSpec> DecodeSpec(std::string_view json);

// Removes the anonymous volumes of `spec_json` (a sandbox's recorded spec):
// store records and files. Call it after the sandbox's record is gone; a
// volume something else still uses is kept (the store refuses) and named in
// the error, the others are removed anyway.
Status RemoveAnonymousVolumes(store::StateStore& store, const std::string& sandbox_home,
                              std::string_view spec_json);

}  // namespace cella::sandbox
