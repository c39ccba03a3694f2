// Fuzzes the agent router's guest side: after a real handshake, with one
// client that opened an exec stream and one that attached the main process
// (so the guest's frames meet live streams, credit windows and the output
// hooks), the input is written on the link as the guest, then the guest
// hangs up. The router must neither crash nor hang: once the link ends it
// reports the upstream error, and its buffers stay within their bounds.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "base/log.h"
#include "base/unique_fd.h"
#include "host/agent/router.h"
#include "protocol/messages.h"
#include "protocol/wire.h"

using namespace cella;
using protocol::Channel;
using protocol::FrameType;

namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "%s\n", what.c_str());
  std::abort();
}

void SendFrame(int fd, uint32_t stream, FrameType type, std::string_view body) {
  std::vector<std::byte> out;
  protocol::EncodeFrame(stream, type, Channel::kControl, protocol::AsBytes(body), out);
  if (::send(fd, out.data(), out.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(out.size()))
    Die("send frame");
}

// Reads frames from `fd` until one of `type` arrives (bounded).
void AwaitFrame(int fd, FrameType type) {
  protocol::FrameDecoder decoder;
  // One buffer for every call: zero-filling 64 KiB per wait was most of an
  // input's cost (page faults), not the router's work.
  static std::byte buf[65536];
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    auto frame = decoder.Next();
    if (!frame) Die("bad frame from the router: " + frame.error().message);
    if (frame->has_value()) {
      if ((*frame)->type == type) return;
      continue;
    }
    if (std::chrono::steady_clock::now() > deadline) Die("router silent");
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) Die("router hung up during set-up");
    decoder.Feed(std::span(buf, static_cast<size_t>(n)));
  }
}

// Reads and drops whatever arrives, so a client never stalls the router.
void Drain(int fd) {
  static char buf[65536];  // not on the stack: ASan's fake stack would fault it in per call
  while (::recv(fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {
  }
}

}  // namespace

// The router logs every broken link at warn: millions of lines would only
// slow the fuzzer down; what matters is that it neither crashes nor hangs.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  log::SetLevel(log::Level::kError);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) Die("socketpair");
  UniqueFd guest(pair[0]);
  SendFrame(guest.Get(), 0, FrameType::kHello,
            protocol::EncodeHello({protocol::kProtocolVersion, protocol::Role::kAgent}));
  host::RouterHooks hooks;
  size_t main_bytes = 0;
  hooks.on_main_output = [&](Channel, std::span<const std::byte> bytes) {
    main_bytes += bytes.size();
  };
  hooks.on_main_result = [](std::string_view) {};
  host::RouterOptions options;
  options.max_upstream_buffer = size_t{1} << 20;
  options.max_client_buffer = size_t{1} << 20;
  auto router =
      host::Router::Start(UniqueFd(pair[1]), std::move(hooks), std::chrono::seconds(5), options);
  if (!router) Die("router start: " + router.error().message);
  // Two clients: an exec (upstream stream 1) and the main process (2).
  std::vector<UniqueFd> clients;
  for (int i = 0; i < 2; ++i) {
    auto client = (*router)->ConnectLocal();
    if (!client) Die("connect: " + client.error().message);
    SendFrame(client->Get(), 0, FrameType::kHello,
              protocol::EncodeHello({protocol::kProtocolVersion, protocol::Role::kHost}));
    AwaitFrame(client->Get(), FrameType::kHello);
    protocol::Request request = protocol::ExecRequest{.argv = {"true"}, .stdin_open = true};
    if (i == 1) request = protocol::AttachMainRequest{};
    SendFrame(client->Get(), 1, FrameType::kOpen, protocol::EncodeRequest(request));
    AwaitFrame(guest.Get(), FrameType::kOpen);
    clients.push_back(std::move(*client));
  }
  // The guest speaks: the input, in whatever pieces the socket takes, with
  // the clients read meanwhile; then it hangs up.
  if (::fcntl(guest.Get(), F_SETFL, O_NONBLOCK) != 0) Die("fcntl");
  size_t sent = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (sent < size && std::chrono::steady_clock::now() < deadline) {
    ssize_t n = ::send(guest.Get(), data + sent, size - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR) break;  // the router ended the link
    for (auto& c : clients) Drain(c.Get());
    Drain(guest.Get());
    pollfd p{guest.Get(), POLLOUT, 0};
    (void)::poll(&p, 1, 10);
  }
  guest.Reset();
  // The link is gone: the router must say so, bounded.
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  // The router records the failure before it writes the clients their error
  // and closes them, so waiting on the clients wakes as soon as it knows (a
  // sleep here cost most of an input's wall time).
  while (!(*router)->UpstreamError()) {
    if (std::chrono::steady_clock::now() > deadline) Die("router never noticed the link end");
    pollfd p[2] = {{clients[0].Get(), POLLIN, 0}, {clients[1].Get(), POLLIN, 0}};
    (void)::poll(p, 2, 100);
    for (auto& c : clients) Drain(c.Get());
  }
  auto stats = (*router)->Stats();
  if (stats.peak_buffered_bytes >
      2 * options.max_upstream_buffer + 2 * options.max_client_buffer + (size_t{4} << 20))
    Die("router buffered " + std::to_string(stats.peak_buffered_bytes) + " bytes");
  (*router)->Stop();
  return 0;
}
