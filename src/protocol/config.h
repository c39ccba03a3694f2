// The config.json schema: what the host tells the guest init at boot.
//
// The host writes config.json onto a small read-only "config disk"; the guest
// init (PID 1) reads it before anything else. Field names and omitempty rules
// follow the founding Go struct (vmconfig.Config) exactly, so a file written by
// that Go code reads unchanged; cella's extensions use the same snake_case style
// and are all omitted when empty. src/protocol/README.md documents every field.
//
// Pure data + encode/decode: no I/O. Every function here is thread-safe (no
// shared state) and never throws.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::protocol {

inline constexpr std::string_view kDefaultAgentPort = "cella.agent";
// Largest config.json either side accepts; a real one is a few KiB.
// PATH for a process whose environment names none (docker's default).
inline constexpr const char* kDefaultPath =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
inline constexpr size_t kMaxConfigBytes = 1u << 20;
inline constexpr int kMinMtu = 68;  // IPv4 minimum (RFC 791)
inline constexpr int kMaxMtu = 65535;
inline constexpr double kMaxCpus = 1024;

// How a volume appears in the guest (seed: "ro", "rw", "overlay").
enum class MountMode {
  kReadOnly,   // "ro"
  kReadWrite,  // "rw"
  // "overlay": `device` is a shared read-only base, `overlay_device` this
  // sandbox's private writable layer; joined with overlayfs.
  kOverlay,
};

// seed: "exec" (default; also what an empty string means) or "systemd".
enum class InitMode { kExec, kSystemd };

std::string_view ToString(MountMode mode);
std::string_view ToString(InitMode mode);

struct VolumeMount {
  std::string device;  // "/dev/vdX" or "/dev/disk/by-id/virtio-<serial>"
  std::string path;    // absolute mount point inside the guest root
  MountMode mode = MountMode::kReadOnly;
  std::string overlay_device;  // required for kOverlay, refused otherwise

  bool operator==(const VolumeMount&) const = default;
};

// A host directory (or one host file) shared over virtiofs (`-v /host:/guest`).
// The host runs one virtiofsd per share and enforces `mode` itself (ro and
// overlay shares are exported read-only); the guest mounts the tag at `path`.
// kOverlay: the guest keeps its writes in an overlayfs layer on its own
// writable storage, so the host tree is never modified.
struct HostShare {
  std::string tag;   // virtiofs tag: [A-Za-z0-9._-], 1..36 bytes
  std::string path;  // absolute mount point inside the guest root
  MountMode mode = MountMode::kReadOnly;
  // Non-empty: the share is one file, exported as the only entry (this name)
  // of a private directory; the guest binds it onto `path` (a file).
  std::string file;
  // Served over FUSE on the agent link (op serve_share) instead of
  // virtiofs: mounted at boot at a stage, put on `path` (with an overlay
  // for overlay mode, and with what lies beneath it) once the host serves
  // it (op shares_mounted). A single-file overlay share is served as a
  // directory holding only `file`; rw and ro single files are the root.
  bool fuse = false;

  bool operator==(const HostShare&) const = default;
};

// One /etc/hosts line the host asks for (docker --add-host).
struct HostEntry {
  std::string host;
  std::string ip;

  bool operator==(const HostEntry&) const = default;
};

struct LowerLayer {
  std::string device;
  std::string fstype;  // empty = "erofs"

  bool operator==(const LowerLayer&) const = default;
};

// Root filesystem assembled from read-only image layers plus a writable upper.
struct OverlayRoot {
  // Topmost layer first (overlayfs lowerdir order). At least one.
  std::vector<LowerLayer> lower;
  // Empty = a tmpfs upper (changes vanish with the VM).
  std::string upper_device;
  std::string upper_fstype;  // empty = "ext4"

  bool operator==(const OverlayRoot&) const = default;
};

// An extra block device mounted as-is (VMConfig.ExtraDisks).
// `run --tmpfs PATH[:size=N]`: a tmpfs (nosuid, nodev, noexec, mode 1777 as
// docker's) mounted at path after the root is assembled.
struct TmpfsMount {
  std::string path;
  int size_mib = 0;  // 0 = the kernel's default (half the RAM)
  bool operator==(const TmpfsMount&) const = default;
};

