// The `create` parameters of matchlock's JSON-RPC (its api.Config), parsed
// from untrusted JSON into what cella can build. Everything named here is
// either honoured or refused: a field cella does not support yet (VFS hooks,
// memory mounts, network interception rules, policy scripts, extra disks...)
// is an error naming it, never silently dropped. vfs host_fs/overlay mounts
// and direct_mounts become host shares (`-v HOST:GUEST:MODE`).
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"

namespace cella::rpc {

struct SecretParam {
  std::string name;
  std::string value;  // never logged, never in an error message
  std::vector<std::string> hosts;
};

// A host directory (or file) for the sandbox, from vfs.direct_mounts or
// vfs.mounts (host_fs, or overlay of a host_fs lower and a memory upper).
struct ShareParam {
  std::string host_path;
  std::string guest_path;
  std::string mode;  // "rw", "ro" or "overlay"
};

struct CreateParams {
  std::string image;
  bool privileged = false;
  bool launch_entrypoint = false;
  double cpus = 1;       // matchlock's default
  int memory_mb = 512;   // matchlock's default
  int disk_size_mb = 0;  // 0: the writable layer stays in guest RAM
  // Network. Private addresses are blocked unless the client set
  // block_private_ips to false and gave no allow-list or secret (a policy
  // keeps them blocked, as in matchlock's default config).
  std::vector<std::string> allowed_hosts;
  std::vector<std::pair<std::string, std::string>> add_hosts;  // host, ip
  bool allow_private = false;
  bool no_network = false;
  bool intercept = false;
  std::vector<SecretParam> secrets;
  std::vector<std::string> dns_servers;
  std::string hostname;
  int mtu = 0;
  std::map<std::string, std::string> env;
  // image_config: overrides of the image's own settings.
  std::string user;
  std::string working_dir;
  std::vector<std::string> entrypoint;
  std::vector<std::string> cmd;
  std::map<std::string, std::string> image_env;
  std::vector<ShareParam> shares;
  // vfs.mounts of type memory: guest paths that get a fresh tmpfs
  // (`--tmpfs PATH`), gone with the sandbox.
  std::vector<std::string> memory_mounts;
};

// Fails with a message naming the offending field ("network.policy_script:
// not supported by cella"), for the server to answer -32602 with.
Result<CreateParams> ParseCreateParams(const nlohmann::json& params);

}  // namespace cella::rpc
