// A machine snapshot on disk, beside a manifest that says what it is only
// valid with. Two layouts:
//   format 2 (the default): guest RAM in a memory file (the RAM block's
//     length, sparse: zero pages are holes) that a restoring QEMU maps
//     privately as the guest's RAM, so nothing of it is read until the guest
//     touches a page (and copies of one snapshot share its page cache); the
//     rest of QEMU's migration stream (device state, firmware blocks: a few
//     hundred KiB) in a raw state file.
//   format 1: the whole migration stream in the state file (zero pages left
//     out), optionally zstd-compressed: smaller, but a restore loads every
//     page (CELLA_SNAPSHOT_FORMAT=zstd|raw; still restorable).
// Used by `cella standby` (the sandbox's own `standby/` directory), named
// snapshots and fork.
//
// Crash safety: QEMU writes the stream (and the memory file) to temporary
// names; CommitSnapshot fsyncs them, records sizes and SHA-256s, renames
// them, then writes the
// manifest to a temporary name, fsyncs and renames that, and fsyncs the
// directory. The manifest's rename is the commit point: a directory without
// manifest.json holds no snapshot, whatever else is in it, and a resume
// checks the size before QEMU starts and the checksum before the guest runs
// (ReadSnapshotManifest, then VerifySnapshotChecksum while QEMU reads the
// stream). So a writer killed at any moment leaves garbage that is never
// trusted.
//
// Threads: free functions, no shared state.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "base/io.h"
#include "base/result.h"
#include "host/os/digest.h"

namespace cella::sandbox {

// The newest format this cella writes and reads (see above); it reads 1 too.
inline constexpr int kSnapshotFormatVersion = 2;
inline constexpr const char* kMemoryFileName = "memory.raw";
inline constexpr const char* kManifestName = "manifest.json";
// A snapshot directory whose name starts with this is a fork's, transient:
// its copies read it right away and it is removed after; its stream is
// stored raw (no compression).
inline constexpr const char* kForkDirPrefix = ".fork-";
// Beside the state when the sandbox had egress control: its DNS server's
// name <-> virtual address table (net::FakeIpTable::Export).
inline constexpr const char* kDnsNamesFile = "dns-names";
// Beside the state when the sandbox had FUSE host shares: each share's
// server state (node table and open handles, share::FuseServer::SaveState)
// as a JSON object {"<share index>": "<state>"}; the guest kernel holds the
// node ids and handles in its memory, so a restored guest needs them.
inline constexpr const char* kShareStatesFile = "share-states.json";

// How a snapshot is written: kMemoryFile is format 2; kZstdStream and
// kRawStream are format 1 (a fork's stream is never compressed).
enum class SnapshotLayout { kMemoryFile, kZstdStream, kRawStream };
std::string_view ToString(SnapshotLayout layout);  // "file" | "zstd" | "raw"
Result<SnapshotLayout> ParseSnapshotLayout(std::string_view text);

enum class SnapshotCompression { kNone, kZstd };
std::string_view ToString(SnapshotCompression compression);  // "none" | "zstd"
Result<SnapshotCompression> ParseSnapshotCompression(std::string_view text);

// What the saved machine is only valid with. A restore on anything else is
// refused, naming the part (a different kernel or QEMU cannot load the
// state; a different memory size or device set would not match it).
struct SnapshotCompat {
  std::string qemu_version;  // first line of `qemu-system-x86_64 --version`
  std::string kernel;        // the guest kernel: "path size mtime" (FileIdentity)
  std::string initramfs;     // cella's initramfs (init + agent + modules), likewise
  int memory_mb = 0;
  double cpus = 0;
  std::string accel;       // "tcg" | "kvm"
  std::string root_image;  // the image the root was built from (erofs path, content-addressed)
  bool operator==(const SnapshotCompat&) const = default;
};

// "PATH SIZE MTIME_NS" of a file: cheap (no hashing on the resume path) and
// changed by any rewrite of the file.
Result<std::string> FileIdentity(const std::string& path);

// The first line of `<qemu_binary> --version` (SnapshotCompat::qemu_version),
// remembered in `cache_dir` under the binary's identity (resolved path,
// device, inode, size, mtime and ctime), so a resume does not spawn QEMU for
// it (60-400 ms here). Stored only for a binary unchanged for a few
// seconds; failing to store costs only the next call's time.
Result<std::string> CachedQemuVersion(const std::string& qemu_binary, const std::string& cache_dir);

// Empty when they match; else "the <part> differs (snapshot: A, now: B)"
// for the first part that differs.
std::string CompatMismatch(const SnapshotCompat& saved, const SnapshotCompat& now);

struct SnapshotManifest {
  int version = 1;         // 2 when memory_file is set (EncodeManifest decides)
  std::string state_file;  // a plain file name in the same directory
  SnapshotCompression compression = SnapshotCompression::kZstd;
  uint64_t size_bytes = 0;  // of state_file as stored
  std::string sha256;       // of state_file as stored, lowercase hex
  int64_t created_ms = 0;
  uint64_t memory_bytes = 0;  // guest RAM the stream describes (for sizes in ls)
  SnapshotCompat compat;
  // Format 2: the memory file (a plain name in the same directory; its
  // length is memory_bytes) and its MemoryDigest. Empty in format 1.
  std::string memory_file;
  std::string memory_sha256;
  // A fork's own snapshot, read by its copies within the second it was
  // written and removed after: its memory file is not hashed (~50 ms per
  // 64 MiB of guest RAM on each side, while the source is frozen and
  // before each copy runs), so memory_sha256 is empty. The state file is
  // still checked.
  bool transient = false;
};

// The checksum of a memory file: SHA-256 over every page that is not all
// zero, each preceded by its page index (8 bytes, little-endian), in
// ascending order. Holes and zero pages count alike, so it does not depend
// on how the filesystem laid the file out.
class MemoryDigest {
 public:
  static constexpr uint64_t kPageSize = 4096;
  // Pages in strictly ascending order (`page` is kPageSize bytes); all-zero
  // ones are skipped.
  void AddPage(uint64_t index, std::string_view page);
  std::string HexDigest() { return sha_.HexDigest(); }

