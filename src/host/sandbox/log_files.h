// A sandbox's log files (the main process's output, the guest console) are
// fed by the guest, which may write without end: each is capped. A log is
// the live file PATH plus at most one older generation PATH.1; when the live
// file would pass the cap it becomes PATH.1 (replacing the older one), so at
// most twice the cap is on disk and at least the last `cap` bytes are kept.
//
// Readers see the two generations as one stream (PATH.1 then PATH) and never
// load a whole file: `logs --tail N` reads backwards from the end.
//
// The main process's output is kept as records (output.rec), one a line:
//   <unix nanoseconds> <S> <payload>\n
// S is O/E for a stdout/stderr line the process ended with a newline (the
// record's newline is that one) and o/e for a piece without one (the
// record's newline is not output: the next piece of that stream goes on the
// same line). The payload is the guest's bytes as they came, never a
// newline, so a record never needs escaping and `--tail N` counts records.
// Times are the host's, taken when the bytes reached the supervisor.
// Sandboxes made by older versions have output.log (raw bytes, stdout and
// stderr merged, no times): readers fall back to it.
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

// One record of output.rec.
struct LogRecord {
  int64_t unix_nanos = 0;
  bool is_stderr = false;
  bool line_end = false;  // the output had a newline here
  std::string_view payload;
};

// `bytes` of one stream as records stamped `unix_nanos`: each line a record,
// a trailing piece without a newline a partial one.
std::string EncodeLogRecords(int64_t unix_nanos, bool is_stderr, std::string_view bytes);

// Splits a stream of output.rec bytes, fed in blocks of any size, into
// records. A malformed line (a file edited by hand, a torn write at a crash)
// is passed on as a stdout line with time 0 rather than dropped. Lines
// longer than kMaxRecordBytes are passed on in pieces.
class LogRecordDecoder {
 public:
  static constexpr size_t kMaxRecordBytes = size_t{1} << 20;
  Status Feed(std::string_view bytes, const std::function<Status(const LogRecord&)>& sink);

 private:
  Status Emit(std::string_view line, bool complete,
              const std::function<Status(const LogRecord&)>& sink);
  std::string pending_;
};

// docker's `logs -t` form: RFC 3339 in UTC with nine fraction digits.
std::string FormatRfc3339Nano(int64_t unix_nanos);

// A time for `logs --since/--until`, as docker takes it: RFC 3339 (with a
// zone, or local time without one; a fraction of up to 9 digits), a date
// (YYYY-MM-DD, local midnight), Unix seconds with an optional fraction, or a
// Go duration before `now_nanos` (10m, 1h30m, 1.5s, 300ms). Unix nanoseconds.
Result<int64_t> ParseLogTime(std::string_view text, int64_t now_nanos);

// A Go duration ("1h30m", "1.5s", "300ms", "2us", "0"): nanoseconds. Units:
// ns us µs ms s m h; no sign.
Result<int64_t> ParseGoDuration(std::string_view text);

}  // namespace cella::sandbox
