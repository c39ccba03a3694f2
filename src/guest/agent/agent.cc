// One piece (~960 lines) on purpose: the agent's single event loop and the
// per-stream state it owns (exec sessions, file transfers, port forwards,
// credit) read as one state machine; the I/O helpers it calls live beside
// it (spawn.cc, fileops.cc, user.cc).
#include "guest/agent/agent.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "base/log.h"
#include "guest/agent/fileops.h"
#include "protocol/wire.h"

namespace cella::agent {
namespace {

using Clock = std::chrono::steady_clock;
using protocol::Channel;
using protocol::FrameType;
using protocol::kDataChunk;
using protocol::kInitialWindow;

// kFileOp: one file operation (stat, list, mkdir, ...) on a thread of its
// own (Impl::OffLoop), answered by the thread through its answer pipe.
enum class Kind { kExec, kReadFile, kWriteFile, kPort, kFuse, kFileOp };

// A FUSE relay reads one whole request per read() and /dev/fuse refuses a
// buffer that cannot hold the largest (max_write 128 KiB + headers), so it
// reads only with at least this much credit; replies are written one whole
// message per write().
constexpr size_t kFuseRelayRead = 128 * 1024 + 4096;
constexpr size_t kFuseHeader = 16;  // fuse_out_header: u32 len, i32 error, u64 unique

// Guest -> host bytes (stdout/stderr, file content, socket reads).
struct OutChannel {
  UniqueFd fd;
  int64_t credit = kInitialWindow;
  bool ready = false;     // poll said readable this iteration
  bool finished = false;  // Eof queued, or the channel never existed
};

// Host -> guest bytes (stdin, file content, socket writes).
struct InChannel {
  UniqueFd fd;
  std::vector<std::byte> pending;
  size_t pending_off = 0;
  int64_t host_credit = kInitialWindow;  // what the host may still send
  uint32_t unacked = 0;                  // consumed, Window not yet sent
  bool eof = false;                      // host sent Eof
  bool broken = false;                   // sink is gone: bytes are discarded

  size_t Pending() const { return pending.size() - pending_off; }
};

struct Session {
  uint32_t stream = 0;  // 0: detached (the main process between links)
  Kind kind = Kind::kExec;
  OutChannel out[2];  // [0] stdout, [1] stderr
  InChannel in;
  uint64_t bytes_sent = 0;
  // exec
  pid_t pid = -1;
  bool is_main = false;
  bool tty = false;
  UniqueFd pty_master;
  bool reaped = false;
  int wait_status = 0;
  bool timed_out = false;
  bool stopping = false;  // TerminateMain: the group goes with its leader
  std::optional<Clock::time_point> deadline;
  std::optional<Clock::time_point> kill_deadline;
  uint32_t kill_grace_ms = 2000;
  // Started without waiting for its exec (SpawnWait::kNoWait): readable once
  // it has exec'd or failed; until then the host has no Opened and its
  // pipes are not read. The request says how to answer (FinishStart).
  UniqueFd start_status;
  std::optional<protocol::ExecRequest> start_request;
  // write_file
  std::optional<AtomicFileWriter> writer;
  // port_forward
  bool connecting = false;
  // serve_share
  uint32_t share = 0;
  // A file operation on a thread of its own (Impl::OffLoop): its answers
  // (WriteAnswer: each framed by its length; 'R' + the Result's payload, or
  // 'E' + errno + message) arrive on answer_fd. While
  // answer_gates, nothing else of the session is serviced (kFileOp, and a
  // read_file until its file is open); an upload's answer comes at its end.
  UniqueFd answer_fd;
  std::string answer;
  bool answer_gates = false;
  bool opened_answered = false;  // read_file: its Opened is out, its outcome follows
  // An upload's thread commits at the end of its data unless this is set
  // first (the stream was abandoned): then it removes its temporary file.
  std::shared_ptr<std::atomic<bool>> upload_abandoned;
};

// The most a file operation's answer may hold: a Result's largest payload
// and the tag and errno in front of it.
constexpr size_t kMaxFileOpAnswer = protocol::kMaxPayload + 8;

// File operations on threads at once (each holds a thread while a share
// does not answer); past this one more is refused with EAGAIN.
constexpr int kMaxFileOpThreads = 64;
std::atomic<int> g_file_op_threads{0};

// A file operation thread's answer, written whole (blocking) to its pipe.
void WriteAnswer(int fd, const Result<std::string>& result) {
  std::string text;
  if (result) {
    text = "R" + *result;
  } else {
    int32_t err = result.error().errno_value != 0 ? result.error().errno_value : EIO;
    text = "E";
    text.append(reinterpret_cast<const char*>(&err), sizeof err);
    text += result.error().message;
  }
  if (text.size() > kMaxFileOpAnswer) {
    int32_t err = E2BIG;
    text = "E";
    text.append(reinterpret_cast<const char*>(&err), sizeof err);
    text += "the answer does not fit in one reply";
  }
  // Framed by its length: a read_file thread sends two (the Opened before
  // the bytes, the outcome after them).
  auto length = static_cast<uint32_t>(text.size());
  text.insert(0, reinterpret_cast<const char*>(&length), sizeof length);
  if (auto st = WriteAll(fd, text); !st)
    log::Debug("agent: a file operation's answer was not delivered",
               {{"error", st.error().message}});
}

// The next whole answer at the front of `buffer` (taken out of it), if one
// has arrived.
std::optional<std::string> TakeAnswer(std::string& buffer) {
  uint32_t length = 0;
  if (buffer.size() < sizeof length) return std::nullopt;
  std::memcpy(&length, buffer.data(), sizeof length);
  if (buffer.size() < sizeof length + length) return std::nullopt;
  std::string answer = buffer.substr(sizeof length, length);
  buffer.erase(0, sizeof length + length);
  return answer;
}

Result<std::string> DecodeAnswer(const std::string& answer) {
  if (answer.empty()) return Fail("file operation: its thread ended without an answer");
  if (answer[0] == 'R') return answer.substr(1);
  int32_t err = EIO;
  if (answer[0] != 'E' || answer.size() < 1 + sizeof err)
    return Fail("file operation: its thread's answer is malformed");
  std::memcpy(&err, answer.data() + 1, sizeof err);
  return std::unexpected(Error{answer.substr(1 + sizeof err), err});
}

// FUSE requests of one share sent to the host and not answered yet, by
// their unique id. They outlive links: when a link ends (standby, snapshot,
// a reconnect) the guest kernel still waits for them, so the next
// serve_share of the share sends them again before anything new.
struct FuseInflight {
  std::map<uint64_t, std::vector<std::byte>> requests;
  size_t bytes = 0;
};
// Beyond this, requests are relayed without a copy (a later link could not
// replay them). The host's window bounds what is unanswered far below it.
constexpr size_t kFuseInflightCap = size_t{4} << 20;
constexpr uint32_t kFuseForget = 2, kFuseInterrupt = 36, kFuseBatchForget = 42;

// A kWriteFile session gets its writer when it is created and loses it only
// when it is abandoned (and erased); reaching this is a bug in this file.
Error MissingWriter() { return Error{"internal: upload stream has no open file", EIO}; }

Channel OutChannelId(int index) { return index == 0 ? Channel::kStdout : Channel::kStderr; }

enum class MainState { kNotStarted, kRunning, kDone };

// How long a released link's last bytes (its queued output, the release's
// Result last) may wait for the host to read them.
constexpr std::chrono::milliseconds kReleaseFlushBound{10'000};

// What a poll slot belongs to.
enum class Slot { kOut0, kOut1, kIn, kConnect, kStart, kAnswer };

}  // namespace

struct Agent::Impl {
  AgentOptions options;
  UniqueFd sigfd;

  // Per link.
  UniqueFd link;
  protocol::FrameDecoder decoder;
  std::vector<std::byte> out;
  size_t out_off = 0;
  bool hello_received = false;
  uint32_t last_stream = 0;
  std::optional<Error> link_failure;
  bool peer_closed = false;
  bool stop_when_flushed = false;
  bool released = false;  // op release taken: nothing more is read from this link
  std::optional<uint32_t> release_to_answer;  // its stream, answered by AnswerRelease
  bool write_failed = false;
  // Allocated once and never zeroed: filling 256 KiB would fault in 64
  // pages before the first Hello (dear under TCG); read() touches only what
  // it fills.
  static constexpr size_t kReadBufBytes = size_t{256} * 1024;
  std::unique_ptr<std::byte[]> read_buf;

