#include "host/net/secrets.h"

#include <algorithm>
#include <array>

namespace cella::net {
namespace {

std::string PercentEncode(std::string_view value) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (char c : value) {
    auto u = static_cast<unsigned char>(c);
    if ((u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || (u >= '0' && u <= '9') || u == '-' ||
        u == '.' || u == '_' || u == '~') {
      out += c;
    } else {
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 0xf];
    }
  }
  return out;
}

void ReplaceAll(std::string& text, std::string_view from, std::string_view to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
}

bool EqualsIgnoringCase(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
           return lower(x) == lower(y);
         });
}

}  // namespace

bool SecretMayTravelInHeader(std::string_view name) {
  // Standard headers (RFC 9110/9111/9112, 6265, 6455, Fetch): framing,
  // routing, content negotiation, caching, cookies, CORS and WebSocket.
  static constexpr std::array<std::string_view, 38> kStandard = {"host",
                                                                 "content-length",
                                                                 "transfer-encoding",
                                                                 "connection",
                                                                 "upgrade",
                                                                 "te",
                                                                 "trailer",
                                                                 "keep-alive",
                                                                 "expect",
                                                                 "content-type",
                                                                 "content-encoding",
                                                                 "content-language",
                                                                 "content-range",
                                                                 "content-location",
                                                                 "range",
                                                                 "accept",
                                                                 "accept-encoding",
                                                                 "accept-language",
                                                                 "accept-charset",
                                                                 "user-agent",
                                                                 "referer",
                                                                 "origin",
                                                                 "via",
                                                                 "forwarded",
                                                                 "cookie",
                                                                 "cache-control",
                                                                 "pragma",
                                                                 "date",
                                                                 "if-match",
                                                                 "if-none-match",
                                                                 "if-modified-since",
                                                                 "if-unmodified-since",
                                                                 "if-range",
                                                                 "max-forwards",
                                                                 "sec-websocket-key",
                                                                 "sec-websocket-version",
                                                                 "sec-websocket-extensions",
                                                                 "x-forwarded-for"};
  if (EqualsIgnoringCase(name, "authorization") || EqualsIgnoringCase(name, "proxy-authorization"))
    return true;
  return std::none_of(kStandard.begin(), kStandard.end(), [&](std::string_view standard) {
    return EqualsIgnoringCase(name, standard);
  });
}

std::optional<std::string> SubstituteSecrets(const Policy& policy, std::string_view host,
                                             http::RequestHead& head) {
  constexpr size_t kMinScannedSecret = 6;
  auto head_contains = [&](std::string_view needle) {
    if (head.method.find(needle) != std::string::npos) return true;
    if (head.target.find(needle) != std::string::npos) return true;
    for (const http::Header& header : head.headers) {
      if (header.name.find(needle) != std::string::npos) return true;
      if (header.value.find(needle) != std::string::npos) return true;
    }
    return false;
  };
  // Refusal is decided before anything is replaced, so a refused head is
  // never half-substituted.
  for (const Secret& secret : policy.secrets()) {
    if (Policy::SecretAppliesTo(secret, host)) continue;
    if (head_contains(secret.placeholder))
      return "secret " + secret.name + " may not be sent to " + std::string(host);
    // The real value too: an allowed upstream that echoes its request hands
    // the guest the value, which must not then walk to another host. Values
    // shorter than kMinScannedSecret would match ordinary text.
    if (secret.value.size() >= kMinScannedSecret &&
        (head_contains(secret.value) || head_contains(PercentEncode(secret.value))))
      return "the value of secret " + secret.name + " may not be sent to " + std::string(host);
  }
  for (const Secret& secret : policy.secrets()) {
    if (!Policy::SecretAppliesTo(secret, host)) continue;
    for (http::Header& header : head.headers) {
      if (SecretMayTravelInHeader(header.name))
        ReplaceAll(header.value, secret.placeholder, secret.value);
    }
    size_t query = head.target.find('?');
    if (query != std::string::npos) {
      size_t fragment = head.target.find('#', query);
      std::string part = head.target.substr(
          query, fragment == std::string::npos ? std::string::npos : fragment - query);
      ReplaceAll(part, secret.placeholder, PercentEncode(secret.value));
      head.target.replace(
          query, fragment == std::string::npos ? std::string::npos : fragment - query, part);
    }
  }
  return std::nullopt;
}

}  // namespace cella::net
