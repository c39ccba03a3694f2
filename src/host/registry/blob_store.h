// Content-addressed blob store: <root>/sha256/<hex>. A blob enters the store
// only after its size and sha256 match what was asked for: bytes go to
// <hex>.partial (kept across interruptions so a pull can resume with a Range
// request), are verified, fsynced and renamed into place.
//
// Concurrency: a BlobWriter holds an exclusive flock on <hex>.lock for its
// lifetime, so two pulls of one blob (threads or processes) serialise and the
// second finds the blob present. BlobStore itself is immutable: thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"
#include "host/os/digest.h"

namespace cella::registry {

class BlobStore {
 public:
  explicit BlobStore(std::string root) : root_(std::move(root)) {}
  const std::string& root() const { return root_; }
  std::string Dir() const { return root_ + "/sha256"; }
  // Path of a stored blob (whether or not it exists). digest must be valid.
  std::string PathFor(std::string_view digest) const;
  // True when the blob is stored with the expected size (size < 0: any).
  Result<bool> Has(std::string_view digest, int64_t size = -1) const;
  // Stores bytes already in memory (manifests), verifying digest and size.
  Status PutBytes(std::string_view digest, std::string_view bytes) const;

 private:
  std::string root_;
};

enum class ResumeMode { kResume, kStartOver };

// Writes one blob. Usage: Open, (if !AlreadyStored) Write* ..., Commit.
// Dropping a writer without Commit keeps the partial file for a later resume.
class BlobWriter {
 public:
  // Takes the blob's lock (blocking). When the blob is already stored,
  // AlreadyStored() is true and nothing else should be called.
  static Result<BlobWriter> Open(const BlobStore& store, std::string_view digest, int64_t size,
                                 ResumeMode mode);
  BlobWriter(BlobWriter&&) = default;
  BlobWriter& operator=(BlobWriter&&) = default;
  ~BlobWriter() = default;

  bool AlreadyStored() const { return already_stored_; }
  // Bytes already in the partial file (hashed); resume from here.
  int64_t Offset() const { return offset_; }
  int64_t ExpectedSize() const { return size_; }
  // Discards the partial content (the server ignored our Range request).
  Status Restart();
  // Appends; fails as soon as more bytes arrive than the expected size.
  Status Write(std::string_view bytes);
  // Verifies size and digest, fsyncs and renames into place. On mismatch the
  // partial file is deleted (its content is wrong, resuming cannot help).
  Status Commit();

 private:
  BlobWriter() = default;
  std::string digest_;
  std::string final_path_;
  std::string partial_path_;
  int64_t size_ = 0;
  int64_t offset_ = 0;
  bool already_stored_ = false;
  UniqueFd lock_;
  UniqueFd fd_;
  std::unique_ptr<host::Sha256> hash_;
};

}  // namespace cella::registry
