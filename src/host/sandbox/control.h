// The supervisor's control socket: one JSON request line per connection,
// one JSON reply line. Requests: {"op":"status"}, {"op":"stop","grace_ms":N},
// {"op":"kill"}. A reply is {"ok":true,...} or {"ok":false,"error":"..."}.
// Requests and replies are capped at 64 KiB.
//
// Threading: the server runs one accept thread and handles one connection
// at a time (requests are rare and short; stop blocks until done). The
// handler runs on that thread. Call Stop (or destroy) before whatever the
// handler touches goes away.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::sandbox {

using ControlHandler = std::function<nlohmann::json(const nlohmann::json& request)>;

class ControlServer {
 public:
  // Binds `path` (mode 0600; a stale socket file is replaced) and starts serving.
  static Result<std::unique_ptr<ControlServer>> Start(const std::string& path,
                                                      ControlHandler handler);
  ~ControlServer();
  void Stop();

 private:
  ControlServer() = default;
  void Loop();
  std::string path_;
  ControlHandler handler_;
  UniqueFd listen_fd_;
  UniqueFd wake_fd_;  // eventfd: Stop wakes the loop
  std::thread thread_;
  std::atomic<bool> stopping_{false};
};

// Sends one request and waits up to `timeout` for the reply. A reply with
// ok=false becomes an error carrying its message.
Result<nlohmann::json> ControlCall(const std::string& path, const nlohmann::json& request,
                                   std::chrono::milliseconds timeout);

// Unix stream socket helpers shared with the router users.
Result<UniqueFd> ConnectUnixSocket(const std::string& path);
Result<UniqueFd> ListenUnixSocket(const std::string& path);

}  // namespace cella::sandbox