 private:
  host::Sha256 sha_;
};
// MemoryDigest of a whole file, reading only its data extents
// (SEEK_DATA/SEEK_HOLE).
Result<std::string> MemoryFileDigest(const std::string& path);

SnapshotLayout LayoutOf(const SnapshotManifest& manifest);

std::string EncodeManifest(const SnapshotManifest& manifest);
// Strict: wrong types, a state_file that is not a plain name, an unknown
// compression or version, a malformed checksum fail with the field named.
Result<SnapshotManifest> DecodeManifest(std::string_view json);

// The migration URI QEMU writes the stream to: "exec:" + a shell pipeline
// into `<dir>/<state_file>.tmp` (paths are single-quoted).
std::string SaveUri(const std::string& dir, const SnapshotManifest& manifest);
// The URI a restoring QEMU reads it from.
std::string LoadUri(const std::string& dir, const SnapshotManifest& manifest);

// After QEMU completed the migration: fsync, size and hash the temporary
// file (unless `manifest.sha256` is set: its writer hashed it), and so the
// memory file when there is one (its length must be memory_bytes; hashed
// unless memory_sha256 is set or the manifest is transient), rename them, write the manifest
// (filling size_bytes and sha256), and fsync the directory. Returns the manifest as written. When
// the last directory fsync fails, the manifest is unlinked before the error is returned: a failed
// commit never leaves a snapshot that looks committed, even when the caller's clean-up of the
// directory fails too. `sync_dir` fsyncs a directory (tests pass one that fails).
// kTransient (a fork's snapshot, read by its copies at once and removed
// after; a host crash loses it either way): no fsync of files or
// directory, which costs ~0.1 s per 100 MiB of memory file here.
using SyncDirectory = std::function<Status(const std::string& dir)>;
enum class Durability { kDurable, kTransient };
Result<SnapshotManifest> CommitSnapshot(const std::string& dir, SnapshotManifest manifest,
                                        const SyncDirectory& sync_dir = FsyncDirectory,
                                        Durability durability = Durability::kDurable);

// Reads the manifest and checks that the state file is there with the
// recorded size and checksum. ENOENT when there is no (committed) snapshot;
// any other error names what is wrong ("truncated", "checksum mismatch").
Result<SnapshotManifest> VerifySnapshot(const std::string& dir);
// VerifySnapshot in two halves, so the checksum can be computed while QEMU
// already reads the stream (a resume lets the guest run only once it
// matched): the manifest and the state file's size, then the checksum.
Result<SnapshotManifest> ReadSnapshotManifest(const std::string& dir);
Status VerifySnapshotChecksum(const std::string& dir, const SnapshotManifest& manifest);

// The disk space a snapshot directory's files take (allocated blocks: a
// sparse memory file counts only its data).
uint64_t SnapshotAllocatedBytes(const std::string& dir);

// Removes the directory and everything in it; a missing one is fine.
Status RemoveSnapshot(const std::string& dir);

// Copies a disk image for a snapshot or a fork copy: a copy-on-write clone
// (ioctl FICLONE) where the filesystem has them (btrfs, xfs), else a sparse
// copy that moves only the data extents (SEEK_DATA/SEEK_HOLE, then
// copy_file_range). `to` must not exist (created 0600). Not fsynced: the
// callers commit by a later rename. Returns whether it was a clone.
Result<bool> CloneOrCopySparse(const std::string& from, const std::string& to);

// Fresh bytes from the host's getrandom() for the guest's RNG reseed on a
// restore (protocol op `resumed`): every copy of a snapshot gets its own.
inline constexpr size_t kRngSeedBytes = 64;
Result<std::vector<uint8_t>> FreshRngSeed();

// fsync(2) of a file by path.
Status FsyncFile(const std::string& path);

}  // namespace cella::sandbox
