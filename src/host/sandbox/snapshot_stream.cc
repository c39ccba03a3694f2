#include "host/sandbox/snapshot_stream.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "base/io.h"
#include "base/log.h"
#include "host/os/digest.h"
#include "host/vmm/migration_stream.h"

namespace cella::sandbox {
namespace {

constexpr size_t kChunk = size_t{1} << 20;

}  // namespace

// The memory file of a format-2 snapshot, as vmm::ZeroPageFilter extracts
// guest RAM into it: sized once, pages written where they belong, adjacent
// pages gathered into one write of up to kChunk.
class MemoryFileWriter : public vmm::RamBlockSink {
 public:
  MemoryFileWriter(UniqueFd fd, std::string path, uint64_t length, bool hash)
      : fd_(std::move(fd)), path_(std::move(path)), length_(length), hashing_(hash) {
    run_.reserve(kChunk);
  }

  Status Create() {
    if (::ftruncate(fd_.Get(), off_t(length_)) != 0) return FailErrno("size " + path_);
    return {};
  }

  Status SetSize(uint64_t bytes) override {
    if (bytes != length_)
      return Fail("the guest RAM in QEMU's migration stream has " + std::to_string(bytes) +
                  " bytes, the sandbox " + std::to_string(length_));
    return {};
  }

  Status WritePage(uint64_t offset, std::span<const uint8_t> page) override {
    std::string_view bytes(reinterpret_cast<const char*>(page.data()), page.size());
    Hash(offset, bytes);
    return Append(offset, bytes);
  }

  Status FillPage(uint64_t offset, uint8_t byte) override {
    const std::string page(MemoryDigest::kPageSize, char(byte));
    Hash(offset, page);
    return Append(offset, page);
  }

  // Writes what is gathered; the digest when it could be computed on the
  // way, else empty (the commit reads the file, unless the snapshot is
  // transient and goes without one).
  Result<std::string> Finish() {
    CELLA_TRY(Flush());
    return hashing_ ? digest_.HexDigest() : std::string();
  }

  uint64_t pages() const { return pages_; }

 private:
  void Hash(uint64_t offset, std::string_view page) {
    ++pages_;
    const uint64_t index = offset / MemoryDigest::kPageSize;
    // A page written again (or out of order) would hash twice: the file is
    // hashed after instead.
    if (index < next_index_) hashing_ = false;
    if (!hashing_) return;
    digest_.AddPage(index, page);
    next_index_ = index + 1;
  }

  Status Append(uint64_t offset, std::string_view page) {
    if (offset + page.size() > length_)
      return Fail("a page at " + std::to_string(offset) + " is beyond the guest RAM");
    if (!run_.empty() && (offset != run_offset_ + run_.size() || run_.size() >= kChunk))
      CELLA_TRY(Flush());
    if (run_.empty()) run_offset_ = offset;
    run_.append(page);
    return {};
  }

  Status Flush() {
    std::string_view left = run_;
    uint64_t at = run_offset_;
    while (!left.empty()) {
      ssize_t n = ::pwrite(fd_.Get(), left.data(), left.size(), off_t(at));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return FailErrno("write " + path_);
      left.remove_prefix(size_t(n));
      at += uint64_t(n);
    }
    run_.clear();
    return {};
  }

