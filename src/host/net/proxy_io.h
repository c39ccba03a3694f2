// Socket and stream helpers the egress proxy's parts share (proxy.cc,
// http_session.cc): bounded waits, connecting with a time-out, pumping and
// splicing byte streams, and the one "egress blocked" log line. Internal to
// src/host/net.
#pragma once

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>

#include "base/byte_stream.h"
#include "base/result.h"
#include "base/unique_fd.h"
#include "host/net/policy.h"

namespace cella::net {

using Clock = std::chrono::steady_clock;
inline constexpr size_t kBufferBytes = 16 * 1024;

std::string_view AsText(std::span<const std::byte> bytes);
std::span<const std::byte> AsBytes(std::string_view text);

// `level=notice msg="egress blocked"` with host, reason, destination and
// protocol: every refused flow or request logs exactly this.
void LogBlocked(std::string_view host, std::string_view reason, const Endpoint& destination,
                std::string_view protocol);
// The body of the 403 a refused HTTP request gets.
std::string BlockedBody(std::string_view reason);

// Waits until `fd` is readable or `deadline` passes. false on timeout.
Result<bool> WaitReadable(int fd, Clock::time_point deadline);
Status SetReceiveTimeout(int fd, std::chrono::milliseconds timeout);
// Small writes (an SSE event, a request head before its body) must leave
// at once; Nagle plus delayed ACKs would hold them ~40 ms.
void DisableNagle(int fd);
// A blocking TCP socket connected to `endpoint`, TCP_NODELAY set.
Result<UniqueFd> ConnectWithTimeout(const Endpoint& endpoint, std::chrono::milliseconds timeout);

// Copies until EOF, then half-closes `to`.
Status Pump(ByteStream& from, ByteStream& to);
// Both directions until both ended; an error in one aborts both.
void Splice(ByteStream& a, ByteStream& b);

}  // namespace cella::net
