#include "host/sandbox/event_ring.h"

#include <algorithm>
#include <limits>
#include <string>
#include <string_view>

namespace cella::sandbox {

void EventRing::Push(nlohmann::json event) {
  {
    std::lock_guard lock(mu_);
    if (events_.size() >= capacity_) {
      events_.pop_front();
      ++first_;
      ++dropped_;
    }
    events_.push_back(std::move(event));
  }
  cv_.notify_all();
}

EventRing::Batch EventRing::Read(uint64_t from, std::chrono::milliseconds wait) {
  std::unique_lock lock(mu_);
  auto end = [&] { return first_ + events_.size(); };
  Batch batch;
  if (from > end()) {  // "from now on"
    batch.next = end();
    return batch;
  }
  if (!closed_ && from == end()) cv_.wait_for(lock, wait, [&] { return closed_ || from < end(); });
  if (from < first_) {
    batch.dropped = first_ - from;
    from = first_;
  }
  size_t bytes = 0;
  for (uint64_t seq = from; seq < end(); ++seq) {
    const nlohmann::json& event = events_[static_cast<size_t>(seq - first_)];
    size_t size = event.dump().size();
    if (!batch.events.empty() && bytes + size > kMaxBatchBytes) break;
    bytes += size;
    batch.events.push_back(event);
  }
  batch.next = from + batch.events.size();
  return batch;
}

void EventRing::Close() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

uint64_t EventRing::total_dropped() const {
  std::lock_guard lock(mu_);
  return dropped_;
}

namespace {

// The guest's text (a URL, a method, a Host header) as printable ASCII, cut
// to `max` bytes: JSON strings must be valid UTF-8 (nlohmann's dump throws
// otherwise), and one event must stay small.
std::string Printable(std::string_view text, size_t max) {
  std::string out(text.substr(0, max));
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
  return out;
}

}  // namespace

nlohmann::json NetworkEventJson(const net::EgressEvent& e) {
  nlohmann::json network = {
      {"method", Printable(e.method, 32)},
      {"url", Printable(e.url, 2048)},
      {"host", Printable(e.host, 255)},
      {"status_code", e.status_code},
      {"request_bytes", e.request_bytes},
      {"response_bytes", e.response_bytes},
      {"duration_ms", e.duration_ms},
      {"blocked", e.blocked},
      {"protocol", e.protocol},
  };
  if (!e.block_reason.empty()) network["block_reason"] = Printable(e.block_reason, 512);
  auto now = std::chrono::system_clock::now().time_since_epoch();
  return {{"type", "network"},
          {"timestamp", std::chrono::duration_cast<std::chrono::nanoseconds>(now).count()},
          {"network", std::move(network)}};
}

}  // namespace cella::sandbox
