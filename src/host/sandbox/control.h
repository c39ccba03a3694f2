// The supervisor's control socket: one JSON request line per connection,
// one JSON reply line. Requests: {"op":"status"}, {"op":"stop","grace_ms":N},
// {"op":"kill"}, {"op":"allow-list","add":[..],"remove":[..]},
// {"op":"events","from":N,"wait_ms":M} (event_ring.h; a long poll). A reply is
// {"ok":true,...} or {"ok":false,"error":"..."}. Requests and replies are
// capped at 64 KiB; only root or our own user may connect (SO_PEERCRED).
//
// Threading: one accept thread, and one thread per connection (at most
// kMaxConnections at once; past that a connection is refused at once with
// "busy", and ControlCall asks again until its own deadline), so a
// long stop never delays a kill and a silent client holds only its own
// thread, for at most kRequestReadTimeout. Handlers run concurrently on
// those threads. Call Stop (or destroy) before whatever the handler touches
// goes away; Stop waits for running handlers.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "base/wake_fd.h"

namespace cella::sandbox {

using ControlHandler = std::function<nlohmann::json(const nlohmann::json& request)>;

class ControlServer {
 public:
  static constexpr size_t kMaxConnections = 16;
  static constexpr std::chrono::seconds kRequestReadTimeout{5};

  // Binds `path` (mode 0600; a stale socket file is replaced) and starts serving.
  static Result<std::unique_ptr<ControlServer>> Start(const std::string& path,
                                                      ControlHandler handler);
  ~ControlServer();
  void Stop();

 private:
  ControlServer() = default;
  void Loop();
  void Serve(UniqueFd conn);
  void ReapFinishedWorkers();
  struct Worker {
    std::thread thread;
    std::atomic<bool> done{false};
  };
  std::string path_;
  ControlHandler handler_;
  UniqueFd listen_fd_;
  WakeFd wake_fd_;  // Stop wakes the loop and every worker
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::mutex workers_mu_;
  std::vector<std::unique_ptr<Worker>> workers_;  // guarded by workers_mu_
};

// Sends one request and waits up to `timeout` for the reply. A reply with
// ok=false becomes an error carrying its message; a server at its connection
// cap is asked again (backing off to 100 ms) until `timeout` runs out.
Result<nlohmann::json> ControlCall(const std::string& path, const nlohmann::json& request,
                                   std::chrono::milliseconds timeout);
// As above, and whenever `wake_fd` becomes readable `give_up` is asked
// (it must take what made wake_fd readable): true abandons the wait at once
// with ECANCELED (the server's work goes on; its reply is dropped).
Result<nlohmann::json> ControlCall(const std::string& path, const nlohmann::json& request,
                                   std::chrono::milliseconds timeout, int wake_fd,
                                   const std::function<bool()>& give_up);

// Unix stream socket helpers shared with the router users.
Result<UniqueFd> ConnectUnixSocket(const std::string& path);
Result<UniqueFd> ListenUnixSocket(const std::string& path);

}  // namespace cella::sandbox
