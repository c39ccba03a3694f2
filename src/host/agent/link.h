// The agent link behind AgentClient: one connection to the guest agent,
// its reader thread, and the per-stream event queues and credit windows the
// client's calls wait on. Internal to host/agent (client.cc and its tests
// of framing); not part of AgentClient's API. Split out of client.cc so each
// file reads as one piece: this one is the link, client.cc the operations.
//
// Trust: the guest is untrusted; every size it sends is capped, every
// protocol violation fails the link (Failure()), every wait is bounded.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/check.h"
#include "base/io.h"
#include "base/result.h"
#include "base/unique_fd.h"
#include "host/agent/client.h"
#include "protocol/messages.h"
#include "protocol/wire.h"

namespace cella::host {
namespace link_detail {

using Clock = std::chrono::steady_clock;
using protocol::Channel;
using protocol::FrameType;
using protocol::kDataChunk;
using protocol::kInitialWindow;
using protocol::kMaxCredit;

inline int Index(Channel channel) { return static_cast<int>(channel); }

inline std::unexpected<Error> Protocol(std::string message) {
  return std::unexpected(Error{"agent link: " + std::move(message), EPROTO});
}

}  // namespace link_detail

// Internal header: these names serve client.cc, its only includer.
using link_detail::Channel;
using link_detail::Clock;
using link_detail::FrameType;
using link_detail::Index;
using link_detail::kDataChunk;
using link_detail::kInitialWindow;
using link_detail::kMaxCredit;
using link_detail::Protocol;

struct Event {
  enum class Kind { kData, kEof, kOpened, kResult, kError };
  Kind kind = Kind::kData;
  Channel channel = Channel::kControl;
  std::vector<std::byte> bytes;

  std::string_view Text() const {
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
  }
};

// One stream's inbound events and credit. Events are bounded: data by the
// windows we grant, the rest by one-per-kind checks in Link::Dispatch.
class Stream {
 public:
  explicit Stream(uint32_t stream_id) : id(stream_id) {}
  const uint32_t id;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> events;
  int64_t stdin_credit = kInitialWindow;
  int64_t recv_window[4] = {0, 0, kInitialWindow, kInitialWindow};
  bool eof_seen[4] = {};
  bool opened_seen = false;
  bool finished = false;  // Result or Error received
  std::optional<Error> failure;
};

class Link {
 public:
  Link(UniqueFd fd, UniqueFd wake_read, UniqueFd wake_write)
      : fd_(std::move(fd)), wake_read_(std::move(wake_read)), wake_write_(std::move(wake_write)) {}
  ~Link() { Close(); }

  static Result<std::shared_ptr<Link>> Connect(UniqueFd fd, std::chrono::milliseconds timeout) {
    CELLA_TRY_CTX(SetNonBlocking(fd.Get(), true), "agent link");
    CELLA_TRY_CTX(SetCloexec(fd.Get(), true), "agent link");
    int p[2];
    if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return FailErrno("agent link: pipe2");
    auto link = std::make_shared<Link>(std::move(fd), UniqueFd(p[0]), UniqueFd(p[1]));
    auto deadline = Clock::now() + timeout;
    std::string hello = protocol::EncodeHello({protocol::kProtocolVersion, protocol::Role::kHost});
    CELLA_TRY_CTX(
        link->Send(0, FrameType::kHello, Channel::kControl, protocol::AsBytes(hello), deadline),
        "agent handshake");
    CELLA_TRY_CTX(link->AwaitHello(deadline), "agent handshake");
    link->reader_ = std::thread([raw = link.get()] { raw->ReaderLoop(); });
    return link;
  }

  void Close() {
    {
      std::lock_guard lock(mu_);
      if (closed_) return;
      closed_ = true;
    }
    FailLink(Error{"agent link: closed by the host", ECANCELED});
    if (reader_.joinable()) reader_.join();
  }

  std::optional<Error> Failure() const {
    std::lock_guard lock(mu_);
    return failure_;
  }

