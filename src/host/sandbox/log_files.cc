#include "host/sandbox/log_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <ctime>
#include <limits>
#include <optional>
#include <vector>

#include "base/io.h"

namespace cella::sandbox {
namespace {

constexpr size_t kBlock = 64 * 1024;

Result<UniqueFd> OpenForAppend(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!fd) return FailErrno("open " + path);
  return fd;
}

// Size of the file at `path`; 0 when it does not exist.
Result<off_t> SizeOrZero(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return off_t{0};
    return FailErrno("stat " + path);
  }
  return st.st_size;
}

Status PreadFully(int fd, std::span<char> buf, off_t at, const std::string& path) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pread(fd, buf.data() + done, buf.size() - done, at + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("read " + path);
    if (n == 0) return Fail("read " + path + ": the file shrank while being read");
    done += static_cast<size_t>(n);
  }
  return {};
}

// Scans `path` backwards from `end`, counting newlines; stops at the one
// that completes `wanted` and returns the offset just after it.
struct BackwardScan {
  int seen = 0;
  std::optional<off_t> found;
};
Status ScanBackwards(const std::string& path, off_t end, int wanted, bool skip_last_byte,
                     BackwardScan& scan) {
  if (end <= 0) return {};
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  std::vector<char> buf(kBlock);
  off_t pos = skip_last_byte ? end - 1 : end;
  while (pos > 0) {
    off_t start = std::max<off_t>(0, pos - static_cast<off_t>(kBlock));
    auto chunk = std::span(buf).first(static_cast<size_t>(pos - start));
    CELLA_TRY(PreadFully(fd.Get(), chunk, start, path));
    for (size_t i = chunk.size(); i > 0; --i) {
      if (chunk[i - 1] == '\n' && ++scan.seen == wanted) {
        scan.found = start + static_cast<off_t>(i);
        return {};
      }
    }
    pos = start;
  }
  return {};
}

// Copies path's bytes from `from` to `until` (-1: to the end as it grows).
Status CopyRange(const std::string& path, off_t from,
                 const std::function<Status(std::string_view)>& sink, off_t* reached,
                 off_t until = -1) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return {};
    return FailErrno("open " + path);
  }
  if (::lseek(fd.Get(), from, SEEK_SET) < 0) return FailErrno("seek " + path);
  off_t at = from;
  std::vector<char> buf(kBlock);
  for (;;) {
    size_t want = buf.size();
    if (until >= 0) {
      if (at >= until) break;
      want = std::min(want, static_cast<size_t>(until - at));
    }
    size_t got = CELLA_TRY(ReadSome(fd.Get(), std::as_writable_bytes(std::span(buf).first(want))));
    if (got == 0) break;
    CELLA_TRY(sink(std::string_view(buf.data(), got)));
    at += static_cast<off_t>(got);
  }
  if (reached != nullptr) *reached = at;
  return {};
}

}  // namespace

std::string OlderGeneration(const std::string& path) { return path + ".1"; }

MainOutputLog FindMainOutputLog(const SandboxPaths& paths) {
  auto exists = [](const std::string& path) { return ::access(path.c_str(), F_OK) == 0; };
  auto either = [&](const std::string& path) {
    return exists(path) || exists(OlderGeneration(path));
  };
  if (!either(paths.output_log) && either(paths.legacy_output_log))
    return {paths.legacy_output_log, false};
  return {paths.output_log, true};
}

Result<CappedLogWriter> CappedLogWriter::Open(std::string path, uint64_t max_bytes) {
  UniqueFd fd = CELLA_TRY(OpenForAppend(path));
  struct stat st {};
  if (::fstat(fd.Get(), &st) != 0) return FailErrno("stat " + path);
  return CappedLogWriter(std::move(path), std::max(max_bytes, kMinLogMaxBytes), std::move(fd),
                         static_cast<uint64_t>(st.st_size));
}

Status CappedLogWriter::Rotate() {
  if (::rename(path_.c_str(), OlderGeneration(path_).c_str()) != 0)
    return FailErrno("rename " + path_ + " to " + OlderGeneration(path_));
  fd_ = CELLA_TRY(OpenForAppend(path_));
  size_ = 0;
  return {};
}

