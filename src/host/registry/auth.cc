#include "host/registry/auth.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "base/io.h"
#include "host/os/paths.h"
#include "host/registry/reference.h"

namespace cella::registry {
namespace {

using Json = nlohmann::json;

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

// "https://index.docker.io/v1/" -> "index.docker.io"; "host:5000" stays.
std::string AuthKeyHost(std::string_view key) {
  if (size_t scheme = key.find("://"); scheme != std::string_view::npos)
    key = key.substr(scheme + 3);
  key = key.substr(0, key.find('/'));
  return Lower(key);
}

bool IsDockerHub(std::string_view host) {
  return host == "docker.io" || host == "index.docker.io" || host == "registry-1.docker.io";
}

bool HostMatches(std::string_view key, std::string_view registry_host) {
  std::string a = AuthKeyHost(key);
  std::string b = Lower(registry_host);
  if (a == b) return true;
  return IsDockerHub(a) && IsDockerHub(b);
}

Result<std::optional<Credentials>> FromAuthsImpl(std::string_view config_json,
                                                 std::string_view host) {
  Json doc = Json::parse(config_json.begin(), config_json.end(), nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return Fail("not a JSON object");
  auto auths = doc.find("auths");
  if (auths == doc.end() || auths->is_null()) return std::optional<Credentials>();
  if (!auths->is_object()) return Fail("\"auths\" must be an object");
  for (auto& [key, entry] : auths->items()) {
    if (!HostMatches(key, host)) continue;
    if (!entry.is_object()) return Fail("auths." + key + " must be an object");
    auto auth = entry.find("auth");
    if (auth != entry.end() && auth->is_string() && !auth->get<std::string>().empty()) {
      std::string decoded =
          CELLA_TRY_CTX(Base64Decode(auth->get<std::string>()), "auths." + key + ".auth");
      size_t colon = decoded.find(':');
      if (colon == std::string::npos)
        return Fail("auths." + key + ".auth is not base64 of user:password");
      return std::optional<Credentials>(
          Credentials{decoded.substr(0, colon), decoded.substr(colon + 1)});
    }
    auto user = entry.find("username");
    auto pass = entry.find("password");
    if (user != entry.end() && pass != entry.end() && user->is_string() && pass->is_string())
      return std::optional<Credentials>(
          Credentials{user->get<std::string>(), pass->get<std::string>()});
  }
  return std::optional<Credentials>();
}

Result<std::optional<Credentials>> FromFile(const std::string& path, std::string_view host) {
  auto text = ReadFileToString(path, 1 << 20);
  if (!text) {
    if (text.error().errno_value == ENOENT) return std::optional<Credentials>();
    return std::unexpected(std::move(text.error()));
  }
  return CELLA_TRY_CTX(CredentialsFromDockerConfig(*text, host), path);
}

// Serialises read-modify-write of the credentials file between processes.
Result<UniqueFd> LockCredentials(const std::string& home) {
  CELLA_TRY(host::MakeDirs(home, 0700));
  std::string lock_path = CellaCredentialsPath(home) + ".lock";
  UniqueFd fd(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) return FailErrno("open " + lock_path);
  int rc;
  do rc = ::flock(fd.Get(), LOCK_EX);
  while (rc != 0 && errno == EINTR);
  if (rc != 0) return FailErrno("flock " + lock_path);
  return fd;
}

Status UpdateCredentials(const std::string& home, std::string_view host,
                         const std::optional<Credentials>& creds) {
  UniqueFd lock = CELLA_TRY(LockCredentials(home));
  const std::string path = CellaCredentialsPath(home);
  Json doc = Json::object();
  auto text = ReadFileToString(path, 1 << 20);
  if (text) {
    doc = Json::parse(*text, nullptr, false);
    if (doc.is_discarded() || !doc.is_object())
      return Fail(path + ": not a JSON object; remove it");
  } else if (text.error().errno_value != ENOENT) {
    return std::unexpected(std::move(text.error()));
  }
  if (!doc.contains("auths") || !doc["auths"].is_object()) doc["auths"] = Json::object();
  std::string key = Lower(host);
  if (IsDockerHub(key)) key = "docker.io";
  for (auto it = doc["auths"].begin(); it != doc["auths"].end();) {
    if (HostMatches(it.key(), key))
      it = doc["auths"].erase(it);
    else
      ++it;
  }
  if (creds) {
    doc["auths"][key] = {{"auth", Base64Encode(creds->username + ":" + creds->password)}};
  }
  // A fresh 0600 temporary (O_EXCL), so a leftover file's looser mode never
  // reaches the credentials.
  return WriteFileAtomically(path, doc.dump(2) + "\n", 0600);
}

}  // namespace

Result<AuthChallenge> ParseWwwAuthenticate(std::string_view header) {
  const std::string quoted = "WWW-Authenticate \"" + std::string(header.substr(0, 200)) + "\"";
  size_t i = 0;
  auto skip_space = [&] {
    while (i < header.size() && (header[i] == ' ' || header[i] == '\t')) ++i;
  };
  skip_space();
  size_t start = i;
  while (i < header.size() && header[i] != ' ' && header[i] != '\t') ++i;
  AuthChallenge c;
  c.scheme = Lower(header.substr(start, i - start));
  if (c.scheme.empty()) return Fail(quoted + ": no auth scheme");
  while (true) {
    skip_space();
    if (i >= header.size()) break;
    size_t key_start = i;
    while (i < header.size() && header[i] != '=' && header[i] != ',' && header[i] != ' ') ++i;
    std::string key = Lower(header.substr(key_start, i - key_start));
    if (key.empty() || i >= header.size() || header[i] != '=')
      return Fail(quoted + ": expected key=value");
    ++i;
    std::string value;
    if (i < header.size() && header[i] == '"') {
      ++i;
      bool closed = false;
      while (i < header.size()) {
        char ch = header[i++];
        if (ch == '\\' && i < header.size()) {
          value += header[i++];
        } else if (ch == '"') {
          closed = true;
          break;
        } else {
          value += ch;
        }
      }
      if (!closed) return Fail(quoted + ": unterminated quoted value for " + key);
    } else {
      size_t v = i;
      while (i < header.size() && header[i] != ',' && header[i] != ' ') ++i;
      value = std::string(header.substr(v, i - v));
    }
    c.params[key] = value;
    skip_space();
    if (i < header.size()) {
      if (header[i] != ',') return Fail(quoted + ": expected ',' between parameters");
      ++i;
    }
  }
  return c;
}

std::string Base64Encode(std::string_view bytes) {
  static constexpr char kTable[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += kTable[v >> 18];
    out += kTable[(v >> 12) & 63];
    out += kTable[(v >> 6) & 63];
    out += kTable[v & 63];
  }
  if (size_t rest = bytes.size() - i; rest > 0) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    if (rest == 2) v |= uint8_t(bytes[i + 1]) << 8;
    out += kTable[v >> 18];
    out += kTable[(v >> 12) & 63];
    out += rest == 2 ? kTable[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

Result<std::string> Base64Decode(std::string_view text) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  while (!text.empty() && text.back() == '=') text.remove_suffix(1);
  if (text.size() % 4 == 1) return Fail("invalid base64: bad length");
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : text) {
    int v = value(c);
    if (v < 0) return Fail("invalid base64: unexpected character");
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  return out;
}

Result<std::optional<Credentials>> CredentialsFromDockerConfig(std::string_view config_json,
                                                               std::string_view registry_host) {
  try {
    return FromAuthsImpl(config_json, registry_host);
  } catch (const std::exception& e) {  // nlohmann boundary
    return Fail(std::string("malformed docker config: ") + e.what());
  }
}

std::string CellaCredentialsPath(const std::string& home) { return home + "/credentials.json"; }

Status Login(const std::string& home, std::string_view registry_host, std::string_view username,
             std::string_view password) {
  if (username.empty()) return Fail("login: empty username");
  if (username.find(':') != std::string_view::npos)
    return Fail("login: username must not contain ':'");
  try {
    return UpdateCredentials(home, registry_host,
                             Credentials{std::string(username), std::string(password)});
  } catch (const std::exception& e) {
    return Fail(std::string("login: ") + e.what());
  }
}

Status Logout(const std::string& home, std::string_view registry_host) {
  try {
    return UpdateCredentials(home, registry_host, std::nullopt);
  } catch (const std::exception& e) {
    return Fail(std::string("logout: ") + e.what());
  }
}

Result<std::optional<Credentials>> LookupCredentials(const std::string& home,
                                                     std::string_view registry_host,
                                                     const std::string& docker_config_path) {
  auto own = CELLA_TRY(FromFile(CellaCredentialsPath(home), registry_host));
  if (own) return own;
  std::string docker_path = docker_config_path;
  if (docker_path.empty()) {
    if (const char* dir = ::getenv("DOCKER_CONFIG"); dir != nullptr && *dir == '/') {
      docker_path = std::string(dir) + "/config.json";
    } else if (const char* user_home = ::getenv("HOME");
               user_home != nullptr && *user_home == '/') {
      docker_path = std::string(user_home) + "/.docker/config.json";
    } else {
      return std::optional<Credentials>();
    }
  }
  return FromFile(docker_path, registry_host);
}

}  // namespace cella::registry
