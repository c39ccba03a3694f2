// Fuzzes the egress proxy's HTTP/1.1 head parsers and chunked tracker with
// bytes a hostile guest or upstream could send. Nothing may crash; a head
// that parses must serialize to a head that parses back to the same thing
// (the proxy forwards its own serialization, so a lossy round trip would
// let the origin see something the policy never checked); the tracker never
// claims more bytes than it was given.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "host/net/http.h"

namespace http = cella::net::http;

namespace {

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "%s\n", what);
  std::abort();
}

bool SameHeaders(const std::vector<http::Header>& a, const std::vector<http::Header>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].value != b[i].value) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  std::string_view input(reinterpret_cast<const char*>(data + 1), size - 1);
  auto end = http::FindHeadEnd(input);
  if (end && *end > input.size()) Die("FindHeadEnd past the input");
  std::string_view head = end ? input.substr(0, *end) : input;

  if (mode % 3 == 0) {
    auto request = http::ParseRequestHead(head);
    if (request) {
      auto again = http::ParseRequestHead(http::SerializeRequestHead(*request));
      if (!again) Die("serialized request head does not parse");
      if (again->method != request->method || again->target != request->target ||
          again->version != request->version || !SameHeaders(again->headers, request->headers)) {
        Die("request head round trip changed it");
      }
      (void)http::RequestHost(*request);
      (void)http::RequestFraming(*request);
    }
  } else if (mode % 3 == 1) {
    auto response = http::ParseResponseHead(head);
    if (response) {
      auto again = http::ParseResponseHead(http::SerializeResponseHead(*response));
      if (!again) Die("serialized response head does not parse");
      if (again->status != response->status || again->reason != response->reason ||
          !SameHeaders(again->headers, response->headers)) {
        Die("response head round trip changed it");
      }
      (void)http::ResponseFraming(*response, (mode & 4) ? "HEAD" : "GET");
    }
  } else {
    size_t piece = 1 + (mode >> 2);
    http::ChunkedTracker tracker;
    for (size_t at = 0; at < input.size(); at += piece) {
      std::string_view part = input.substr(at, piece);
      auto used = tracker.Feed(part);
      if (!used) break;
      if (*used > part.size()) Die("tracker consumed more than given");
      if (*used < part.size() && !tracker.Done()) Die("tracker stopped early without finishing");
      if (tracker.Done()) break;
    }
  }
  return 0;
}
