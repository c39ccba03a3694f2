// A small client for QEMU's machine protocol (QMP): newline-delimited JSON
// over a Unix socket. Commands are sent with an "id" and the reply with that
// id is returned; asynchronous events met on the way are kept (bounded) and
// skipped. Every read is bounded by a deadline; a reply larger than
// kMaxQmpLine ends the session with an error.
//
// Not thread-safe: one owner (the machine) issues commands one at a time.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::vmm {

inline constexpr size_t kMaxQmpLine = 1u << 20;

class QmpClient {
 public:
  using Duration = std::chrono::milliseconds;

  // Reads the greeting and negotiates `qmp_capabilities` on a connected
  // stream socket.
  static Result<QmpClient> Handshake(UniqueFd fd, Duration timeout);
  // Connects to QEMU's QMP socket (retrying while it does not exist yet or
  // refuses, until timeout) and handshakes.
  static Result<QmpClient> Connect(const std::string& socket_path, Duration timeout);

  QmpClient(QmpClient&&) = default;
  QmpClient& operator=(QmpClient&&) = default;

  // Runs a command; returns its "return" value, or the QMP error
  // ("class: desc") as an Error.
  Result<nlohmann::json> Execute(std::string_view command,
                                 const nlohmann::json& arguments = nullptr,
                                 Duration timeout = std::chrono::seconds(10));

  // Hands QEMU a descriptor under `name` (`getfd`, the descriptor sent with
  // SCM_RIGHTS): "fd:NAME" migration URIs use it. QEMU holds its own copy.
  Status SendFd(std::string_view name, int fd, Duration timeout = std::chrono::seconds(10));

  // "running", "paused", "shutdown", ... (query-status .status)
  Result<std::string> QueryStatus();
  Status Stop();             // pause vCPUs
  Status Cont();             // resume
  Status SystemPowerdown();  // ACPI power button
  // Asks QEMU to exit. QEMU may close the socket before replying; that
  // counts as success.
  Status Quit();

  // Runs a migration that was started (migrate / migrate-incoming) until
  // query-migrate says "completed"; an error with QEMU's reason when it
  // says "failed" or "cancelled", ETIMEDOUT after timeout.
  Status AwaitMigration(Duration timeout);

  // Most recent events (oldest first), at most kMaxEvents.
  static constexpr size_t kMaxEvents = 64;
  const std::deque<nlohmann::json>& Events() const { return events_; }

 private:
  explicit QmpClient(UniqueFd fd) : fd_(std::move(fd)) {}
  Result<nlohmann::json> ReadMessage(std::chrono::steady_clock::time_point deadline);
  Status Send(const nlohmann::json& message, int fd = -1);
  Result<nlohmann::json> AwaitReply(std::string_view command, uint64_t id, Duration timeout);

  UniqueFd fd_;
  std::string buffer_;
  uint64_t next_id_ = 1;
  std::deque<nlohmann::json> events_;
};

}  // namespace cella::vmm
