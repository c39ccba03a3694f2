#include "host/os/digest.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

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

namespace {

// Everything that changes when the file's content can have changed.
std::string IdentityOf(const std::string& path, const struct stat& st) {
  auto ns = [](const timespec& t) {
    return std::to_string(t.tv_sec) + "." + std::to_string(t.tv_nsec);
  };
  return path + '\0' + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ":" +
         std::to_string(st.st_size) + ":" + ns(st.st_mtim) + ":" + ns(st.st_ctim);
}

constexpr time_t kSettledSeconds = 2;
constexpr size_t kMaxEntryBytes = 8192;  // a digest and a path
constexpr size_t kMaxPrunedPerRun = 100000;

bool IsHexDigest(std::string_view s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

// Best effort: a digest that cannot be stored is computed again next time.
void Remember(const std::string& cache_dir, const std::string& entry, const std::string& digest,
              const std::string& path) {
  if (::mkdir(cache_dir.c_str(), 0755) != 0 && errno != EEXIST) return;
  std::string tmp = entry + ".tmp." + std::to_string(::getpid());
  if (!WriteStringToFile(tmp, digest + "\n" + path + "\n", 0644)) return;
  if (::rename(tmp.c_str(), entry.c_str()) != 0) ::unlink(tmp.c_str());
}

}  // namespace

Result<std::string> CachedSha256OfFile(const std::string& path, const std::string& cache_dir) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  struct stat before {};
  if (::fstat(fd.Get(), &before) != 0) return FailErrno("stat " + path);
  std::string identity = IdentityOf(path, before);
  std::string entry = cache_dir + "/" + Sha256Hex(identity);
  if (auto known = ReadFileToString(entry, kMaxEntryBytes); known) {
    std::string_view digest = std::string_view(*known).substr(0, known->find('\n'));
    if (IsHexDigest(digest)) return std::string(digest);
  }
  Sha256 h;
  std::array<std::byte, size_t{64} * 1024> buf;
  while (true) {
    size_t n = CELLA_TRY_CTX(ReadSome(fd.Get(), buf), "read " + path);
    if (n == 0) break;
    h.Update({reinterpret_cast<const char*>(buf.data()), n});
  }
  std::string digest = h.HexDigest();
  struct stat after {};
  // A file changed within the filesystem's timestamp granularity of the
  // hash could be changed again with the same identity (git's "racily
  // clean" case): only files that have been quiet for a while are stored.
  timespec now{};
  bool settled = ::clock_gettime(CLOCK_REALTIME, &now) == 0 &&
                 before.st_ctim.tv_sec + kSettledSeconds < now.tv_sec &&
                 before.st_mtim.tv_sec + kSettledSeconds < now.tv_sec;
  if (settled && ::stat(path.c_str(), &after) == 0 && IdentityOf(path, after) == identity)
    Remember(cache_dir, entry, digest, path);
  return digest;
}

Result<size_t> PruneDigestCache(const std::string& cache_dir) {
  UniqueFd dir(::open(cache_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir) {
    if (errno == ENOENT) return size_t{0};
    return FailErrno("open " + cache_dir);
  }
  // At most so many names a run: a cache larger still is pruned a part at a
  // time, one gc after another.
  std::vector<std::string> names;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(cache_dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    names.push_back(it->path().filename().string());
    if (names.size() >= kMaxPrunedPerRun) break;
  }
  if (ec) return Fail("read " + cache_dir + ": " + ec.message());
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  size_t removed = 0;
  auto remove = [&](const std::string& name) {
    if (::unlinkat(dir.Get(), name.c_str(), 0) == 0) ++removed;
  };
  for (const std::string& name : names) {
    if (name.find(".tmp.") != std::string::npos) {
      struct stat st {};
      if (::fstatat(dir.Get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
          st.st_mtim.tv_sec + 60 < now.tv_sec)
        remove(name);
      continue;
    }
    if (!IsHexDigest(name)) continue;  // not the cache's
    auto text = ReadFileToString(cache_dir + "/" + name, kMaxEntryBytes);
    if (!text) continue;
    size_t nl = text->find('\n');
    std::string path = nl == std::string::npos
                           ? std::string()
                           : text->substr(nl + 1, text->find('\n', nl + 1) - nl - 1);
    struct stat st {};
    if (path.empty() || ::stat(path.c_str(), &st) != 0 || Sha256Hex(IdentityOf(path, st)) != name)
      remove(name);
  }
  return removed;
}

}  // namespace cella::host
