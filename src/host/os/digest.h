// SHA-256 helpers (OpenSSL) for content-addressed caches. Thread-safe.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"

namespace cella::host {

// Incremental hasher; lowercase hex output.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(std::string_view bytes);
  // Hashes the file's content (streamed). Errors name the path.
  Status UpdateFromFile(const std::string& path);
  std::string HexDigest();

 private:
  void* ctx_;  // EVP_MD_CTX*, kept opaque so OpenSSL headers stay out of ours
};

std::string Sha256Hex(std::string_view bytes);
Result<std::string> Sha256OfFile(const std::string& path);

// Sha256OfFile, remembered in `cache_dir` (created if missing) under the
// file's identity: path, device, inode, size, mtime and ctime (in ns). An
// unchanged file is not read again; any write to it (or a replacement, or
// even a chmod) changes its ctime and so misses the cache. A digest is only
// stored when the file's identity was the same before and after hashing,
// so a file changed while being read is never remembered, and only once
// it has been unchanged for a few seconds (a write within the timestamp
// granularity could otherwise keep the identity). Failing to store
// costs only the next call's time, never a wrong answer or an error.
// Use for inputs that are hashed on every run but rarely change (the guest
// binaries and kernel modules behind the initramfs cache key).
// An entry is named by the hash of the identity and holds the digest and
// the path ("<digest>\n<path>\n"), so that it can be pruned.
Result<std::string> CachedSha256OfFile(const std::string& path, const std::string& cache_dir);

// Removes the entries of `cache_dir` that can never be hit again: the file
// is gone or changed (its identity no longer names the entry), entries of
// the older form that held no path, and temporary files left for over a
// minute. Run by `cella image gc` (the cache grows by an entry for every
// version of every input ever hashed, slowly: not worth work on every run).
// Entries it cannot read are left alone. Returns how many it removed.
Result<size_t> PruneDigestCache(const std::string& cache_dir);

}  // namespace cella::host
