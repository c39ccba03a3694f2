#include "protocol/wire.h"

#include <cstring>

namespace cella::protocol {
namespace {

void PutU32(std::vector<std::byte>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
}

uint32_t GetU32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

bool KnownType(uint8_t t) {
  return t >= static_cast<uint8_t>(FrameType::kHello) &&
         t <= static_cast<uint8_t>(FrameType::kOpened);
}

}  // namespace

void EncodeFrame(uint32_t stream_id, FrameType type, Channel channel,
                 std::span<const std::byte> payload, std::vector<std::byte>& out) {
  out.reserve(out.size() + kHeaderSize + payload.size());
  PutU32(out, static_cast<uint32_t>(payload.size()));
  PutU32(out, stream_id);
  out.push_back(static_cast<std::byte>(type));
  out.push_back(static_cast<std::byte>(channel));
  out.push_back(std::byte{0});
  out.push_back(std::byte{0});
  out.insert(out.end(), payload.begin(), payload.end());
}

std::vector<std::byte> EncodeFrame(const Frame& frame) {
  std::vector<std::byte> out;
  EncodeFrame(frame.stream_id, frame.type, frame.channel, frame.payload, out);
  return out;
}

Result<FrameHeader> DecodeHeader(std::span<const std::byte, kHeaderSize> bytes) {
  FrameHeader h{};
  h.payload_length = GetU32(bytes.data());
  h.stream_id = GetU32(bytes.data() + 4);
  auto type = static_cast<uint8_t>(bytes[8]);
  auto channel = static_cast<uint8_t>(bytes[9]);
  if (!KnownType(type)) return Fail("frame header: unknown type " + std::to_string(type));
  if (channel > static_cast<uint8_t>(Channel::kStderr))
    return Fail("frame header: unknown channel " + std::to_string(channel));
  if (bytes[10] != std::byte{0} || bytes[11] != std::byte{0})
    return Fail("frame header: reserved bits set");
  if (h.payload_length > kMaxPayload)
    return Fail("frame header: payload length " + std::to_string(h.payload_length) +
                " exceeds the limit of " + std::to_string(kMaxPayload));
  h.type = static_cast<FrameType>(type);
  h.channel = static_cast<Channel>(channel);
  return h;
}

void FrameDecoder::Feed(std::span<const std::byte> bytes) {
  if (failed_) return;
  // Compact before growing so a long-lived link does not accumulate.
  if (consumed_ > 0 && consumed_ >= buffer_.size() / 2) {
    buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<ptrdiff_t>(consumed_));
    consumed_ = 0;
  }
  buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
}

Result<std::optional<Frame>> FrameDecoder::Next() {
  if (failed_) return std::unexpected(*failed_);
  if (Buffered() < kHeaderSize) return std::nullopt;
  const std::byte* p = buffer_.data() + consumed_;
  auto header = DecodeHeader(std::span<const std::byte, kHeaderSize>(p, kHeaderSize));
  if (header && header->payload_length > max_payload_)
    header = Fail("frame header: payload length " + std::to_string(header->payload_length) +
                  " exceeds the limit of " + std::to_string(max_payload_));
  if (!header) {
    failed_ = header.error();
    return std::unexpected(header.error());
  }
  if (Buffered() < kHeaderSize + header->payload_length) return std::nullopt;
  Frame frame;
  frame.stream_id = header->stream_id;
  frame.type = header->type;
  frame.channel = header->channel;
  frame.payload.assign(p + kHeaderSize, p + kHeaderSize + header->payload_length);
  consumed_ += kHeaderSize + header->payload_length;
  if (consumed_ == buffer_.size()) {
    buffer_.clear();
    consumed_ = 0;
  }
  return frame;
}

std::span<const std::byte> AsBytes(std::string_view s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

std::vector<std::byte> U32Payload(uint32_t value) {
  std::vector<std::byte> out;
  PutU32(out, value);
  return out;
}

Result<uint32_t> ParseU32Payload(const Frame& frame) {
  if (frame.payload.size() != 4)
    return Fail("frame payload: expected 4 bytes, got " + std::to_string(frame.payload.size()));
  return GetU32(frame.payload.data());
}

}  // namespace cella::protocol
