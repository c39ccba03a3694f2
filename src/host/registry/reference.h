// Image references ("alpine", "host:5000/team/app:v1", "repo@sha256:...")
// normalised the way Docker does. Pure functions: thread-safe.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"

namespace cella::registry {

inline constexpr std::string_view kDockerHubDomain = "docker.io";
// Docker Hub's registry API lives on another host than its name.
inline constexpr std::string_view kDockerHubApiHost = "registry-1.docker.io";

struct Reference {
  std::string domain;      // "docker.io", "127.0.0.1:5000", "[::1]:5000"
  std::string repository;  // "library/alpine"
  std::string tag;         // "latest" unless a digest alone was given
  std::string digest;      // "sha256:<64 hex>" or empty

  // "docker.io/library/alpine:latest", "host/repo@sha256:..." (tag dropped
  // when a digest is present: the digest is what gets pulled).
  std::string String() const;
  // "docker.io/library/alpine"
  std::string Name() const { return domain + "/" + repository; }
  // Host (and port) the distribution API is served from.
  std::string ApiHost() const;
  // What to put after /manifests/: the digest when known, else the tag.
  std::string ManifestSelector() const { return digest.empty() ? tag : digest; }
};

Result<Reference> ParseReference(std::string_view text);

// True for 127.0.0.0/8, ::1 and localhost, with or without ":port".
bool IsLoopbackHost(std::string_view host_port);

// Checks "sha256:<64 lowercase hex>" and returns the hex part.
Result<std::string> DigestHex(std::string_view digest);

}  // namespace cella::registry