  std::map<uint32_t, std::unique_ptr<Session>> sessions;
  std::unique_ptr<Session> detached_main;
  MainState main_state = MainState::kNotStarted;
  pid_t abandoned_main_pid = -1;
  std::vector<pid_t> abandoned;                    // killed children not yet reaped
  std::map<uint32_t, FuseInflight> fuse_inflight;  // by share index
  std::vector<uint32_t> mounts_waiting;            // shares_mounted streams of this link
  // Once a host share is served through this loop, a child's workdir or
  // program may be on it: its chdir or exec waits for this loop to relay
  // the lookup, so children start without the loop waiting for their exec.
  bool serves_fuse_shares = false;

  // ---- link output -------------------------------------------------------

  size_t OutPending() const { return out.size() - out_off; }

  void Queue(uint32_t stream, FrameType type, Channel channel, std::span<const std::byte> payload) {
    protocol::EncodeFrame(stream, type, channel, payload, out);
  }
  void QueueText(uint32_t stream, FrameType type, std::string_view text) {
    Queue(stream, type, Channel::kControl, protocol::AsBytes(text));
  }
  void QueueError(uint32_t stream, int err, std::string_view message) {
    QueueText(stream, FrameType::kError, protocol::EncodeError({err, std::string(message)}));
  }
  void QueueError(uint32_t stream, const Error& error) {
    QueueError(stream, error.errno_value != 0 ? error.errno_value : EIO, error.message);
  }

  // Reads up to max bytes from fd straight into a Data frame at the tail of
  // the output queue. 0 = EOF; errors keep errno (EAGAIN included).
  Result<size_t> ReadIntoFrame(int fd, uint32_t stream, Channel channel, size_t max) {
    size_t start = out.size();
    out.resize(start + protocol::kHeaderSize + max);
    ssize_t n;
    do {
      n = ::read(fd, out.data() + start + protocol::kHeaderSize, max);
    } while (n < 0 && errno == EINTR);
    int err = errno;
    if (n <= 0) {
      out.resize(start);
      if (n < 0) return FailErrno("read", err);
      return size_t{0};
    }
    std::vector<std::byte> header;
    protocol::EncodeFrame(stream, FrameType::kData, channel, {}, header);
    uint32_t len = static_cast<uint32_t>(n);
    for (int i = 0; i < 4; ++i) header[i] = static_cast<std::byte>((len >> (8 * i)) & 0xff);
    std::copy(header.begin(), header.end(), out.begin() + static_cast<ptrdiff_t>(start));
    out.resize(start + protocol::kHeaderSize + static_cast<size_t>(n));
    return static_cast<size_t>(n);
  }

  // Writes what the link takes without blocking.
  void Flush() {
    while (OutPending() > 0 && !write_failed) {
      ssize_t n = ::write(link.Get(), out.data() + out_off, OutPending());
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        write_failed = true;
        if (errno == EPIPE || errno == ECONNRESET) {
          peer_closed = true;
        } else if (!link_failure) {
          link_failure = Error::FromErrno("write to the link");
        }
        break;
      }
      out_off += static_cast<size_t>(n);
    }
    if (out_off == out.size()) {
      out.clear();
      out_off = 0;
    } else if (out_off > (1u << 20) && out_off > out.size() / 2) {
      out.erase(out.begin(), out.begin() + static_cast<ptrdiff_t>(out_off));
      out_off = 0;
    }
  }

