// HTTP/1.1 message heads and body framing for the egress proxy. Strict on
// purpose: the proxy sits between an untrusted guest and real servers, so
// anything two parsers could read differently (obs-fold, bare LF, space
// before the colon, conflicting Content-Length / Transfer-Encoding) is an
// error, never a guess. Pure functions, no I/O; thread-compatible.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::net::http {

inline constexpr size_t kMaxHeadBytes = 64 * 1024;
inline constexpr size_t kMaxHeaders = 256;

struct Header {
  std::string name;   // as sent
  std::string value;  // leading/trailing whitespace removed
};

struct RequestHead {
  std::string method;
  std::string target;   // request-target as sent ("/path?query", or absolute form)
  std::string version;  // "HTTP/1.1" or "HTTP/1.0"
  std::vector<Header> headers;
};

struct ResponseHead {
  std::string version;
  int status = 0;
  std::string reason;
  std::vector<Header> headers;
};

// Length of the head at the start of `buffer` including the blank line that
// ends it; nullopt while incomplete.
std::optional<size_t> FindHeadEnd(std::string_view buffer);

// `head` is exactly the bytes FindHeadEnd measured.
Result<RequestHead> ParseRequestHead(std::string_view head);
Result<ResponseHead> ParseResponseHead(std::string_view head);
std::string SerializeRequestHead(const RequestHead& head);
std::string SerializeResponseHead(const ResponseHead& head);

// Case-insensitive lookups. FindHeader returns the first one.
const Header* FindHeader(const std::vector<Header>& headers, std::string_view name);
size_t CountHeaders(const std::vector<Header>& headers, std::string_view name);
void RemoveHeaders(std::vector<Header>& headers, std::string_view name);
bool EqualsIgnoreCase(std::string_view a, std::string_view b);
// Whether a comma-separated header (Connection, Upgrade) lists `token`.
bool HeaderHasToken(const std::vector<Header>& headers, std::string_view name,
                    std::string_view token);

// The Host header split into host and port (port 0 when absent). Errors when
// missing (HTTP/1.1), duplicated or malformed.
struct HostPort {
  std::string host;
  uint16_t port = 0;
};
Result<HostPort> RequestHost(const RequestHead& head);

enum class BodyKind : uint8_t { kNone, kLength, kChunked, kUntilClose };
struct BodyFraming {
  BodyKind kind = BodyKind::kNone;
  uint64_t length = 0;  // kLength only
};
Result<BodyFraming> RequestFraming(const RequestHead& head);
// `request_method` decides HEAD; 1xx, 204 and 304 have no body.
Result<BodyFraming> ResponseFraming(const ResponseHead& head, std::string_view request_method);

// Follows chunked framing over a byte stream without changing it, so the
// proxy can pass the bytes through and still know where the message ends.
class ChunkedTracker {
 public:
  // Consumes a prefix of `bytes`; returns how many bytes belong to this
  // message (less than bytes.size() only once Done()).
  Result<size_t> Feed(std::string_view bytes);
  bool Done() const { return state_ == State::kDone; }

 private:
  enum class State : uint8_t {
    kSize,          // hex digits of a chunk size
    kExtension,     // ";ext" up to CR
    kSizeLf,        // LF after the size line
    kData,          // chunk bytes
    kDataCr,        // CR after the data
    kDataLf,        // LF after the data
    kTrailerStart,  // first byte of a trailer line (CR = end)
    kTrailer,       // trailer field line up to CR
    kTrailerLf,     // LF after a trailer line
    kFinalLf,       // LF of the blank line that ends the message
    kDone,
  };
  State state_ = State::kSize;
  uint64_t remaining_ = 0;  // kData
  size_t digits_ = 0;
  size_t line_bytes_ = 0;  // bounds extension and trailer lines
};

// A complete "HTTP/1.1 <status> <reason>" response with a text/plain body
// and Connection: close, for answers the proxy makes itself.
std::string PlainResponse(int status, std::string_view reason, std::string_view body);

}  // namespace cella::net::http
