// Standard base64 (RFC 4648, with padding): the encoding of every byte field
// in the JSON-RPC protocol. Decoding is strict: bad characters or padding
// are an error, never skipped.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"

namespace cella::rpc {

std::string Base64Encode(std::string_view bytes);
Result<std::string> Base64Decode(std::string_view text);

}  // namespace cella::rpc