  Status AnswerRelease(int port) {
    if (!release_to_answer) return Fail("no release to answer");
    std::vector<std::byte> frame;
    protocol::EncodeFrame(*release_to_answer, FrameType::kResult, Channel::kControl,
                          protocol::AsBytes(protocol::EncodeEmpty()), frame);
    release_to_answer.reset();
    CELLA_TRY_CTX(SetNonBlocking(port, true), "agent port");
    std::span<const std::byte> left(frame);
    const auto deadline = Clock::now() + kReleaseFlushBound;
    while (!left.empty()) {
      ssize_t n = ::write(port, left.data(), left.size());
      if (n > 0) {
        left = left.subspan(static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno != EAGAIN) return FailErrno("answer the release");
      const auto wait =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      pollfd p{port, POLLOUT, 0};
      int ready = wait.count() > 0 ? ::poll(&p, 1, static_cast<int>(wait.count())) : 0;
      if (ready < 0 && errno == EINTR) continue;
      if (ready < 0) return FailErrno("poll the agent port");
      // No host any more (it gave up waiting), or none reading: its
      // answer has nowhere to go.
      if (ready == 0 || (p.revents & POLLHUP))
        return std::unexpected(Error{"answer the release: the host did not take it", ETIMEDOUT});
    }
    return {};
  }

  // Waits for the link to take more (at most `bound`) and writes; false
  // when it did not within the bound or the link failed.
  bool FlushWithin(std::chrono::milliseconds bound) {
    pollfd p{link.Get(), POLLOUT, 0};
    int ready;
    do {
      ready = ::poll(&p, 1, static_cast<int>(bound.count()));
    } while (ready < 0 && errno == EINTR);
    if (ready <= 0) return false;
    // A virtio port whose host went away says POLLHUP (no POLLOUT, and a
    // write would only say EAGAIN): nobody will read the rest.
    if ((p.revents & POLLOUT) == 0) return false;
    Flush();
    return !write_failed && !link_failure;
  }

  void Violation(const std::string& message) {
    if (link_failure) return;
    QueueError(0, EPROTO, "protocol violation: " + message);
    link_failure = Error{"host broke the protocol: " + message, EPROTO};
  }

  // ---- sessions ----------------------------------------------------------

  Session* Find(uint32_t stream) {
    auto it = sessions.find(stream);
    return it == sessions.end() ? nullptr : it->second.get();
  }

  static void KillGroup(pid_t pid, int sig) {
    // ESRCH: the group is already gone, which is what we wanted.
    if (::kill(-pid, sig) != 0 && errno != ESRCH)
      log::Warn("agent: kill failed", {{"pid", pid}, {"signal", sig}, {"error", strerror(errno)}});
  }

  // For a leader not yet reaped. With no group by its pid, a forked child
  // has not reached its setsid() yet and is alone: it is our unreaped
  // child, so the pid is still its own, and the signal waits for it.
  static void KillUnreapedTree(pid_t pid, int sig) {
    if (::kill(-pid, sig) == 0) return;
    if (errno == ESRCH && (::kill(pid, sig) == 0 || errno == ESRCH)) return;
    log::Warn("agent: kill failed", {{"pid", pid}, {"signal", sig}, {"error", strerror(errno)}});
  }

  // Kills and forgets a session; nothing more is sent on its stream.
  void Abandon(Session& s) {
    if (s.kind == Kind::kExec && s.start_request && s.start_request->detach) {
      // exec -d still starting: out of a link's reach, as once it runs.
      if (!s.reaped) abandoned.push_back(s.pid);
      return;
    }
    if (s.kind == Kind::kExec && !s.reaped) {
      KillUnreapedTree(s.pid, SIGKILL);
      abandoned.push_back(s.pid);
      if (s.is_main) abandoned_main_pid = s.pid;
    }
    if (s.is_main) main_state = MainState::kDone;
    s.writer.reset();  // removes the temp file of an unfinished upload
    // An upload on a thread: told before its pipe closes with the session,
    // unless all of it (Eof included) has gone down the pipe already: then
    // it commits, as one on the loop did at its Eof.
    if (s.upload_abandoned && !(s.in.eof && !s.in.fd)) s.upload_abandoned->store(true);
  }

  void FailStream(uint32_t stream, const Error& error) {
    QueueError(stream, error);
    auto it = sessions.find(stream);
    if (it != sessions.end()) {
      Abandon(*it->second);
      sessions.erase(it);
    }
  }

  void SendWindow(Session& s, uint32_t amount) {
    s.in.host_credit += amount;
    Queue(s.stream, FrameType::kWindow, Channel::kStdin, protocol::U32Payload(amount));
  }

  // Guest kernel -> host: one FUSE request per read, each its own Data frame.
  void PumpFuseOut(Session& s) {
    OutChannel& c = s.out[0];
    c.ready = false;
    if (!c.fd || s.stream == 0) return;
    for (int round = 0; round < 8 && c.credit >= static_cast<int64_t>(kFuseRelayRead) &&
                        OutPending() < options.link_soft_cap;
         ++round) {
      size_t start = out.size();
      auto n = ReadIntoFrame(c.fd.Get(), s.stream, Channel::kStdout, kFuseRelayRead);
      if (n && *n > 0) {
        c.credit -= static_cast<int64_t>(*n);
        RememberFuseRequest(s.share, std::span(out).subspan(start + protocol::kHeaderSize, *n));
        continue;
      }
      if (n && *n == 0) break;
      int err = n.error().errno_value;
      if (err == EAGAIN) break;
      if (err == ENOENT) continue;  // the request was interrupted meanwhile
      return FailStream(s.stream, std::move(n.error()).WithContext("read /dev/fuse"));
    }
  }

  void RememberFuseRequest(uint32_t share, std::span<const std::byte> request) {
    // fuse_in_header: u32 len, u32 opcode, u64 unique, ...
    if (request.size() < 16) return;
    uint32_t opcode = 0;
    uint64_t unique = 0;
    std::memcpy(&opcode, request.data() + 4, sizeof opcode);
    std::memcpy(&unique, request.data() + 8, sizeof unique);
    if (opcode == kFuseForget || opcode == kFuseBatchForget || opcode == kFuseInterrupt) return;
    FuseInflight& f = fuse_inflight[share];
    if (f.bytes + request.size() > kFuseInflightCap) return;
    auto [it, added] =
        f.requests.emplace(unique, std::vector<std::byte>(request.begin(), request.end()));
    if (added) f.bytes += request.size();
  }

  void ForgetFuseRequest(uint32_t share, uint64_t unique) {
    auto f = fuse_inflight.find(share);
    if (f == fuse_inflight.end()) return;
    auto it = f->second.requests.find(unique);
    if (it == f->second.requests.end()) return;
    f->second.bytes -= it->second.size();
    f->second.requests.erase(it);
  }

  // Host -> guest kernel: whole FUSE replies, one write each.
  void PumpFuseIn(Session& s) {
    InChannel& in = s.in;
    if (s.stream == 0) return;
    while (in.Pending() >= kFuseHeader) {
      const std::byte* at = in.pending.data() + in.pending_off;
      uint32_t len = 0;
      std::memcpy(&len, at, sizeof len);
      if (len < kFuseHeader || len > kFuseRelayRead)
        return FailStream(s.stream, Error{"a FUSE reply with a bad length", EPROTO});
      if (in.Pending() < len) break;
      ssize_t n;
      do {
        n = ::write(in.fd.Get(), at, len);
      } while (n < 0 && errno == EINTR);
      // ENOENT: the request was interrupted and is gone; EINVAL: the kernel
      // refused a malformed reply (the host's bug, the guest stays sound).
      if (n < 0 && errno != ENOENT && errno != EINVAL)
        return FailStream(s.stream, Error::FromErrno("write /dev/fuse"));
      uint64_t unique = 0;
      std::memcpy(&unique, at + 8, sizeof unique);
      ForgetFuseRequest(s.share, unique);
      in.pending_off += len;
      in.unacked += len;
    }
    if (in.Pending() == 0) {
      in.pending.clear();
      in.pending_off = 0;
    } else if (in.pending_off > 0) {
      in.pending.erase(in.pending.begin(),
                       in.pending.begin() + static_cast<ptrdiff_t>(in.pending_off));
      in.pending_off = 0;
    }
    if (in.unacked > 0) {
      SendWindow(s, in.unacked);
      in.unacked = 0;
    }
  }

  void StartFuse(uint32_t stream, uint32_t index) {
    if (!options.on_serve_share)
      return QueueError(stream, ENOSYS, "serve_share is not supported here");
    auto fd = options.on_serve_share(index);
    if (!fd) return QueueError(stream, fd.error());
    int flags = ::fcntl(fd->Get(), F_GETFL);
    if (flags < 0 || ::fcntl(fd->Get(), F_SETFL, flags | O_NONBLOCK) != 0)
      return QueueError(stream, Error::FromErrno("serve_share: fcntl"));
    auto s = std::make_unique<Session>();
    s->stream = stream;
    s->kind = Kind::kFuse;
    s->in.fd.Reset(::fcntl(fd->Get(), F_DUPFD_CLOEXEC, 0));
    if (!s->in.fd) return QueueError(stream, Error::FromErrno("serve_share: dup"));
    s->out[0].fd = std::move(*fd);
    s->out[1].finished = true;
    s->share = index;
    serves_fuse_shares = true;
    Session& session = *s;
    sessions[stream] = std::move(s);
    QueueText(stream, FrameType::kOpened, protocol::EncodeEmpty());
    // What an earlier link left unanswered goes first, within the window.
    auto f = fuse_inflight.find(index);
    if (f == fuse_inflight.end()) return;
    for (const auto& [unique, request] : f->second.requests) {
      auto size = static_cast<int64_t>(request.size());
      if (size > session.out[0].credit) break;
      Queue(stream, FrameType::kData, Channel::kStdout, request);
      session.out[0].credit -= size;
    }
  }

  void PumpOut(Session& s, int index) {
    if (s.kind == Kind::kFuse) {
      if (index == 0) PumpFuseOut(s);
      return;
    }
    OutChannel& c = s.out[index];
    bool draining = s.kind == Kind::kExec && s.reaped;
    bool try_read = c.ready || draining;
    c.ready = false;
    if (!c.fd || s.stream == 0 || !try_read) return;
    for (int round = 0; round < 4 && c.credit > 0 && OutPending() < options.link_soft_cap;
         ++round) {
      size_t max = std::min<size_t>(static_cast<size_t>(c.credit), kDataChunk);
      auto n = ReadIntoFrame(c.fd.Get(), s.stream, OutChannelId(index), max);
      if (n && *n > 0) {
        c.credit -= static_cast<int64_t>(*n);
        s.bytes_sent += *n;
        continue;
      }
      if (!n && n.error().errno_value == EAGAIN) {
        // A finished child wrote everything before exiting; what is left
        // unwritten belongs to background processes and is not waited for.
        if (!draining) break;
      } else if (!n && n.error().errno_value != EIO) {
        // EIO is how a pty master reports that every slave is closed.
        if (s.kind == Kind::kReadFile || s.kind == Kind::kPort) {
          FailStream(s.stream, std::move(n.error()).WithContext("read"));
          return;
        }
        log::Warn("agent: output read failed",
                  {{"stream", s.stream}, {"error", n.error().message}});
      }
      c.fd.Reset();
      c.finished = true;
      Queue(s.stream, FrameType::kEof, OutChannelId(index), {});
      break;
    }
  }

  void PumpIn(Session& s) {
    if (s.kind == Kind::kFuse) return PumpFuseIn(s);
    InChannel& in = s.in;
    if (s.stream == 0) return;
    while (in.Pending() > 0) {
      if (!in.fd || in.broken) {
        in.unacked += static_cast<uint32_t>(in.Pending());
        in.pending.clear();
        in.pending_off = 0;
        break;
      }
      ssize_t n = ::write(in.fd.Get(), in.pending.data() + in.pending_off, in.Pending());
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        // EPIPE: the reader is gone; later bytes are dropped, credit still
        // flows so the host never stalls on a child that stopped reading.
        in.broken = true;
        // An upload that lost bytes must not commit the rest.
        if (s.upload_abandoned) s.upload_abandoned->store(true);
        in.fd.Reset();
        continue;
      }
      in.pending_off += static_cast<size_t>(n);
      in.unacked += static_cast<uint32_t>(n);
    }
    if (in.Pending() == 0) {
      in.pending.clear();
      in.pending_off = 0;
    }
    if (in.unacked > 0 && (in.unacked >= kDataChunk / 2 || in.Pending() == 0)) {
      SendWindow(s, in.unacked);
      in.unacked = 0;
    }
    if (in.eof && in.Pending() == 0 && in.fd) {
      if (s.kind == Kind::kPort) {
        if (::shutdown(in.fd.Get(), SHUT_WR) != 0 && errno != ENOTCONN)
          log::Warn("agent: shutdown(SHUT_WR) failed", {{"error", strerror(errno)}});
      } else if (s.tty) {
        // A terminal has no half-close: ^D is the end-of-input character.
        char eot = 4;
        if (::write(in.fd.Get(), &eot, 1) != 1)
          log::Debug("agent: writing ^D to the terminal failed", {{"error", strerror(errno)}});
      }
      in.fd.Reset();
    }
  }

  // Sends the Result if the session is complete; true when it is gone.
  bool MaybeFinish(Session& s) {
    if (s.stream == 0 || s.start_status || (s.answer_gates && s.answer_fd)) return false;
    switch (s.kind) {
      case Kind::kExec: {
        if (!s.reaped || !s.out[0].finished || !s.out[1].finished) return false;
        protocol::ExecOutcome outcome;
        if (WIFSIGNALED(s.wait_status)) {
          outcome.signal = WTERMSIG(s.wait_status);
        } else {
          outcome.exit_code = WEXITSTATUS(s.wait_status);
        }
        outcome.timed_out = s.timed_out;
        QueueText(s.stream, FrameType::kResult, protocol::EncodeExecOutcome(outcome));
        if (s.is_main) {
          main_state = MainState::kDone;
          if (options.on_main_exit) options.on_main_exit(s.wait_status);
        }
        return true;
      }
      case Kind::kReadFile:
        if (!s.out[0].finished || s.answer_fd) return false;  // off the loop: its outcome too
        QueueText(s.stream, FrameType::kResult, protocol::EncodeSize(s.bytes_sent));
        return true;
      case Kind::kPort:
        if (s.connecting || !s.out[0].finished || !s.in.eof || s.in.Pending() > 0 || s.in.fd)
          return false;
        QueueText(s.stream, FrameType::kResult, protocol::EncodeEmpty());
        return true;
      case Kind::kWriteFile:
        return false;  // finished from the Eof handler
      case Kind::kFuse:
        return false;  // serves until the host closes it or the link ends
      case Kind::kFileOp:
        return false;  // answered when its thread's answer is complete
    }
    return false;
  }

