// One piece (~860 lines) on purpose: the router is a single poll loop whose
// state (clients, stream routes, credit windows, buffers) is owned by one
// thread; splitting it would scatter that ownership across files. The
// contract is in router.h.
#include "host/agent/router.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <variant>
#include <vector>

#include "base/io.h"
#include "base/log.h"
#include "protocol/messages.h"

namespace cella::host {
namespace {

using Clock = std::chrono::steady_clock;
using protocol::Channel;
using protocol::Frame;
using protocol::FrameType;
using protocol::kInitialWindow;
using protocol::kMaxCredit;

// Every client Ping is forwarded with this many bytes of client id in front.
constexpr size_t kPingTagSize = 8;
// A client being disconnected with an explanation gets this long to read it.
constexpr auto kClosingGrace = std::chrono::seconds(1);
// Reads per poll wakeup: one busy peer cannot starve the others.
constexpr size_t kReadChunk = size_t{256} * 1024;
constexpr int kUpstreamReadsPerRound = 4;
constexpr int kAcceptsPerRound = 64;
// accept() failing for lack of descriptors is retried after this pause
// rather than in a busy loop (the listener stays readable meanwhile).
constexpr auto kAcceptBackoff = std::chrono::milliseconds(100);

int OutIndex(Channel channel) { return channel == Channel::kStdout ? 0 : 1; }

bool IsOutput(Channel channel) {
  return channel == Channel::kStdout || channel == Channel::kStderr;
}

std::string TypeName(FrameType type) { return std::to_string(static_cast<int>(type)); }

std::vector<std::byte> ErrorPayload(int err, const std::string& message) {
  std::string body = protocol::EncodeError({err != 0 ? err : EIO, message});
  auto bytes = protocol::AsBytes(body);
  return {bytes.begin(), bytes.end()};
}

// Frames queued toward one peer, written as the peer takes them.
class ByteQueue {
 public:
  size_t Pending() const { return data_.size() - off_; }

  void Append(uint32_t stream, FrameType type, Channel channel,
              std::span<const std::byte> payload) {
    protocol::EncodeFrame(stream, type, channel, payload, data_);
  }

  void Clear() {
    data_.clear();
    data_.shrink_to_fit();
    off_ = 0;
  }

  // Writes what the peer takes without blocking.
  Status Flush(int fd) {
    while (Pending() > 0) {
      // MSG_NOSIGNAL: a peer that went away is an error value, never a
      // SIGPIPE that kills the supervisor.
      ssize_t n = ::send(fd, data_.data() + off_, Pending(), MSG_NOSIGNAL);
      if (n < 0 && errno == ENOTSOCK) n = ::write(fd, data_.data() + off_, Pending());
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        return FailErrno("write");
      }
      off_ += static_cast<size_t>(n);
    }
    if (off_ == data_.size()) {
      data_.clear();
      off_ = 0;
      // A burst (20 MB through a slow client) should not pin its peak.
      if (data_.capacity() > (size_t{4} << 20)) data_.shrink_to_fit();
    } else if (off_ > (size_t{1} << 20) && off_ > data_.size() / 2) {
      data_.erase(data_.begin(), data_.begin() + static_cast<ptrdiff_t>(off_));
      off_ = 0;
    }
    return {};
  }

 private:
  std::vector<std::byte> data_;
  size_t off_ = 0;
};

// One upstream stream id and whose it is.
struct Route {
  uint64_t client = 0;
  uint32_t client_stream = 0;
  bool is_main = false;
  // What the client may still send on stdin (the agent's Windows add to it).
  int64_t stdin_credit = kInitialWindow;
  // What the guest may still send on stdout/stderr (the client's Windows).
  int64_t recv_window[2] = {kInitialWindow, kInitialWindow};
};

struct Client {
  enum class State { kHandshake, kReady, kClosing };
  uint64_t id = 0;
  UniqueFd fd;
  // Ping payloads get a tag in front: the client's frames must leave room.
  protocol::FrameDecoder decoder{protocol::kMaxPayload - kPingTagSize};
  ByteQueue out;
  State state = State::kHandshake;
  Clock::time_point deadline;  // Hello due (kHandshake) or give up (kClosing)
  uint32_t last_stream = 0;
  std::map<uint32_t, uint32_t> streams;  // client stream id -> upstream id
  std::optional<std::string> doomed;     // set: drop at the next safe point
  // Added in-process (ConnectLocal: the supervisor's own client); only it
  // may ask for op release, which mutes the link for good.
  bool local = false;
};

Status WaitFd(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return FailErrno("timed out", ETIMEDOUT);
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 60'000)));
    if (r < 0) {
      if (errno == EINTR) continue;
      return FailErrno("poll");
    }
    if (r > 0) return {};
  }
}

