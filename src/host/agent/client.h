// Host side of the agent protocol (src/protocol/README.md): one AgentClient
// per connected link (virtio-serial socket, vsock, or a socket pair).
//
// Threading: every AgentClient method is thread-safe; many threads may run
// Exec/ReadFile/... at once on one client. A reader thread owns the link's
// input and dispatches frames to streams; writes are serialized. Exec
// callbacks run on a per-session delivery thread (never the reader thread),
// in order, so a slow callback slows only its own session and may call back
// into that session (WriteStdin, Signal...).
//
// Trust: everything from the guest is untrusted. Frame sizes are capped by
// wire.h, credit violations, malformed JSON and unexpected frames fail the
// link, and every waiter then wakes with that error. Collected output is
// capped (AgentClientOptions).
//
// Lifetime: sessions and port streams hold the link alive; destroying the
// AgentClient stops the reader and fails whatever is still pending.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "protocol/messages.h"

namespace cella::host {

using protocol::ExecRequest;
using protocol::FileInfo;
using protocol::FileType;

struct AgentClientOptions {
  std::chrono::milliseconds handshake_timeout{10'000};
  // Exec(): stdout + stderr collected in memory.
  size_t max_exec_output = 64u << 20;
  // ReadFile() into memory (ReadFileTo() streams and has no cap).
  size_t max_read_file = 64u << 20;
};

struct ExecStatus {
  std::optional<int> exit_code;  // exactly one of exit_code / signal is set
  std::optional<int> signal;
  bool timed_out = false;
  // Shell convention: the exit code, or 128 + the signal number.
  int ShellCode() const { return exit_code ? *exit_code : 128 + signal.value_or(0); }
};

struct ExecResult {
  ExecStatus status;
  std::string stdout_data;
  std::string stderr_data;
};

struct ExecCallbacks {
  std::function<void(std::string_view)> on_stdout;
  std::function<void(std::string_view)> on_stderr;
};

class Link;
class Stream;

// A running exec (or the attached main process).
class ExecSession {
 public:
  ~ExecSession();  // a still-running process group is killed (Close)
  ExecSession(const ExecSession&) = delete;
  ExecSession& operator=(const ExecSession&) = delete;

  int64_t pid() const { return pid_; }
  // Blocks while the agent has no credit for this stdin: memory stays
  // bounded however slowly the process reads.
  Status WriteStdin(std::span<const std::byte> bytes);
  Status WriteStdin(std::string_view bytes);
  Status CloseStdin();
  Status Resize(uint16_t rows, uint16_t cols);
  Status Signal(int signo);
  // Waits until the process has exited and all output was delivered.
  Result<ExecStatus> Wait();

 private:
  friend class AgentClient;
  ExecSession() = default;
  void Pump();
  std::shared_ptr<Link> link_;
  std::shared_ptr<Stream> stream_;
  ExecCallbacks callbacks_;
  int64_t pid_ = 0;
  std::thread thread_;
  std::optional<Result<ExecStatus>> outcome_;
};

// A TCP connection to 127.0.0.1:port inside the guest. Read from one
// thread; Write/ShutdownWrite may run on another.
class PortStream {
 public:
  ~PortStream();  // closes the connection if it is still open
  PortStream(const PortStream&) = delete;
  PortStream& operator=(const PortStream&) = delete;

  Status Write(std::span<const std::byte> bytes);
  Status Write(std::string_view bytes);
  // Half-close: the guest socket sees EOF; reading continues.
  Status ShutdownWrite();
  // Blocks for data; 0 means the guest side closed its direction.
  Result<size_t> Read(std::span<std::byte> buffer);
  // Waits until both directions ended (the agent's Result).
  Status Wait();

 private:
  friend class AgentClient;
  PortStream() = default;
  std::shared_ptr<Link> link_;
  std::shared_ptr<Stream> stream_;
  std::vector<std::byte> leftover_;
  size_t leftover_off_ = 0;
  bool eof_ = false;
  bool finished_ = false;
};

struct WriteFileOptions {
  uint32_t mode = 0644;
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
  enum class Parents { kMustExist, kCreate } parents = Parents::kMustExist;
  std::optional<int64_t> mtime;  // seconds since the epoch; absent: time of writing
};

struct MakeDirsOptions {
  uint32_t mode = 0755;  // every directory created (the agent's umask applies)
  // Owner of the final component, applied only if this call created it.
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
};

// What SetAttributes changes; unset fields are left alone (at least one set).
struct FileAttributes {
  std::optional<uint32_t> mode;  // not on a symlink (EOPNOTSUPP)
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
  std::optional<int64_t> mtime;  // seconds since the epoch
};

enum class RemoveMode { kSingle, kRecursive };

class AgentClient {
 public:
  // Takes the connected link and performs the handshake within
  // options.handshake_timeout.
  static Result<std::unique_ptr<AgentClient>> Connect(UniqueFd fd, AgentClientOptions options = {});
  ~AgentClient();
  AgentClient(const AgentClient&) = delete;
  AgentClient& operator=(const AgentClient&) = delete;

  Status Ping(std::chrono::milliseconds timeout);

