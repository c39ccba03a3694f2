#include "host/net/http_session.h"

#include <vector>

#include "base/log.h"
#include "host/net/egress_decision.h"
#include "host/net/proxy_io.h"
#include "host/net/secrets.h"

namespace cella::net {
namespace {

// HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes it
// unless told otherwise.
bool WantsClose(std::string_view version, const std::vector<http::Header>& headers) {
  if (http::HeaderHasToken(headers, "connection", "close")) return true;
  return version == "HTTP/1.0" && !http::HeaderHasToken(headers, "connection", "keep-alive");
}

}  // namespace

// Reads one message head from `stream`, starting with the bytes in
// `pending`; what follows the head stays in `pending`. nullopt: the peer
// closed cleanly before a new message began.
Result<std::optional<std::string>> ReadHead(ByteStream& stream, std::string& pending,
                                            bool skip_leading_blank_lines) {
  std::vector<std::byte> buffer(kBufferBytes);
  for (;;) {
    if (skip_leading_blank_lines) {
      // RFC 9112 2.2: a server should ignore empty lines before a request.
      while (pending.starts_with("\r\n")) pending.erase(0, 2);
    }
    if (auto end = http::FindHeadEnd(pending)) {
      std::string head = pending.substr(0, *end);
      pending.erase(0, *end);
      return head;
    }
    if (pending.size() > http::kMaxHeadBytes) return Fail("http: head larger than 64 KiB");
    size_t n = CELLA_TRY(stream.Read(buffer));
    if (n == 0) {
      if (pending.empty()) return std::optional<std::string>();
      return Fail("http: connection closed inside a message head");
    }
    pending.append(AsText(std::span(buffer.data(), n)));
  }
}

// Passes one message body from `from` to `to`, following `framing`; bytes
// already read from `from` come first out of `pending`, and bytes read past
// the end of the body are left there.
Status CopyBody(ByteStream& from, std::string& pending, ByteStream& to, http::BodyFraming framing,
                uint64_t* copied) {
  uint64_t ignored = 0;
  uint64_t& total = copied != nullptr ? *copied : ignored;
  std::vector<std::byte> buffer(kBufferBytes);
  switch (framing.kind) {
    case http::BodyKind::kNone:
      return {};
    case http::BodyKind::kLength: {
      uint64_t remaining = framing.length;
      size_t from_pending = static_cast<size_t>(std::min<uint64_t>(remaining, pending.size()));
      if (from_pending > 0) {
        CELLA_TRY(to.Write(std::string_view(pending).substr(0, from_pending)));
        total += from_pending;
        pending.erase(0, from_pending);
        remaining -= from_pending;
      }
      while (remaining > 0) {
        size_t want = static_cast<size_t>(std::min<uint64_t>(remaining, buffer.size()));
        size_t n = CELLA_TRY(from.Read(std::span(buffer.data(), want)));
        if (n == 0) return Fail("http: peer closed before the end of the body");
        CELLA_TRY(to.Write(std::span<const std::byte>(buffer.data(), n)));
        total += n;
        remaining -= n;
      }
      return {};
    }
    case http::BodyKind::kChunked: {
      http::ChunkedTracker tracker;
      if (!pending.empty()) {
        size_t used = CELLA_TRY(tracker.Feed(pending));
        CELLA_TRY(to.Write(std::string_view(pending).substr(0, used)));
        total += used;
        pending.erase(0, used);
      }
      while (!tracker.Done()) {
        size_t n = CELLA_TRY(from.Read(buffer));
        if (n == 0) return Fail("http: peer closed inside a chunked body");
        std::string_view got = AsText(std::span(buffer.data(), n));
        size_t used = CELLA_TRY(tracker.Feed(got));
        CELLA_TRY(to.Write(got.substr(0, used)));
        total += used;
        pending.append(got.substr(used));
      }
      return {};
    }
    case http::BodyKind::kUntilClose: {
      if (!pending.empty()) {
        CELLA_TRY(to.Write(pending));
        total += pending.size();
        pending.clear();
      }
      for (;;) {
        size_t n = CELLA_TRY(from.Read(buffer));
        if (n == 0) return {};
        CELLA_TRY(to.Write(std::span<const std::byte>(buffer.data(), n)));
        total += n;
      }
    }
  }
  return {};
}

void HttpSession::Run() {
  while (HandleOneRequest()) {
  }
  // Lets the response thread finish: after the answers still owed (guest
  // sent its last request), or at once when the streams were aborted.
  Push(Item{ItemKind::kEnd, "", false, false, "", "", {}, nullptr});
  if (response_thread_.joinable()) {
    response_thread_.join();
  } else {
    // Nothing was ever sent upstream; anything queued is a local answer.
    std::lock_guard lock(mutex_);
    for (const Item& item : queue_) {
      if (item.kind == ItemKind::kLocalResponse) {
        if (guest_.Write(item.local_response)) (void)guest_.ShutdownWrite();
      }
    }
  }
  guest_.Abort();
  if (upstream_) upstream_->Abort();
}

void HttpSession::Push(Item item) {
  std::lock_guard lock(mutex_);
  queue_.push_back(std::move(item));
  changed_.notify_all();
}

void HttpSession::AbortBoth() {
  guest_.Abort();
  if (upstream_) upstream_->Abort();
}

void HttpSession::SetUpgrade(UpgradeState state) {
  std::lock_guard lock(mutex_);
  if (upgrade_ == UpgradeState::kPending) upgrade_ = state;
  changed_.notify_all();
}

void HttpSession::Refuse(int status, std::string_view reason_phrase, std::string_view why) {
  Item item;
  item.kind = ItemKind::kLocalResponse;
  item.local_response = http::PlainResponse(status, reason_phrase, BlockedBody(why));
  Push(std::move(item));
}

bool HttpSession::HandleOneRequest() {
  auto raw_head = ReadHead(guest_, guest_pending_, /*skip_leading_blank_lines=*/true);
  if (!raw_head) {
    log::Info("egress proxy: bad request from guest", {{"error", raw_head.error().message}});
    bool too_large = guest_pending_.size() > http::kMaxHeadBytes;
    Refuse(too_large ? 431 : 400, too_large ? "Request Header Fields Too Large" : "Bad Request",
           raw_head.error().message);
    return false;
  }
  if (!*raw_head) return false;
  auto head = http::ParseRequestHead(**raw_head);
  if (!head) {
    log::Info("egress proxy: bad request from guest", {{"error", head.error().message}});
    Refuse(400, "Bad Request", head.error().message);
    return false;
  }
  auto host_port = http::RequestHost(*head);
  if (!host_port) {
    Refuse(400, "Bad Request", host_port.error().message);
    return false;
  }
  const auto start = std::chrono::steady_clock::now();
  // Before DecideHttpRequest substitutes secrets into the head.
  const std::string method = head->method;
  const std::string target = head->target;
  const uint16_t port = host_port->port;
  auto url_for = [&](const std::string& host) {
    if (target.empty() || target[0] != '/') return target;  // absolute form (or '*')
    return protocol_ + "://" + host + (port != 0 ? ":" + std::to_string(port) : "") + target;
  };
  Verdict verdict = DecideHttpRequest(*options_.policy, destination_decision_,
                                      {host_port->host, required_host_, upstream_by_name_}, *head);
  if (!verdict) {
    LogBlocked(verdict.host, verdict.reason, destination_, protocol_);
    EgressEvent event;
    event.method = method;
    event.url = url_for(verdict.host);
    event.host = verdict.host;
    event.protocol = protocol_;
    event.status_code = 403;
    event.request_bytes = raw_head->value().size();
    event.blocked = true;
    event.block_reason = verdict.reason;
    Emit(std::move(event));
    Refuse(403, "Forbidden", verdict.reason);
    return false;
  }
  const std::string& host = verdict.host;
  auto framing = http::RequestFraming(*head);
  if (!framing) {
    Refuse(400, "Bad Request", framing.error().message);
    return false;
  }
  required_host_ = host;

  bool upgrade = http::HeaderHasToken(head->headers, "upgrade", "websocket") &&
                 http::HeaderHasToken(head->headers, "connection", "upgrade");
  if (!upgrade && http::FindHeader(head->headers, "upgrade") != nullptr) {
    // Only WebSocket may leave HTTP/1.1 (h2c would carry requests this
    // proxy cannot see): the origin is asked without the upgrade.
    http::RemoveHeaders(head->headers, "upgrade");
    http::RemoveHeaders(head->headers, "http2-settings");
  }

  if (!upstream_) {
    auto connected = connect_();
    if (!connected) {
      log::Warn("egress proxy: upstream connection failed",
                {{"host", host}, {"error", connected.error().message}});
      Refuse(502, "Bad Gateway", "could not connect to " + host);
      return false;
    }
    upstream_ = std::move(*connected);
    response_thread_ = std::thread([this] { ResponseLoop(); });
  }
  log::Debug("egress allowed", {{"host", host}, {"method", head->method}, {"proto", protocol_}});
  std::string serialized = http::SerializeRequestHead(*head);
  auto request_bytes = std::make_shared<std::atomic<uint64_t>>(serialized.size());
  Push(Item{ItemKind::kRequest, head->method, upgrade, WantsClose(head->version, head->headers), "",
            url_for(host), start, request_bytes});
  if (auto sent = upstream_->Write(serialized); !sent) {
    AbortBoth();
    return false;
  }
  uint64_t body_bytes = 0;
  auto body = CopyBody(guest_, guest_pending_, *upstream_, *framing, &body_bytes);
  *request_bytes += body_bytes;
  if (!body) {
    log::Info("egress proxy: request body failed",
              {{"host", host}, {"error", body.error().message}});
    AbortBoth();
    return false;
  }
  if (!upgrade) return true;

  UpgradeState state;
  {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return upgrade_ != UpgradeState::kPending; });
    state = upgrade_;
    if (state == UpgradeState::kRejected) upgrade_ = UpgradeState::kPending;
  }
  if (state == UpgradeState::kRejected) return true;
  if (state == UpgradeState::kAccepted) {
    if (!guest_pending_.empty()) {
      if (!upstream_->Write(guest_pending_)) {
        AbortBoth();
        return false;
      }
      guest_pending_.clear();
    }
    if (!Pump(guest_, *upstream_)) AbortBoth();
  }
  return false;
}

