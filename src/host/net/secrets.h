// Secret substitution in a request head the proxy is about to send: the
// placeholder the guest holds becomes the real value, only toward the
// secret's own hosts and only where a credential travels. Pure (no I/O).
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "host/net/http.h"
#include "host/net/policy.h"

namespace cella::net {

// Where a secret may be substituted: `Authorization`, `Proxy-Authorization`
// and custom (non-standard) headers, and the request-target's query string.
// Never the body, the path, or a standard header that has no business
// carrying a credential (Host, Cookie, Referer, framing headers...): a
// placeholder there passes unchanged, so the value cannot be steered into
// a place the origin echoes or logs as ordinary data.
bool SecretMayTravelInHeader(std::string_view name);

// Swaps every placeholder of a secret valid for `host` (normalized) for its
// value, in the headers SecretMayTravelInHeader allows and in the
// request-target's query string (there percent-encoded). Returns the reason
// to refuse the request when the head carries, anywhere, the placeholder of
// a secret NOT valid for `host`, or that secret's real value (6 bytes or
// longer, plain or percent-encoded: the guest may have learnt it from an
// upstream that echoed it); the reason names the secret, never its value.
// Bodies are not scanned. An empty `host` means "reached by an address the
// guest chose": no secret is valid for it.
std::optional<std::string> SubstituteSecrets(const Policy& policy, std::string_view host,
                                             http::RequestHead& head);

}  // namespace cella::net