struct Disk {
  std::string device;
  std::string path;
  bool read_only = false;

  bool operator==(const Disk&) const = default;
};

struct Config {
  // --- Seed fields (vmconfig.Config), in the seed's order. ---
  std::vector<std::string> entrypoint;
  std::vector<std::string> cmd;
  std::string workdir;  // empty = "/"
  std::map<std::string, std::string> env;
  bool network_enabled = false;
  std::string guest_ip;  // IPv4
  int guest_cidr = 0;    // prefix length, 0..32 (0 = absent)
  std::string guest_gw;  // IPv4, empty = no default route
  std::string guest_dns;
  std::vector<VolumeMount> volume_mounts;
  InitMode init_mode = InitMode::kExec;
  // Accepted for compatibility; cella never installs kernel headers, so this
  // changes nothing.
  bool skip_kernel_headers = false;
  // Run the workload directly under PID 1 with no agent link.
  bool skip_guest_agent = false;
  // GPU passthrough requested. The host lists any GPU driver modules in
  // cella.order; the init itself does nothing more.
  bool has_gpu = false;

  // --- cella extensions (all omitempty). ---
  std::string hostname;
  std::vector<std::string> dns_servers;  // wins over guest_dns when non-empty
  std::vector<HostEntry> extra_hosts;
  int mtu = 0;  // 0 = leave the kernel's default
  // The NIC's address, "02:xx:xx:xx:xx:xx" (unicast, locally administered),
  // drawn by the host for every boot, cold or warm: every warm clone of one
  // template would otherwise keep the address its template booted with.
  // Fork copies and resumes continue their source's guest and keep its
  // address. Empty = keep the NIC's own.
  std::string guest_mac;
  bool no_network = false;
  bool privileged = false;
  std::optional<OverlayRoot> overlay_root;
  // Root when overlay_root is absent. Empty device = "/dev/vda"; empty fstype
  // = try ext4, then erofs (read-only; the init then adds a tmpfs upper).
  std::string root_device;
  std::string root_fstype;
  std::vector<Disk> disks;
  std::vector<HostShare> host_shares;
  std::string user;  // "name", "uid", "uid:gid", "name:group"; empty = root
  double cpus = 0;   // fractional CPUs for a cgroup quota; 0 = no limit
  bool keep_alive = false;
  // The main process gets a pseudo-terminal (`cella run -t`); the host sends
  // the window size after attaching.
  bool tty = false;
  // PEM certificates the guest must trust (the egress proxy's CA when it
  // intercepts TLS): appended to the distribution's CA bundles at boot.
  std::string ca_certificates;
  std::string agent_port = std::string(kDefaultAgentPort);
  // `run --read-only`: the root is remounted read-only once the init has
  // written what it writes (/etc/hosts, ...); /tmp and /run get a tmpfs.
  bool read_only_root = false;
  std::vector<TmpfsMount> tmpfs;

  bool operator==(const Config&) const = default;
};

// Parses and validates. Errors name the field, e.g.
// `volume_mounts[1].mode: unknown mode "rx" (want ro, rw or overlay)`.
// `null` reads as the zero value for every field (Go writes nil slices and
// maps that way); unknown keys are ignored, as Go's encoding/json does, so an
// older guest accepts a newer host's config.
Result<Config> ParseConfig(std::string_view json);

// Seed fields always written (omitempty ones only when set), then extensions
// when set. Compact JSON. ParseConfig(SerializeConfig(c)) == c for any valid c.
std::string SerializeConfig(const Config& config);

// Semantic checks ParseConfig applies after decoding; exposed so code that
// builds a Config (the host) can check it before writing it.
Status ValidateConfig(const Config& config);

// "02:ab:cd:ef:01:23" (either case) as six bytes; nullopt unless it is
// exactly six hex pairs joined by ':' naming a unicast address (not all
// zeros).
std::optional<std::array<uint8_t, 6>> ParseMac(std::string_view text);

// Normalises an absolute guest path: collapses "//" and "/./", strips a
// trailing "/". Refuses relative paths, ".." components and NUL bytes.
Result<std::string> NormalizeGuestPath(std::string_view path);

}  // namespace cella::protocol
