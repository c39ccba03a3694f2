// Writing a snapshot's state file from QEMU's migration stream.
//
// QEMU writes the stream into a pipe (no shell, no `cat`: the save hands
// QEMU the pipe's write end over QMP); a thread of ours reads it, leaves out
// the zero pages of guest RAM (vmm::ZeroPageFilter) and writes
// `<dir>/<state_file>.tmp`, through `zstd -1` when the manifest asks for
// it. Leaving them out is valid because every restore of a snapshot starts
// a fresh QEMU whose guest RAM is zero-filled memory (memory-backend-ram or
// a fresh memfd; a template clone never loads a snapshot): ~228,000 zero
// records of a 1 GiB guest cost a restore seconds of page faults here
// (docs/performance.md, "Standby and resume"). A raw (uncompressed) stream
// is hashed as it is written, so the commit need not read it again.
//
// Format 2 (manifest.memory_file set): the pages of guest RAM go to
// `<dir>/<memory_file>.tmp` instead (MemoryFileWriter: the RAM's length,
// sparse, written in runs; its MemoryDigest computed on the way while the
// pages come in ascending order, as they do from a stopped VM), and the
// state file keeps only the rest of the stream, raw.
//
// Threads: one reader thread per save, owned by the writer; the caller's
// thread runs the save and then Finish.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "base/result.h"
#include "base/unique_fd.h"
#include "host/os/process.h"
#include "host/sandbox/snapshot.h"
#include "host/vmm/machine.h"

namespace cella::sandbox {

class MemoryFileWriter;

class SnapshotStreamWriter {
 public:
  struct Written {
    uint64_t dropped_zero_pages = 0;
    uint64_t memory_file_pages = 0;
    std::string sha256;         // of the file written; empty when compressed (zstd wrote it)
    std::string memory_sha256;  // of the memory file; empty when it has to be read to know
  };

  // Creates the pipe and the temporary file, starts zstd when compressing
  // and the reader thread.
  static Result<std::unique_ptr<SnapshotStreamWriter>> Start(const std::string& dir,
                                                             const SnapshotManifest& manifest);
  // Stops the thread and zstd when Finish was not called (a failed save).
  ~SnapshotStreamWriter();
  SnapshotStreamWriter(const SnapshotStreamWriter&) = delete;
  SnapshotStreamWriter& operator=(const SnapshotStreamWriter&) = delete;

  // The pipe's write end, for QEMU (once).
  UniqueFd TakeQemuEnd() { return std::move(qemu_end_); }
  // After QEMU completed the migration and closed its end: waits (bounded)
  // for the thread and zstd and says whether the file holds the whole
  // stream. `abandon`: the save failed; stop at once instead.
  Result<Written> Finish(std::chrono::milliseconds timeout, bool abandon = false);

 private:
  SnapshotStreamWriter() = default;
  void Run();

  UniqueFd qemu_end_;
  UniqueFd read_end_;
  UniqueFd sink_;                             // the temporary file, or zstd's stdin
  std::unique_ptr<MemoryFileWriter> memory_;  // format 2
  bool hash_ = false;
  std::optional<host::SpawnedProcess> zstd_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> done_{false};
  Status result_;
  Written written_;
};

// Saves the frozen machine's state into `dir` through a SnapshotStreamWriter
// (vmm::Machine::SaveStateTo). On success `manifest.sha256` is set when the
// checksum is already known (raw streams), so CommitSnapshot skips a read.
Status SaveMachineState(vmm::Machine& machine, const std::string& dir, SnapshotManifest& manifest,
                        std::chrono::milliseconds timeout);

}  // namespace cella::sandbox
