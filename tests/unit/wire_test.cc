#include "protocol/wire.h"

#include <gtest/gtest.h>

namespace cella::protocol {
namespace {

std::vector<std::byte> Bytes(std::string_view s) {
  auto b = AsBytes(s);
  return {b.begin(), b.end()};
}

TEST(Wire, RoundTripsFramesFedOneByteAtATime) {
  std::vector<std::byte> stream;
  EncodeFrame(7, FrameType::kData, Channel::kStderr, AsBytes("hello"), stream);
  EncodeFrame(0, FrameType::kPing, Channel::kControl, {}, stream);
  FrameDecoder decoder;
  std::vector<Frame> frames;
  for (std::byte b : stream) {
    decoder.Feed(std::span(&b, 1));
    auto next = decoder.Next();
    ASSERT_TRUE(next.has_value()) << next.error().message;
    if (next->has_value()) frames.push_back(std::move(**next));
  }
  ASSERT_EQ(frames.size(), 2u);
  EXPECT_EQ(frames[0].stream_id, 7u);
  EXPECT_EQ(frames[0].type, FrameType::kData);
  EXPECT_EQ(frames[0].channel, Channel::kStderr);
  EXPECT_EQ(frames[0].PayloadText(), "hello");
  EXPECT_EQ(frames[1].type, FrameType::kPing);
  EXPECT_TRUE(frames[1].payload.empty());
  EXPECT_EQ(decoder.Buffered(), 0u);
}

TEST(Wire, RejectsOversizedLengthBeforeBufferingPayload) {
  std::vector<std::byte> header;
  EncodeFrame(1, FrameType::kData, Channel::kStdout, {}, header);
  uint32_t huge = kMaxPayload + 1;
  for (int i = 0; i < 4; ++i) header[i] = static_cast<std::byte>((huge >> (8 * i)) & 0xff);
  FrameDecoder decoder;
  decoder.Feed(header);
  auto next = decoder.Next();
  ASSERT_FALSE(next.has_value());
  EXPECT_NE(next.error().message.find("exceeds the limit"), std::string::npos);
  // Stays failed: framing is lost for good.
  decoder.Feed(Bytes("more"));
  EXPECT_FALSE(decoder.Next().has_value());
}

TEST(Wire, DecoderCapIsConfigurable) {
  std::vector<std::byte> stream;
  EncodeFrame(1, FrameType::kData, Channel::kStdout, AsBytes(std::string(100, 'x')), stream);
  FrameDecoder decoder(50);
  decoder.Feed(stream);
  EXPECT_FALSE(decoder.Next().has_value());
}

TEST(Wire, RejectsUnknownTypeChannelAndReservedBits) {
  for (int field : {8, 9, 10}) {
    std::vector<std::byte> stream;
    EncodeFrame(1, FrameType::kData, Channel::kStdout, {}, stream);
    stream[field] = std::byte{0x7f};
    FrameDecoder decoder;
    decoder.Feed(stream);
    EXPECT_FALSE(decoder.Next().has_value()) << "field offset " << field;
  }
}

TEST(Wire, U32PayloadRoundTripAndSizeCheck) {
  Frame f;
  f.payload = U32Payload(0xdeadbeef);
  auto v = ParseU32Payload(f);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, 0xdeadbeefu);
  f.payload.pop_back();
  EXPECT_FALSE(ParseU32Payload(f).has_value());
}

}  // namespace
}  // namespace cella::protocol