  void ServiceAll() {
    std::vector<uint32_t> ids;
    ids.reserve(sessions.size());
    for (auto& [id, s] : sessions) ids.push_back(id);
    // Looked up again after each step: a failing step erases its session.
    for (uint32_t id : ids) {
      Session* s = Find(id);
      if (!s || (s->kind == Kind::kPort && s->connecting) || s->start_status ||
          (s->answer_gates && s->answer_fd))
        continue;
      // Each pump may end the session, so look it up again before the next.
      PumpOut(*s, 0);
      s = Find(id);
      if (!s) continue;
      PumpOut(*s, 1);
      s = Find(id);
      if (!s) continue;
      PumpIn(*s);
      if (MaybeFinish(*s)) sessions.erase(id);
    }
  }

  // ---- children ----------------------------------------------------------

  Session* FindByPid(pid_t pid) {
    for (auto& [id, s] : sessions)
      if (s->kind == Kind::kExec && s->pid == pid && !s->reaped) return s.get();
    if (detached_main && detached_main->pid == pid && !detached_main->reaped)
      return detached_main.get();
    return nullptr;
  }

  void OnChildExit(pid_t pid, int status) {
    if (Session* s = FindByPid(pid)) {
      s->reaped = true;
      s->wait_status = status;
      // A timed-out or stopped tree gets no further grace once its leader
      // is gone: a child holding the pipes would hold back the Result.
      if (s->timed_out || s->stopping) KillGroup(pid, SIGKILL);
      return;
    }
    auto it = std::find(abandoned.begin(), abandoned.end(), pid);
    if (it != abandoned.end()) abandoned.erase(it);
    if (pid == abandoned_main_pid) {
      abandoned_main_pid = -1;
      if (options.on_main_exit) options.on_main_exit(status);
    }
  }

  void Reap() {
    if (options.reap == ReapMode::kAllChildren) {
      for (;;) {
        int status = 0;
        pid_t pid = ::waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR) continue;
        if (pid <= 0) break;  // 0: none ready; ECHILD: no children at all
        OnChildExit(pid, status);
      }
      return;
    }
    std::vector<pid_t> pids = abandoned;
    for (auto& [id, s] : sessions)
      if (s->kind == Kind::kExec && !s->reaped) pids.push_back(s->pid);
    if (detached_main && !detached_main->reaped) pids.push_back(detached_main->pid);
    for (pid_t pid : pids) {
      int status = 0;
      pid_t r;
      do {
        r = ::waitpid(pid, &status, WNOHANG);
      } while (r < 0 && errno == EINTR);
      if (r == pid) {
        OnChildExit(pid, status);
      } else if (r < 0 && errno == ECHILD) {
        // Someone else reaped it (should not happen): do not wait forever.
        OnChildExit(pid, 0);
      }
    }
  }

  void DrainSignalFd() {
    struct signalfd_siginfo info[16];
    for (;;) {
      ssize_t n = ::read(sigfd.Get(), info, sizeof(info));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;  // EAGAIN: drained
    }
  }

  void CheckTimers(Clock::time_point now) {
    auto check = [&](Session& s) {
      if (s.kind != Kind::kExec || s.reaped) return;
      if (s.deadline && now >= *s.deadline) {
        s.deadline.reset();
        s.timed_out = true;
        KillUnreapedTree(s.pid, SIGTERM);
        s.kill_deadline = now + std::chrono::milliseconds(s.kill_grace_ms);
      }
      if (s.kill_deadline && now >= *s.kill_deadline) {
        s.kill_deadline.reset();
        KillUnreapedTree(s.pid, SIGKILL);
      }
    };
    for (auto& [id, s] : sessions) check(*s);
    if (detached_main) check(*detached_main);
  }