  // Runs to completion and collects output (capped by max_exec_output).
  // The child's stdin is closed: use StartExec to feed it.
  Result<ExecResult> Exec(const ExecRequest& request);
  // Returns once the process started (the agent's Opened); output goes to
  // the callbacks.
  Result<std::unique_ptr<ExecSession>> StartExec(const ExecRequest& request,
                                                 ExecCallbacks callbacks);
  // Starts (once) or re-attaches the guest's pre-configured main process.
  // A guest that does not say the process started within `answer_timeout`
  // (stopped, hijacked) fails the call rather than holding the caller (the
  // supervisor's start-up) forever.
  Result<std::unique_ptr<ExecSession>> AttachMain(
      ExecCallbacks callbacks,
      std::chrono::milliseconds answer_timeout = std::chrono::milliseconds(60'000));

  Status WriteFile(const std::string& path, std::string_view bytes, WriteFileOptions options = {});
  // Streams source_fd (blocking, read to EOF) with bounded memory.
  Status WriteFileFrom(const std::string& path, int source_fd, WriteFileOptions options = {});
  Result<std::string> ReadFile(const std::string& path);
  // Streams into dest_fd (blocking) with bounded memory; returns the size.
  // At most max_bytes reach dest_fd: past them the transfer is abandoned with
  // EFBIG (dest_fd then holds exactly max_bytes), so a guest cannot feed a
  // host file without end.
  Result<uint64_t> ReadFileTo(const std::string& path, int dest_fd,
                              uint64_t max_bytes = std::numeric_limits<uint64_t>::max());
  Result<std::vector<FileInfo>> ListFiles(const std::string& path);
  Result<FileInfo> Stat(const std::string& path);
  Status MakeDirs(const std::string& path, uint32_t mode = 0755);
  Status MakeDirs(const std::string& path, const MakeDirsOptions& options);
  Status Remove(const std::string& path, RemoveMode mode = RemoveMode::kSingle);
  // A symlink at path -> target (never resolved), replacing an existing
  // non-directory atomically; uid/gid/mtime apply to the link itself.
  Status MakeSymlink(const std::string& path, const std::string& target,
                     std::optional<uint32_t> uid = std::nullopt,
                     std::optional<uint32_t> gid = std::nullopt,
                     std::optional<int64_t> mtime = std::nullopt);
  // chown, then chmod, then mtime; a final symlink is not followed.
  Status SetAttributes(const std::string& path, const FileAttributes& attributes);

  // A guest that does not answer within `answer_timeout` fails the call:
  // each forwarded connection waits on it, and must not wait forever.
  Result<std::unique_ptr<PortStream>> OpenPort(
      uint16_t guest_port,
      std::chrono::milliseconds answer_timeout = std::chrono::milliseconds(10'000));
  // Op serve_share: the guest mounts host share `index` over FUSE and relays
  // its raw FUSE messages on the returned stream (requests read, replies
  // written; see protocol/README.md). A guest that does not answer within
  // `answer_timeout` (stopped, hijacked) fails the call rather than holding
  // the supervisor's start-up.
  Result<std::unique_ptr<PortStream>> ServeShare(
      uint32_t index, std::chrono::milliseconds answer_timeout = std::chrono::milliseconds(10'000));
  // Op shares_mounted: waits until the guest has put its FUSE shares in
  // place with everything mounted through them (overlay layers, volumes and
  // tmpfs beneath, nested shares), which needs the shares served first. The
  // guest's error when a mount failed; ETIMEDOUT after `answer_timeout`.
  Status SharesMounted(std::chrono::milliseconds answer_timeout);

  // Asks the guest to power off (the agent's on_shutdown). The guest init
  // sends SIGTERM to every process, waits up to `grace` (0: its default,
  // 1 s; above protocol::kMaxShutdownGraceMs: that maximum), then SIGKILL.
  // Returns once the request is accepted, before the grace runs; an agent
  // that does not accept it within `answer_timeout` (stopped, hijacked,
  // starved by a fork bomb) gets ETIMEDOUT, so the caller can power off by
  // other means instead of hanging.
  Status Shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(0),
                  std::chrono::milliseconds answer_timeout = std::chrono::milliseconds(5000));

  // Asks the agent to let go of this link before the VM is saved (protocol
  // op `release`): once this returns, the agent reads nothing more from the
  // link and waits for its next host, so the VM may be stopped at once.
  // Bounded by `answer_timeout`.
  Status Release(std::chrono::milliseconds answer_timeout);

  // Tells the guest it woke from a snapshot (protocol op `resumed`): it sets
  // its wall clock to `realtime` and counts the resume. Returns the guest's
  // resume count. With `rng_seed` (fresh host random bytes,
  // protocol::kMinRngSeed..kMaxRngSeed) the guest reseeds its kernel RNG
  // from it, and fails the request when it cannot. Bounded by
  // `answer_timeout` like Shutdown.
  Result<uint64_t> Resumed(
      std::chrono::system_clock::time_point realtime, std::span<const uint8_t> rng_seed = {},
      std::chrono::milliseconds answer_timeout = std::chrono::milliseconds(10'000));

  // Set once the link has failed or closed.
  std::optional<Error> LinkError() const;

 private:
  explicit AgentClient(std::shared_ptr<Link> link, AgentClientOptions options);
  Result<std::unique_ptr<ExecSession>> Start(
      const protocol::Request& request, ExecCallbacks callbacks,
      std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);
  Result<std::string> Simple(const protocol::Request& request);
  // Opens a stream that answers Opened {} and then carries bytes both ways.
  Result<std::unique_ptr<PortStream>> OpenByteStream(
      const protocol::Request& request,
      std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);
  std::shared_ptr<Link> link_;
  AgentClientOptions options_;
};

}  // namespace cella::host
