#include "host/net/http.h"

#include <algorithm>
#include <charconv>
#include <span>

namespace cella::net::http {
namespace {

constexpr size_t kMaxChunkLineBytes = 4096;
constexpr size_t kMaxTrailerBytes = 64 * 1024;

bool IsTokenChar(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  return std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

bool IsToken(std::string_view text) {
  return !text.empty() && std::all_of(text.begin(), text.end(), IsTokenChar);
}

// Field values and reason phrases: HTAB, SP, visible ASCII, obs-text.
bool IsFieldText(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return u == '\t' || u == ' ' || (u >= 0x21 && u != 0x7f);
  });
}

std::string_view TrimOws(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
  return text;
}

char Lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

// Splits a complete head into lines without their CRLF; the last (empty)
// line is dropped. Every LF must follow a CR and every CR precede an LF.
Result<std::vector<std::string_view>> SplitLines(std::string_view head) {
  if (head.size() > kMaxHeadBytes) return Fail("http: head larger than 64 KiB");
  if (!head.ends_with("\r\n\r\n")) return Fail("http: head does not end with CRLF CRLF");
  std::vector<std::string_view> lines;
  size_t start = 0;
  for (size_t i = 0; i < head.size(); ++i) {
    if (head[i] == '\r') {
      if (i + 1 >= head.size() || head[i + 1] != '\n') return Fail("http: bare CR in head");
      lines.push_back(head.substr(start, i - start));
      start = i + 2;
      ++i;
    } else if (head[i] == '\n') {
      return Fail("http: bare LF in head");
    }
  }
  // The head ends with an empty line; it must be the only one.
  if (lines.empty() || !lines.back().empty()) return Fail("http: head not terminated");
  lines.pop_back();
  if (lines.empty()) return Fail("http: empty head");
  for (std::string_view line : lines) {
    if (line.empty()) return Fail("http: blank line inside head");
  }
  return lines;
}

Result<std::vector<Header>> ParseHeaderLines(std::span<const std::string_view> lines) {
  if (lines.size() > kMaxHeaders) return Fail("http: more than 256 header fields");
  std::vector<Header> headers;
  headers.reserve(lines.size());
  for (std::string_view line : lines) {
    if (line.front() == ' ' || line.front() == '\t') {
      return Fail("http: obsolete line folding in header");
    }
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return Fail("http: header line without ':'");
    std::string_view name = line.substr(0, colon);
    if (!IsToken(name)) return Fail("http: invalid header name (whitespace before ':'?)");
    std::string_view value = TrimOws(line.substr(colon + 1));
    if (!IsFieldText(value)) return Fail("http: control character in header " + std::string(name));
    headers.push_back(Header{std::string(name), std::string(value)});
  }
  return headers;
}

Result<uint64_t> ParseDecimal(std::string_view text, std::string_view what) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size() || text[0] == '+' ||
      text[0] == '-') {
    return Fail("http: invalid " + std::string(what));
  }
  return value;
}

// All Content-Length fields must agree.
Result<std::optional<uint64_t>> ContentLength(const std::vector<Header>& headers) {
  std::optional<uint64_t> length;
  for (const Header& header : headers) {
    if (!EqualsIgnoreCase(header.name, "content-length")) continue;
    uint64_t value = CELLA_TRY(ParseDecimal(header.value, "Content-Length"));
    if (length && *length != value) return Fail("http: conflicting Content-Length fields");
    length = value;
  }
  return length;
}

}  // namespace

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                            [](char x, char y) { return Lower(x) == Lower(y); });
}

std::optional<size_t> FindHeadEnd(std::string_view buffer) {
  // A bare-LF blank line also ends the head so the strict parser can refuse
  // it, instead of the proxy waiting for a CRLF CRLF that never comes.
  for (size_t i = 0; i < buffer.size(); ++i) {
    if (buffer[i] != '\n') continue;
    if (i + 1 < buffer.size() && buffer[i + 1] == '\n') return i + 2;
    if (i + 2 < buffer.size() && buffer[i + 1] == '\r' && buffer[i + 2] == '\n') return i + 3;
  }
  return std::nullopt;
}

