// A sandbox's log files (the main process's output, the guest console) are
// fed by the guest, which may write without end: each is capped. A log is
// the live file PATH plus at most one older generation PATH.1; when the live
// file would pass the cap it becomes PATH.1 (replacing the older one), so at
// most twice the cap is on disk and at least the last `cap` bytes are kept.
//
// Readers see the two generations as one stream (PATH.1 then PATH) and never
// load a whole file: `logs --tail N` reads backwards from the end.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::sandbox {

// 64 MiB kept per log by default (`cella run --log-max-size`).
inline constexpr uint64_t kDefaultLogMaxBytes = uint64_t{64} << 20;
inline constexpr uint64_t kMinLogMaxBytes = uint64_t{4} << 10;

std::string OlderGeneration(const std::string& path);  // PATH.1

// The writer of a log the supervisor produces itself (output.log). Not
// thread-safe: one writer thread.
class CappedLogWriter {
 public:
  static Result<CappedLogWriter> Open(std::string path, uint64_t max_bytes);
  Status Write(std::span<const std::byte> bytes);

 private:
  CappedLogWriter(std::string path, uint64_t max_bytes, UniqueFd fd, uint64_t size)
      : path_(std::move(path)), max_bytes_(max_bytes), fd_(std::move(fd)), size_(size) {}
  Status Rotate();

  std::string path_;
  uint64_t max_bytes_;
  UniqueFd fd_;
  uint64_t size_;
};

// For a log another process appends to (QEMU's console chardev, opened with
// append=on): once PATH passes the cap, its newest `cap` bytes are copied to
// PATH.1 and PATH is truncated, so the writer's next append starts it again. A few
// bytes written between the copy and the truncation can be lost: acceptable
// for a console, and the price of not owning the writer. Returns whether it
// rotated.
Result<bool> TrimAppendedLog(const std::string& path, uint64_t max_bytes);

// Where reading PATH.1 + PATH must start to show only the last `lines`
// lines: {generation, offset}. Reads backwards in blocks; lines < 0 = all.
struct LogPosition {
  bool in_older = false;  // the offset is in PATH.1 (then all of PATH follows)
  off_t offset = 0;
};
Result<LogPosition> TailPosition(const std::string& path, int lines);

// Streams PATH.1 (from `from` if it starts there) and then PATH to `sink` in
// blocks. Returns the offset in PATH reached (for a follower to go on from).
Result<off_t> CopyLog(const std::string& path, LogPosition from,
                      const std::function<Status(std::string_view)>& sink);

}  // namespace cella::sandbox
