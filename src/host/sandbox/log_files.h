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
// newline, so a record never needs escaping. A record is at most
// kMaxRecordBytes without its newline: a longer piece (a guest's 1 MiB
// write) is stored as several, all but the last partial. Times are the
// host's, taken when the bytes reached the supervisor.
//
// An unbuffered writer's line can come in many pieces ("x", then "\n"), and
// the other stream's pieces can come between them: `logs` joins a stream's
// pieces into lines first (LogLineJoiner), as docker does, so that `--tail`,
// `-t`, `--since` and `--until` work on lines; a line's time is its first
// piece's.
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
#include "host/sandbox/layout.h"

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
// blocks, PATH up to `live_until` if that is not negative. Returns the
// offset in PATH reached (for a follower to go on from).
Result<off_t> CopyLog(const std::string& path, LogPosition from,
                      const std::function<Status(std::string_view)>& sink, off_t live_until = -1);

// The longest record of output.rec, without its newline.
inline constexpr size_t kMaxRecordBytes = size_t{1} << 20;

// Which file holds a sandbox's main process output: output.rec, or
// output.log (raw bytes, stdout and stderr merged, no times) when an older
// cella made the sandbox: no generation of output.rec and one of output.log.
// `logs` and `attach` both read what this names.
struct MainOutputLog {
  std::string path;
  bool records = true;  // false: output.log
};
MainOutputLog FindMainOutputLog(const SandboxPaths& paths);

// One record of output.rec.
struct LogRecord {
  int64_t unix_nanos = 0;
  bool is_stderr = false;
  bool line_end = false;  // the output had a newline here
  std::string_view payload;
};

// `bytes` of one stream as records stamped `unix_nanos`: each line a record,
// a trailing piece without a newline a partial one; a piece longer than a
// record holds is split into partial records.
std::string EncodeLogRecords(int64_t unix_nanos, bool is_stderr, std::string_view bytes);

// Splits a stream of output.rec bytes, fed in blocks of any size, into
// records. A malformed line (a file edited by hand, a torn write at a crash)
// is passed on as a stdout line with time 0 rather than dropped. Lines
// longer than kMaxRecordBytes are passed on in pieces.
class LogRecordDecoder {
 public:
  Status Feed(std::string_view bytes, const std::function<Status(const LogRecord&)>& sink);

 private:
  Status Emit(std::string_view line, bool complete,
              const std::function<Status(const LogRecord&)>& sink);
  std::string pending_;
};

// One line of the main process's output, its pieces joined.
struct LogLine {
  int64_t unix_nanos = 0;  // its first piece's time
  bool is_stderr = false;
  bool line_end = false;    // ended by a newline (false: cut at kMaxLineBytes, or unfinished)
  std::string_view text;    // without the newline
  uint64_t end_offset = 0;  // where its last record ends in the bytes fed so far
};
using LogLineSink = std::function<Status(const LogLine&)>;

// Joins the records of output.rec into lines, each stream on its own. A
// line is passed on when its newline comes (in the order the newlines
// came); a line longer than kMaxLineBytes is passed on in pieces of that
// size (the guest may write without end: what is held stays bounded).
class LogLineJoiner {
 public:
  static constexpr size_t kMaxLineBytes = size_t{4} << 20;
  Status Feed(std::string_view bytes, const LogLineSink& sink);
  // Passes on the unfinished lines (line_end false), the one whose last
  // piece came first first, and forgets them.
  Status Finish(const LogLineSink& sink);
  // Forgets an unfinished line of one stream (its rest then reads as a
  // line of its own).
  void Drop(bool is_stderr);

 private:
  struct Pending {
    std::string text;
    int64_t unix_nanos = 0;
    uint64_t end_offset = 0;
    bool open = false;
  };
  Status OnRecord(const LogRecord& record, const LogLineSink& sink);
  LogRecordDecoder decoder_;
  Pending pending_[2];
  uint64_t fed_ = 0;  // bytes fed so far
  uint64_t record_end_ = 0;
};

// Where reading output.rec (PATH.1 + PATH) must start for the joined lines
// to hold the last `lines` lines (lines < 0 = all): the lines are ordered by
// where their last piece is, and the other stream's pieces in between may
// belong to older lines, so the answer may hold more; CopyLogLines cuts it
// to exactly `lines`. Reads backwards, never the whole file.
Result<LogPosition> TailRecordPosition(const std::string& path, int lines);

// Passes the last `lines` lines of output.rec (< 0: all) to `sink`, in the
// order their newlines came, an unfinished line where its last piece is.
// With `keep_unfinished` the unfinished lines the tail takes stay in
// `joiner` (a follower goes on with them) and those it does not are
// dropped; otherwise they are passed on. Reads what it shows twice (first
// counting) and never holds more than a line a stream. Returns the offset
// in PATH reached (the follower goes on from there).
Result<off_t> CopyLogLines(const std::string& path, int lines, LogLineJoiner& joiner,
                           bool keep_unfinished, const LogLineSink& sink);

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