Status CappedLogWriter::Write(std::span<const std::byte> bytes) {
  if (size_ > 0 && size_ + bytes.size() > max_bytes_) CELLA_TRY(Rotate());
  CELLA_TRY(WriteAll(fd_.Get(), bytes));
  size_ += bytes.size();
  return {};
}

Result<bool> TrimAppendedLog(const std::string& path, uint64_t max_bytes) {
  off_t size = CELLA_TRY(SizeOrZero(path));
  const uint64_t cap = std::max(max_bytes, kMinLogMaxBytes);
  if (static_cast<uint64_t>(size) <= cap) return false;
  // Only the newest `cap` bytes as measured now: a writer racing ahead
  // cannot make this copy (or PATH.1) grow past the cap.
  const off_t keep_from = size - static_cast<off_t>(cap);
  std::string older = OlderGeneration(path);
  std::string temp = older + ".tmp";
  {
    UniqueFd out(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!out) return FailErrno("open " + temp);
    auto copied = CopyRange(
        path, keep_from, [&](std::string_view block) { return WriteAll(out.Get(), block); },
        nullptr, size);
    if (!copied) {
      ::unlink(temp.c_str());
      return std::unexpected(copied.error());
    }
  }
  if (::rename(temp.c_str(), older.c_str()) != 0) return FailErrno("rename " + temp);
  if (::truncate(path.c_str(), 0) != 0) return FailErrno("truncate " + path);
  return true;
}

Result<LogPosition> TailPosition(const std::string& path, int lines) {
  std::string older = OlderGeneration(path);
  off_t live_size = CELLA_TRY(SizeOrZero(path));
  off_t older_size = CELLA_TRY(SizeOrZero(older));
  if (lines < 0) return older_size > 0 ? LogPosition{true, 0} : LogPosition{false, 0};
  if (lines == 0) return LogPosition{false, live_size};
  // A final newline ends the last line; it does not start an empty one.
  BackwardScan scan;
  CELLA_TRY(ScanBackwards(path, live_size, lines, live_size > 0, scan));
  if (scan.found) return LogPosition{false, *scan.found};
  CELLA_TRY(ScanBackwards(older, older_size, lines, live_size == 0 && older_size > 0, scan));
  if (scan.found) return LogPosition{true, *scan.found};
  return older_size > 0 ? LogPosition{true, 0} : LogPosition{false, 0};
}

Result<off_t> CopyLog(const std::string& path, LogPosition from,
                      const std::function<Status(std::string_view)>& sink, off_t live_until) {
  off_t live_from = from.offset;
  if (from.in_older) {
    CELLA_TRY(CopyRange(OlderGeneration(path), from.offset, sink, nullptr));
    live_from = 0;
  }
  off_t reached = live_from;
  CELLA_TRY(CopyRange(path, live_from, sink, &reached, live_until));
  return reached;
}

namespace {

void AppendRecord(std::string& out, int64_t unix_nanos, char stream, std::string_view payload) {
  out += std::to_string(unix_nanos);
  out += ' ';
  out += stream;
  out += ' ';
  out.append(payload);
  out += '\n';
}

// Digits only, at least one; false on overflow.
bool ParseDigits(std::string_view text, int64_t& value);

// "<digits> <S> <payload>": false when `line` is not a record.
struct RecordHeader {
  int64_t unix_nanos = 0;
  char stream = 'O';
  size_t payload_at = 0;
};
bool ParseRecordHeader(std::string_view line, RecordHeader& header) {
  size_t space = line.find(' ');
  if (space == std::string_view::npos || line.size() < space + 3 || line[space + 2] != ' ' ||
      std::string_view("OoEe").find(line[space + 1]) == std::string_view::npos ||
      !ParseDigits(line.substr(0, space), header.unix_nanos))
    return false;
  header.stream = line[space + 1];
  header.payload_at = space + 3;
  return true;
}

// Digits only, at least one; false on overflow.
bool ParseDigits(std::string_view text, int64_t& value) {
  if (text.empty()) return false;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  return ec == std::errc() && end == text.data() + text.size() && value >= 0;
}

// ".123" → nanoseconds (at most 9 digits; more are cut, as Go does).
bool ParseFraction(std::string_view digits, int64_t& nanos) {
  if (digits.empty()) return false;
  nanos = 0;
  int64_t scale = 100000000;
  for (char c : digits) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
    nanos += (c - '0') * scale;
    scale /= 10;
  }
  return true;
}

