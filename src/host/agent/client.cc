#include "host/agent/client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <optional>

#include "base/check.h"
#include "base/io.h"
#include "protocol/wire.h"

namespace cella::host {
namespace {

using Clock = std::chrono::steady_clock;
using protocol::Channel;
using protocol::FrameType;
using protocol::kDataChunk;
using protocol::kInitialWindow;

constexpr int64_t kMaxCredit = int64_t{1} << 40;

int Index(Channel channel) { return static_cast<int>(channel); }

std::unexpected<Error> Protocol(std::string message) {
  return std::unexpected(Error{"agent link: " + std::move(message), EPROTO});
}

}  // namespace

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
    // A failure here fails the link, which every waiter then sees.
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
        FailLink(e);
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

namespace {

// Abandons the stream on scope exit unless it finished normally.
class StreamGuard {
 public:
  StreamGuard(Link& link, std::shared_ptr<Stream> stream)
      : link_(link), stream_(std::move(stream)) {}
  ~StreamGuard() {
    if (stream_) link_.Abandon(*stream_);
  }
  Stream& operator*() { return *stream_; }
  // Hands the stream to a longer-lived owner.
  void Release() { stream_.reset(); }

 private:
  Link& link_;
  std::shared_ptr<Stream> stream_;
};

Error AgentError(const Event& e) {
  auto body = protocol::DecodeError(e.Text());
  if (!body) return Error{"agent link: malformed Error: " + body.error().message, EPROTO};
  return protocol::ErrorFromBody(*body);
}

Error Unexpected(const Event& e) {
  return Error{"agent link: unexpected event " + std::to_string(static_cast<int>(e.kind)), EPROTO};
}

ExecStatus ToStatus(const protocol::ExecOutcome& o) {
  return ExecStatus{o.exit_code, o.signal, o.timed_out};
}

// Waits for Result (returned as text) or Error; nothing else may arrive.
Result<std::string> AwaitResult(Link& link, Stream& s,
                                std::optional<Clock::time_point> deadline = std::nullopt) {
  auto e = CELLA_TRY(link.Next(s, deadline));
  if (e.kind == Event::Kind::kResult) return std::string(e.Text());
  if (e.kind == Event::Kind::kError) return std::unexpected(AgentError(e));
  return std::unexpected(Unexpected(e));
}

// Delivers a read_file stream's content to sink; returns the Result size.
Result<uint64_t> ReceiveFile(Link& link, Stream& s,
                             const std::function<Status(std::span<const std::byte>)>& sink) {
  auto first = CELLA_TRY(link.Next(s));
  if (first.kind == Event::Kind::kError) return std::unexpected(AgentError(first));
  if (first.kind != Event::Kind::kOpened) return std::unexpected(Unexpected(first));
  CELLA_TRY(protocol::DecodeReadFileOpened(first.Text()));
  uint64_t received = 0;
  for (;;) {
    auto e = CELLA_TRY(link.Next(s));
    switch (e.kind) {
      case Event::Kind::kData:
        CELLA_TRY(sink(e.bytes));
        received += e.bytes.size();
        link.ReturnCredit(s, e.channel, e.bytes.size());
        break;
      case Event::Kind::kEof:
        break;
      case Event::Kind::kResult: {
        uint64_t size = CELLA_TRY(protocol::DecodeSize(e.Text()));
        if (size != received)
          return FailErrno("read_file: agent reported " + std::to_string(size) +
                               " bytes but sent " + std::to_string(received),
                           EPROTO);
        return size;
      }
      case Event::Kind::kError:
        return std::unexpected(AgentError(e));
      case Event::Kind::kOpened:
        return std::unexpected(Unexpected(e));
    }
  }
}

Status SendFile(Link& link, Stream& s,
                const std::function<Result<size_t>(std::span<std::byte>)>& source) {
  std::vector<std::byte> buf(kDataChunk);
  Status sent;
  for (;;) {
    auto n = source(buf);
    if (!n) return std::unexpected(n.error());
    if (*n == 0) break;
    sent = link.SendBytes(s, std::span(buf.data(), *n));
    if (!sent) break;
  }
  if (sent) sent = link.Send(s.id, FrameType::kEof, Channel::kStdin, {});
  // The agent's own error (EACCES, ENOSPC...) explains a failed send best.
  auto result = AwaitResult(link, s);
  if (!result) return std::unexpected(result.error());
  if (!sent) return std::unexpected(sent.error());
  CELLA_TRY(protocol::DecodeSize(*result));
  return {};
}

}  // namespace

// ---- ExecSession ----------------------------------------------------------

ExecSession::~ExecSession() {
  if (thread_.joinable()) {
    link_->Abandon(*stream_);
    thread_.join();
  }
}

void ExecSession::Pump() {
  for (;;) {
    auto e = link_->Next(*stream_);
    if (!e) {
      outcome_ = std::unexpected(e.error());
      return;
    }
    switch (e->kind) {
      case Event::Kind::kData: {
        std::string_view text = e->Text();
        auto& cb = e->channel == Channel::kStdout ? callbacks_.on_stdout : callbacks_.on_stderr;
        if (cb) cb(text);
        link_->ReturnCredit(*stream_, e->channel, e->bytes.size());
        break;
      }
      case Event::Kind::kEof:
        break;
      case Event::Kind::kResult: {
        auto outcome = protocol::DecodeExecOutcome(e->Text());
        if (outcome) {
          outcome_ = ToStatus(*outcome);
        } else {
          outcome_ = std::unexpected(outcome.error());
        }
        return;
      }
      case Event::Kind::kError:
        outcome_ = std::unexpected(AgentError(*e));
        return;
      case Event::Kind::kOpened:
        outcome_ = std::unexpected(Unexpected(*e));
        link_->Abandon(*stream_);
        return;
    }
  }
}

Status ExecSession::WriteStdin(std::span<const std::byte> bytes) {
  return link_->SendBytes(*stream_, bytes);
}
Status ExecSession::WriteStdin(std::string_view bytes) {
  return WriteStdin(protocol::AsBytes(bytes));
}
Status ExecSession::CloseStdin() {
  return link_->Send(stream_->id, FrameType::kEof, Channel::kStdin, {});
}
Status ExecSession::Resize(uint16_t rows, uint16_t cols) {
  std::vector<std::byte> p = {
      static_cast<std::byte>(rows & 0xff), static_cast<std::byte>(rows >> 8),
      static_cast<std::byte>(cols & 0xff), static_cast<std::byte>(cols >> 8)};
  return link_->Send(stream_->id, FrameType::kResize, Channel::kControl, p);
}
Status ExecSession::Signal(int signo) {
  if (signo <= 0) return FailErrno("signal " + std::to_string(signo), EINVAL);
  return link_->Send(stream_->id, FrameType::kSignal, Channel::kControl,
                     protocol::U32Payload(static_cast<uint32_t>(signo)));
}
Result<ExecStatus> ExecSession::Wait() {
  if (thread_.joinable()) thread_.join();
  if (!outcome_) return Fail("exec session: no outcome");
  return *outcome_;
}

// ---- PortStream -----------------------------------------------------------

PortStream::~PortStream() {
  if (!finished_) link_->Abandon(*stream_);
}
Status PortStream::Write(std::span<const std::byte> bytes) {
  return link_->SendBytes(*stream_, bytes);
}
Status PortStream::Write(std::string_view bytes) { return Write(protocol::AsBytes(bytes)); }
Status PortStream::ShutdownWrite() {
  return link_->Send(stream_->id, FrameType::kEof, Channel::kStdin, {});
}

Result<size_t> PortStream::Read(std::span<std::byte> buffer) {
  while (leftover_off_ == leftover_.size()) {
    if (eof_ || finished_) return size_t{0};
    auto e = CELLA_TRY(link_->Next(*stream_));
    switch (e.kind) {
      case Event::Kind::kData:
        link_->ReturnCredit(*stream_, e.channel, e.bytes.size());
        leftover_ = std::move(e.bytes);
        leftover_off_ = 0;
        break;
      case Event::Kind::kEof:
        eof_ = true;
        break;
      case Event::Kind::kResult:
        finished_ = true;
        CELLA_TRY(protocol::DecodeEmpty(e.Text()));
        break;
      case Event::Kind::kError:
        finished_ = true;
        return std::unexpected(AgentError(e));
      case Event::Kind::kOpened:
        return std::unexpected(Unexpected(e));
    }
  }
  size_t n = std::min(buffer.size(), leftover_.size() - leftover_off_);
  std::copy_n(leftover_.begin() + static_cast<ptrdiff_t>(leftover_off_), n, buffer.begin());
  leftover_off_ += n;
  return n;
}

Status PortStream::Wait() {
  std::vector<std::byte> sink(kDataChunk);
  while (!finished_) {
    auto n = CELLA_TRY(Read(sink));
    if (n == 0 && !finished_) {
      // EOF seen: only the Result (or an Error) is left.
      auto result = AwaitResult(*link_, *stream_);
      finished_ = true;
      if (!result) return std::unexpected(result.error());
      return protocol::DecodeEmpty(*result);
    }
  }
  return {};
}

// ---- AgentClient ----------------------------------------------------------

AgentClient::AgentClient(std::shared_ptr<Link> link, AgentClientOptions options)
    : link_(std::move(link)), options_(options) {}

AgentClient::~AgentClient() { link_->Close(); }

Result<std::unique_ptr<AgentClient>> AgentClient::Connect(UniqueFd fd, AgentClientOptions options) {
  auto link = CELLA_TRY(Link::Connect(std::move(fd), options.handshake_timeout));
  return std::unique_ptr<AgentClient>(new AgentClient(std::move(link), options));
}

std::optional<Error> AgentClient::LinkError() const { return link_->Failure(); }

Status AgentClient::Ping(std::chrono::milliseconds timeout) { return link_->Ping(timeout); }

Result<ExecResult> AgentClient::Exec(const ExecRequest& request) {
  ExecRequest req = request;
  req.stdin_open = false;
  StreamGuard s(*link_, CELLA_TRY(link_->Open(req)));
  ExecResult result;
  size_t total = 0;
  for (;;) {
    auto e = CELLA_TRY(link_->Next(*s));
    switch (e.kind) {
      case Event::Kind::kOpened:
        CELLA_TRY(protocol::DecodePid(e.Text()));
        break;
      case Event::Kind::kData: {
        total += e.bytes.size();
        if (total > options_.max_exec_output)
          return std::unexpected(Error{"exec " + req.argv[0] + ": output exceeds the limit of " +
                                           std::to_string(options_.max_exec_output) +
                                           " bytes (use StartExec to stream it)",
                                       EFBIG});
        auto& dest = e.channel == Channel::kStdout ? result.stdout_data : result.stderr_data;
        dest.append(e.Text());
        link_->ReturnCredit(*s, e.channel, e.bytes.size());
        break;
      }
      case Event::Kind::kEof:
        break;
      case Event::Kind::kResult:
        result.status = ToStatus(CELLA_TRY(protocol::DecodeExecOutcome(e.Text())));
        return result;
      case Event::Kind::kError:
        return std::unexpected(AgentError(e));
    }
  }
}

Result<std::unique_ptr<ExecSession>> AgentClient::Start(const protocol::Request& request,
                                                        ExecCallbacks callbacks) {
  auto stream = CELLA_TRY(link_->Open(request));
  StreamGuard guard(*link_, stream);
  auto e = CELLA_TRY(link_->Next(*stream));
  if (e.kind == Event::Kind::kError) return std::unexpected(AgentError(e));
  if (e.kind != Event::Kind::kOpened) return std::unexpected(Unexpected(e));
  int64_t pid = CELLA_TRY(protocol::DecodePid(e.Text()));
  std::unique_ptr<ExecSession> session(new ExecSession());
  session->link_ = link_;
  session->stream_ = stream;
  session->callbacks_ = std::move(callbacks);
  session->pid_ = pid;
  session->thread_ = std::thread([raw = session.get()] { raw->Pump(); });
  guard.Release();  // the session owns the stream now
  return session;
}

Result<std::unique_ptr<ExecSession>> AgentClient::StartExec(const ExecRequest& request,
                                                            ExecCallbacks callbacks) {
  return Start(request, std::move(callbacks));
}

Result<std::unique_ptr<ExecSession>> AgentClient::AttachMain(ExecCallbacks callbacks) {
  return Start(protocol::AttachMainRequest{}, std::move(callbacks));
}

Result<std::string> AgentClient::Simple(const protocol::Request& request) {
  StreamGuard s(*link_, CELLA_TRY(link_->Open(request)));
  return AwaitResult(*link_, *s);
}

namespace {

protocol::WriteFileRequest MakeWriteRequest(const std::string& path, const WriteFileOptions& o) {
  protocol::WriteFileRequest req;
  req.path = path;
  req.mode = o.mode;
  req.uid = o.uid;
  req.gid = o.gid;
  req.mkdirs = o.parents == WriteFileOptions::Parents::kCreate;
  req.mtime = o.mtime;
  return req;
}

}  // namespace

Status AgentClient::WriteFile(const std::string& path, std::string_view bytes,
                              WriteFileOptions options) {
  StreamGuard s(*link_, CELLA_TRY(link_->Open(MakeWriteRequest(path, options))));
  size_t offset = 0;
  return SendFile(*link_, *s, [&](std::span<std::byte> buf) -> Result<size_t> {
    size_t n = std::min(buf.size(), bytes.size() - offset);
    std::memcpy(buf.data(), bytes.data() + offset, n);
    offset += n;
    return n;
  });
}

Status AgentClient::WriteFileFrom(const std::string& path, int source_fd,
                                  WriteFileOptions options) {
  StreamGuard s(*link_, CELLA_TRY(link_->Open(MakeWriteRequest(path, options))));
  return SendFile(*link_, *s, [&](std::span<std::byte> buf) -> Result<size_t> {
    return ReadSome(source_fd, buf);
  });
}

Result<std::string> AgentClient::ReadFile(const std::string& path) {
  StreamGuard s(*link_, CELLA_TRY(link_->Open(protocol::ReadFileRequest{path})));
  std::string out;
  size_t cap = options_.max_read_file;
  CELLA_TRY(ReceiveFile(*link_, *s, [&](std::span<const std::byte> bytes) -> Status {
    if (out.size() + bytes.size() > cap)
      return std::unexpected(Error{"read_file " + path + ": larger than the limit of " +
                                       std::to_string(cap) + " bytes (use ReadFileTo)",
                                   EFBIG});
    out.append(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return {};
  }));
  return out;
}

Result<uint64_t> AgentClient::ReadFileTo(const std::string& path, int dest_fd) {
  StreamGuard s(*link_, CELLA_TRY(link_->Open(protocol::ReadFileRequest{path})));
  return ReceiveFile(*link_, *s, [&](std::span<const std::byte> bytes) -> Status {
    return WriteAll(dest_fd, bytes);
  });
}

Result<std::vector<FileInfo>> AgentClient::ListFiles(const std::string& path) {
  auto text = CELLA_TRY(Simple(protocol::ListRequest{path}));
  return protocol::DecodeList(text);
}

Result<FileInfo> AgentClient::Stat(const std::string& path) {
  auto text = CELLA_TRY(Simple(protocol::StatRequest{path}));
  return protocol::DecodeFileInfo(text);
}

Status AgentClient::MakeDirs(const std::string& path, uint32_t mode) {
  return MakeDirs(path, MakeDirsOptions{.mode = mode, .uid = std::nullopt, .gid = std::nullopt});
}

Status AgentClient::MakeDirs(const std::string& path, const MakeDirsOptions& options) {
  protocol::MkdirRequest request{path, options.mode, options.uid, options.gid};
  auto text = CELLA_TRY(Simple(request));
  return protocol::DecodeEmpty(text);
}

Status AgentClient::MakeSymlink(const std::string& path, const std::string& target,
                                std::optional<uint32_t> uid, std::optional<uint32_t> gid,
                                std::optional<int64_t> mtime) {
  auto text = CELLA_TRY(Simple(protocol::SymlinkRequest{path, target, uid, gid, mtime}));
  return protocol::DecodeEmpty(text);
}

Status AgentClient::SetAttributes(const std::string& path, const FileAttributes& attributes) {
  protocol::SetAttrRequest request{path, attributes.mode, attributes.uid, attributes.gid,
                                   attributes.mtime};
  auto text = CELLA_TRY(Simple(request));
  return protocol::DecodeEmpty(text);
}

Status AgentClient::Remove(const std::string& path, RemoveMode mode) {
  auto text = CELLA_TRY(Simple(protocol::RemoveRequest{path, mode == RemoveMode::kRecursive}));
  return protocol::DecodeEmpty(text);
}

Status AgentClient::Shutdown(std::chrono::milliseconds grace,
                             std::chrono::milliseconds answer_timeout) {
  protocol::ShutdownRequest request;
  if (grace > std::chrono::milliseconds(0))
    request.grace_ms = static_cast<uint32_t>(
        std::min<int64_t>(grace.count(), int64_t{protocol::kMaxShutdownGraceMs}));
  const auto deadline = Clock::now() + answer_timeout;
  StreamGuard s(*link_, CELLA_TRY(link_->Open(request)));
  auto text = CELLA_TRY_CTX(AwaitResult(*link_, *s, deadline), "shutdown request");
  return protocol::DecodeEmpty(text);
}

Result<std::unique_ptr<PortStream>> AgentClient::OpenPort(uint16_t guest_port) {
  auto stream = CELLA_TRY(link_->Open(protocol::PortForwardRequest{guest_port}));
  StreamGuard guard(*link_, stream);
  auto e = CELLA_TRY(link_->Next(*stream));
  if (e.kind == Event::Kind::kError) return std::unexpected(AgentError(e));
  if (e.kind != Event::Kind::kOpened) return std::unexpected(Unexpected(e));
  CELLA_TRY(protocol::DecodeEmpty(e.Text()));
  std::unique_ptr<PortStream> port(new PortStream());
  port->link_ = link_;
  port->stream_ = stream;
  guard.Release();
  return port;
}

}  // namespace cella::host
