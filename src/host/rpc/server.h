// `cella rpc`'s JSON-RPC 2.0 server: newline-delimited requests on one fd,
// responses and notifications on another, one sandbox per server, speaking
// matchlock's protocol (method names, params, base64 byte fields, error
// codes) so its SDKs drive cella unchanged. See README.md for the methods.
//
// Ordering: `create` and `close` wait until every in-flight request has been
// answered and run on the reader thread; notifications a client sends
// (stdin for a pipe exec, a resize) are handled in arrival order on the
// reader thread; every other request runs on its own worker thread and can
// be cancelled (`cancel {id}`), which answers it −32003 and kills its
// process.
//
// Trust: every byte read is untrusted. Lines are capped (Options), a bad
// line gets the matching JSON-RPC error and the server keeps serving.
//
// Lifetime: Serve() returns after `close` was answered or the input ended;
// either way the sandbox has been closed by then (in-flight work cancelled,
// bounded waits).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/result.h"
#include "host/agent/client.h"
#include "host/rpc/params.h"

namespace cella::rpc {

// Error codes: JSON-RPC's own, then matchlock's.
inline constexpr int kParseError = -32700;
inline constexpr int kInvalidRequest = -32600;
inline constexpr int kMethodNotFound = -32601;
inline constexpr int kInvalidParams = -32602;
inline constexpr int kInternalError = -32603;
inline constexpr int kVmFailed = -32000;
inline constexpr int kExecFailed = -32001;
inline constexpr int kFileFailed = -32002;
inline constexpr int kCancelled = -32003;

// The sandbox a server drives; made by the SandboxFactory on `create`.
// Thread-safe: workers call agent() concurrently.
class Sandbox {
 public:
  virtual ~Sandbox() = default;
  virtual const std::string& id() const = 0;
  virtual host::AgentClient& agent() = 0;
  // argv-less defaults every exec starts from: the sandbox's env, workdir,
  // user and privilege, as `cella exec` uses them.
  virtual host::ExecRequest ExecDefaults() const = 0;
  // Edits the egress allow-list of the running sandbox in one step; returns
  // the list before and the list now in force.
  struct AllowListChange {
    std::vector<std::string> before;
    std::vector<std::string> after;
  };
  virtual Result<AllowListChange> EditAllowList(const std::vector<std::string>& add,
                                                const std::vector<std::string>& remove) = 0;
  // The sandbox's console log (kernel and guest output, `cella logs
  // --console`): the live file; its older generation is PATH.1
  // (host/sandbox/log_files.h). Empty when there is none (`log` answers
  // −32000).
  virtual std::string ConsoleLogPath() const { return {}; }
  // The sandbox's recent events (matchlock's Event objects; the egress
  // proxy's decisions), numbered: those from `from` on (nullopt: from now
  // on), waiting up to `wait` for one. Bounded at the source: a reader that
  // falls behind finds `dropped` > 0, never a blocked proxy.
  struct EventBatch {
    uint64_t next = 0;
    uint64_t dropped = 0;
    std::vector<nlohmann::json> events;
  };
  virtual Result<EventBatch> PollEvents(std::optional<uint64_t> from,
                                        std::chrono::milliseconds wait) {
    (void)from;
    (void)wait;
    return Fail("this sandbox reports no events");
  }
  // `port_forward`: listens on address:local_port (0 picks a free port)
  // and passes each connection to the guest's 127.0.0.1:remote_port, until
  // Close.
  struct PortBinding {
    std::string address;
    uint16_t local_port = 0;
    uint16_t remote_port = 0;
  };
  virtual Result<PortBinding> ForwardPort(const std::string& address, uint16_t local_port,
                                          uint16_t remote_port) {
    (void)address;
    (void)local_port;
    (void)remote_port;
    return Fail("this sandbox cannot forward ports");
  }
  // `cella.port_forward_close`: stops the forwards listening on
  // address:local_port (every address when `address` is empty) and returns
  // them: new connections are refused at once, open ones are cut. None
  // there is an error with errno_value ENOENT.
  virtual Result<std::vector<PortBinding>> StopForward(const std::string& address,
                                                       uint16_t local_port) {
    (void)address;
    (void)local_port;
    return Fail("this sandbox cannot forward ports");
  }
  // Stops the VM (guest processes get `grace` to exit) and removes the
  // sandbox; bounded.
  virtual Status Close(std::chrono::milliseconds grace) = 0;
};

// Fails with a message for the client (a −32000 answer).
using SandboxFactory = std::function<Result<std::unique_ptr<Sandbox>>(const CreateParams&)>;
// `cella.attach {id}`: an existing sandbox (a name or ID), driven but not
// owned: its Close only lets go of it.
using SandboxAttacher = std::function<Result<std::unique_ptr<Sandbox>>(const std::string&)>;

struct ServerOptions {
  size_t max_line_bytes = size_t{10} << 20;   // matchlock's cap
  size_t max_in_flight = 64;                  // concurrent requests (each a thread)
  size_t max_exec_output = size_t{64} << 20;  // exec's collected stdout + stderr
  std::chrono::milliseconds close_grace{2000};
  // How long teardown waits for cancelled work before closing regardless.
  std::chrono::milliseconds drain_timeout{10'000};
  // exec_pipe / exec_tty input queued for the guest (which takes it as it
  // grants credit), per exec. The reader thread never waits on the guest
  // while the queue has room; with it full it waits at most `stdin_stall`,
  // then ends that exec (−32001), so a process (or guest) that never reads
  // cannot hold every later request. One notification always fits an empty
  // queue.
  size_t max_stdin_queue = size_t{16} << 20;
  std::chrono::milliseconds stdin_stall{30'000};
  // `cella.fork` {id?, count, name}: forks a running sandbox (by default the
  // one this server drives) into `count` new ones and returns their IDs.
  // Unset: the method is answered "Method not found".
  std::function<Result<std::vector<std::string>>(const std::string& id, int count,
                                                 const std::string& name)>
      fork;
};

class Server {
 public:
  Server(SandboxFactory factory, int in_fd, int out_fd, ServerOptions options = {},
         SandboxAttacher attacher = nullptr);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Serves until `close` or the end of input; returns the input's read error
  // if there was one.
  Status Serve();

 private:
  struct Call;
  using json = nlohmann::json;

  void HandleLine(std::string_view line);
  void HandleRequest(json id, const std::string& method, json params);
  void RunWorker(std::shared_ptr<Call> call, const std::string& method, json params);
  // Answers a call unless it was already answered (cancelled).
  void Answer(Call& call, json result);
  void AnswerError(Call& call, int code, const std::string& message);
  void SendError(const json& id, int code, const std::string& message);
  void Send(const json& message);

  json DoCreate(Call& call, const json& params);
  json DoAttach(Call& call, const json& params);
  json DoClose(Call& call, const json& params);
  void DoCancel(Call& call, const json& params);
  // How an exec's output and input travel: collected into the result
  // (exec), streamed as notifications (exec_stream), or streamed with stdin
  // from the client's notifications (exec_pipe), on a terminal (exec_tty).
  enum class ExecMode { kCollect, kStream, kPipe, kTty };
  void DoExec(Call& call, const json& params, ExecMode mode);
  // exec_pipe.stdin / .stdin_eof, exec_tty.stdin / .stdin_eof / .resize:
  // queued on the call in arrival order (bounded, see ServerOptions).
  void HandleExecInput(const std::string& method, const json& params);
  // The exec's input thread: hands the queued input to the guest.
  static void PumpInput(Call& call, host::ExecSession& session);
  void DoWriteFile(Call& call, const json& params);
  void DoReadFile(Call& call, const json& params);
  void DoListFiles(Call& call, const json& params);
  void DoAllowList(Call& call, const json& params, bool add);
  // `log`: the console log so far; `log_stream`: the same as
  // `log_stream.data` notifications, then what is appended, until cancelled.
  void DoLog(Call& call, bool follow);
  // `port_forward {forwards:[{local_port,remote_port}], addresses:[ip]}`.
  // All or nothing: a call that fails partway stops what it made.
  void DoPortForward(Call& call, const json& params);
  // `cella.port_forward_close {local_port, address?}`.
  void DoPortForwardClose(Call& call, const json& params);

  // `event` notifications: a thread per sandbox polls it (PollEvents) and
  // sends what it reports; exec events are sent by the exec itself.
  void StartEvents(std::shared_ptr<Sandbox> sandbox, bool from_start);
  void StopEvents();
  void SendEvent(json event);
  void DoFork(Call& call, const json& params);

  std::shared_ptr<Sandbox> CurrentSandbox();
  void CancelAll();
  // Waits until no worker runs (bounded), then joins finished threads.
  void WaitIdle(std::chrono::milliseconds timeout);
  void ReapFinished();
  void Teardown();

  SandboxFactory factory_;
  SandboxAttacher attacher_;
  int in_fd_;
  int out_fd_;
  ServerOptions options_;

  std::mutex out_mu_;        // one writer at a time on out_fd_
  bool out_broken_ = false;  // guarded by out_mu_

  std::mutex mu_;
  std::condition_variable idle_cv_;
  std::shared_ptr<Sandbox> sandbox_;                        // guarded by mu_
  std::map<std::string, std::shared_ptr<Call>> in_flight_;  // by id's JSON text; guarded by mu_
  std::map<uint64_t, std::thread> workers_;                 // guarded by mu_
  std::vector<uint64_t> finished_;                          // guarded by mu_
  uint64_t next_worker_ = 0;                                // guarded by mu_
  bool closed_ = false;                                     // reader thread only

  std::thread events_thread_;  // reader thread starts and joins it
  std::mutex events_mu_;
  std::condition_variable events_cv_;
  bool events_stop_ = false;  // guarded by events_mu_
};

}  // namespace cella::rpc