std::unexpected<Error> Protocol(std::string message) {
  return std::unexpected(Error{std::move(message), EPROTO});
}

}  // namespace

struct Router::Impl {
  RouterHooks hooks;
  RouterOptions options;
  UniqueFd wake;  // eventfd: commands from other threads, and Stop

  // ---- shared with other threads, under mu --------------------------------
  mutable std::mutex mu;
  std::vector<UniqueFd> incoming;  // added by ConnectLocal (local clients)
  UniqueFd incoming_listener;
  bool listen_claimed = false;
  std::string listen_path;
  dev_t listen_dev = 0;
  ino_t listen_ino = 0;
  bool stop_requested = false;
  std::optional<Error> failure;
  RouterStats stats;
  std::mutex join_mu;
  std::thread thread;

  // ---- router thread only (and Start before the thread exists) -------------
  UniqueFd upstream;
  protocol::FrameDecoder up_decoder;
  ByteQueue up_out;
  bool upstream_alive = true;
  Error upstream_error{"guest agent link closed", EPIPE};
  uint32_t next_up_stream = 1;
  bool agent_spoke = false;        // a frame other than a leftover Hello came up
  bool upstream_released = false;  // op release went up: nothing more does
  std::map<uint32_t, Route> routes;
  std::map<uint64_t, std::unique_ptr<Client>> clients;
  uint64_t next_client = 1;
  UniqueFd listener;
  Clock::time_point accept_resume{};
  // Not zero-filled: a read touches only the pages it fills (a router per
  // sandbox and per fork copy; the fuzzer makes one per input).
  std::unique_ptr<std::byte[]> read_buf = std::make_unique_for_overwrite<std::byte[]>(kReadChunk);
  size_t peak_buffered = 0;

  void Wake() {
    uint64_t one = 1;
    // EAGAIN: the counter is already non-zero, the thread will wake anyway.
    if (::write(wake.Get(), &one, sizeof(one)) < 0 && errno != EAGAIN)
      log::Warn("agent router: waking the router thread failed", {{"error", strerror(errno)}});
  }

  // ---- handshake (caller's thread) ------------------------------------------

