// The SNI of a TLS ClientHello, parsed strictly and bounded (fuzzed by
// tests/fuzz/fuzz_client_hello.cc).
#include <cstdint>
#include <span>
#include <vector>

#include "host/net/tls.h"
#include "host/net/tls_internal.h"
#include "protocol/network.h"

namespace cella::net {
using namespace tls_detail;  // NOLINT: this file's half of the TLS code

// --- ClientHello -----------------------------------------------------------

namespace {

// Bounds-checked big-endian reader over one buffer.
class Cursor {
 public:
  explicit Cursor(std::span<const uint8_t> data) : data_(data) {}
  size_t left() const { return data_.size() - at_; }
  bool Number(size_t width, size_t& out) {
    if (left() < width) return false;
    out = 0;
    for (size_t i = 0; i < width; ++i) out = (out << 8) | data_[at_++];
    return true;
  }
  bool Take(size_t count, std::span<const uint8_t>& out) {
    if (left() < count) return false;
    out = data_.subspan(at_, count);
    at_ += count;
    return true;
  }

 private:
  std::span<const uint8_t> data_;
  size_t at_ = 0;
};

constexpr uint8_t kContentHandshake = 22;
constexpr uint8_t kHandshakeClientHello = 1;
constexpr size_t kRecordHeader = 5;
constexpr size_t kHandshakeHeader = 4;
constexpr uint16_t kExtensionServerName = 0;
constexpr uint8_t kServerNameHostName = 0;

std::unexpected<Error> Malformed(std::string_view what) {
  return Fail("malformed TLS ClientHello: " + std::string(what));
}

Result<std::string> ParseServerName(std::span<const uint8_t> extension) {
  Cursor cursor(extension);
  size_t list_length = 0;
  if (!cursor.Number(2, list_length) || list_length != cursor.left() || list_length == 0)
    return Malformed("server_name list length does not match the extension");
  std::optional<std::string> host;
  while (cursor.left() > 0) {
    size_t type = 0, length = 0;
    std::span<const uint8_t> value;
    if (!cursor.Number(1, type) || !cursor.Number(2, length) || !cursor.Take(length, value))
      return Malformed("server_name entry runs past its list");
    if (type != kServerNameHostName) continue;  // other name types: not ours to judge
    if (host) return Malformed("more than one host_name in server_name");
    std::string_view text(reinterpret_cast<const char*>(value.data()), value.size());
    if (!protocol::IsValidHostName(text))
      return Malformed(
          "server_name host_name is not a DNS name (letters, digits, '-', '_', labels of "
          "1-63 bytes not starting or ending with '-', 253 bytes at most, no trailing dot)");
    host = ToLower(text);
  }
  if (!host) return Malformed("server_name extension without a host_name");
  return *host;
}

Result<std::string> ParseClientHelloBody(std::span<const uint8_t> body) {
  Cursor cursor(body);
  size_t version = 0, length = 0;
  std::span<const uint8_t> skipped;
  if (!cursor.Number(2, version) || (version >> 8) != 3)
    return Malformed("legacy_version is not 3.x");
  if (!cursor.Take(32, skipped)) return Malformed("too short for its random");
  if (!cursor.Number(1, length) || length > 32 || !cursor.Take(length, skipped))
    return Malformed("bad session_id");
  if (!cursor.Number(2, length) || length < 2 || length % 2 != 0 || !cursor.Take(length, skipped))
    return Malformed("bad cipher_suites");
  if (!cursor.Number(1, length) || length < 1 || !cursor.Take(length, skipped))
    return Malformed("bad compression_methods");
  if (cursor.left() == 0) return Fail("TLS ClientHello has no extensions, so no server_name (SNI)");
  if (!cursor.Number(2, length) || length != cursor.left())
    return Malformed("extensions length does not match the rest of the ClientHello");
  std::vector<bool> seen(65536, false);
  std::optional<std::string> host;
  while (cursor.left() > 0) {
    size_t type = 0;
    std::span<const uint8_t> data;
    if (!cursor.Number(2, type) || !cursor.Number(2, length) || !cursor.Take(length, data))
      return Malformed("extension runs past the ClientHello");
    if (seen[type]) return Malformed("extension " + std::to_string(type) + " appears twice");
    seen[type] = true;
    if (type == kExtensionServerName) host = CELLA_TRY(ParseServerName(data));
  }
  if (!host) return Fail("TLS ClientHello has no server_name (SNI) extension");
  return *host;
}

}  // namespace

Result<std::optional<std::string>> ParseClientHelloSni(std::span<const std::byte> input) {
  std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(input.data()), input.size());
  auto need_more = [&]() -> Result<std::optional<std::string>> {
    if (bytes.size() >= kMaxClientHelloBytes)
      return Fail("no complete TLS ClientHello within the first " +
                  std::to_string(kMaxClientHelloBytes) + " bytes");
    return std::nullopt;
  };
  // A ClientHello may span several handshake records; they are joined here.
  std::vector<uint8_t> handshake;
  std::optional<size_t> message_size;  // header included, once known
  size_t at = 0;
  while (!message_size || handshake.size() < *message_size) {
    size_t available = bytes.size() - at;
    if (available == 0) return need_more();
    // Checked byte by byte, so non-TLS traffic is refused at once instead of
    // being waited on.
    if (bytes[at] != kContentHandshake) {
      if (at == 0 && (bytes[0] & 0x80) != 0)
        return Fail("not a TLS ClientHello: SSLv2-format hello (no extensions, no SNI)");
      return Fail("not a TLS ClientHello: record content type " + std::to_string(bytes[at]) +
                  " at offset " + std::to_string(at) + " is not handshake (22)");
    }
    if (available >= 2 && bytes[at + 1] != 3)
      return Fail("not a TLS ClientHello: record version major " + std::to_string(bytes[at + 1]) +
                  " at offset " + std::to_string(at + 1) + " is not 3");
    if (available >= 3 && bytes[at + 2] > 4)
      return Fail("not a TLS ClientHello: record version 3." + std::to_string(bytes[at + 2]) +
                  " is unknown");
    if (available < kRecordHeader) return need_more();
    size_t record_length = (size_t{bytes[at + 3]} << 8) | bytes[at + 4];
    if (record_length == 0) return Malformed("empty handshake record");
    if (record_length > kMaxTlsRecordPayload)
      return Malformed("record of " + std::to_string(record_length) + " bytes exceeds 16384");
    size_t present = std::min(record_length, available - kRecordHeader);
    auto fragment = bytes.subspan(at + kRecordHeader, present);
    handshake.insert(handshake.end(), fragment.begin(), fragment.end());
    if (!handshake.empty() && handshake[0] != kHandshakeClientHello)
      return Fail("not a TLS ClientHello: handshake message type " + std::to_string(handshake[0]));
    if (!message_size && handshake.size() >= kHandshakeHeader) {
      size_t body = (size_t{handshake[1]} << 16) | (size_t{handshake[2]} << 8) | handshake[3];
      if (body + kHandshakeHeader + kRecordHeader > kMaxClientHelloBytes)
        return Fail("TLS ClientHello of " + std::to_string(body) + " bytes exceeds the limit of " +
                    std::to_string(kMaxClientHelloBytes));
      message_size = body + kHandshakeHeader;
    }
    if (message_size && handshake.size() >= *message_size) break;
    if (present < record_length) return need_more();
    at += kRecordHeader + record_length;
  }
  auto body = std::span<const uint8_t>(handshake).subspan(kHandshakeHeader,
                                                          *message_size - kHandshakeHeader);
  return CELLA_TRY(ParseClientHelloBody(body));
}

}  // namespace cella::net
