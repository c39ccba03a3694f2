// Per-blob progress reports, so the CLI can draw bars on a TTY and print one
// summary line otherwise. Callbacks run on the pulling thread, synchronously,
// often (every received chunk): implementations should be cheap and throttle
// their own drawing.
#pragma once

#include <cstdint>
#include <string_view>

namespace cella::registry {

enum class BlobOutcome { kFetched, kAlreadyPresent };

class ProgressSink {
 public:
  virtual ~ProgressSink() = default;
  // resumed_from > 0 when a partial download is being continued.
  virtual void BlobStarted(std::string_view digest, int64_t total, int64_t resumed_from) = 0;
  virtual void BlobProgress(std::string_view digest, int64_t done, int64_t total) = 0;
  // kAlreadyPresent comes alone (no BlobStarted before it): nothing was fetched.
  virtual void BlobFinished(std::string_view digest, BlobOutcome outcome) = 0;
};

}  // namespace cella::registry