  Status Handshake(Clock::time_point deadline) {
    ByteQueue hello;
    std::string body = protocol::EncodeHello({protocol::kProtocolVersion, protocol::Role::kHost});
    hello.Append(0, FrameType::kHello, Channel::kControl, protocol::AsBytes(body));
    while (hello.Pending() > 0) {
      CELLA_TRY_CTX(hello.Flush(upstream.Get()), "send Hello");
      if (hello.Pending() > 0)
        CELLA_TRY_CTX(WaitFd(upstream.Get(), POLLOUT, deadline), "send Hello");
    }
    // The router thread has not started: its read buffer is free to use.
    for (;;) {
      auto next = up_decoder.Next();
      if (!next) return Protocol(next.error().message);
      if (std::optional<Frame>& complete = *next; complete) {
        return protocol::CheckAgentHello(*complete);
      }
      CELLA_TRY_CTX(WaitFd(upstream.Get(), POLLIN, deadline), "await Hello");
      ssize_t n = ::read(upstream.Get(), read_buf.get(), kReadChunk);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        return FailErrno("read");
      }
      if (n == 0) return FailErrno("closed before Hello", EPIPE);
      up_decoder.Feed(std::span(read_buf.get(), static_cast<size_t>(n)));
    }
  }

  // ---- clients --------------------------------------------------------------

  Client* FindClient(uint64_t id) {
    auto it = clients.find(id);
    return it == clients.end() ? nullptr : it->second.get();
  }

  void QueueToClient(Client& c, uint32_t stream, FrameType type, Channel channel,
                     std::span<const std::byte> payload) {
    if (c.doomed) return;
    if (c.out.Pending() + protocol::kHeaderSize + payload.size() > options.max_client_buffer) {
      c.doomed = "it stopped reading (" + std::to_string(c.out.Pending()) + " bytes queued)";
      return;
    }
    c.out.Append(stream, type, channel, payload);
  }

  // Queues an explanation on stream 0 and disconnects once it is read. An
  // AgentClient fails its link with this message (during the handshake too).
  void CloseWithError(Client& c, int err, const std::string& message) {
    QueueToClient(c, 0, FrameType::kError, Channel::kControl, ErrorPayload(err, message));
    c.state = Client::State::kClosing;
    c.deadline = Clock::now() + kClosingGrace;
  }

  void Admit(UniqueFd fd, bool local) {
    auto c = std::make_unique<Client>();
    c->id = next_client++;
    c->fd = std::move(fd);
    c->local = local;
    c->deadline = Clock::now() + options.client_handshake_timeout;
    if (!upstream_alive)
      CloseWithError(*c, upstream_error.errno_value,
                     "the guest agent link is gone: " + upstream_error.message);
    clients[c->id] = std::move(c);
  }

  // Forgets a client; its live streams are closed upstream (its execs are
  // killed, its ports closed).
  void DropClient(uint64_t id, std::string_view reason) {
    auto it = clients.find(id);
    if (it == clients.end()) return;
    Client& c = *it->second;
    for (auto& [client_stream, up] : c.streams) {
      if (upstream_alive) AppendUp(up, FrameType::kClose, Channel::kControl, {});
      routes.erase(up);
    }
    log::Debug("agent router: client disconnected",
               {{"client", id}, {"reason", reason}, {"streams", c.streams.size()}});
    clients.erase(it);
  }

  void EndRoute(uint32_t up) {
    auto it = routes.find(up);
    if (it == routes.end()) return;
    if (Client* c = FindClient(it->second.client)) c->streams.erase(it->second.client_stream);
    routes.erase(it);
  }

  Status HandleHello(Client& c, const Frame& f) {
    if (f.stream_id != 0 || f.type != FrameType::kHello)
      return Protocol("the first frame must be Hello on stream 0");
    auto hello = protocol::DecodeHello(f.PayloadText());
    if (!hello) return Protocol("bad Hello: " + hello.error().message);
    if (hello->version != protocol::kProtocolVersion) {
      CloseWithError(c, EPROTONOSUPPORT,
                     "protocol version " + std::to_string(hello->version) +
                         " is not supported (the agent router speaks " +
                         std::to_string(protocol::kProtocolVersion) + ")");
      return {};
    }
    if (hello->role != protocol::Role::kHost) {
      CloseWithError(c, EPROTO, "Hello role must be host");
      return {};
    }
    std::string body = protocol::EncodeHello({protocol::kProtocolVersion, protocol::Role::kAgent});
    QueueToClient(c, 0, FrameType::kHello, Channel::kControl, protocol::AsBytes(body));
    c.state = Client::State::kReady;
    return {};
  }

  // Everything bound for the agent goes through here. After a release
  // (op release, before a snapshot) nothing more does: the agent reads no
  // further on this link and opens its port anew to answer, and a byte
  // sent after the request would reach that new descriptor ahead of the
  // next host's Hello.
  void AppendUp(uint32_t stream, FrameType type, Channel channel,
                std::span<const std::byte> payload) {
    if (upstream_released) return;
    up_out.Append(stream, type, channel, payload);
  }

  Status HandleOpen(Client& c, const Frame& f) {
    if (f.stream_id <= c.last_stream)
      return Protocol("stream id " + std::to_string(f.stream_id) +
                      " reused (ids must increase on a link)");
    c.last_stream = f.stream_id;
    if (next_up_stream == 0) {
      QueueToClient(c, f.stream_id, FrameType::kError, Channel::kControl,
                    ErrorPayload(ENOSPC, "the agent link has used up its stream ids"));
      return {};
    }
    auto request = protocol::DecodeRequest(f.PayloadText());
    const bool release = request && std::holds_alternative<protocol::ReleaseRequest>(*request);
    if (upstream_released || (release && !c.local)) {
      QueueToClient(c, f.stream_id, FrameType::kError, Channel::kControl,
                    upstream_released
                        ? ErrorPayload(ECANCELED, "the agent link is being released for a snapshot")
                        : ErrorPayload(EPERM, "only the supervisor releases the agent link"));
      return {};
    }
    uint32_t up = next_up_stream++;
    Route route;
    route.client = c.id;
    route.client_stream = f.stream_id;
    // A request that does not decode is still forwarded: the agent answers
    // it with the precise EINVAL.
    route.is_main = request && std::holds_alternative<protocol::AttachMainRequest>(*request);
    routes[up] = route;
    c.streams[f.stream_id] = up;
    AppendUp(up, FrameType::kOpen, Channel::kControl, f.payload);
    if (release) upstream_released = true;
    return {};
  }

  // An error return disconnects the client.
  Status HandleClientFrame(Client& c, const Frame& f) {
    if (c.state == Client::State::kHandshake) return HandleHello(c, f);
    if (f.stream_id == 0) {
      if (f.type != FrameType::kPing)
        return Protocol("unexpected frame type " + TypeName(f.type) + " on stream 0");
      std::vector<std::byte> tagged(kPingTagSize);
      for (size_t i = 0; i < kPingTagSize; ++i)
        tagged[i] = static_cast<std::byte>((c.id >> (8 * i)) & 0xff);
      tagged.insert(tagged.end(), f.payload.begin(), f.payload.end());
      AppendUp(0, FrameType::kPing, Channel::kControl, tagged);
      return {};
    }
    switch (f.type) {
      case FrameType::kOpen:
        return HandleOpen(c, f);
      case FrameType::kData:
      case FrameType::kEof:
      case FrameType::kWindow:
      case FrameType::kResize:
      case FrameType::kSignal:
      case FrameType::kClose:
      case FrameType::kError:
        break;
      default:
        // The agent would end the whole link for these.
        return Protocol("unexpected frame type " + TypeName(f.type) + " from a host");
    }
    auto it = c.streams.find(f.stream_id);
    if (it == c.streams.end()) {
      // Close, Error and Window racing the end of a stream are expected;
      // answering them would only make noise (or an Error ping-pong).
      if (f.type == FrameType::kClose || f.type == FrameType::kError ||
          f.type == FrameType::kWindow)
        return {};
      QueueToClient(c, f.stream_id, FrameType::kError, Channel::kControl,
                    ErrorPayload(EBADF, "stream " + std::to_string(f.stream_id) +
                                            " is not open on this link"));
      return {};
    }
    uint32_t up = it->second;
    auto route = routes.find(up);
    if (route == routes.end())
      return std::unexpected(Error{"agent router: stream map out of step (bug)", EIO});
    Route& r = route->second;
    switch (f.type) {
      case FrameType::kData:
        if (f.channel == Channel::kStdin) {
          auto size = static_cast<int64_t>(f.payload.size());
          if (size > r.stdin_credit)
            return Protocol("stream " + std::to_string(f.stream_id) + " sent more than its window");
          r.stdin_credit -= size;
        }
        break;
      case FrameType::kWindow: {
        auto inc = protocol::ParseU32Payload(f);
        // A malformed Window is forwarded: the agent fails just that stream.
        if (inc && IsOutput(f.channel)) {
          int64_t& w = r.recv_window[OutIndex(f.channel)];
          w = std::min(w + static_cast<int64_t>(*inc), kMaxCredit);
        }
        break;
      }
      default:
        break;
    }
    AppendUp(up, f.type, f.channel, f.payload);
    // The agent sends nothing more after Close or a host Error.
    if (f.type == FrameType::kClose || f.type == FrameType::kError) EndRoute(up);
    return {};
  }

  void ReadClient(uint64_t id) {
    Client* c = FindClient(id);
    if (!c) return;
    ssize_t n;
    do {
      n = ::read(c->fd.Get(), read_buf.get(), kReadChunk);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      if (errno == EAGAIN) return;
      return DropClient(id, std::string("read: ") + strerror(errno));
    }
    if (n == 0) return DropClient(id, "closed by the client");
    c->decoder.Feed(std::span(read_buf.get(), static_cast<size_t>(n)));
    while (c->state != Client::State::kClosing && !c->doomed) {
      auto next = c->decoder.Next();
      if (!next) return DropClient(id, "bad framing: " + next.error().message);
      if (!next->has_value()) break;
      if (auto ok = HandleClientFrame(*c, **next); !ok) return DropClient(id, ok.error().message);
    }
    if (c->doomed) DropClient(id, *c->doomed);
  }

  void Accept() {
    for (int i = 0; i < kAcceptsPerRound; ++i) {
      int fd = ::accept4(listener.Get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0) {
        UniqueFd conn(fd);
        if (auto peer = RequireTrustedPeer(conn.Get()); !peer) {
          log::Notice("agent router: connection refused", {{"error", peer.error().message}});
          continue;
        }
        Admit(std::move(conn), /*local=*/false);
        continue;
      }
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN) return;
      log::Warn("agent router: accept failed", {{"error", strerror(errno)}});
      accept_resume = Clock::now() + kAcceptBackoff;
      return;
    }
  }

  // ---- upstream -------------------------------------------------------------

  void FailUpstream(Error error) {
    if (!upstream_alive) return;
    upstream_alive = false;
    upstream_error = error;
    {
      std::lock_guard lock(mu);
      if (!failure) failure = error;
    }
    // A guest that breaks the protocol ends the link for good: worth a
    // warning. A closed link is also how every guest powers off.
    if (error.errno_value == EPROTO)
      log::Warn("agent router: upstream failed", {{"error", error.message}});
    else
      log::Debug("agent router: upstream ended", {{"error", error.message}});
    upstream.Reset();
    up_out.Clear();
    routes.clear();
    for (auto& [id, c] : clients) {
      c->streams.clear();
      if (c->state != Client::State::kClosing)
        CloseWithError(*c, error.errno_value, "the guest agent link is gone: " + error.message);
    }
  }

  void Violation(const std::string& message) {
    FailUpstream(Error{"guest agent broke the protocol: " + message, EPROTO});
  }

  void DispatchControl(Frame& f) {
    switch (f.type) {
      case FrameType::kPong: {
        if (f.payload.size() < kPingTagSize) return;  // not one the router sent
        uint64_t id = 0;
        for (size_t i = 0; i < kPingTagSize; ++i)
          id |= static_cast<uint64_t>(f.payload[i]) << (8 * i);
        Client* c = FindClient(id);
        if (!c || c->state != Client::State::kReady) return;  // it left meanwhile
        QueueToClient(*c, 0, FrameType::kPong, Channel::kControl,
                      std::span(f.payload).subspan(kPingTagSize));
        if (c->doomed) DropClient(id, *c->doomed);
        return;
      }
      case FrameType::kPing:
        AppendUp(0, FrameType::kPong, Channel::kControl, f.payload);
        return;
      case FrameType::kError: {
        auto body = protocol::DecodeError(f.PayloadText());
        if (!body) return Violation("malformed Error on stream 0");
        return FailUpstream(protocol::ErrorFromBody(*body).WithContext("guest agent"));
      }
      default:
        return Violation("unexpected frame type " + TypeName(f.type) + " on stream 0");
    }
  }

  void DispatchUpstream(Frame f) {
    // Hellos of earlier link attempts may come first: while no host was
    // connected, QEMU held what the guest agent wrote (a Hello per attempt)
    // and delivers it all once a host connects, which a restored snapshot's
    // agent hits (fork copies). Only before the agent says anything else;
    // each is dropped, so a guest repeating them gains nothing.
    if (f.stream_id == 0 && f.type == FrameType::kHello && !agent_spoke) return;
    agent_spoke = true;
    if (f.stream_id == 0) return DispatchControl(f);
    auto it = routes.find(f.stream_id);
    if (it == routes.end()) {
      // Frames racing a Close, or for a client that has gone.
      if (f.stream_id < next_up_stream) return;
      return Violation("frame for stream " + std::to_string(f.stream_id) + " never opened");
    }
    Route& r = it->second;
    switch (f.type) {
      case FrameType::kData: {
        if (!IsOutput(f.channel)) return Violation("Data on a channel the agent does not write");
        int64_t& w = r.recv_window[OutIndex(f.channel)];
        auto size = static_cast<int64_t>(f.payload.size());
        if (size > w)
          return Violation("stream " + std::to_string(f.stream_id) + " exceeded its window");
        w -= size;
        if (r.is_main && hooks.on_main_output) hooks.on_main_output(f.channel, f.payload);
        break;
      }
      case FrameType::kEof:
        if (!IsOutput(f.channel)) return Violation("Eof on a channel the agent does not write");
        break;
      case FrameType::kWindow: {
        auto inc = protocol::ParseU32Payload(f);
        if (!inc || f.channel != Channel::kStdin) return Violation("malformed Window");
        r.stdin_credit = std::min(r.stdin_credit + static_cast<int64_t>(*inc), kMaxCredit);
        break;
      }
      case FrameType::kOpened:
        break;
      case FrameType::kResult:
        if (r.is_main && hooks.on_main_result) hooks.on_main_result(f.PayloadText());
        break;
      case FrameType::kError:
        break;
      default:
        return Violation("unexpected frame type " + TypeName(f.type) + " on a stream");
    }
    uint64_t client_id = r.client;
    Client* c = FindClient(client_id);
    if (c) QueueToClient(*c, r.client_stream, f.type, f.channel, f.payload);
    if (f.type == FrameType::kResult || f.type == FrameType::kError) EndRoute(f.stream_id);
    if (c && c->doomed) DropClient(client_id, *c->doomed);
  }

  void ReadUpstream() {
    for (int round = 0; round < kUpstreamReadsPerRound && upstream_alive; ++round) {
      ssize_t n;
      do {
        n = ::read(upstream.Get(), read_buf.get(), kReadChunk);
      } while (n < 0 && errno == EINTR);
      if (n < 0) {
        if (errno == EAGAIN) return;
        return FailUpstream(Error::FromErrno("guest agent link: read"));
      }
      if (n == 0) return FailUpstream(Error{"the guest agent closed the link", EPIPE});
      up_decoder.Feed(std::span(read_buf.get(), static_cast<size_t>(n)));
      while (upstream_alive) {
        auto next = up_decoder.Next();
        if (!next) return Violation(next.error().message);
        if (!next->has_value()) break;
        DispatchUpstream(std::move(**next));
      }
      if (static_cast<size_t>(n) < kReadChunk) return;
    }
  }

  // ---- loop -----------------------------------------------------------------

  // Takes what other threads handed over; false once Stop was asked for.
  bool TakeCommands() {
    std::vector<UniqueFd> fresh;
    {
      std::lock_guard lock(mu);
      if (stop_requested) return false;
      fresh.swap(incoming);
      if (incoming_listener) listener = std::move(incoming_listener);
    }
    for (auto& fd : fresh) Admit(std::move(fd), /*local=*/true);
    return true;
  }

  void PublishStats() {
    size_t buffered = up_out.Pending();
    for (auto& [id, c] : clients) buffered += c->out.Pending();
    peak_buffered = std::max(peak_buffered, buffered);
    std::lock_guard lock(mu);
    stats.clients = clients.size();
    stats.live_streams = routes.size();
    stats.peak_buffered_bytes = peak_buffered;
  }

  int PollTimeout(Clock::time_point now) {
    std::optional<Clock::time_point> next;
    for (auto& [id, c] : clients)
      if (c->state != Client::State::kReady && (!next || c->deadline < *next)) next = c->deadline;
    if (listener && accept_resume > now && (!next || accept_resume < *next)) next = accept_resume;
    if (!next) return -1;
    if (*next <= now) return 0;
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(*next - now).count();
    return static_cast<int>(std::min<int64_t>(ms, 60'000));
  }

  void Run() {
    std::vector<pollfd> fds;
    std::vector<uint64_t> owners;
    while (TakeCommands()) {
      auto now = Clock::now();
      fds.clear();
      owners.clear();
      fds.push_back({wake.Get(), POLLIN, 0});
      // The guest feeds up_out too (a Pong for every Ping): past twice the
      // clients' threshold, stop reading it until it takes what is queued,
      // so a flooding guest stalls itself instead of growing the host.
      short up_events = up_out.Pending() < 2 * options.max_upstream_buffer ? POLLIN : 0;
      if (up_out.Pending() > 0) up_events |= POLLOUT;
      // Negative fds are ignored by poll.
      fds.push_back({upstream_alive ? upstream.Get() : -1, up_events, 0});
      bool accepting = listener && accept_resume <= now;
      fds.push_back({accepting ? listener.Get() : -1, POLLIN, 0});
      bool backpressure = up_out.Pending() >= options.max_upstream_buffer;
      for (auto& [id, c] : clients) {
        short events = 0;
        if (c->state == Client::State::kHandshake ||
            (c->state == Client::State::kReady && !backpressure))
          events |= POLLIN;
        if (c->out.Pending() > 0) events |= POLLOUT;
        fds.push_back({c->fd.Get(), events, 0});
        owners.push_back(id);
      }
      int ready = ::poll(fds.data(), fds.size(), PollTimeout(now));
      if (ready < 0) {
        if (errno == EINTR) continue;
        // EINVAL/ENOMEM: nothing this loop can recover from.
        Error error = Error::FromErrno("agent router: poll");
        log::Error("agent router: poll failed; the router stopped", {{"error", error.message}});
        FailUpstream(std::move(error));
        break;
      }
      if (fds[0].revents & POLLIN) {
        uint64_t count;
        if (::read(wake.Get(), &count, sizeof(count)) < 0 && errno != EAGAIN)
          log::Warn("agent router: reading the wake eventfd failed", {{"error", strerror(errno)}});
      }
      if (upstream_alive && (up_events & POLLIN) && (fds[1].revents & (POLLIN | POLLHUP | POLLERR)))
        ReadUpstream();
      if (fds[2].revents & POLLIN) Accept();
      for (size_t i = 0; i < owners.size(); ++i) {
        short rev = fds[3 + i].revents;
        if (rev == 0) continue;
        Client* c = FindClient(owners[i]);
        if (!c) continue;
        if (rev & POLLNVAL) {
          DropClient(owners[i], "descriptor is not open");
        } else if (rev & POLLIN) {
          ReadClient(owners[i]);
        } else if (rev & (POLLHUP | POLLERR)) {
          // Not being read (closing, or backpressure) and the peer is gone:
          // nobody is left to read what it asked for.
          DropClient(owners[i], "hung up");
        }
      }
      now = Clock::now();
      std::vector<std::pair<uint64_t, std::string>> expired;
      for (auto& [id, c] : clients) {
        if (c->state == Client::State::kHandshake && now >= c->deadline)
          expired.emplace_back(id, "no Hello within the handshake timeout");
        if (c->state == Client::State::kClosing && now >= c->deadline)
          expired.emplace_back(id, "did not read its last message");
      }
      for (auto& [id, why] : expired) DropClient(id, why);
      PublishStats();
      if (upstream_alive && up_out.Pending() > 0) {
        if (auto ok = up_out.Flush(upstream.Get()); !ok)
          FailUpstream(std::move(ok.error()).WithContext("guest agent link"));
      }
      std::vector<std::pair<uint64_t, std::string>> done;
      for (auto& [id, c] : clients) {
        if (c->out.Pending() > 0) {
          if (auto ok = c->out.Flush(c->fd.Get()); !ok) {
            done.emplace_back(id, ok.error().message);
            continue;
          }
        }
        if (c->state == Client::State::kClosing && c->out.Pending() == 0)
          done.emplace_back(id, "closed by the router");
      }
      for (auto& [id, why] : done) DropClient(id, why);
    }
    Shutdown();
  }

  // The thread's last act: everybody is told (best effort) and closed.
  void Shutdown() {
    FailUpstream(Error{"the agent router stopped", ECANCELED});
    for (auto& [id, c] : clients) (void)c->out.Flush(c->fd.Get());
    clients.clear();
    listener.Reset();
    PublishStats();
  }
};

Router::Router(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Router::~Router() { Stop(); }

Result<std::unique_ptr<Router>> Router::Start(UniqueFd upstream, RouterHooks hooks,
                                              std::chrono::milliseconds handshake_timeout,
                                              RouterOptions options) {
  CELLA_TRY_CTX(SetNonBlocking(upstream.Get(), true), "agent router: upstream");
  CELLA_TRY_CTX(SetCloexec(upstream.Get(), true), "agent router: upstream");
  auto impl = std::make_unique<Impl>();
  impl->hooks = std::move(hooks);
  impl->options = options;
  impl->upstream = std::move(upstream);
  impl->wake.Reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!impl->wake) return FailErrno("agent router: eventfd");
  CELLA_TRY_CTX(impl->Handshake(Clock::now() + handshake_timeout), "agent router: handshake");
  impl->thread = std::thread([raw = impl.get()] { raw->Run(); });
  return std::unique_ptr<Router>(new Router(std::move(impl)));
}

Status Router::AddClient(UniqueFd client) {
  if (!client) return FailErrno("agent router: add client", EBADF);
  CELLA_TRY_CTX(SetNonBlocking(client.Get(), true), "agent router: add client");
  CELLA_TRY_CTX(SetCloexec(client.Get(), true), "agent router: add client");
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->failure) return std::unexpected(Error(*impl_->failure).WithContext("agent router"));
    if (impl_->stop_requested) return FailErrno("agent router: stopped", ECANCELED);
    impl_->incoming.push_back(std::move(client));
  }
  impl_->Wake();
  return {};
}