  Result<std::shared_ptr<Stream>> Open(const protocol::Request& request) {
    std::shared_ptr<Stream> stream;
    std::string body = protocol::EncodeRequest(request);
    // Ids are allocated and sent under the write lock: the agent requires
    // them to arrive in increasing order.
    std::lock_guard write_lock(write_mu_);
    {
      std::lock_guard lock(mu_);
      if (failure_) return std::unexpected(*failure_);
      if (next_id_ == 0) return Fail("agent link: stream ids exhausted");
      stream = std::make_shared<Stream>(next_id_++);
      streams_[stream->id] = stream;
    }
    CELLA_TRY(SendLocked(stream->id, FrameType::kOpen, Channel::kControl, protocol::AsBytes(body),
                         std::nullopt));
    return stream;
  }

  // Blocks for the stream's next event; after the link failed, pending
  // events are still delivered before the failure.
  // Without a deadline this waits as long as the link lives: for requests
  // whose answer takes as long as the work (exec). Requests the guest must
  // answer at once pass one, so a stopped agent cannot hold the caller.
  Result<Event> Next(Stream& s, std::optional<Clock::time_point> deadline = std::nullopt) {
    std::unique_lock lock(s.mu);
    auto ready = [&] { return !s.events.empty() || s.failure.has_value(); };
    if (!deadline) {
      s.cv.wait(lock, ready);
    } else if (!s.cv.wait_until(lock, *deadline, ready)) {
      return std::unexpected(Error{"the guest agent did not answer in time", ETIMEDOUT});
    }
    if (!s.events.empty()) {
      Event e = std::move(s.events.front());
      s.events.pop_front();
      return e;
    }
    if (s.failure) return std::unexpected(*s.failure);
    return Fail("agent stream woke with neither an event nor a failure (bug)");
  }

  void ReturnCredit(Stream& s, Channel channel, size_t amount) {
    if (amount == 0) return;
    {
      std::lock_guard lock(s.mu);
      if (s.finished || s.failure) return;
      s.recv_window[Index(channel)] += static_cast<int64_t>(amount);
    }
    // A failure here fails the link (or, with the peer gone, leaves that
    // to the reader: see SendLocked), which every waiter then sees.
    (void)Send(s.id, FrameType::kWindow, channel,
               protocol::U32Payload(static_cast<uint32_t>(amount)));
  }

  // Sends bytes on the stream's stdin channel within the agent's credit.
  Status SendBytes(Stream& s, std::span<const std::byte> data) {
    while (!data.empty()) {
      size_t n = 0;
      {
        std::unique_lock lock(s.mu);
        s.cv.wait(lock, [&] { return s.stdin_credit > 0 || s.finished || s.failure; });
        if (s.failure) return std::unexpected(*s.failure);
        if (s.finished) return std::unexpected(Error{"agent link: the stream has ended", EPIPE});
        n = std::min<size_t>({static_cast<size_t>(s.stdin_credit), kDataChunk, data.size()});
        s.stdin_credit -= static_cast<int64_t>(n);
      }
      CELLA_TRY(Send(s.id, FrameType::kData, Channel::kStdin, data.first(n)));
      data = data.subspan(n);
    }
    return {};
  }

  // Stops caring about a stream: tells the agent (Close) if it is still
  // live, and wakes anyone waiting on it.
  // Never throws: destructors call it.
  void Abandon(Stream& s) noexcept {
    try {
      bool live = false;
      {
        std::lock_guard lock(mu_);
        live = streams_.erase(s.id) > 0 && !failure_;
      }
      if (live) (void)Send(s.id, FrameType::kClose, Channel::kControl, {});
    } catch (const std::exception&) {
      // Close is a courtesy (like a failed Send above): the agent drops the
      // stream with the link anyway, and its later frames find no owner.
    }
    try {
      std::lock_guard lock(s.mu);
      if (!s.finished && !s.failure) s.failure = Error{"agent stream abandoned", ECANCELED};
      s.cv.notify_all();
    } catch (const std::exception&) {
      // Out of memory or a broken mutex: a waiter left asleep here would hang
      // its owner's join forever, so crashing is the only bounded outcome.
      Die(CELLA_HERE, "cannot wake the waiters of an abandoned agent stream");
    }
  }