  UniqueFd fd_;
  std::string path_;
  uint64_t length_;
  std::string run_;
  uint64_t run_offset_ = 0;
  MemoryDigest digest_;
  uint64_t next_index_ = 0;
  bool hashing_;  // off for a transient snapshot, or once a page came out of order
  uint64_t pages_ = 0;
};

Result<std::unique_ptr<SnapshotStreamWriter>> SnapshotStreamWriter::Start(
    const std::string& dir, const SnapshotManifest& manifest) {
  std::unique_ptr<SnapshotStreamWriter> w(new SnapshotStreamWriter());
  const std::string tmp = dir + "/" + manifest.state_file + ".tmp";
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return FailErrno("pipe");
  w->read_end_.Reset(fds[0]);
  w->qemu_end_.Reset(fds[1]);
  // Fewer wake-ups per MiB; a failure only costs that.
  (void)::fcntl(fds[0], F_SETPIPE_SZ, int(kChunk));
  if (manifest.compression == SnapshotCompression::kZstd) {
    int zfds[2];
    if (::pipe2(zfds, O_CLOEXEC) != 0) return FailErrno("pipe");
    UniqueFd zstd_in(zfds[0]);
    w->sink_.Reset(zfds[1]);
    (void)::fcntl(zfds[1], F_SETPIPE_SZ, int(kChunk));
    // -1: the fastest level; the stream is mostly page data. zstd's stdout
    // (and its stderr, said only on a failure that its exit code reports
    // too) go to the temporary file.
    const int inherited[] = {zstd_in.Get()};
    w->zstd_ = CELLA_TRY(host::SpawnWithOutputFile(
        {"zstd", "-q", "-1", "-T1", "-c", "/dev/fd/" + std::to_string(host::kFirstInheritedFd)},
        tmp, inherited));
  } else {
    w->sink_.Reset(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!w->sink_) return FailErrno("create " + tmp);
    w->hash_ = true;
  }
  if (!manifest.memory_file.empty()) {
    if (manifest.compression != SnapshotCompression::kNone)
      return Fail("snapshot: a memory file goes with a raw state file");
    const std::string memory_tmp = dir + "/" + manifest.memory_file + ".tmp";
    UniqueFd fd(::open(memory_tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd) return FailErrno("create " + memory_tmp);
    w->memory_ = std::make_unique<MemoryFileWriter>(std::move(fd), memory_tmp,
                                                    manifest.memory_bytes, !manifest.transient);
    CELLA_TRY(w->memory_->Create());
  }
  w->thread_ = std::thread([raw = w.get()] { raw->Run(); });
  return w;
}

void SnapshotStreamWriter::Run() {
  vmm::ZeroPageFilter filter =
      memory_ ? vmm::ZeroPageFilter({vmm::kGuestRamBlock}, vmm::kGuestRamBlock, memory_.get())
              : vmm::ZeroPageFilter({vmm::kGuestRamBlock});
  host::Sha256 sha;
  result_ = [&]() -> Status {
    std::vector<uint8_t> buf(kChunk);
    std::string out;
    out.reserve(kChunk + 8192);
    while (!stop_.load()) {
      pollfd p{read_end_.Get(), POLLIN, 0};
      int rc = ::poll(&p, 1, 200);
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0) return FailErrno("poll the snapshot stream");
      if (rc == 0) continue;
      ssize_t n = ::read(read_end_.Get(), buf.data(), buf.size());
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n < 0) return FailErrno("read the snapshot stream");
      if (n == 0) {
        CELLA_TRY(filter.Finish());
        written_.dropped_zero_pages = filter.DroppedPages();
        if (hash_) written_.sha256 = sha.HexDigest();
        if (memory_) {
          written_.memory_sha256 = CELLA_TRY(memory_->Finish());
          written_.memory_file_pages = memory_->pages();
        }
        return {};
      }
      out.clear();
      CELLA_TRY(filter.Feed(std::span<const uint8_t>(buf.data(), size_t(n)), out));
      CELLA_TRY_CTX(WriteAll(sink_.Get(), out), "write the snapshot");
      if (hash_) sha.Update(out);
    }
    return Fail("the snapshot stream was abandoned");
  }();
  // QEMU sees its pipe closed (a failed stream fails its migration), zstd
  // sees the end of its input.
  read_end_.Reset();
  sink_.Reset();
  done_.store(true);
}

Result<SnapshotStreamWriter::Written> SnapshotStreamWriter::Finish(
    std::chrono::milliseconds timeout, bool abandon) {
  qemu_end_.Reset();
  if (abandon) stop_.store(true);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done_.load() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  bool killed_zstd = false;
  if (!done_.load()) {
    stop_.store(true);  // the thread ends within its 200 ms poll...
    // ...unless it is blocked writing to a zstd that stopped reading: killed,
    // zstd's pipe fails that write (EPIPE; SIGPIPE is ignored) and the join
    // below stays bounded.
    if (zstd_) {
      killed_zstd = true;
      if (::kill(zstd_->pid, SIGKILL) != 0 && errno != ESRCH)
        log::Warn("could not kill zstd", {{"error", std::strerror(errno)}});
    }
  }
  if (thread_.joinable()) thread_.join();
  Status zstd_status;
  if (zstd_) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (abandon || !result_) left = std::chrono::milliseconds(0);
    auto exited = host::WaitForExit(*zstd_, std::max(left, std::chrono::milliseconds(1000)));
    if (!exited) {
      (void)::kill(zstd_->pid, SIGKILL);
      (void)host::WaitForExit(*zstd_, std::chrono::seconds(5));
      zstd_status = Fail("zstd did not finish the snapshot: " + exited.error().message);
    } else if (exited->exit_code != 0) {
      zstd_status = Fail("zstd failed writing the snapshot (" + exited->Describe() + ")");
    }
    zstd_.reset();
  }
  if (killed_zstd && !abandon)
    return Fail("zstd did not take the snapshot stream within " + std::to_string(timeout.count()) +
                " ms (killed)");
  if (!result_) return std::unexpected(result_.error());
  if (!zstd_status) return std::unexpected(zstd_status.error());
  return written_;
}

SnapshotStreamWriter::~SnapshotStreamWriter() {
  if (thread_.joinable() || zstd_) (void)Finish(std::chrono::milliseconds(0), /*abandon=*/true);
}

Status SaveMachineState(vmm::Machine& machine, const std::string& dir, SnapshotManifest& manifest,
                        std::chrono::milliseconds timeout) {
  auto writer = CELLA_TRY(SnapshotStreamWriter::Start(dir, manifest));
  Status saved = machine.SaveStateTo(writer->TakeQemuEnd(), timeout);
  auto written = writer->Finish(std::chrono::seconds(60), /*abandon=*/!saved);
  if (!saved) {
    // A stream our side refused fails QEMU's migration too: say why.
    if (!written && written.error().message.find("abandoned") == std::string::npos)
      return std::unexpected(Error{saved.error().message + " (" + written.error().message + ")",
                                   saved.error().errno_value});
    return saved;
  }
  if (!written) return std::unexpected(std::move(written.error()).WithContext("snapshot"));
  log::Debug("snapshot stream written",
             {{"dir", dir},
              {"zero_pages_left_out", std::to_string(written->dropped_zero_pages)},
              {"memory_file_pages", std::to_string(written->memory_file_pages)}});
  manifest.sha256 = written->sha256;
  manifest.memory_sha256 = written->memory_sha256;
  return {};
}

}  // namespace cella::sandbox
