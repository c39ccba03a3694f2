// Parsing of registry documents: image manifests (Docker v2 schema 2, OCI),
// indexes (OCI index, Docker manifest list) and image configs. Input is
// untrusted: parsers never throw, check every type and cap every count.
// Pure functions: thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::registry {

namespace media {
inline constexpr std::string_view kDockerManifest =
    "application/vnd.docker.distribution.manifest.v2+json";
inline constexpr std::string_view kDockerManifestList =
    "application/vnd.docker.distribution.manifest.list.v2+json";
inline constexpr std::string_view kDockerConfig = "application/vnd.docker.container.image.v1+json";
inline constexpr std::string_view kDockerLayerGzip =
    "application/vnd.docker.image.rootfs.diff.tar.gzip";
inline constexpr std::string_view kDockerLayerTar = "application/vnd.docker.image.rootfs.diff.tar";
inline constexpr std::string_view kOciManifest = "application/vnd.oci.image.manifest.v1+json";
inline constexpr std::string_view kOciIndex = "application/vnd.oci.image.index.v1+json";
inline constexpr std::string_view kOciConfig = "application/vnd.oci.image.config.v1+json";
inline constexpr std::string_view kOciLayerTar = "application/vnd.oci.image.layer.v1.tar";
inline constexpr std::string_view kOciLayerGzip = "application/vnd.oci.image.layer.v1.tar+gzip";
inline constexpr std::string_view kOciLayerZstd = "application/vnd.oci.image.layer.v1.tar+zstd";
// The Accept header value for manifest requests.
inline constexpr std::string_view kManifestAccept =
    "application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json";
}  // namespace media

inline constexpr size_t kMaxManifestBytes = size_t{4} << 20;
inline constexpr size_t kMaxConfigBytes = size_t{8} << 20;

struct Platform {
  std::string os = "linux";
  std::string architecture = "amd64";
  std::string variant;         // "v8", "v7"...; empty matches any
  std::string String() const;  // "linux/arm64/v8"
  bool operator==(const Platform&) const = default;
};

// "os/arch[/variant]"
Result<Platform> ParsePlatform(std::string_view text);

struct Descriptor {
  std::string media_type;
  std::string digest;                // validated "sha256:<hex>"
  int64_t size = 0;                  // validated >= 0
  std::optional<Platform> platform;  // index entries only
  std::map<std::string, std::string> annotations;
};

struct ImageManifest {
  std::string media_type;
  Descriptor config;
  std::vector<Descriptor> layers;  // lowest first; media types are known layer types
};

struct ManifestIndex {
  std::string media_type;
  std::vector<Descriptor> manifests;
};

enum class ManifestKind { kImage, kIndex };

struct ParsedManifest {
  ManifestKind kind = ManifestKind::kImage;
  ImageManifest image;  // kImage
  ManifestIndex index;  // kIndex
};

// content_type is the HTTP Content-Type (may be empty): the body's own
// mediaType wins when present; they must not contradict each other.
Result<ParsedManifest> ParseManifest(std::string_view body, std::string_view content_type = {});

// Picks the image manifest for `wanted` from an index. The error lists the
// platforms the index offers.
Result<Descriptor> SelectPlatform(const ManifestIndex& index, const Platform& wanted);

bool IsKnownLayerMediaType(std::string_view media_type);

struct ImageConfig {
  std::string os;
  std::string architecture;
  std::string variant;
  std::string created;  // RFC 3339 as written by the builder; may be empty
  std::vector<std::string> entrypoint;
  std::vector<std::string> cmd;
  std::vector<std::string> env;  // "KEY=VALUE"
  std::string working_dir;
  std::string user;
  std::vector<std::string> exposed_ports;  // "80/tcp", sorted
  std::map<std::string, std::string> labels;
  std::vector<std::string> diff_ids;  // rootfs.diff_ids ("sha256:...")

  // Entrypoint followed by Cmd, as docker runs it.
  std::vector<std::string> EffectiveCommand() const;
  // True when the effective command starts systemd as init.
  bool IsSystemdInit() const;
};

Result<ImageConfig> ParseImageConfig(std::string_view body);

}  // namespace cella::registry