  Status Ping(std::chrono::milliseconds timeout) {
    uint64_t id;
    {
      std::lock_guard lock(mu_);
      if (failure_) return std::unexpected(*failure_);
      id = next_ping_++;
      pings_[id] = false;
    }
    std::vector<std::byte> payload;
    payload.reserve(8);
    for (int i = 0; i < 8; ++i) payload.push_back(static_cast<std::byte>((id >> (8 * i)) & 0xff));
    auto sent = Send(0, FrameType::kPing, Channel::kControl, payload);
    std::unique_lock lock(mu_);
    bool answered =
        sent && ping_cv_.wait_for(lock, timeout, [&] { return pings_[id] || failure_; });
    bool got = pings_[id];
    pings_.erase(id);
    if (got) return {};
    if (!sent) return std::unexpected(sent.error());
    if (failure_) return std::unexpected(*failure_);
    (void)answered;
    return FailErrno("agent ping: no answer within " + std::to_string(timeout.count()) + " ms",
                     ETIMEDOUT);
  }

  Status Send(uint32_t stream, FrameType type, Channel channel, std::span<const std::byte> payload,
              std::optional<Clock::time_point> deadline = std::nullopt) {
    std::lock_guard lock(write_mu_);
    return SendLocked(stream, type, channel, payload, deadline);
  }

 private:
  // Needs write_mu_ held.
  Status SendLocked(uint32_t stream, FrameType type, Channel channel,
                    std::span<const std::byte> payload, std::optional<Clock::time_point> deadline) {
    std::vector<std::byte> header;
    protocol::EncodeFrame(stream, type, channel, {}, header);
    uint32_t len = static_cast<uint32_t>(payload.size());
    for (int i = 0; i < 4; ++i) header[i] = static_cast<std::byte>((len >> (8 * i)) & 0xff);
    if (auto f = Failure()) return std::unexpected(*f);
    size_t total = header.size() + payload.size();
    size_t done = 0;
    while (done < total) {
      iovec iov[2];
      int count = 0;
      if (done < header.size()) {
        iov[count++] = {header.data() + done, header.size() - done};
        if (!payload.empty())
          iov[count++] = {const_cast<std::byte*>(payload.data()), payload.size()};
      } else {
        size_t off = done - header.size();
        iov[count++] = {const_cast<std::byte*>(payload.data()) + off, payload.size() - off};
      }
      // sendmsg with MSG_NOSIGNAL: a guest that went away (QEMU killed, VM
      // powered off) is an error value here, never a SIGPIPE that kills the
      // host process. The link is always a socket.
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(count);
      ssize_t n = ::sendmsg(fd_.Get(), &msg, MSG_NOSIGNAL);
      if (n >= 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN) {
        Error e = Error::FromErrno("agent link: write");
        // A peer that stopped reading (a guest powering off right after its
        // main process ended) may still have sent what matters, e.g. that
        // process's Result: failing the link here would shut our reading
        // side before it is read. The caller gets the error; the reader
        // fails the link at the EOF that follows.
        if (errno != EPIPE && errno != ECONNRESET) FailLink(e);
        return std::unexpected(e);
      }
      CELLA_TRY(WaitFd(fd_.Get(), POLLOUT, deadline));
    }
    return {};
  }

