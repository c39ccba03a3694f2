// The agent wire protocol: one byte stream between host and guest agent
// carrying many concurrent sessions ("streams"). See src/protocol/README.md
// for the full message catalogue; this header is the framing only.
//
// Frame layout (little-endian), 12-byte header then payload:
//   u32 payload_length   (<= kMaxPayload, checked before anything is read)
//   u32 stream_id        (0 = link control; host-chosen ids for sessions)
//   u8  type             (FrameType)
//   u8  channel          (Channel: which byte stream of the session)
//   u16 reserved         (must be 0)
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::protocol {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr size_t kHeaderSize = 12;
// Largest payload either side accepts. Data is chunked well below this; the
// cap exists so an untrusted peer cannot make us allocate without bound.
inline constexpr uint32_t kMaxPayload = 1u << 20;
// Data chunk size senders use.
inline constexpr uint32_t kDataChunk = 64u * 1024;
// Initial per-stream, per-channel send credit (bytes). Receivers return
// credit with kWindow frames as they consume, so memory stays bounded.
inline constexpr uint32_t kInitialWindow = 256u * 1024;
// Credit granted by a peer accumulates up to this ceiling, never beyond: a
// peer sending endless WindowUpdates cannot overflow the sender's count.
inline constexpr int64_t kMaxCredit = int64_t{1} << 40;

enum class FrameType : uint8_t {
  kHello = 1,  // stream 0, JSON {"version":N,"role":"host"|"agent"}
  kPing = 2,   // stream 0, opaque payload echoed in kPong
  kPong = 3,
  kOpen = 4,     // host -> agent, JSON request; starts a stream
  kData = 5,     // raw bytes on `channel`
  kEof = 6,      // no more bytes on `channel` (half-close)
  kWindow = 7,   // u32 credit increment for `channel` (sent by the reader)
  kResize = 8,   // host -> agent, u16 rows, u16 cols
  kSignal = 9,   // host -> agent, u32 signal number
  kResult = 10,  // agent -> host, JSON; the stream is finished
  kError = 11,   // either way, JSON {"errno":N,"message":"..."}; stream finished
  kClose = 12,   // host -> agent: abandon the stream (kills an exec)
  kOpened = 13,  // agent -> host, JSON; stream accepted (exec started, port connected)
};

enum class Channel : uint8_t {
  kControl = 0,
  kStdin = 1,   // also: file content host->guest, port-forward host->guest
  kStdout = 2,  // also: file content guest->host, port-forward guest->host
  kStderr = 3,
};

struct Frame {
  uint32_t stream_id = 0;
  FrameType type = FrameType::kPing;
  Channel channel = Channel::kControl;
  std::vector<std::byte> payload;

  std::string_view PayloadText() const {
    return {reinterpret_cast<const char*>(payload.data()), payload.size()};
  }
};

// Appends the encoded frame to out.
void EncodeFrame(uint32_t stream_id, FrameType type, Channel channel,
                 std::span<const std::byte> payload, std::vector<std::byte>& out);
std::vector<std::byte> EncodeFrame(const Frame& frame);

struct FrameHeader {
  uint32_t payload_length;
  uint32_t stream_id;
  FrameType type;
  Channel channel;
};

// Validates a header; errors name the bad field. Unknown types and
// channels, nonzero reserved bits and oversized lengths are rejected.
Result<FrameHeader> DecodeHeader(std::span<const std::byte, kHeaderSize> bytes);

// Incremental decoder for a byte stream that arrives in arbitrary pieces.
// Feed() takes bytes; Next() yields complete frames. After an error the
// decoder stays failed: the link must be torn down (framing is lost).
class FrameDecoder {
 public:
  explicit FrameDecoder(uint32_t max_payload = kMaxPayload) : max_payload_(max_payload) {}
  void Feed(std::span<const std::byte> bytes);
  // nullopt: need more bytes.
  Result<std::optional<Frame>> Next();
  size_t Buffered() const { return buffer_.size() - consumed_; }

 private:
  uint32_t max_payload_;
  std::vector<std::byte> buffer_;
  size_t consumed_ = 0;
  std::optional<Error> failed_;
};

std::span<const std::byte> AsBytes(std::string_view s);
std::vector<std::byte> U32Payload(uint32_t value);
Result<uint32_t> ParseU32Payload(const Frame& frame);

}  // namespace cella::protocol
