// One HTTP/1.x conversation through the egress proxy (plain HTTP, or the
// HTTP inside intercepted TLS): each request is judged (egress_decision.h),
// its secrets substituted (secrets.h), its body and the responses streamed
// with their framing tracked, WebSocket upgrades spliced. Internal to
// src/host/net: the proxy's connection handler runs one per HTTP flow.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "base/byte_stream.h"
#include "base/result.h"
#include "host/net/http.h"
#include "host/net/policy.h"
#include "host/net/proxy.h"

namespace cella::net {

// Reads one message head from `stream`, starting with the bytes in
// `pending`; what follows the head stays in `pending`. nullopt: the peer
// closed cleanly before a new message began.
Result<std::optional<std::string>> ReadHead(ByteStream& stream, std::string& pending,
                                            bool skip_leading_blank_lines);
// Passes one message body from `from` to `to`, following `framing`; bytes
// already read from `from` come first out of `pending`, and bytes read past
// the end of the body are left there.
// `copied` (when given) grows by the body bytes passed.
Status CopyBody(ByteStream& from, std::string& pending, ByteStream& to, http::BodyFraming framing,
                uint64_t* copied = nullptr);

// One HTTP/1.x conversation between the guest and one upstream: requests
// are handled on the calling thread, responses on a second thread.
class HttpSession {
 public:
  using Connector = std::function<Result<std::unique_ptr<ByteStream>>()>;
  HttpSession(const ProxyOptions& options, ByteStream& guest, std::string pending,
              Endpoint destination, Decision destination_decision,
              std::optional<std::string> required_host, Connector connect, std::string protocol)
      : options_(options),
        guest_(guest),
        guest_pending_(std::move(pending)),
        destination_(destination),
        destination_decision_(std::move(destination_decision)),
        required_host_(std::move(required_host)),
        upstream_by_name_(required_host_.has_value()),
        connect_(std::move(connect)),
        protocol_(std::move(protocol)) {}

  void Run();

 private:
  enum class ItemKind { kRequest, kLocalResponse, kEnd };
  struct Item {
    ItemKind kind = ItemKind::kRequest;
    std::string method;
    bool upgrade = false;
    bool close_after = false;  // the guest asked to close after this response
    std::string local_response;
    // For the request's EgressEvent (kRequest only).
    std::string url;
    std::chrono::steady_clock::time_point start{};
    std::shared_ptr<std::atomic<uint64_t>> request_bytes;
  };
  enum class UpgradeState { kPending, kAccepted, kRejected, kGone };

  // Returns false when the conversation is over.
  bool HandleOneRequest();
  void Refuse(int status, std::string_view reason_phrase, std::string_view why);
  void Push(Item item);
  void ResponseLoop();
  bool ForwardOneResponse(const Item& request);
  // The event of a request the upstream answered.
  void EmitAnswered(const Item& request, int status, uint64_t response_bytes);
  void Emit(EgressEvent event) const {
    if (options_.on_event) options_.on_event(std::move(event));
  }
  void AbortBoth();
  void SetUpgrade(UpgradeState state);

  const ProxyOptions& options_;
  ByteStream& guest_;
  std::string guest_pending_;
  const Endpoint destination_;
  const Decision destination_decision_;
  std::optional<std::string> required_host_;  // normalized; set by the first request if empty
  const bool upstream_by_name_;  // the upstream was chosen by name, not by the guest's address
  Connector connect_;
  const std::string protocol_;
  std::unique_ptr<ByteStream> upstream_;
  std::string upstream_pending_;  // response thread only
  std::thread response_thread_;

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Item> queue_;                         // guarded by mutex_
  UpgradeState upgrade_ = UpgradeState::kPending;  // guarded by mutex_
};

}  // namespace cella::net