void HttpSession::ResponseLoop() {
  for (;;) {
    Item item;
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return !queue_.empty(); });
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    if (item.kind == ItemKind::kEnd) {
      (void)guest_.ShutdownWrite();
      return;
    }
    if (item.kind == ItemKind::kLocalResponse) {
      if (guest_.Write(item.local_response)) (void)guest_.ShutdownWrite();
      AbortBoth();
      return;
    }
    if (!ForwardOneResponse(item)) {
      SetUpgrade(UpgradeState::kGone);
      AbortBoth();
      return;
    }
  }
}

void HttpSession::EmitAnswered(const Item& request, int status, uint64_t response_bytes) {
  if (!options_.on_event) return;
  auto elapsed = std::chrono::steady_clock::now() - request.start;
  EgressEvent event;
  event.method = request.method;
  event.url = request.url;
  event.host = required_host_.value_or("");
  event.protocol = protocol_;
  event.status_code = status;
  event.request_bytes = request.request_bytes ? request.request_bytes->load() : 0;
  event.response_bytes = response_bytes;
  event.duration_ms = std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count();
  Emit(std::move(event));
}

bool HttpSession::ForwardOneResponse(const Item& request) {
  for (;;) {
    auto raw_head = ReadHead(*upstream_, upstream_pending_, /*skip_leading_blank_lines=*/false);
    if (!raw_head || !*raw_head) {
      log::Info("egress proxy: upstream ended without a response",
                {{"host", required_host_.value_or("")},
                 {"error", raw_head ? "connection closed" : raw_head.error().message}});
      return false;
    }
    auto head = http::ParseResponseHead(**raw_head);
    if (!head) {
      log::Warn("egress proxy: malformed response from upstream",
                {{"host", required_host_.value_or("")}, {"error", head.error().message}});
      return false;
    }
    if (head->status == 101) {
      if (!request.upgrade) return false;  // a switch nobody asked for
      if (!guest_.Write(**raw_head)) return false;
      if (!upstream_pending_.empty() && !guest_.Write(upstream_pending_)) return false;
      upstream_pending_.clear();
      SetUpgrade(UpgradeState::kAccepted);
      EmitAnswered(request, 101, raw_head->value().size());
      if (!Pump(*upstream_, guest_)) return false;
      // The other direction ends the conversation when it sees EOF.
      return true;
    }
    if (head->status < 200) {
      if (!guest_.Write(**raw_head)) return false;
      continue;
    }
    auto framing = http::ResponseFraming(*head, request.method);
    if (!framing) {
      log::Warn("egress proxy: malformed response from upstream",
                {{"host", required_host_.value_or("")}, {"error", framing.error().message}});
      return false;
    }
    if (!guest_.Write(**raw_head)) return false;
    uint64_t response_bytes = raw_head->value().size();
    auto body = CopyBody(*upstream_, upstream_pending_, guest_, *framing, &response_bytes);
    EmitAnswered(request, head->status, response_bytes);
    if (!body) {
      log::Info("egress proxy: response body failed",
                {{"host", required_host_.value_or("")}, {"error", body.error().message}});
      return false;
    }
    if (request.upgrade) SetUpgrade(UpgradeState::kRejected);
    if (framing->kind == http::BodyKind::kUntilClose || request.close_after ||
        WantsClose(head->version, head->headers)) {
      // The body ended with the upstream connection, or either side said
      // this was the last exchange: the guest sees the close too.
      (void)guest_.ShutdownWrite();
      return false;
    }
    return true;
  }
}

}  // namespace cella::net