constexpr int64_t kNanosPerSecond = 1000000000;

}  // namespace

std::string EncodeLogRecords(int64_t unix_nanos, bool is_stderr, std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() + 32);
  // "<digits> <S> ": what a record holds besides its payload.
  const size_t max_payload = kMaxRecordBytes - (std::to_string(unix_nanos).size() + 3);
  while (!bytes.empty()) {
    size_t nl = bytes.find('\n');
    std::string_view line = bytes.substr(0, nl);
    // A piece longer than a record holds: its head as a partial record.
    while (line.size() > max_payload) {
      AppendRecord(out, unix_nanos, is_stderr ? 'e' : 'o', line.substr(0, max_payload));
      line.remove_prefix(max_payload);
      bytes.remove_prefix(max_payload);
    }
    if (nl == std::string_view::npos) {
      if (!line.empty()) AppendRecord(out, unix_nanos, is_stderr ? 'e' : 'o', line);
      break;
    }
    AppendRecord(out, unix_nanos, is_stderr ? 'E' : 'O', line);
    bytes.remove_prefix(line.size() + 1);
  }
  return out;
}

Status LogRecordDecoder::Emit(std::string_view line, bool complete,
                              const std::function<Status(const LogRecord&)>& sink) {
  LogRecord record;
  RecordHeader header;
  if (complete && ParseRecordHeader(line, header)) {
    char s = header.stream;
    record.unix_nanos = header.unix_nanos;
    record.is_stderr = s == 'E' || s == 'e';
    record.line_end = s == 'O' || s == 'E';
    record.payload = line.substr(header.payload_at);
    return sink(record);
  }
  record.line_end = complete;
  record.payload = line;
  return sink(record);
}

Status LogRecordDecoder::Feed(std::string_view bytes,
                              const std::function<Status(const LogRecord&)>& sink) {
  while (!bytes.empty()) {
    size_t nl = bytes.find('\n');
    if (nl == std::string_view::npos) {
      pending_.append(bytes);
      // A record of exactly the longest size is still awaiting its newline.
      if (pending_.size() > kMaxRecordBytes) {
        CELLA_TRY(Emit(pending_, false, sink));
        pending_.clear();
      }
      return {};
    }
    if (pending_.empty()) {
      CELLA_TRY(Emit(bytes.substr(0, nl), true, sink));
    } else {
      pending_.append(bytes.substr(0, nl));
      CELLA_TRY(Emit(pending_, true, sink));
      pending_.clear();
    }
    bytes.remove_prefix(nl + 1);
  }
  return {};
}

Status LogLineJoiner::OnRecord(const LogRecord& record, const LogLineSink& sink) {
  Pending& p = pending_[record.is_stderr ? 1 : 0];
  if (!p.open) {
    p.open = true;
    p.unix_nanos = record.unix_nanos;
    p.text.clear();
  }
  p.text.append(record.payload);
  p.end_offset = record_end_;
  if (!record.line_end && p.text.size() < kMaxLineBytes) return {};
  LogLine line{p.unix_nanos, record.is_stderr, record.line_end, p.text, p.end_offset};
  p.open = false;
  Status sent = sink(line);
  p.text.clear();
  return sent;
}

Status LogLineJoiner::Feed(std::string_view bytes, const LogLineSink& sink) {
  // A record at a time, so that each knows where it ends.
  auto on_record = [&](const LogRecord& record) { return OnRecord(record, sink); };
  while (!bytes.empty()) {
    size_t nl = bytes.find('\n');
    size_t n = nl == std::string_view::npos ? bytes.size() : nl + 1;
    record_end_ = fed_ + n;
    CELLA_TRY(decoder_.Feed(bytes.substr(0, n), on_record));
    fed_ += n;
    bytes.remove_prefix(n);
  }
  return {};
}

Status LogLineJoiner::Finish(const LogLineSink& sink) {
  int first =
      pending_[0].open && pending_[1].open && pending_[1].end_offset < pending_[0].end_offset ? 1
                                                                                              : 0;
  for (int i : {first, 1 - first}) {
    Pending& p = pending_[i];
    if (!p.open) continue;
    p.open = false;
    CELLA_TRY(sink(LogLine{p.unix_nanos, i == 1, false, p.text, p.end_offset}));
    p.text.clear();
  }
  return {};
}