  int PollTimeoutMs(Clock::time_point now) {
    std::optional<Clock::time_point> next;
    auto consider = [&](const Session& s) {
      if (s.kind != Kind::kExec || s.reaped) return;
      for (const auto& d : {s.deadline, s.kill_deadline})
        if (d && (!next || *d < *next)) next = d;
    };
    for (auto& [id, s] : sessions) consider(*s);
    if (detached_main) consider(*detached_main);
    if (!next) return -1;
    if (*next <= now) return 0;
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(*next - now).count();
    return static_cast<int>(std::min<int64_t>(ms, 60'000));
  }

  bool TerminateMain(std::chrono::milliseconds grace) {
    Session* main = nullptr;
    for (auto& [id, s] : sessions)
      if (s->is_main && s->kind == Kind::kExec) main = s.get();
    if (main == nullptr) return false;
    if (main->reaped) {
      // Its Result waits for pipes a leftover child holds open.
      KillGroup(main->pid, SIGKILL);
      return true;
    }
    main->stopping = true;
    KillUnreapedTree(main->pid, SIGTERM);
    auto kill_at = Clock::now() + grace;
    if (!main->kill_deadline || kill_at < *main->kill_deadline) main->kill_deadline = kill_at;
    return true;
  }

  // ---- requests ----------------------------------------------------------

  std::unique_ptr<Session> SessionFromChild(uint32_t stream, SpawnedChild child,
                                            const protocol::ExecRequest& req) {
    auto s = std::make_unique<Session>();
    s->stream = stream;
    s->kind = Kind::kExec;
    s->pid = child.pid;
    s->tty = req.tty;
    s->out[0].fd = std::move(child.stdout_fd);
    s->out[1].fd = std::move(child.stderr_fd);
    s->out[1].finished = !s->out[1].fd;
    s->in.fd = std::move(child.stdin_fd);
    s->pty_master = std::move(child.pty_master);
    s->kill_grace_ms = req.kill_grace_ms;
    if (req.timeout_ms > 0) s->deadline = Clock::now() + std::chrono::milliseconds(req.timeout_ms);
    return s;
  }

  // ---- file operations off the loop ----------------------------------------
  // On a detached thread each: a share the host never answers holds that
  // thread only. The loop polls the thread's answer pipe (Session::answer_fd).

  struct ThreadPipe {
    UniqueFd loop_end;    // non-blocking
    int thread_end = -1;  // blocking; the thread closes it
  };
  // loop_reads: the loop reads (an answer, a file's bytes) or writes (an
  // upload's bytes).
  Result<ThreadPipe> MakeThreadPipe(bool loop_reads) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return FailErrno("file operation: pipe2");
    ThreadPipe p;
    p.loop_end.Reset(loop_reads ? fds[0] : fds[1]);
    p.thread_end = loop_reads ? fds[1] : fds[0];
    if (auto st = SetNonBlocking(p.loop_end.Get(), true); !st) {
      ::close(p.thread_end);
      return std::unexpected(std::move(st.error()));
    }
    return p;
  }

  // A file's two pipes: answers from its thread, and its bytes (read by the
  // loop for read_file, written by it for write_file).
  struct FilePipes {
    ThreadPipe answer;
    ThreadPipe data;
  };
  Result<FilePipes> MakeFilePipes(bool loop_reads_data) {
    ThreadPipe answer = CELLA_TRY(MakeThreadPipe(/*loop_reads=*/true));
    auto data = MakeThreadPipe(loop_reads_data);
    if (!data) {
      ::close(answer.thread_end);
      return std::unexpected(std::move(data.error()));
    }
    return FilePipes{std::move(answer), std::move(*data)};
  }

  // The session of a file operation whose thread answers on `answer_fd`.
  Session& AddThreadSession(uint32_t stream, Kind kind, UniqueFd answer_fd, bool answer_gates) {
    auto s = std::make_unique<Session>();
    s->stream = stream;
    s->kind = kind;
    s->out[0].finished = s->out[1].finished = true;
    s->answer_fd = std::move(answer_fd);
    s->answer_gates = answer_gates;
    Session& session = *s;
    sessions[stream] = std::move(s);
    return session;
  }

  // Starts `work`, which owns `thread_fds` (closed here if no thread could
  // be made: std::thread reports that by exception).
  Status StartThread(std::function<void()> work, std::initializer_list<int> thread_fds) {
    auto close_all = [&] {
      for (int fd : thread_fds) ::close(fd);
    };
    if (g_file_op_threads.fetch_add(1) >= kMaxFileOpThreads) {
      g_file_op_threads.fetch_sub(1);
      close_all();
      return std::unexpected(Error{"file operation: " + std::to_string(kMaxFileOpThreads) +
                                       " are running already (a host share not answering?)",
                                   EAGAIN});
    }
    // The thread takes every signal blocked: they are the loop's (SIGCHLD
    // by its signalfd) and the children's.
    sigset_t all, old;
    sigfillset(&all);
    if (int err = ::pthread_sigmask(SIG_SETMASK, &all, &old); err != 0) {
      g_file_op_threads.fetch_sub(1);
      close_all();
      return FailErrno("file operation: block signals", err);
    }
    Status started;
    try {
      std::thread([work = std::move(work)] {
        work();
        g_file_op_threads.fetch_sub(1);
      }).detach();
    } catch (const std::system_error& e) {
      g_file_op_threads.fetch_sub(1);
      close_all();
      started = std::unexpected(Error{std::string("file operation: no thread: ") + e.what(),
                                      e.code().value() != 0 ? e.code().value() : EAGAIN});
    }
    if (int err = ::pthread_sigmask(SIG_SETMASK, &old, nullptr); err != 0)
      log::Warn("agent: could not restore the signal mask", {{"error", strerror(err)}});
    return started;
  }

  void RunFileOp(uint32_t stream, std::function<Result<std::string>()> op) {
    auto answer = MakeThreadPipe(/*loop_reads=*/true);
    if (!answer) return QueueError(stream, answer.error());
    const int fd = answer->thread_end;
    if (auto st = StartThread(
            [op = std::move(op), fd] {
              WriteAnswer(fd, op());
              ::close(fd);
            },
            {fd});
        !st)
      return QueueError(stream, st.error());
    AddThreadSession(stream, Kind::kFileOp, std::move(answer->loop_end), /*answer_gates=*/true);
  }

  // The thread opens the file, answers the Opened payload, then copies the
  // file into a pipe the session reads as it would the file.
  void StartReadFileOffLoop(uint32_t stream, const std::string& path) {
    auto pipes = MakeFilePipes(/*loop_reads_data=*/true);
    if (!pipes) return QueueError(stream, pipes.error());
    const int answer_fd = pipes->answer.thread_end, data_fd = pipes->data.thread_end;
    if (auto st = StartThread(
            [path, answer_fd, data_fd] {
              UniqueFd sink(data_fd);
              auto opened = OpenForRead(path);
              if (!opened) {
                WriteAnswer(answer_fd, std::unexpected(opened.error()));
                ::close(answer_fd);
                return;
              }
              WriteAnswer(answer_fd, protocol::EncodeReadFileOpened({opened->size, opened->mode}));
              // Blocking both ways, to the file's end; then the outcome (a
              // read error fails the stream, as on the loop). EPIPE: the
              // stream was abandoned.
              auto copied = [&]() -> Result<std::string> {
                CELLA_TRY(SetNonBlocking(opened->fd.Get(), false));
                std::vector<char> buf(kDataChunk);
                for (;;) {
                  ssize_t n = ::read(opened->fd.Get(), buf.data(), buf.size());
                  if (n < 0 && errno == EINTR) continue;
                  if (n < 0) return FailErrno("read " + path);
                  if (n == 0) return std::string();
                  CELLA_TRY(
                      WriteAll(sink.Get(), std::string_view(buf.data(), static_cast<size_t>(n))));
                }
              }();
              sink.Reset();
              WriteAnswer(answer_fd, copied);
              ::close(answer_fd);
            },
            {answer_fd, data_fd});
        !st)
      return QueueError(stream, st.error());
    Session& s = AddThreadSession(stream, Kind::kReadFile, std::move(pipes->answer.loop_end),
                                  /*answer_gates=*/true);
    s.out[0].fd = std::move(pipes->data.loop_end);
    s.out[0].finished = false;
  }

  // The session writes the host's Data into a pipe (as an exec's stdin);
  // the thread writes it to the file and, at its end, commits and answers
  // the Result, unless the stream was abandoned first.
  void StartWriteFileOffLoop(uint32_t stream, const protocol::WriteFileRequest& request) {
    auto pipes = MakeFilePipes(/*loop_reads_data=*/false);
    if (!pipes) return QueueError(stream, pipes.error());
    auto abandoned_flag = std::make_shared<std::atomic<bool>>(false);
    const int answer_fd = pipes->answer.thread_end, data_fd = pipes->data.thread_end;
    if (auto st = StartThread(
            [request, answer_fd, data_fd, abandoned_flag] {
              UniqueFd in(data_fd);
              auto result = [&]() -> Result<std::string> {
                auto writer =
                    AtomicFileWriter::Create(request.path, request.mode, request.uid, request.gid,
                                             request.mkdirs ? AtomicFileWriter::CreateParents::kYes
                                                            : AtomicFileWriter::CreateParents::kNo,
                                             request.mtime);
                if (!writer) return std::unexpected(writer.error());
                std::vector<std::byte> buf(kDataChunk);
                for (;;) {
                  ssize_t n = ::read(in.Get(), buf.data(), buf.size());
                  if (n < 0 && errno == EINTR) continue;
                  if (n < 0) return FailErrno("write_file: read the upload");
                  if (n == 0) break;
                  CELLA_TRY(writer->Write(std::span(buf.data(), static_cast<size_t>(n))));
                }
                // The loop sets this before it closes the pipe.
                if (abandoned_flag->load())
                  return Fail("write_file: the upload was abandoned");  // the temp file goes
                return protocol::EncodeSize(CELLA_TRY(writer->Commit()));
              }();
              in.Reset();
              WriteAnswer(answer_fd, result);
              ::close(answer_fd);
            },
            {answer_fd, data_fd});
        !st)
      return QueueError(stream, st.error());
    Session& s = AddThreadSession(stream, Kind::kWriteFile, std::move(pipes->answer.loop_end),
                                  /*answer_gates=*/false);
    s.in.fd = std::move(pipes->data.loop_end);
    s.upload_abandoned = std::move(abandoned_flag);
  }

  // Reads what a file operation's thread answered and passes on each whole
  // answer: a read_file's Opened, then its outcome; the others' Result or
  // Error. A thread that ends without its last answer fails the stream.
  void ReadAnswer(Session& s) {
    const uint32_t stream = s.stream;
    char buf[16384];
    bool ended = false;
    for (;;) {
      ssize_t n = ::read(s.answer_fd.Get(), buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) break;
      if (n < 0) return FailStream(stream, Error::FromErrno("file operation: read its answer"));
      if (n == 0) {
        ended = true;
        break;
      }
      s.answer.append(buf, static_cast<size_t>(n));
      if (s.answer.size() > kMaxFileOpAnswer + 4)
        return FailStream(stream, Error{"file operation: its answer is too long", E2BIG});
    }
    while (auto answer = TakeAnswer(s.answer)) {
      auto decoded = DecodeAnswer(*answer);
      if (!decoded) return FailStream(stream, decoded.error());
      if (s.kind == Kind::kReadFile && !s.opened_answered) {
        s.opened_answered = true;
        s.answer_gates = false;  // the file is open: its bytes follow
        QueueText(stream, FrameType::kOpened, *decoded);
        continue;
      }
      // The last answer: a read_file's outcome (its Result follows the
      // bytes: MaybeFinish), or the whole answer of the others.
      s.answer_fd.Reset();
      if (s.kind == Kind::kReadFile) return;
      QueueText(stream, FrameType::kResult, *decoded);
      sessions.erase(stream);
      return;
    }
    if (ended) FailStream(stream, Error{"file operation: its thread ended without an answer", EIO});
  }

  // Once a host share is served through this loop, a command's chdir or
  // exec and a file operation may wait for this loop to relay a lookup:
  // the loop then waits for none of them.
  bool OffLoop() const { return serves_fuse_shares || options.as_if_serving_shares; }

  SpawnWait SpawnWaitMode() const { return OffLoop() ? SpawnWait::kNoWait : SpawnWait::kUntilExec; }

  // A session for a child Spawn returned before its exec: answered by
  // FinishStart once its status pipe says how the start went.
  std::unique_ptr<Session> StartingSession(uint32_t stream, SpawnedChild child,
                                           const protocol::ExecRequest& req) {
    UniqueFd status = std::move(child.status_fd);
    auto s = SessionFromChild(stream, std::move(child), req);
    s->out[0].finished = !s->out[0].fd;  // a detached child has no pipes
    s->start_status = std::move(status);
    s->start_request = req;
    if (req.detach) s->deadline.reset();  // exec -d: no time-out, as once it runs
    return s;
  }

  void AnswerDetachedStart(uint32_t stream, pid_t pid, int exec_errno,
                           const protocol::ExecRequest& req) {
    // exec -d: no session, no output; reaped silently like an abandoned
    // child, and (in its own process group) out of reach of a link's end.
    // A program that could not be executed is answered as a shell would
    // (127 not found, 126 not runnable, the reason on stderr), so that the
    // caller can report it as `docker exec -d` does.
    QueueText(stream, FrameType::kOpened, protocol::EncodePid(pid));
    protocol::ExecOutcome started;
    started.exit_code = 0;
    if (exec_errno != 0) {
      std::string why = "cella-agent: " + (req.argv.empty() ? std::string() : req.argv[0]) + ": " +
                        std::strerror(exec_errno) + "\n";
      Queue(stream, FrameType::kData, Channel::kStderr, protocol::AsBytes(why));
      started.exit_code = exec_errno == ENOENT ? 127 : 126;
    }
    QueueText(stream, FrameType::kResult, protocol::EncodeExecOutcome(started));
  }

  // A kNoWait child's status pipe is readable: it runs (Opened), or it
  // failed before its exec (the same answers a waited-for start gives).
  void FinishStart(Session& s) {
    const protocol::ExecRequest req = std::move(*s.start_request);
    s.start_request.reset();
    auto exec_errno = FinishSpawn(std::move(s.start_status), req);
    const uint32_t stream = s.stream;
    const pid_t pid = s.pid;
    auto forget = [&] {
      // It exits on its own (or runs on, exec -d): reaped as abandoned.
      if (!s.reaped) abandoned.push_back(pid);
      if (stream == 0) {
        detached_main.reset();
      } else {
        sessions.erase(stream);
      }
    };
    if (!exec_errno) {
      if (!s.reaped) KillUnreapedTree(pid, SIGKILL);
      Error error = std::move(exec_errno.error());
      if (s.is_main) {
        main_state = MainState::kDone;
        error = std::move(error).WithContext("main process");
      }
      if (stream != 0) QueueError(stream, error);
      return forget();
    }
    if (req.detach) {
      AnswerDetachedStart(stream, pid, *exec_errno, req);
      return forget();
    }
    if (stream != 0) QueueText(stream, FrameType::kOpened, protocol::EncodePid(pid));
  }

  void StartExec(uint32_t stream, const protocol::ExecRequest& req) {
    auto child = Spawn(req, options.hardening, SpawnWaitMode());
    if (!child) return QueueError(stream, child.error());
    if (child->status_fd) {
      sessions[stream] = StartingSession(stream, std::move(*child), req);
      return;
    }
    pid_t pid = child->pid;
    if (req.detach) {
      AnswerDetachedStart(stream, pid, child->exec_errno, req);
      if (child->exec_errno == 0) abandoned.push_back(pid);
      return;
    }
    sessions[stream] = SessionFromChild(stream, std::move(*child), req);
    QueueText(stream, FrameType::kOpened, protocol::EncodePid(pid));
  }

  void AttachMain(uint32_t stream) {
    if (!options.main_request) return QueueError(stream, EINVAL, "no main process is configured");
    switch (main_state) {
      case MainState::kNotStarted: {
        main_state = MainState::kDone;  // exactly once, even if it fails to start
        auto child = Spawn(*options.main_request, options.hardening, SpawnWaitMode(),
                           MissingWorkdir::kCreate);
        if (!child) return QueueError(stream, std::move(child.error()).WithContext("main process"));
        pid_t pid = child->pid;
        const bool starting = static_cast<bool>(child->status_fd);
        auto s = starting ? StartingSession(stream, std::move(*child), *options.main_request)
                          : SessionFromChild(stream, std::move(*child), *options.main_request);
        s->is_main = true;
        sessions[stream] = std::move(s);
        main_state = MainState::kRunning;
        if (!starting) QueueText(stream, FrameType::kOpened, protocol::EncodePid(pid));
        return;
      }
      case MainState::kRunning: {
        if (!detached_main)
          return QueueError(stream, EBUSY, "the main process is already attached");
        auto s = std::move(detached_main);
        s->stream = stream;
        for (auto& c : s->out) c.credit = kInitialWindow;
        s->in.host_credit = kInitialWindow;
        s->in.unacked = 0;
        pid_t pid = s->pid;
        const bool starting = static_cast<bool>(s->start_status);  // answered by FinishStart
        sessions[stream] = std::move(s);
        if (!starting) QueueText(stream, FrameType::kOpened, protocol::EncodePid(pid));
        return;
      }
      case MainState::kDone:
        return QueueError(stream, EALREADY, "the main process has already run");
    }
  }

  void StartPort(uint32_t stream, uint16_t port) {
    UniqueFd sock(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!sock) return QueueError(stream, Error::FromErrno("port_forward: socket"));
    struct sockaddr_in addr {};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool connecting = false;
    if (::connect(sock.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      if (errno != EINPROGRESS)
        return QueueError(
            stream, Error::FromErrno("port_forward: connect 127.0.0.1:" + std::to_string(port)));
      connecting = true;
    }
    auto s = std::make_unique<Session>();
    s->stream = stream;
    s->kind = Kind::kPort;
    s->connecting = connecting;
    s->in.fd.Reset(::fcntl(sock.Get(), F_DUPFD_CLOEXEC, 0));
    if (!s->in.fd) return QueueError(stream, Error::FromErrno("port_forward: dup"));
    s->out[0].fd = std::move(sock);
    s->out[1].finished = true;
    sessions[stream] = std::move(s);
    if (!connecting) QueueText(stream, FrameType::kOpened, protocol::EncodeEmpty());
  }

  void FinishConnect(Session& s) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(s.out[0].fd.Get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err != 0) return FailStream(s.stream, Error::FromErrno("port_forward: connect", err));
    s.connecting = false;
    QueueText(s.stream, FrameType::kOpened, protocol::EncodeEmpty());
  }

  void HandleOpen(const protocol::Frame& frame) {
    uint32_t id = frame.stream_id;
    if (id == 0) return Violation("Open on stream 0");
    if (id <= last_stream) return Violation("stream id " + std::to_string(id) + " reused");
    last_stream = id;
    auto request = protocol::DecodeRequest(frame.PayloadText());
    if (!request) return QueueError(id, request.error());
    if (auto* e = std::get_if<protocol::ExecRequest>(&*request)) return StartExec(id, *e);
    if (std::holds_alternative<protocol::AttachMainRequest>(*request)) return AttachMain(id);
    if (auto* sd = std::get_if<protocol::ShutdownRequest>(&*request)) {
      if (!options.on_shutdown) return QueueError(id, ENOSYS, "shutdown is not supported here");
      options.on_shutdown(*sd);
      return QueueText(id, FrameType::kResult, protocol::EncodeEmpty());
    }
    if (std::holds_alternative<protocol::ReleaseRequest>(*request)) {
      released = true;
      if (options.answer_release_on_reopened_port) {
        release_to_answer = id;
        return;
      }
      return QueueText(id, FrameType::kResult, protocol::EncodeEmpty());
    }
    if (auto* rs = std::get_if<protocol::ResumedRequest>(&*request)) {
      if (!options.on_resumed) return QueueError(id, ENOSYS, "resumed is not supported here");
      auto count = options.on_resumed(*rs);
      if (!count) return QueueError(id, count.error());
      return QueueText(id, FrameType::kResult, "{\"resume_count\":" + std::to_string(*count) + "}");
    }
    if (auto* w = std::get_if<protocol::WriteFileRequest>(&*request)) {
      if (OffLoop()) return StartWriteFileOffLoop(id, *w);
      auto writer = AtomicFileWriter::Create(
          w->path, w->mode, w->uid, w->gid,
          w->mkdirs ? AtomicFileWriter::CreateParents::kYes : AtomicFileWriter::CreateParents::kNo,
          w->mtime);
      if (!writer) return QueueError(id, writer.error());
      auto s = std::make_unique<Session>();
      s->stream = id;
      s->kind = Kind::kWriteFile;
      s->writer.emplace(std::move(*writer));
      s->out[0].finished = s->out[1].finished = true;
      sessions[id] = std::move(s);
      return;
    }
    if (auto* r = std::get_if<protocol::ReadFileRequest>(&*request)) {
      if (OffLoop()) return StartReadFileOffLoop(id, r->path);
      auto opened = OpenForRead(r->path);
      if (!opened) return QueueError(id, opened.error());
      auto s = std::make_unique<Session>();
      s->stream = id;
      s->kind = Kind::kReadFile;
      s->out[0].fd = std::move(opened->fd);
      s->out[1].finished = true;
      sessions[id] = std::move(s);
      return QueueText(id, FrameType::kOpened,
                       protocol::EncodeReadFileOpened({opened->size, opened->mode}));
    }
    if (auto op = SimpleFileOp(*request)) {
      if (OffLoop()) return RunFileOp(id, std::move(op));
      auto answer = op();
      if (!answer) return QueueError(id, answer.error());
      return QueueText(id, FrameType::kResult, *answer);
    }
    if (auto* p = std::get_if<protocol::PortForwardRequest>(&*request))
      return StartPort(id, p->port);
    if (auto* ss = std::get_if<protocol::ServeShareRequest>(&*request))
      return StartFuse(id, ss->index);
    if (std::holds_alternative<protocol::SharesMountedRequest>(*request)) {
      mounts_waiting.push_back(id);
      return AnswerMountsWaiting();
    }
    QueueError(id, EINVAL, "unsupported op");
  }

  // list, stat, mkdir, symlink, setattr, remove: each one call answered by
  // one Result (its payload here); empty for any other request.
  static std::function<Result<std::string>()> SimpleFileOp(const protocol::Request& request) {
    if (auto* l = std::get_if<protocol::ListRequest>(&request))
      return [path = l->path]() -> Result<std::string> {
        auto entries = CELLA_TRY(ListDirectory(path));
        std::string body = protocol::EncodeList(entries);
        // The host refuses frames above kMaxPayload and would drop the
        // whole link; failing this one stream says what went wrong instead.
        if (body.size() > protocol::kMaxPayload)
          return std::unexpected(Error{"list " + path + ": " + std::to_string(entries.size()) +
                                           " entries do not fit in one reply of " +
                                           std::to_string(protocol::kMaxPayload) + " bytes",
                                       E2BIG});
        return body;
      };
    if (auto* st = std::get_if<protocol::StatRequest>(&request))
      return [path = st->path]() -> Result<std::string> {
        return protocol::EncodeFileInfo(CELLA_TRY(StatPath(path)));
      };
    if (auto* m = std::get_if<protocol::MkdirRequest>(&request))
      return [m = *m]() -> Result<std::string> {
        CELLA_TRY(MakeDirs(m.path, m.mode, m.uid, m.gid));
        return protocol::EncodeEmpty();
      };
    if (auto* ln = std::get_if<protocol::SymlinkRequest>(&request))
      return [ln = *ln]() -> Result<std::string> {
        CELLA_TRY(MakeSymlink(ln));
        return protocol::EncodeEmpty();
      };
    if (auto* sa = std::get_if<protocol::SetAttrRequest>(&request))
      return [sa = *sa]() -> Result<std::string> {
        CELLA_TRY(SetAttributes(sa));
        return protocol::EncodeEmpty();
      };
    if (auto* rm = std::get_if<protocol::RemoveRequest>(&request))
      return [path = rm->path, recursive = rm->recursive]() -> Result<std::string> {
        CELLA_TRY(RemovePath(path, recursive ? Recursive::kYes : Recursive::kNo));
        return protocol::EncodeEmpty();
      };
    return {};
  }

  void HandleData(Session& s, const protocol::Frame& frame) {
    if (frame.channel != Channel::kStdin)
      return FailStream(s.stream, Error{"Data from the host must be on stdin", EPROTO});
    auto size = static_cast<int64_t>(frame.payload.size());
    if (size > s.in.host_credit)
      return Violation("stream " + std::to_string(s.stream) + " sent more than its window");
    if (s.in.eof) return FailStream(s.stream, Error{"Data after Eof", EPROTO});
    s.in.host_credit -= size;
    if (s.kind == Kind::kWriteFile && !s.upload_abandoned) {
      if (!s.writer) return FailStream(s.stream, MissingWriter());
      if (auto ok = s.writer->Write(frame.payload); !ok) return FailStream(s.stream, ok.error());
      SendWindow(s, static_cast<uint32_t>(size));
      return;
    }
    s.in.pending.insert(s.in.pending.end(), frame.payload.begin(), frame.payload.end());
  }

  void HandleEof(Session& s, const protocol::Frame& frame) {
    if (frame.channel != Channel::kStdin)
      return FailStream(s.stream, Error{"Eof from the host must be on stdin", EPROTO});
    s.in.eof = true;
    // An upload on a thread ends when its pipe is drained and closed (PumpIn).
    if (s.kind == Kind::kWriteFile && !s.upload_abandoned) {
      if (!s.writer) return FailStream(s.stream, MissingWriter());
      auto size = s.writer->Commit();
      uint32_t id = s.stream;
      if (!size) return FailStream(id, size.error());
      sessions.erase(id);
      QueueText(id, FrameType::kResult, protocol::EncodeSize(*size));
    }
  }

  void HandleFrame(protocol::Frame frame) {
    if (!hello_received) {
      if (frame.type != FrameType::kHello || frame.stream_id != 0)
        return Violation("the first frame must be Hello on stream 0 (got type " +
                         std::to_string(static_cast<int>(frame.type)) + " on stream " +
                         std::to_string(frame.stream_id) + ")");
      auto hello = protocol::DecodeHello(frame.PayloadText());
      if (!hello) return Violation(hello.error().message);
      if (hello->version != protocol::kProtocolVersion) {
        QueueError(0, EPROTONOSUPPORT,
                   "protocol version " + std::to_string(hello->version) +
                       " is not supported (agent speaks " +
                       std::to_string(protocol::kProtocolVersion) + ")");
        link_failure = Error{"host speaks protocol version " + std::to_string(hello->version),
                             EPROTONOSUPPORT};
        return;
      }
      if (hello->role != protocol::Role::kHost) return Violation("Hello role must be host");
      hello_received = true;
      return;
    }
    if (frame.stream_id == 0) {
      switch (frame.type) {
        case FrameType::kPing:
          return Queue(0, FrameType::kPong, Channel::kControl, frame.payload);
        case FrameType::kPong:
          return;
        default:
          return Violation("unexpected frame type " + std::to_string(static_cast<int>(frame.type)) +
                           " on stream 0");
      }
    }
    if (frame.type == FrameType::kOpen) return HandleOpen(frame);
    Session* s = Find(frame.stream_id);
    if (!s) {
      // Late frames for a stream that already ended are expected races.
      if (frame.stream_id <= last_stream) return;
      return Violation("frame for stream " + std::to_string(frame.stream_id) +
                       " that was never opened");
    }
    switch (frame.type) {
      case FrameType::kData:
        return HandleData(*s, frame);
      case FrameType::kEof:
        return HandleEof(*s, frame);
      case FrameType::kWindow: {
        auto inc = protocol::ParseU32Payload(frame);
        if (!inc) return FailStream(s->stream, Error{inc.error().message, EINVAL});
        if (frame.channel != Channel::kStdout && frame.channel != Channel::kStderr)
          return FailStream(s->stream,
                            Error{"Window from the host must be for stdout/stderr", EPROTO});
        int64_t& credit = s->out[frame.channel == Channel::kStdout ? 0 : 1].credit;
        credit = std::min<int64_t>(credit + *inc, protocol::kMaxCredit);
        return;
      }
      case FrameType::kResize: {
        if (frame.payload.size() != 4)
          return FailStream(s->stream, Error{"Resize payload must be 4 bytes", EINVAL});
        if (s->kind != Kind::kExec || !s->pty_master) return;  // no terminal: nothing to resize
        auto b = [&](int i) { return static_cast<unsigned>(frame.payload[i]); };
        struct winsize ws {};
        ws.ws_row = static_cast<unsigned short>(b(0) | (b(1) << 8));
        ws.ws_col = static_cast<unsigned short>(b(2) | (b(3) << 8));
        if (::ioctl(s->pty_master.Get(), TIOCSWINSZ, &ws) != 0)
          return FailStream(s->stream, Error::FromErrno("ioctl(TIOCSWINSZ)"));
        // The kernel signals the foreground group; the session's own group
        // is told too in case the foreground group is a different one.
        if (!s->reaped) KillUnreapedTree(s->pid, SIGWINCH);
        return;
      }
      case FrameType::kSignal: {
        auto signo = protocol::ParseU32Payload(frame);
        if (!signo || *signo == 0 || *signo >= static_cast<uint32_t>(NSIG))
          return FailStream(s->stream, Error{"Signal payload is not a signal number", EINVAL});
        if (s->kind == Kind::kExec && !s->reaped)
          KillUnreapedTree(s->pid, static_cast<int>(*signo));
        return;
      }
      case FrameType::kClose:
      case FrameType::kError: {
        uint32_t id = s->stream;
        Abandon(*s);
        sessions.erase(id);
        return;
      }
      default:
        return Violation("unexpected frame type " + std::to_string(static_cast<int>(frame.type)) +
                         " from the host");
    }
  }

  void ReadLink(short revents) {
    ssize_t n;
    do {
      n = ::read(link.Get(), read_buf.get(), kReadBufBytes);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      if (errno == EAGAIN) {
        // A virtio port whose host side went away reports POLLHUP only.
        if (revents & POLLHUP) peer_closed = true;
        return;
      }
      if (errno == ECONNRESET || errno == EPIPE) {
        peer_closed = true;
        return;
      }
      link_failure = Error::FromErrno("read from the link");
      return;
    }
    if (n == 0) {
      peer_closed = true;
      return;
    }
    decoder.Feed(std::span(read_buf.get(), static_cast<size_t>(n)));
    while (!link_failure && !released) {
      auto frame = decoder.Next();
      if (!frame) return Violation(frame.error().message);
      std::optional<protocol::Frame>& complete = *frame;
      if (!complete) return;
      HandleFrame(std::move(*complete));
    }
  }

  // Answers every waiting shares_mounted once the mounts are done.
  void AnswerMountsWaiting() {
    if (mounts_waiting.empty()) return;
    std::optional<Status> result;
    if (options.mounts_result) {
      result = options.mounts_result();
      if (!result) return;
    } else {
      result = Status{};
    }
    for (uint32_t id : mounts_waiting) {
      if (*result) {
        QueueText(id, FrameType::kResult, protocol::EncodeEmpty());
      } else {
        QueueError(id, result->error());
      }
    }
    mounts_waiting.clear();
  }

  // Ends a link: everything but the main process is abandoned.
  void DetachAll() {
    for (auto& [id, s] : sessions) {
      if (s->is_main && main_state == MainState::kRunning) {
        s->stream = 0;
        s->in.pending.clear();
        s->in.pending_off = 0;
        detached_main = std::move(s);
      } else {
        Abandon(*s);
      }
    }
    sessions.clear();
  }

  Result<LinkEnd> Serve(UniqueFd link_fd) {
    link = std::move(link_fd);
    CELLA_TRY_CTX(SetNonBlocking(link.Get(), true), "agent link");
    CELLA_TRY_CTX(SetCloexec(link.Get(), true), "agent link");
    decoder = protocol::FrameDecoder();
    out.clear();
    out_off = 0;
    hello_received = false;
    last_stream = 0;
    link_failure.reset();
    peer_closed = false;
    write_failed = false;
    released = false;
    release_to_answer.reset();
    if (!read_buf) read_buf = std::make_unique_for_overwrite<std::byte[]>(kReadBufBytes);
    mounts_waiting.clear();
    QueueText(0, FrameType::kHello,
              protocol::EncodeHello({protocol::kProtocolVersion, protocol::Role::kAgent}));

    std::vector<pollfd> fds;
    std::vector<std::pair<Session*, Slot>> owners;
    while (!link_failure && !peer_closed) {
      if (released) {
        // Only what is queued goes out now (the Result last); no session is
        // serviced and nothing is read. Bounded: a host that stops reading
        // before it has its answer loses the link.
        if (OutPending() == 0 || !FlushWithin(kReleaseFlushBound)) break;
        continue;
      }
      fds.clear();
      owners.clear();
      short link_events = 0;
      if (OutPending() < options.link_hard_cap) link_events |= POLLIN;
      if (OutPending() > 0) link_events |= POLLOUT;
      fds.push_back({link.Get(), link_events, 0});
      fds.push_back({sigfd.Get(), POLLIN, 0});
      // Level-triggered and never read: readable for good once done.
      const bool poll_mounts = !mounts_waiting.empty() && options.mounts_ready_fd >= 0;
      if (poll_mounts) fds.push_back({options.mounts_ready_fd, POLLIN, 0});
      const size_t first_session = fds.size();
      bool room = OutPending() < options.link_soft_cap;
      for (auto& [id, s] : sessions) {
        if (s->kind == Kind::kPort && s->connecting) {
          fds.push_back({s->out[0].fd.Get(), POLLOUT, 0});
          owners.emplace_back(s.get(), Slot::kConnect);
          continue;
        }
        if (s->start_status) {
          fds.push_back({s->start_status.Get(), POLLIN, 0});
          owners.emplace_back(s.get(), Slot::kStart);
          continue;
        }
        if (s->answer_fd) {
          fds.push_back({s->answer_fd.Get(), POLLIN, 0});
          owners.emplace_back(s.get(), Slot::kAnswer);
          if (s->answer_gates) continue;
        }
        int64_t need = s->kind == Kind::kFuse ? static_cast<int64_t>(kFuseRelayRead) : 1;
        for (int i = 0; i < 2; ++i) {
          if (s->out[i].fd && s->out[i].credit >= need && room) {
            fds.push_back({s->out[i].fd.Get(), POLLIN, 0});
            owners.emplace_back(s.get(), i == 0 ? Slot::kOut0 : Slot::kOut1);
          }
        }
        // /dev/fuse is always writable: PumpIn writes whole replies each round.
        if (s->in.fd && s->in.Pending() > 0 && !s->in.broken && s->kind != Kind::kFuse) {
          fds.push_back({s->in.fd.Get(), POLLOUT, 0});
          owners.emplace_back(s.get(), Slot::kIn);
        }
      }
      int timeout = PollTimeoutMs(Clock::now());
      int ready = ::poll(fds.data(), fds.size(), timeout);
      if (ready < 0) {
        if (errno == EINTR) continue;
        return FailErrno("agent: poll");
      }
      if (fds[0].revents & (POLLOUT | POLLERR)) Flush();
      if (fds[1].revents & POLLIN) {
        DrainSignalFd();
        Reap();
      }
      if (poll_mounts && fds[2].revents != 0) AnswerMountsWaiting();
      std::vector<Session*> connected;
      std::vector<Session*> started;
      std::vector<Session*> answered;
      for (size_t i = first_session; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        auto [s, slot] = owners[i - first_session];
        switch (slot) {
          case Slot::kOut0:
            s->out[0].ready = true;
            break;
          case Slot::kOut1:
            s->out[1].ready = true;
            break;
          case Slot::kIn:
            break;  // PumpIn writes whatever is pending

          case Slot::kConnect:
            connected.push_back(s);
            break;
          case Slot::kStart:
            started.push_back(s);
            break;
          case Slot::kAnswer:
            answered.push_back(s);
            break;
        }
      }
      // Session pointers stay valid until ServiceAll/ReadLink erase entries.
      for (Session* s : connected) FinishConnect(*s);
      for (Session* s : started) FinishStart(*s);
      for (Session* s : answered) ReadAnswer(*s);
      if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) ReadLink(fds[0].revents);
      CheckTimers(Clock::now());
      ServiceAll();
      Flush();
      if (stop_when_flushed && OutPending() == 0) break;
    }
    // Best effort: tell the host why (an Error frame may be queued).
    Flush();
    DetachAll();
    link.Reset();
    out.clear();
    out_off = 0;
    if (link_failure) return std::unexpected(*link_failure);
    if (stop_when_flushed) return LinkEnd::kStopped;
    if (released) return LinkEnd::kReleased;
    return LinkEnd::kPeerClosed;
  }
};

