// Registry authentication pieces: the WWW-Authenticate challenge, where
// credentials come from (cella's own file written by Login, then
// ~/.docker/config.json), and base64. No network here. Thread-safe except
// that Login/LookupCredentials race with other processes only through the
// atomic rename of the credentials file (last writer wins).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace cella::registry {

struct AuthChallenge {
  std::string scheme;                         // lowercase: "bearer", "basic"
  std::map<std::string, std::string> params;  // realm, service, scope, error...
};

// Parses one challenge: `Bearer
// realm="https://auth/token",service="reg",scope="repository:x:pull"`.
Result<AuthChallenge> ParseWwwAuthenticate(std::string_view header);

struct Credentials {
  std::string username;
  std::string password;
};

std::string Base64Encode(std::string_view bytes);
Result<std::string> Base64Decode(std::string_view text);

// The credentials for `registry_host` ("docker.io", "127.0.0.1:5000") in a
// docker config.json's "auths" (keys may carry a scheme and path, and Docker
// Hub is "https://index.docker.io/v1/"). nullopt when the host has none.
Result<std::optional<Credentials>> CredentialsFromDockerConfig(std::string_view config_json,
                                                               std::string_view registry_host);

// <home>/credentials.json, mode 0600, same "auths" format as docker's.
std::string CellaCredentialsPath(const std::string& home);

// Stores user:password for host (replacing any previous entry).
Status Login(const std::string& home, std::string_view registry_host, std::string_view username,
             std::string_view password);
// Removes host's entry; not an error when there is none.
Status Logout(const std::string& home, std::string_view registry_host);

// cella's file first, then docker_config_path (empty: $DOCKER_CONFIG/config.json
// or ~/.docker/config.json). Missing files are not errors; unreadable or
// malformed ones are.
Result<std::optional<Credentials>> LookupCredentials(const std::string& home,
                                                     std::string_view registry_host,
                                                     const std::string& docker_config_path = {});

}  // namespace cella::registry
