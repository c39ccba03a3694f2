// The supervisor's recent sandbox events (the egress proxy's decisions,
// as JSON objects in matchlock's Event shape), for the `cella rpc` process
// that drives the sandbox to pick up: a bounded ring, so a slow reader (or
// none) never blocks the proxy and never makes the supervisor allocate
// without bound; when the ring is full the oldest event is dropped and
// counted. Readers poll by sequence number over the control socket
// ({"op":"events"}, see supervisor.cc), waiting a bounded time for news.
//
// Thread-safe: Push from the proxy's connection threads, Read from control
// handler threads.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "host/net/proxy.h"

namespace cella::sandbox {

class EventRing {
 public:
  static constexpr size_t kDefaultCapacity = 512;
  // One read's reply must stay under the control socket's 64 KiB cap.
  static constexpr size_t kMaxBatchBytes = 48 * 1024;

  explicit EventRing(size_t capacity = kDefaultCapacity) : capacity_(capacity) {}

  // Appends; drops the oldest when full. Never waits on a reader.
  void Push(nlohmann::json event);

  struct Batch {
    uint64_t next = 0;     // the sequence number to ask for next
    uint64_t dropped = 0;  // events between `from` and the first returned that are gone
    std::vector<nlohmann::json> events;
  };
  // Events numbered `from` and later (at most kMaxBatchBytes of JSON, at
  // least one), waiting up to `wait` for one when there is none yet. A
  // `from` past the end (e.g. UINT64_MAX) means "from now on": no events,
  // `next` is where new ones will start.
  Batch Read(uint64_t from, std::chrono::milliseconds wait);
  // Wakes every waiting reader; later reads do not wait.
  void Close();

  uint64_t total_dropped() const;

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<nlohmann::json> events_;  // guarded by mu_; numbered first_ .. first_+size-1
  uint64_t first_ = 0;                 // guarded by mu_
  uint64_t dropped_ = 0;               // guarded by mu_
  bool closed_ = false;                // guarded by mu_
};

// matchlock's Event for an egress decision: {type:"network", timestamp
// (Unix nanoseconds), network:{method,url,host,status_code,request_bytes,
// response_bytes,duration_ms,blocked,block_reason}}; cella adds `protocol`.
nlohmann::json NetworkEventJson(const net::EgressEvent& event);

}  // namespace cella::sandbox