Agent::Agent(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Agent::~Agent() {
  if (!impl_) return;
  for (auto& [id, s] : impl_->sessions) impl_->Abandon(*s);
  if (impl_->detached_main) impl_->Abandon(*impl_->detached_main);
}

Result<std::unique_ptr<Agent>> Agent::Create(AgentOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  if (::sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) return FailErrno("sigprocmask(SIGCHLD)");
  // SIG_IGN for SIGCHLD would auto-reap children and lose their status.
  if (::signal(SIGCHLD, SIG_DFL) == SIG_ERR) return FailErrno("signal(SIGCHLD)");
  if (::signal(SIGPIPE, SIG_IGN) == SIG_ERR) return FailErrno("signal(SIGPIPE)");
  impl->sigfd.Reset(::signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!impl->sigfd) return FailErrno("signalfd(SIGCHLD)");
  return std::unique_ptr<Agent>(new Agent(std::move(impl)));
}

Result<LinkEnd> Agent::Serve(UniqueFd link) { return impl_->Serve(std::move(link)); }
void Agent::StopWhenFlushed() { impl_->stop_when_flushed = true; }
Status Agent::AnswerRelease(int port) { return impl_->AnswerRelease(port); }
bool Agent::TerminateMain(std::chrono::milliseconds grace) { return impl_->TerminateMain(grace); }

}  // namespace cella::agent