Result<UniqueFd> Router::ConnectLocal() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return FailErrno("agent router: socketpair");
  UniqueFd ours(sv[0]);
  UniqueFd theirs(sv[1]);
  CELLA_TRY(AddClient(std::move(ours)));
  return theirs;
}

Status Router::Listen(const std::string& path) {
  std::string where = "agent router: listen " + path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return FailErrno(
        where + ": path length must be 1.." + std::to_string(sizeof(addr.sun_path) - 1),
        ENAMETOOLONG);
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stop_requested) return FailErrno(where + ": stopped", ECANCELED);
    if (impl_->listen_claimed)
      return FailErrno(where + ": already listening on " + impl_->listen_path, EBUSY);
    impl_->listen_claimed = true;
  }
  auto release_claim = [&] {
    std::lock_guard lock(impl_->mu);
    impl_->listen_claimed = false;
  };
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      release_claim();
      return FailErrno(where + ": a file that is not a socket is in the way", EEXIST);
    }
    // A previous supervisor's socket: nobody can be serving it if we are
    // asked to (the caller owns the sandbox directory).
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      release_claim();
      return FailErrno(where + ": unlink stale socket");
    }
  } else if (errno != ENOENT) {
    release_claim();
    return FailErrno(where + ": lstat");
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    release_claim();
    return FailErrno(where + ": socket");
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (::bind(fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    release_claim();
    return FailErrno(where + ": bind");
  }
  // Before listen(): until then nobody can connect, so there is no window
  // in which the socket is reachable with the umask's looser mode.
  auto fail_bound = [&](const std::string& what) {
    int err = errno;
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      log::Warn("agent router: removing the socket file failed",
                {{"path", path}, {"error", strerror(errno)}});
    release_claim();
    return FailErrno(where + ": " + what, err);
  };
  if (::chmod(path.c_str(), 0600) != 0) return fail_bound("chmod 0600");
  if (::stat(path.c_str(), &st) != 0) return fail_bound("stat");
  if (::listen(fd.Get(), 64) != 0) return fail_bound("listen");
  bool handed_over = false;
  {
    std::lock_guard lock(impl_->mu);
    if (!impl_->stop_requested) {
      impl_->incoming_listener = std::move(fd);
      impl_->listen_path = path;
      impl_->listen_dev = st.st_dev;
      impl_->listen_ino = st.st_ino;
      handed_over = true;
    }
  }
  if (!handed_over) {
    errno = ECANCELED;
    return fail_bound("the router stopped meanwhile");
  }
  impl_->Wake();
  return {};
}

std::optional<Error> Router::UpstreamError() const {
  std::lock_guard lock(impl_->mu);
  return impl_->failure;
}

RouterStats Router::Stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->stats;
}

void Router::Stop() {
  {
    std::lock_guard lock(impl_->mu);
    impl_->stop_requested = true;
  }
  impl_->Wake();
  std::string path;
  dev_t dev = 0;
  ino_t ino = 0;
  {
    std::lock_guard join_lock(impl_->join_mu);
    if (!impl_->thread.joinable()) return;
    impl_->thread.join();
    std::lock_guard lock(impl_->mu);
    if (!impl_->failure) impl_->failure = Error{"the agent router stopped", ECANCELED};
    path = impl_->listen_path;
    dev = impl_->listen_dev;
    ino = impl_->listen_ino;
    impl_->incoming.clear();
    impl_->incoming_listener.Reset();
  }
  if (path.empty()) return;
  // Only our own socket: a newer supervisor may have replaced it already.
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && st.st_dev == dev && st.st_ino == ino) {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      log::Warn("agent router: removing the socket file failed",
                {{"path", path}, {"error", strerror(errno)}});
  }
}

}  // namespace cella::host
