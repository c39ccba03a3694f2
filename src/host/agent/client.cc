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
#include <nlohmann/json.hpp>
#include <optional>

#include "base/check.h"
#include "base/io.h"
#include "host/agent/link.h"
#include "protocol/wire.h"

namespace cella::host {

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

Result<std::unique_ptr<ExecSession>> AgentClient::Start(
    const protocol::Request& request, ExecCallbacks callbacks,
    std::optional<std::chrono::steady_clock::time_point> deadline) {
  auto stream = CELLA_TRY(link_->Open(request));
  StreamGuard guard(*link_, stream);
  auto e = CELLA_TRY(link_->Next(*stream, deadline));
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

Result<std::unique_ptr<ExecSession>> AgentClient::AttachMain(
    ExecCallbacks callbacks, std::chrono::milliseconds answer_timeout) {
  return Start(protocol::AttachMainRequest{}, std::move(callbacks),
               std::chrono::steady_clock::now() + answer_timeout);
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

Result<uint64_t> AgentClient::ReadFileTo(const std::string& path, int dest_fd, uint64_t max_bytes) {
  StreamGuard s(*link_, CELLA_TRY(link_->Open(protocol::ReadFileRequest{path})));
  uint64_t written = 0;
  return ReceiveFile(*link_, *s, [&](std::span<const std::byte> bytes) -> Status {
    if (bytes.size() > max_bytes - written) {
      CELLA_TRY(WriteAll(dest_fd, bytes.first(static_cast<size_t>(max_bytes - written))));
      written = max_bytes;
      return std::unexpected(Error{"read_file " + path + ": the guest sent more than " +
                                       std::to_string(max_bytes) + " bytes",
                                   EFBIG});
    }
    written += bytes.size();
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

Status AgentClient::Release(std::chrono::milliseconds answer_timeout) {
  const auto deadline = Clock::now() + answer_timeout;
  StreamGuard s(*link_, CELLA_TRY(link_->Open(protocol::ReleaseRequest{})));
  CELLA_TRY_CTX(AwaitResult(*link_, *s, deadline), "release the agent link");
  return {};
}

Result<uint64_t> AgentClient::Resumed(std::chrono::system_clock::time_point realtime,
                                      std::span<const uint8_t> rng_seed,
                                      std::chrono::milliseconds answer_timeout) {
  protocol::ResumedRequest request;
  request.rng_seed.assign(rng_seed.begin(), rng_seed.end());
  request.realtime_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(realtime.time_since_epoch()).count();
  const auto deadline = Clock::now() + answer_timeout;
  StreamGuard s(*link_, CELLA_TRY(link_->Open(request)));
  auto text = CELLA_TRY_CTX(AwaitResult(*link_, *s, deadline), "resumed notice");
  nlohmann::json reply = nlohmann::json::parse(text, nullptr, false);
  if (!reply.is_object() || !reply.contains("resume_count") ||
      !reply["resume_count"].is_number_unsigned())
    return Fail("resumed notice: the guest's reply has no resume_count");
  return reply["resume_count"].get<uint64_t>();
}

Result<std::unique_ptr<PortStream>> AgentClient::OpenPort(
    uint16_t guest_port, std::chrono::milliseconds answer_timeout) {
  return OpenByteStream(protocol::PortForwardRequest{guest_port},
                        std::chrono::steady_clock::now() + answer_timeout);
}

Status AgentClient::SharesMounted(std::chrono::milliseconds answer_timeout) {
  const auto deadline = Clock::now() + answer_timeout;
  StreamGuard s(*link_, CELLA_TRY(link_->Open(protocol::SharesMountedRequest{})));
  auto text = CELLA_TRY_CTX(AwaitResult(*link_, *s, deadline), "shares_mounted");
  return protocol::DecodeEmpty(text);
}

Result<std::unique_ptr<PortStream>> AgentClient::ServeShare(
    uint32_t index, std::chrono::milliseconds answer_timeout) {
  return OpenByteStream(protocol::ServeShareRequest{index},
                        std::chrono::steady_clock::now() + answer_timeout);
}

Result<std::unique_ptr<PortStream>> AgentClient::OpenByteStream(
    const protocol::Request& request,
    std::optional<std::chrono::steady_clock::time_point> deadline) {
  auto stream = CELLA_TRY(link_->Open(request));
  StreamGuard guard(*link_, stream);
  auto e = CELLA_TRY(link_->Next(*stream, deadline));
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