Result<RequestHead> ParseRequestHead(std::string_view head) {
  auto lines = CELLA_TRY(SplitLines(head));
  std::string_view line = lines[0];
  size_t first = line.find(' ');
  size_t second = first == std::string_view::npos ? first : line.find(' ', first + 1);
  if (second == std::string_view::npos) return Fail("http: malformed request line");
  RequestHead request;
  request.method = line.substr(0, first);
  request.target = line.substr(first + 1, second - first - 1);
  request.version = line.substr(second + 1);
  if (!IsToken(request.method)) return Fail("http: invalid method");
  if (request.target.empty() ||
      !std::all_of(request.target.begin(), request.target.end(), [](char c) {
        auto u = static_cast<unsigned char>(c);
        return u >= 0x21 && u <= 0x7e;
      })) {
    return Fail("http: invalid request target");
  }
  if (request.version != "HTTP/1.1" && request.version != "HTTP/1.0") {
    return Fail("http: unsupported version (want HTTP/1.1 or HTTP/1.0)");
  }
  request.headers = CELLA_TRY(ParseHeaderLines(std::span(lines).subspan(1)));
  return request;
}

Result<ResponseHead> ParseResponseHead(std::string_view head) {
  auto lines = CELLA_TRY(SplitLines(head));
  std::string_view line = lines[0];
  ResponseHead response;
  if (line.size() < 12 || !(line.starts_with("HTTP/1.1 ") || line.starts_with("HTTP/1.0 "))) {
    return Fail("http: malformed status line");
  }
  response.version = line.substr(0, 8);
  std::string_view code = line.substr(9, 3);
  if (!std::all_of(code.begin(), code.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      code[0] == '0') {
    return Fail("http: invalid status code");
  }
  response.status = (code[0] - '0') * 100 + (code[1] - '0') * 10 + (code[2] - '0');
  if (line.size() > 12) {
    if (line[12] != ' ') return Fail("http: malformed status line");
    response.reason = line.substr(13);
    if (!IsFieldText(response.reason)) return Fail("http: control character in reason phrase");
  }
  response.headers = CELLA_TRY(ParseHeaderLines(std::span(lines).subspan(1)));
  return response;
}

std::string SerializeRequestHead(const RequestHead& head) {
  std::string out = head.method + " " + head.target + " " + head.version + "\r\n";
  for (const Header& header : head.headers) out += header.name + ": " + header.value + "\r\n";
  out += "\r\n";
  return out;
}

std::string SerializeResponseHead(const ResponseHead& head) {
  std::string out = head.version + " " + std::to_string(head.status);
  if (!head.reason.empty()) out += " " + head.reason;
  out += "\r\n";
  for (const Header& header : head.headers) out += header.name + ": " + header.value + "\r\n";
  out += "\r\n";
  return out;
}

const Header* FindHeader(const std::vector<Header>& headers, std::string_view name) {
  for (const Header& header : headers) {
    if (EqualsIgnoreCase(header.name, name)) return &header;
  }
  return nullptr;
}

size_t CountHeaders(const std::vector<Header>& headers, std::string_view name) {
  return static_cast<size_t>(std::count_if(headers.begin(), headers.end(), [&](const Header& h) {
    return EqualsIgnoreCase(h.name, name);
  }));
}

void RemoveHeaders(std::vector<Header>& headers, std::string_view name) {
  std::erase_if(headers, [&](const Header& h) { return EqualsIgnoreCase(h.name, name); });
}

bool HeaderHasToken(const std::vector<Header>& headers, std::string_view name,
                    std::string_view token) {
  for (const Header& header : headers) {
    if (!EqualsIgnoreCase(header.name, name)) continue;
    std::string_view rest = header.value;
    while (!rest.empty()) {
      size_t comma = rest.find(',');
      std::string_view item = TrimOws(rest.substr(0, comma));
      if (EqualsIgnoreCase(item, token)) return true;
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
  }
  return false;
}

Result<HostPort> RequestHost(const RequestHead& head) {
  size_t count = CountHeaders(head.headers, "host");
  if (count == 0) return Fail("http: request has no Host header");
  if (count > 1) return Fail("http: request has more than one Host header");
  std::string_view value = FindHeader(head.headers, "host")->value;
  // An absolute-form target names the authority itself; it must agree with
  // Host so the policy and the origin server see the same host.
  std::string_view target = head.target;
  for (std::string_view scheme : {"http://", "https://"}) {
    if (target.size() >= scheme.size() &&
        EqualsIgnoreCase(target.substr(0, scheme.size()), scheme)) {
      std::string_view authority = target.substr(scheme.size());
      authority = authority.substr(0, authority.find_first_of("/?#"));
      if (!EqualsIgnoreCase(authority, value)) {
        return Fail("http: request target authority does not match the Host header");
      }
      target = "/";
    }
  }
  if (!target.starts_with('/') && !(target == "*" && head.method == "OPTIONS")) {
    return Fail("http: unsupported request target form");
  }
  HostPort result;
  std::string_view port_text;
  if (value.starts_with('[')) {
    size_t close = value.find(']');
    if (close == std::string_view::npos) return Fail("http: malformed Host header");
    result.host = value.substr(0, close + 1);
    std::string_view rest = value.substr(close + 1);
    if (!rest.empty()) {
      if (rest[0] != ':') return Fail("http: malformed Host header");
      port_text = rest.substr(1);
    }
  } else {
    size_t colon = value.find(':');
    result.host = value.substr(0, colon);
    if (colon != std::string_view::npos) port_text = value.substr(colon + 1);
    if (colon != std::string_view::npos && port_text.empty()) {
      return Fail("http: malformed Host header");
    }
  }
  if (result.host.empty()) return Fail("http: empty Host header");
  if (!port_text.empty()) {
    uint64_t port = CELLA_TRY(ParseDecimal(port_text, "Host port"));
    if (port == 0 || port > 65535) return Fail("http: Host port out of range");
    result.port = static_cast<uint16_t>(port);
  }
  return result;
}

Result<BodyFraming> RequestFraming(const RequestHead& head) {
  size_t encodings = CountHeaders(head.headers, "transfer-encoding");
  auto length = CELLA_TRY(ContentLength(head.headers));
  if (encodings > 0) {
    // Anything but exactly one "chunked" is where request smuggling lives.
    if (encodings > 1 ||
        !EqualsIgnoreCase(FindHeader(head.headers, "transfer-encoding")->value, "chunked")) {
      return Fail("http: unsupported Transfer-Encoding (only chunked)");
    }
    if (length) return Fail("http: both Transfer-Encoding and Content-Length");
    return BodyFraming{BodyKind::kChunked, 0};
  }
  if (length && *length > 0) return BodyFraming{BodyKind::kLength, *length};
  return BodyFraming{BodyKind::kNone, 0};
}

Result<BodyFraming> ResponseFraming(const ResponseHead& head, std::string_view request_method) {
  if (request_method == "HEAD" || (head.status >= 100 && head.status < 200) || head.status == 204 ||
      head.status == 304) {
    return BodyFraming{BodyKind::kNone, 0};
  }
  if (CountHeaders(head.headers, "transfer-encoding") > 0) {
    // RFC 9112 6.3: chunked last means chunked; any other coding is read
    // until the server closes. Transfer-Encoding overrides Content-Length.
    const Header* last = nullptr;
    for (const Header& h : head.headers) {
      if (EqualsIgnoreCase(h.name, "transfer-encoding")) last = &h;
    }
    std::string_view value = last->value;
    size_t comma = value.rfind(',');
    std::string_view final_coding =
        TrimOws(comma == std::string_view::npos ? value : value.substr(comma + 1));
    if (EqualsIgnoreCase(final_coding, "chunked")) return BodyFraming{BodyKind::kChunked, 0};
    return BodyFraming{BodyKind::kUntilClose, 0};
  }
  auto length = CELLA_TRY(ContentLength(head.headers));
  if (length) {
    if (*length == 0) return BodyFraming{BodyKind::kNone, 0};
    return BodyFraming{BodyKind::kLength, *length};
  }
  return BodyFraming{BodyKind::kUntilClose, 0};
}

Result<size_t> ChunkedTracker::Feed(std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size() && state_ != State::kDone) {
    char c = bytes[i];
    switch (state_) {
      case State::kSize: {
        int digit = -1;
        if (c >= '0' && c <= '9') digit = c - '0';
        if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
        if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
        if (digit >= 0) {
          if (++digits_ > 15) return Fail("http: chunk size too large");
          remaining_ = remaining_ * 16 + static_cast<uint64_t>(digit);
        } else if (digits_ > 0 && (c == ';' || c == ' ' || c == '\t')) {
          line_bytes_ = 0;
          state_ = State::kExtension;
        } else if (digits_ > 0 && c == '\r') {
          state_ = State::kSizeLf;
        } else {
          return Fail("http: malformed chunk size");
        }
        ++i;
        break;
      }
      case State::kExtension:
        if (c == '\r') {
          state_ = State::kSizeLf;
        } else if (c == '\n' || c == '\0' || ++line_bytes_ > kMaxChunkLineBytes) {
          return Fail("http: malformed chunk extension");
        }
        ++i;
        break;
      case State::kSizeLf:
        if (c != '\n') return Fail("http: chunk size line not ended by CRLF");
        digits_ = 0;
        line_bytes_ = 0;
        state_ = remaining_ == 0 ? State::kTrailerStart : State::kData;
        ++i;
        break;
      case State::kData: {
        uint64_t take = std::min<uint64_t>(remaining_, bytes.size() - i);
        remaining_ -= take;
        i += static_cast<size_t>(take);
        if (remaining_ == 0) state_ = State::kDataCr;
        break;
      }
      case State::kDataCr:
        if (c != '\r') return Fail("http: chunk data not followed by CRLF");
        state_ = State::kDataLf;
        ++i;
        break;
      case State::kDataLf:
        if (c != '\n') return Fail("http: chunk data not followed by CRLF");
        state_ = State::kSize;
        ++i;
        break;
      case State::kTrailerStart:
        if (c == '\r') {
          state_ = State::kFinalLf;
        } else if (c == '\n') {
          return Fail("http: bare LF in chunked trailer");
        } else {
          state_ = State::kTrailer;
          if (++line_bytes_ > kMaxTrailerBytes) return Fail("http: chunked trailer too large");
        }
        ++i;
        break;
      case State::kTrailer:
        if (c == '\r') {
          state_ = State::kTrailerLf;
        } else if (c == '\n' || c == '\0') {
          return Fail("http: malformed chunked trailer");
        }
        if (++line_bytes_ > kMaxTrailerBytes) return Fail("http: chunked trailer too large");
        ++i;
        break;
      case State::kTrailerLf:
        if (c != '\n') return Fail("http: malformed chunked trailer");
        state_ = State::kTrailerStart;
        ++i;
        break;
      case State::kFinalLf:
        if (c != '\n') return Fail("http: chunked body not ended by CRLF");
        state_ = State::kDone;
        ++i;
        break;
      case State::kDone:
        break;
    }
  }
  return i;
}

std::string PlainResponse(int status, std::string_view reason, std::string_view body) {
  std::string out = "HTTP/1.1 " + std::to_string(status) + " " + std::string(reason) + "\r\n";
  out += "Content-Type: text/plain; charset=utf-8\r\n";
  out += "Content-Length: " + std::to_string(body.size()) + "\r\n";
  out += "Connection: close\r\n\r\n";
  out += body;
  return out;
}

}  // namespace cella::net::http