void LogLineJoiner::Drop(bool is_stderr) {
  Pending& p = pending_[is_stderr ? 1 : 0];
  p.open = false;
  p.text.clear();
}

namespace {

// Calls visit(fd, start, end) for each newline-ended record of `path` before
// `end`, the last first, until it returns true; bytes after the last newline
// (a torn write) are no record. Returns whether visit stopped it.
Result<bool> VisitRecordsBackwards(
    const std::string& path, off_t end,
    const std::function<Result<bool>(int fd, off_t start, off_t end)>& visit) {
  if (end <= 0) return false;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return false;
    return FailErrno("open " + path);
  }
  std::vector<char> buf(kBlock);
  off_t pos = end;
  off_t record_end = -1;  // after the newline of the record being looked for
  while (pos > 0) {
    off_t start = std::max<off_t>(0, pos - static_cast<off_t>(kBlock));
    auto chunk = std::span(buf).first(static_cast<size_t>(pos - start));
    CELLA_TRY(PreadFully(fd.Get(), chunk, start, path));
    for (size_t i = chunk.size(); i > 0; --i) {
      if (chunk[i - 1] != '\n') continue;
      off_t after = start + static_cast<off_t>(i);
      if (record_end >= 0 && CELLA_TRY(visit(fd.Get(), after, record_end))) return true;
      record_end = after;
    }
    pos = start;
  }
  if (record_end > 0) return visit(fd.Get(), 0, record_end);
  return false;
}

// The stream letter of the record at `start` ('O' for a malformed one, as
// the decoder reads it).
Result<char> RecordStreamAt(int fd, off_t start, const std::string& path) {
  char head[40];
  ssize_t n;
  do {
    n = ::pread(fd, head, sizeof(head), start);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return FailErrno("read " + path);
  std::string_view line(head, static_cast<size_t>(n));
  line = line.substr(0, line.find('\n'));
  RecordHeader header;
  // Only the head was read: the payload may go on.
  if (!ParseRecordHeader(line, header)) return 'O';
  return header.stream;
}

}  // namespace

Result<LogPosition> TailRecordPosition(const std::string& path, int lines) {
  std::string older = OlderGeneration(path);
  off_t live_size = CELLA_TRY(SizeOrZero(path));
  off_t older_size = CELLA_TRY(SizeOrZero(older));
  const LogPosition everything = older_size > 0 ? LogPosition{true, 0} : LogPosition{false, 0};
  if (lines < 0) return everything;
  if (lines == 0) return LogPosition{false, live_size};
  // Going backwards, a line is met at its last piece: a complete record, or
  // a stream's last record when that is partial (an unfinished line). Each
  // of the last `lines` stays open until the complete record before its
  // first piece (the previous line's end of the same stream) is met; the
  // answer is just after the record that closes the last one open.
  int count = 0;
  bool open[2] = {false, false};
  bool seen[2] = {false, false};
  std::optional<LogPosition> found;
  auto visitor = [&](bool in_older, const std::string& file) {
    return [&, in_older](int fd, off_t start, off_t end) -> Result<bool> {
      char s = CELLA_TRY(RecordStreamAt(fd, start, file));
      const int stream = s == 'E' || s == 'e' ? 1 : 0;
      if (s == 'O' || s == 'E') {
        open[stream] = false;
        if (count < lines) {
          ++count;
          open[stream] = true;
        }
      } else if (!seen[stream] && count < lines) {
        ++count;
        open[stream] = true;
      }
      seen[stream] = true;
      if (count >= lines && !open[0] && !open[1]) {
        found = LogPosition{in_older, end};
        return true;
      }
      return false;
    };
  };
  if (CELLA_TRY(VisitRecordsBackwards(path, live_size, visitor(false, path)))) return *found;
  if (CELLA_TRY(VisitRecordsBackwards(older, older_size, visitor(true, older)))) return *found;
  return everything;
}

