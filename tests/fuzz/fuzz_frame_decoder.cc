// Feeds arbitrary bytes from an untrusted guest into the frame decoder, in
// pieces whose sizes the input also chooses. The decoder must never crash,
// never yield a frame above the cap, and stay failed after a failure.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "protocol/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cella::protocol;
  if (size == 0) return 0;
  size_t piece = 1 + data[0] % 64;
  auto bytes = std::as_bytes(std::span(data + 1, size - 1));
  FrameDecoder decoder(4096);
  bool failed = false;
  for (size_t off = 0; off < bytes.size(); off += piece) {
    decoder.Feed(bytes.subspan(off, std::min(piece, bytes.size() - off)));
    for (;;) {
      auto next = decoder.Next();
      if (!next) {
        failed = true;
        break;
      }
      if (failed) std::abort();  // a failed decoder must not recover
      if (!next->has_value()) break;
      const Frame& frame = **next;
      if (frame.payload.size() > 4096) std::abort();
      auto reencoded = EncodeFrame(frame);
      if (reencoded.size() != kHeaderSize + frame.payload.size()) std::abort();
    }
    if (failed) break;
  }
  return 0;
}
