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

}  // namespace cella::host
