// What it takes to boot a sandbox again: recorded in the state store when the
// sandbox is created, read by its supervisor at every (re)start. Versioned
// JSON; the guest half is the config.json schema itself.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/sandbox/compose.h"
#include "protocol/config.h"

namespace cella::sandbox {

struct VolumeSpec {
  std::string name;
  std::string host_path;  // the volume's image
  std::string guest_path;
  protocol::MountMode mode = protocol::MountMode::kReadWrite;
  std::string overlay_path;  // kOverlay: this sandbox's private layer
};

struct PortSpec {
  std::string host_ip = "127.0.0.1";
  uint16_t host_port = 0;
  uint16_t guest_port = 0;
};

struct SandboxSpec {
  // config.json before Compose: command, env, user, workdir, network knobs.
  protocol::Config guest;
  std::string image;            // as the user named it; empty = built-in
  std::string root_image_path;  // erofs; empty = the built-in image
  MachineShape shape;
  std::vector<VolumeSpec> volumes;
  std::vector<PortSpec> ports;
  std::string kernel_path;  // empty = the cached default kernel
  std::string accel = "auto";
  int boot_timeout_s = 120;
  std::string upper_image;  // ext4 writable layer; empty = tmpfs
};

std::string EncodeSpec(const SandboxSpec& spec);
// Errors name the field; the guest half is validated by ParseConfig.
Result<SandboxSpec> DecodeSpec(std::string_view json);

}  // namespace cella::sandbox