  // Waits for events on fd, giving up when the link is closing or the
  // deadline passes.
  Status WaitFd(int fd, short events, std::optional<Clock::time_point> deadline) {
    for (;;) {
      pollfd p[2] = {{fd, events, 0}, {wake_read_.Get(), POLLIN, 0}};
      int timeout = -1;
      if (deadline) {
        auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - Clock::now()).count();
        if (left <= 0) return FailErrno("agent link: timed out", ETIMEDOUT);
        timeout = static_cast<int>(std::min<int64_t>(left, 60'000));
      }
      int r = ::poll(p, 2, timeout);
      if (r < 0) {
        if (errno == EINTR) continue;
        return FailErrno("agent link: poll");
      }
      if (p[1].revents) {
        if (auto f = Failure()) return std::unexpected(*f);
        return FailErrno("agent link: closed", ECANCELED);
      }
      if (p[0].revents) return {};
    }
  }

  Status AwaitHello(Clock::time_point deadline) {
    std::vector<std::byte> buf(size_t{64} * 1024);
    for (;;) {
      auto frame = decoder_.Next();
      if (!frame) return Protocol(frame.error().message);
      if (std::optional<protocol::Frame>& complete = *frame; complete) {
        Status hello = protocol::CheckAgentHello(*complete);
        if (!hello && hello.error().errno_value == EPROTO)
          return Protocol(std::move(hello.error().message));
        return hello;
      }
      CELLA_TRY(WaitFd(fd_.Get(), POLLIN, deadline));
      ssize_t n = ::read(fd_.Get(), buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        return FailErrno("agent link: read");
      }
      if (n == 0) return FailErrno("agent link: closed before Hello", EPIPE);
      decoder_.Feed(std::span(buf.data(), static_cast<size_t>(n)));
    }
  }

  void FailLink(const Error& error) {
    std::map<uint32_t, std::shared_ptr<Stream>> streams;
    {
      std::lock_guard lock(mu_);
      if (failure_) return;
      failure_ = error;
      streams.swap(streams_);
    }
    // Wakes the reader and every writer blocked in poll; never drained.
    char byte = 1;
    if (::write(wake_write_.Get(), &byte, 1) < 0 && errno != EAGAIN) {
      // The pipe is ours and non-blocking; nothing else can go wrong here
      // that would leave a waiter asleep (the reader also sees the error).
    }
    // Tells the agent promptly on a socket; other link kinds see close().
    if (::shutdown(fd_.Get(), SHUT_RDWR) != 0 && errno != ENOTSOCK && errno != ENOTCONN) {
      // Best effort only: the descriptor is closed with the link anyway.
    }
    for (auto& [id, s] : streams) {
      std::lock_guard lock(s->mu);
      if (!s->failure) s->failure = error;
      s->cv.notify_all();
    }
    ping_cv_.notify_all();
  }

  void ReaderLoop() {
    std::vector<std::byte> buf(size_t{256} * 1024);
    for (;;) {
      for (;;) {
        auto frame = decoder_.Next();
        if (!frame) return FailLink(Protocol(frame.error().message).error());
        std::optional<protocol::Frame>& complete = *frame;
        if (!complete) break;
        Dispatch(std::move(*complete));
        if (Failure()) return;
      }
      if (auto waited = WaitFd(fd_.Get(), POLLIN, std::nullopt); !waited)
        return FailLink(waited.error());
      ssize_t n = ::read(fd_.Get(), buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        return FailLink(Error::FromErrno("agent link: read"));
      }
      if (n == 0) return FailLink(Error{"agent link: the agent closed the link", EPIPE});
      decoder_.Feed(std::span(buf.data(), static_cast<size_t>(n)));
    }
  }

  void Violation(std::string message) { FailLink(Protocol(std::move(message)).error()); }

  void DispatchControl(protocol::Frame& f) {
    switch (f.type) {
      case FrameType::kPong: {
        if (f.payload.size() != 8) return;  // not one of ours
        uint64_t id = 0;
        for (int i = 0; i < 8; ++i) id |= static_cast<uint64_t>(f.payload[i]) << (8 * i);
        std::lock_guard lock(mu_);
        auto it = pings_.find(id);
        if (it != pings_.end()) it->second = true;
        ping_cv_.notify_all();
        return;
      }
      case FrameType::kPing:
        (void)Send(0, FrameType::kPong, Channel::kControl, f.payload);
        return;
      case FrameType::kError: {
        auto body = protocol::DecodeError(f.PayloadText());
        if (!body) return Violation("malformed Error on stream 0");
        Error e = protocol::ErrorFromBody(*body);
        return FailLink(std::move(e).WithContext("agent link"));
      }
      default:
        return Violation("unexpected frame type " + std::to_string(static_cast<int>(f.type)) +
                         " on stream 0");
    }
  }

  void Dispatch(protocol::Frame f) {
    // Hellos of earlier link attempts may come first: while no host was
    // connected, QEMU held what the guest agent wrote (a Hello per attempt)
    // and delivers it all once a host connects, which a restored snapshot's
    // agent hits (fork copies). Only before the agent says anything else;
    // each is dropped, so a guest repeating them gains nothing.
    if (f.stream_id == 0 && f.type == FrameType::kHello && !agent_spoke_) return;
    agent_spoke_ = true;
    if (f.stream_id == 0) return DispatchControl(f);
    std::shared_ptr<Stream> s;
    bool already_ended = false;
    {
      std::lock_guard lock(mu_);
      auto it = streams_.find(f.stream_id);
      if (it != streams_.end()) {
        s = it->second;
      } else {
        already_ended = f.stream_id < next_id_;
      }
    }
    // Frames racing a Close we sent are expected; ids never issued are not.
    if (!s && already_ended) return;
    if (!s) return Violation("frame for stream " + std::to_string(f.stream_id) + " never opened");
    std::unique_lock lock(s->mu);
    int ch = Index(f.channel);
    switch (f.type) {
      case FrameType::kData: {
        if (f.channel != Channel::kStdout && f.channel != Channel::kStderr)
          return lock.unlock(), Violation("Data on a channel the agent does not write");
        if (s->eof_seen[ch]) return lock.unlock(), Violation("Data after Eof");
        auto size = static_cast<int64_t>(f.payload.size());
        if (size > s->recv_window[ch]) return lock.unlock(), Violation("agent exceeded its window");
        s->recv_window[ch] -= size;
        s->events.push_back({Event::Kind::kData, f.channel, std::move(f.payload)});
        break;
      }
      case FrameType::kEof:
        if (f.channel != Channel::kStdout && f.channel != Channel::kStderr)
          return lock.unlock(), Violation("Eof on a channel the agent does not write");
        if (s->eof_seen[ch]) return lock.unlock(), Violation("second Eof on a channel");
        s->eof_seen[ch] = true;
        s->events.push_back({Event::Kind::kEof, f.channel, {}});
        break;
      case FrameType::kWindow: {
        auto inc = protocol::ParseU32Payload(f);
        if (!inc || f.channel != Channel::kStdin)
          return lock.unlock(), Violation("malformed Window");
        s->stdin_credit = std::min(s->stdin_credit + static_cast<int64_t>(*inc), kMaxCredit);
        break;
      }
      case FrameType::kOpened:
        if (s->opened_seen) return lock.unlock(), Violation("second Opened on a stream");
        s->opened_seen = true;
        s->events.push_back({Event::Kind::kOpened, Channel::kControl, std::move(f.payload)});
        break;
      case FrameType::kResult:
      case FrameType::kError: {
        s->finished = true;
        auto kind = f.type == FrameType::kResult ? Event::Kind::kResult : Event::Kind::kError;
        s->events.push_back({kind, Channel::kControl, std::move(f.payload)});
        s->cv.notify_all();
        lock.unlock();
        std::lock_guard map_lock(mu_);
        streams_.erase(f.stream_id);
        return;
      }
      default:
        return lock.unlock(), Violation("unexpected frame type " +
                                        std::to_string(static_cast<int>(f.type)) + " on a stream");
    }
    s->cv.notify_all();
  }

  bool agent_spoke_ = false;  // reader thread only: see Dispatch
  UniqueFd fd_;
  UniqueFd wake_read_;
  UniqueFd wake_write_;
  std::mutex write_mu_;
  mutable std::mutex mu_;  // streams_, next_id_, failure_, pings_, closed_
  std::condition_variable ping_cv_;
  std::map<uint32_t, std::shared_ptr<Stream>> streams_;
  uint32_t next_id_ = 1;
  std::optional<Error> failure_;
  std::map<uint64_t, bool> pings_;
  uint64_t next_ping_ = 1;
  bool closed_ = false;
  protocol::FrameDecoder decoder_;  // handshake, then the reader thread only
  std::thread reader_;
};

}  // namespace cella::host
