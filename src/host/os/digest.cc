#include "host/os/digest.h"

#include <fcntl.h>
#include <openssl/evp.h>

#include <array>
#include <cstdio>
#include <cstdlib>

#include "base/check.h"
#include "base/io.h"
#include "base/unique_fd.h"

namespace cella::host {

namespace {
EVP_MD_CTX* Ctx(void* p) { return static_cast<EVP_MD_CTX*>(p); }
}  // namespace

// OpenSSL failing to set up SHA-256 means a broken installation: there is no
// sensible way to continue without cache keys, so this crashes loudly.
Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (ctx_ == nullptr || EVP_DigestInit_ex(Ctx(ctx_), EVP_sha256(), nullptr) != 1)
    Die(CELLA_HERE, "OpenSSL cannot initialise SHA-256");
}

Sha256::~Sha256() { EVP_MD_CTX_free(Ctx(ctx_)); }

void Sha256::Update(std::string_view bytes) {
  if (EVP_DigestUpdate(Ctx(ctx_), bytes.data(), bytes.size()) != 1)
    Die(CELLA_HERE, "OpenSSL SHA-256 update failed");
}

Status Sha256::UpdateFromFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  std::array<std::byte, size_t{64} * 1024> buf;
  while (true) {
    size_t n = CELLA_TRY_CTX(ReadSome(fd.Get(), buf), "read " + path);
    if (n == 0) return {};
    Update({reinterpret_cast<const char*>(buf.data()), n});
  }
}

std::string Sha256::HexDigest() {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(Ctx(ctx_), md, &len) != 1) Die(CELLA_HERE, "OpenSSL SHA-256 final failed");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(size_t{len} * 2);
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 0xf]);
  }
  return out;
}

std::string Sha256Hex(std::string_view bytes) {
  Sha256 h;
  h.Update(bytes);
  return h.HexDigest();
}

Result<std::string> Sha256OfFile(const std::string& path) {
  Sha256 h;
  CELLA_TRY(h.UpdateFromFile(path));
  return h.HexDigest();
}

}  // namespace cella::host
