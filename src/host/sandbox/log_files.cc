#include "host/sandbox/log_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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
                      const std::function<Status(std::string_view)>& sink) {
  off_t live_from = from.offset;
  if (from.in_older) {
    CELLA_TRY(CopyRange(OlderGeneration(path), from.offset, sink, nullptr));
    live_from = 0;
  }
  off_t reached = live_from;
  CELLA_TRY(CopyRange(path, live_from, sink, &reached));
  return reached;
}

}  // namespace cella::sandbox