Result<off_t> CopyLogLines(const std::string& path, int lines, LogLineJoiner& joiner,
                           bool keep_unfinished, const LogLineSink& sink) {
  const LogPosition from = CELLA_TRY(TailRecordPosition(path, lines));
  auto feed = [&](const LogLineSink& to) {
    return [&joiner, &to](std::string_view block) { return joiner.Feed(block, to); };
  };
  if (lines < 0) {
    off_t reached = CELLA_TRY(CopyLog(path, from, feed(sink)));
    if (!keep_unfinished) CELLA_TRY(joiner.Finish(sink));
    return reached;
  }
  // First count: the lines from `from` on, finished ones in the order of
  // their newlines, and where the (at most two) unfinished ones end.
  uint64_t finished = 0;
  struct Unfinished {
    uint64_t end_offset;
    bool is_stderr;
    uint64_t finished_before = 0;  // finished lines ending before it
    bool shown = false;
  };
  std::vector<Unfinished> unfinished;
  {
    LogLineJoiner counter;
    LogLineSink count = [&](const LogLine&) -> Status {
      ++finished;
      return {};
    };
    off_t counted_to = CELLA_TRY(
        CopyLog(path, from, [&](std::string_view block) { return counter.Feed(block, count); }));
    CELLA_TRY(counter.Finish([&](const LogLine& line) -> Status {
      unfinished.push_back({line.end_offset, line.is_stderr});
      return {};
    }));
    // Then show the same bytes again, skipping all but the last `lines`,
    // ranked by where each line's last piece is.
    const uint64_t total = finished + unfinished.size();
    const uint64_t skip = total > static_cast<uint64_t>(lines) ? total - lines : 0;
    uint64_t passed = 0;
    LogLineSink ranked = [&](const LogLine& line) -> Status {
      ++passed;
      uint64_t rank = passed;
      for (Unfinished& u : unfinished) {
        if (u.end_offset < line.end_offset)
          ++rank;
        else
          ++u.finished_before;
      }
      return rank > skip ? sink(line) : Status{};
    };
    off_t reached = CELLA_TRY(CopyLog(path, from, feed(ranked), counted_to));
    for (size_t i = 0; i < unfinished.size(); ++i)
      unfinished[i].shown = unfinished[i].finished_before + i + 1 > skip;
    if (keep_unfinished) {
      for (const Unfinished& u : unfinished)
        if (!u.shown) joiner.Drop(u.is_stderr);
      return reached;
    }
    CELLA_TRY(joiner.Finish([&](const LogLine& line) -> Status {
      for (const Unfinished& u : unfinished)
        if (u.is_stderr == line.is_stderr && u.shown) return sink(line);
      return {};
    }));
    return reached;
  }
}

std::string FormatRfc3339Nano(int64_t unix_nanos) {
  int64_t secs = unix_nanos / kNanosPerSecond;
  int64_t frac = unix_nanos % kNanosPerSecond;
  if (frac < 0) {
    frac += kNanosPerSecond;
    --secs;
  }
  time_t t = static_cast<time_t>(secs);
  struct tm utc {};
  ::gmtime_r(&t, &utc);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%09lldZ", utc.tm_year + 1900,
                utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec,
                static_cast<long long>(frac));
  return buf;
}

Result<int64_t> ParseGoDuration(std::string_view text) {
  const std::string shown(text);
  auto bad = [&]() {
    return Fail("invalid duration \"" + shown + "\" (want e.g. 10m, 1h30m, 1.5s)");
  };
  if (text == "0") return int64_t{0};
  if (text.empty()) return bad();
  long double total = 0;
  while (!text.empty()) {
    size_t i = 0;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
    std::string_view whole = text.substr(0, i);
    std::string_view frac;
    if (i < text.size() && text[i] == '.') {
      size_t j = i + 1;
      while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) ++j;
      frac = text.substr(i + 1, j - i - 1);
      i = j;
    }
    if (whole.empty() && frac.empty()) return bad();
    size_t u = i;
    while (u < text.size() && !std::isdigit(static_cast<unsigned char>(text[u])) && text[u] != '.')
      ++u;
    std::string_view unit = text.substr(i, u - i);
    long double scale = 0;
    if (unit == "ns")
      scale = 1;
    else if (unit == "us" || unit == "\xC2\xB5s" || unit == "\xCE\xBCs")
      scale = 1e3L;
    else if (unit == "ms")
      scale = 1e6L;
    else if (unit == "s")
      scale = 1e9L;
    else if (unit == "m")
      scale = 60e9L;
    else if (unit == "h")
      scale = 3600e9L;
    else
      return bad();
    long double value = 0;
    for (char c : whole) value = value * 10 + (c - '0');
    long double place = 0.1L;
    for (char c : frac) {
      value += (c - '0') * place;
      place /= 10;
    }
    total += value * scale;
    if (total > static_cast<long double>(std::numeric_limits<int64_t>::max()))
      return Fail("duration \"" + shown + "\" is too long");
    text.remove_prefix(u);
  }
  return static_cast<int64_t>(total);
}

