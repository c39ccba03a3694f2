#include "host/registry/reference.h"

#include <arpa/inet.h>

#include <algorithm>

namespace cella::registry {
namespace {

bool IsLowerAlnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
bool IsHex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

// One path component: [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
bool ValidPathComponent(std::string_view c) {
  if (c.empty() || !IsLowerAlnum(c.front()) || !IsLowerAlnum(c.back())) return false;
  size_t i = 0;
  while (i < c.size()) {
    if (IsLowerAlnum(c[i])) {
      ++i;
      continue;
    }
    size_t start = i;
    while (i < c.size() && !IsLowerAlnum(c[i])) ++i;
    std::string_view sep = c.substr(start, i - start);
    bool dashes = std::all_of(sep.begin(), sep.end(), [](char x) { return x == '-'; });
    if (!(sep == "." || sep == "_" || sep == "__" || dashes)) return false;
  }
  return true;
}

// [\w][\w.-]{0,127}
bool ValidTag(std::string_view t) {
  if (t.empty() || t.size() > 128) return false;
  auto word = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  };
  if (!word(t[0])) return false;
  return std::all_of(t.begin() + 1, t.end(),
                     [&](char c) { return word(c) || c == '.' || c == '-'; });
}

// host[:port] where host is a DNS name, IPv4 or [IPv6].
bool ValidDomain(std::string_view d) {
  std::string_view host = d;
  std::string_view port;
  if (!d.empty() && d.front() == '[') {
    size_t close = d.find(']');
    if (close == std::string_view::npos) return false;
    std::string inner(d.substr(1, close - 1));
    in6_addr a6{};
    if (inet_pton(AF_INET6, inner.c_str(), &a6) != 1) return false;
    std::string_view rest = d.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return false;
      port = rest.substr(1);
      if (port.empty()) return false;
    }
    host = {};
  } else if (size_t colon = d.rfind(':'); colon != std::string_view::npos) {
    host = d.substr(0, colon);
    port = d.substr(colon + 1);
    if (port.empty()) return false;
  }
  if (!port.empty()) {
    if (port.size() > 5 ||
        !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return false;
  }
  if (d.front() == '[') return true;
  if (host.empty() || host.size() > 253) return false;
  // Labels: alnum with inner dashes; Docker accepts uppercase in domains.
  size_t start = 0;
  while (start <= host.size()) {
    size_t dot = host.find('.', start);
    std::string_view label =
        host.substr(start, dot == std::string_view::npos ? host.npos : dot - start);
    if (label.empty() || label.front() == '-' || label.back() == '-') return false;
    for (char c : label) {
      bool ok =
          (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
      if (!ok) return false;
    }
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return true;
}

}  // namespace

Result<std::string> DigestHex(std::string_view digest) {
  constexpr std::string_view kPrefix = "sha256:";
  if (!digest.starts_with(kPrefix)) {
    size_t colon = digest.find(':');
    if (colon != std::string_view::npos && colon > 0)
      return Fail("unsupported digest algorithm \"" + std::string(digest.substr(0, colon)) +
                  "\" (only sha256)");
    return Fail("invalid digest \"" + std::string(digest) + "\": expected sha256:<64 hex>");
  }
  std::string_view hex = digest.substr(kPrefix.size());
  if (hex.size() != 64 || !std::all_of(hex.begin(), hex.end(), IsHex))
    return Fail("invalid digest \"" + std::string(digest) +
                "\": expected sha256: followed by 64 lowercase hex digits");
  return std::string(hex);
}

std::string Reference::String() const {
  if (!digest.empty()) return Name() + "@" + digest;
  return Name() + ":" + tag;
}

std::string Reference::ApiHost() const {
  if (domain == kDockerHubDomain) return std::string(kDockerHubApiHost);
  return domain;
}

bool IsLoopbackHost(std::string_view host_port) {
  std::string host;
  if (!host_port.empty() && host_port.front() == '[') {
    size_t close = host_port.find(']');
    if (close == std::string_view::npos) return false;
    host = std::string(host_port.substr(1, close - 1));
    in6_addr a6{};
    if (inet_pton(AF_INET6, host.c_str(), &a6) != 1) return false;
    return IN6_IS_ADDR_LOOPBACK(&a6);
  }
  size_t colon = host_port.find(':');
  if (colon != std::string_view::npos && host_port.find(':', colon + 1) != std::string_view::npos) {
    // Bare IPv6 without brackets.
    in6_addr a6{};
    std::string bare(host_port);
    return inet_pton(AF_INET6, bare.c_str(), &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
  }
  host = std::string(host_port.substr(0, colon));
  std::transform(host.begin(), host.end(), host.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (host == "localhost") return true;
  in_addr a4{};
  if (inet_pton(AF_INET, host.c_str(), &a4) != 1) return false;
  return (ntohl(a4.s_addr) >> 24) == 127;
}

Result<Reference> ParseReference(std::string_view text) {
  const std::string quoted = "\"" + std::string(text) + "\"";
  if (text.empty()) return Fail("invalid image reference: empty");
  if (text.size() > 512) return Fail("invalid image reference: longer than 512 bytes");
  for (char c : text) {
    if (static_cast<unsigned char>(c) <= ' ' || static_cast<unsigned char>(c) >= 0x7f)
      return Fail("invalid image reference " + quoted +
                  ": contains whitespace or a non-ASCII byte");
  }
  Reference ref;
  std::string_view rest = text;
  if (size_t at = rest.find('@'); at != std::string_view::npos) {
    ref.digest = std::string(rest.substr(at + 1));
    auto hex = DigestHex(ref.digest);
    if (!hex) return Fail("invalid image reference " + quoted + ": " + hex.error().message);
    rest = rest.substr(0, at);
  }
  // A tag follows the last ':' after the last '/' (a ':' before it is a port).
  size_t last_slash = rest.rfind('/');
  size_t colon = rest.rfind(':');
  if (colon != std::string_view::npos &&
      (last_slash == std::string_view::npos || colon > last_slash)) {
    std::string_view tag = rest.substr(colon + 1);
    if (!ValidTag(tag))
      return Fail("invalid image reference " + quoted + ": invalid tag \"" + std::string(tag) +
                  "\" (allowed: letters, digits, '_', '.', '-'; at most 128; not starting with '.' "
                  "or '-')");
    ref.tag = std::string(tag);
    rest = rest.substr(0, colon);
  }
  if (rest.empty()) return Fail("invalid image reference " + quoted + ": missing repository name");
  std::string_view path = rest;
  size_t first_slash = rest.find('/');
  if (first_slash != std::string_view::npos) {
    std::string_view first = rest.substr(0, first_slash);
    if (first.find('.') != std::string_view::npos || first.find(':') != std::string_view::npos ||
        first == "localhost" || first.front() == '[') {
      if (!ValidDomain(first))
        return Fail("invalid image reference " + quoted + ": invalid registry host \"" +
                    std::string(first) + "\"");
      ref.domain = std::string(first);
      path = rest.substr(first_slash + 1);
    }
  }
  if (ref.domain.empty() || ref.domain == "index.docker.io") ref.domain = kDockerHubDomain;
  if (path.empty()) return Fail("invalid image reference " + quoted + ": missing repository name");
  size_t start = 0;
  while (true) {
    size_t slash = path.find('/', start);
    std::string_view component =
        path.substr(start, slash == std::string_view::npos ? path.npos : slash - start);
    if (!ValidPathComponent(component)) {
      bool upper = std::any_of(component.begin(), component.end(),
                               [](char c) { return c >= 'A' && c <= 'Z'; });
      if (upper)
        return Fail("invalid image reference " + quoted + ": repository name must be lowercase");
      return Fail("invalid image reference " + quoted + ": invalid repository name component \"" +
                  std::string(component) +
                  "\" (allowed: a-z, 0-9, separated by '.', '_', '__' or '-')");
    }
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  ref.repository = std::string(path);
  if (ref.domain == kDockerHubDomain && ref.repository.find('/') == std::string::npos)
    ref.repository = "library/" + ref.repository;
  if (ref.Name().size() > 255)
    return Fail("invalid image reference " + quoted + ": repository name longer than 255 bytes");
  if (ref.tag.empty() && ref.digest.empty()) ref.tag = "latest";
  return ref;
}

}  // namespace cella::registry