Result<int64_t> ParseLogTime(std::string_view text, int64_t now_nanos) {
  const std::string shown(text);
  // A bare "0" is the epoch (everything), as docker reads it, not "0s ago".
  if (text != "0")
    if (auto d = ParseGoDuration(text); d) return now_nanos - *d;
  auto bad = [&]() {
    return Fail("invalid time \"" + shown +
                "\": want RFC 3339 (2026-01-02T15:04:05Z), a date, Unix seconds or a duration "
                "such as 10m");
  };
  // Unix seconds, optionally with a fraction.
  if (!text.empty() && text.find_first_not_of("0123456789.") == std::string_view::npos) {
    size_t dot = text.find('.');
    int64_t secs = 0;
    int64_t frac = 0;
    if (!ParseDigits(text.substr(0, dot), secs)) return bad();
    if (dot != std::string_view::npos && !ParseFraction(text.substr(dot + 1), frac)) return bad();
    if (secs > std::numeric_limits<int64_t>::max() / kNanosPerSecond - 1) return bad();
    return secs * kNanosPerSecond + frac;
  }
  // YYYY-MM-DD[THH[:MM[:SS[.frac]]]][Z|±HH:MM]
  auto num = [&](size_t at, size_t len, int& out) {
    if (at + len > text.size()) return false;
    int64_t v = 0;
    if (!ParseDigits(text.substr(at, len), v)) return false;
    out = static_cast<int>(v);
    return true;
  };
  struct tm tm {};
  int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
  if (!num(0, 4, year) || text.size() < 10 || text[4] != '-' || !num(5, 2, month) ||
      text[7] != '-' || !num(8, 2, day))
    return bad();
  size_t at = 10;
  int64_t frac = 0;
  if (at < text.size() && (text[at] == 'T' || text[at] == 't')) {
    if (!num(at + 1, 2, hour)) return bad();
    at += 3;
    if (at < text.size() && text[at] == ':') {
      if (!num(at + 1, 2, minute)) return bad();
      at += 3;
      if (at < text.size() && text[at] == ':') {
        if (!num(at + 1, 2, second)) return bad();
        at += 3;
        if (at < text.size() && text[at] == '.') {
          size_t end = at + 1;
          while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
          if (!ParseFraction(text.substr(at + 1, end - at - 1), frac)) return bad();
          at = end;
        }
      }
    }
  }
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 60)
    return bad();
  tm.tm_year = year - 1900;
  tm.tm_mon = month - 1;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  time_t secs = 0;
  std::string_view zone = text.substr(at);
  if (zone.empty()) {
    tm.tm_isdst = -1;  // local time, as docker reads a time without a zone
    secs = ::mktime(&tm);
  } else if (zone == "Z" || zone == "z") {
    secs = ::timegm(&tm);
  } else if ((zone[0] == '+' || zone[0] == '-') && zone.size() == 6 && zone[3] == ':') {
    int zh = 0, zm = 0;
    if (!num(at + 1, 2, zh) || !num(at + 4, 2, zm) || zh > 23 || zm > 59) return bad();
    int offset = (zh * 60 + zm) * 60;
    secs = ::timegm(&tm) - (zone[0] == '+' ? offset : -offset);
  } else {
    return bad();
  }
  // Nanoseconds since 1970 in 64 bits end in 2262.
  if (secs < 0 ||
      static_cast<int64_t>(secs) > std::numeric_limits<int64_t>::max() / kNanosPerSecond - 1)
    return Fail("time \"" + shown + "\" is out of range (1970 to 2262)");
  return static_cast<int64_t>(secs) * kNanosPerSecond + frac;
}

}  // namespace cella::sandbox
