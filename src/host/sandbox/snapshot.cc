#include "host/sandbox/snapshot.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "base/io.h"
#include "base/unique_fd.h"
#include "host/os/digest.h"
#include "host/os/process.h"

namespace cella::sandbox {
namespace {

using nlohmann::json;

constexpr size_t kMaxManifest = 64 * 1024;

Status FsyncPath(const std::string& path, int flags) {
  UniqueFd fd(::open(path.c_str(), flags | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  if (::fsync(fd.Get()) != 0) return FailErrno("fsync " + path);
  return {};
}

bool IsPlainName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         name.find('\0') == std::string_view::npos && name.size() <= 255;
}

bool IsSha256Hex(std::string_view text) {
  if (text.size() != 64) return false;
  for (char c : text)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

}  // namespace

std::string_view ToString(SnapshotCompression compression) {
  return compression == SnapshotCompression::kZstd ? "zstd" : "none";
}

Result<SnapshotCompression> ParseSnapshotCompression(std::string_view text) {
  if (text == "zstd") return SnapshotCompression::kZstd;
  if (text == "none") return SnapshotCompression::kNone;
  return Fail("unknown snapshot compression \"" + std::string(text) + "\" (want zstd or none)");
}

std::string_view ToString(SnapshotLayout layout) {
  switch (layout) {
    case SnapshotLayout::kMemoryFile:
      return "file";
    case SnapshotLayout::kZstdStream:
      return "zstd";
    case SnapshotLayout::kRawStream:
      return "raw";
  }
  return "file";
}

Result<SnapshotLayout> ParseSnapshotLayout(std::string_view text) {
  if (text == "file") return SnapshotLayout::kMemoryFile;
  if (text == "zstd") return SnapshotLayout::kZstdStream;
  if (text == "raw") return SnapshotLayout::kRawStream;
  return Fail("unknown snapshot format \"" + std::string(text) + "\" (want file, zstd or raw)");
}

namespace {

bool AllZero(std::string_view bytes) {
  static const char kZeros[MemoryDigest::kPageSize] = {};
  while (!bytes.empty()) {
    size_t n = std::min(bytes.size(), sizeof kZeros);
    if (std::memcmp(bytes.data(), kZeros, n) != 0) return false;
    bytes.remove_prefix(n);
  }
  return true;
}

}  // namespace

void MemoryDigest::AddPage(uint64_t index, std::string_view page) {
  if (AllZero(page)) return;
  char le[8];
  for (int i = 0; i < 8; ++i) le[i] = char((index >> (8 * i)) & 0xff);
  sha_.Update(std::string_view(le, sizeof le));
  sha_.Update(page);
}

Result<std::string> MemoryFileDigest(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  struct stat st {};
  if (::fstat(fd.Get(), &st) != 0) return FailErrno("stat " + path);
  const auto size = static_cast<uint64_t>(st.st_size);
  constexpr uint64_t kPage = MemoryDigest::kPageSize;
  MemoryDigest digest;
  std::vector<char> buf(size_t{1} << 20);
  uint64_t next_page = 0;  // pages below were hashed (or were holes)
  off_t at = 0;
  while (uint64_t(at) < size) {
    off_t data = ::lseek(fd.Get(), at, SEEK_DATA);
    if (data < 0 && errno == ENXIO) break;  // only a hole is left
    if (data < 0) return FailErrno("seek data in " + path);
    off_t hole = ::lseek(fd.Get(), data, SEEK_HOLE);
    if (hole < 0) return FailErrno("seek hole in " + path);
    // Extents are filesystem blocks; pages are read whole, each once.
    uint64_t from = std::max(uint64_t(data) / kPage, next_page) * kPage;
    const uint64_t to = std::min((uint64_t(hole) + kPage - 1) / kPage * kPage, size);
    while (from < to) {
      const size_t want = size_t(std::min<uint64_t>(to - from, buf.size()));
      size_t got = 0;
      while (got < want) {
        ssize_t n = ::pread(fd.Get(), buf.data() + got, want - got, off_t(from + got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return FailErrno("read " + path);
        if (n == 0) return Fail("read " + path + ": it shrank while being hashed");
        got += size_t(n);
      }
      for (size_t off = 0; off < want; off += kPage)
        digest.AddPage((from + off) / kPage,
                       std::string_view(buf.data() + off, std::min<size_t>(kPage, want - off)));
      from += want;
    }
    next_page = (from + kPage - 1) / kPage;
    at = off_t(std::max<uint64_t>(from, uint64_t(hole)));
  }
  return digest.HexDigest();
}

Result<std::string> FileIdentity(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
  return path + " " + std::to_string(st.st_size) + " " +
         std::to_string(int64_t{st.st_mtim.tv_sec} * 1'000'000'000 + st.st_mtim.tv_nsec);
}

Result<std::string> CachedQemuVersion(const std::string& qemu_binary,
                                      const std::string& cache_dir) {
  std::string path = qemu_binary;
  if (path.find('/') == std::string::npos) {
    const char* search = std::getenv("PATH");
    std::string_view dirs = search ? search : "/usr/bin:/bin";
    path.clear();
    while (!dirs.empty() && path.empty()) {
      std::string dir(dirs.substr(0, dirs.find(':')));
      dirs.remove_prefix(std::min(dirs.size(), dir.size() + 1));
      std::string candidate = (dir.empty() ? "." : dir) + "/" + qemu_binary;
      if (::access(candidate.c_str(), X_OK) == 0) path = candidate;
    }
    if (path.empty()) return Fail(qemu_binary + " is not on PATH");
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
  const auto ns = [](const timespec& t) {
    return std::to_string(int64_t{t.tv_sec} * 1'000'000'000 + t.tv_nsec);
  };
  const std::string identity = path + " " + std::to_string(st.st_dev) + " " +
                               std::to_string(st.st_ino) + " " + std::to_string(st.st_size) + " " +
                               ns(st.st_mtim) + " " + ns(st.st_ctim);
  const std::string entry = cache_dir + "/" + host::Sha256Hex(identity).substr(0, 32);
  if (auto known = ReadFileToString(entry, 4096); known && known->starts_with(identity + "\n")) {
    std::string version = known->substr(identity.size() + 1);
    if (!version.empty() && version.back() == '\n') version.pop_back();
    if (!version.empty() && version.find('\n') == std::string::npos) return version;
  }
  std::string out = CELLA_TRY_CTX(host::CheckCommand({path, "--version"}, std::chrono::seconds(30)),
                                  "QEMU version");
  std::string version = out.substr(0, out.find('\n'));
  timespec now{};
  const bool settled = ::clock_gettime(CLOCK_REALTIME, &now) == 0 &&
                       st.st_mtim.tv_sec + 2 < now.tv_sec && st.st_ctim.tv_sec + 2 < now.tv_sec;
  if (settled && !version.empty() && (::mkdir(cache_dir.c_str(), 0755) == 0 || errno == EEXIST)) {
    std::string tmp = entry + ".tmp." + std::to_string(::getpid());
    if (WriteStringToFile(tmp, identity + "\n" + version + "\n", 0644)) {
      if (::rename(tmp.c_str(), entry.c_str()) != 0) (void)::unlink(tmp.c_str());
    }
  }
  return version;
}

std::string CompatMismatch(const SnapshotCompat& saved, const SnapshotCompat& now) {
  auto differs = [](std::string_view part, const std::string& a, const std::string& b) {
    return "the " + std::string(part) + " differs (snapshot: " + a + ", now: " + b + ")";
  };
  if (saved.qemu_version != now.qemu_version)
    return differs("QEMU version", saved.qemu_version, now.qemu_version);
  if (saved.kernel != now.kernel) return differs("guest kernel", saved.kernel, now.kernel);
  if (saved.initramfs != now.initramfs)
    return differs("initramfs (cella's guest init and agent)", saved.initramfs, now.initramfs);
  if (saved.memory_mb != now.memory_mb)
    return differs("memory size", std::to_string(saved.memory_mb) + " MiB",
                   std::to_string(now.memory_mb) + " MiB");
  if (saved.cpus != now.cpus)
    return differs("CPU count", std::to_string(saved.cpus), std::to_string(now.cpus));
  if (saved.accel != now.accel) return differs("accelerator", saved.accel, now.accel);
  if (saved.root_image != now.root_image)
    return differs("root image", saved.root_image, now.root_image);
  return {};
}

SnapshotLayout LayoutOf(const SnapshotManifest& m) {
  if (!m.memory_file.empty()) return SnapshotLayout::kMemoryFile;
  return m.compression == SnapshotCompression::kZstd ? SnapshotLayout::kZstdStream
                                                     : SnapshotLayout::kRawStream;
}

std::string EncodeManifest(const SnapshotManifest& m) {
  json j = {{"version", m.memory_file.empty() ? 1 : 2},
            {"state_file", m.state_file},
            {"compression", std::string(ToString(m.compression))},
            {"size_bytes", m.size_bytes},
            {"sha256", m.sha256},
            {"created_ms", m.created_ms},
            {"memory_bytes", m.memory_bytes},
            {"compat",
             {{"qemu_version", m.compat.qemu_version},
              {"kernel", m.compat.kernel},
              {"initramfs", m.compat.initramfs},
              {"memory_mb", m.compat.memory_mb},
              {"cpus", m.compat.cpus},
              {"accel", m.compat.accel},
              {"root_image", m.compat.root_image}}}};
  if (!m.memory_file.empty()) {
    j["memory_file"] = m.memory_file;
    j["memory_sha256"] = m.memory_sha256;
  }
  if (m.transient) j["transient"] = true;
  return j.dump(2) + "\n";
}

Result<SnapshotManifest> DecodeManifest(std::string_view text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return Fail("snapshot manifest: not a JSON object");
  SnapshotManifest m;
  // nlohmann throws on a wrong type; turned into an error naming the field.
  std::string field;
  try {
    auto take = [&](const json& obj, const char* key, auto& out) {
      field = key;
      if (!obj.contains(key)) throw std::runtime_error("missing");
      obj.at(key).get_to(out);
    };
    take(j, "version", m.version);
    if (m.version < 1 || m.version > kSnapshotFormatVersion)
      return Fail("snapshot manifest: format version " + std::to_string(m.version) +
                  " is not one this cella reads (1 to " + std::to_string(kSnapshotFormatVersion) +
                  ")");
    if (m.version >= 2) {
      take(j, "memory_file", m.memory_file);
      take(j, "memory_sha256", m.memory_sha256);
    } else if (j.contains("memory_file")) {
      field = "memory_file";
      throw std::runtime_error("not part of format version 1");
    }
    take(j, "state_file", m.state_file);
    std::string compression;
    take(j, "compression", compression);
    m.compression = CELLA_TRY_CTX(ParseSnapshotCompression(compression), "snapshot manifest");
    take(j, "size_bytes", m.size_bytes);
    take(j, "sha256", m.sha256);
    take(j, "created_ms", m.created_ms);
    take(j, "memory_bytes", m.memory_bytes);
    field = "compat";
    const json& c = j.at("compat");
    if (!c.is_object()) throw std::runtime_error("not an object");
    take(c, "qemu_version", m.compat.qemu_version);
    take(c, "kernel", m.compat.kernel);
    take(c, "initramfs", m.compat.initramfs);
    take(c, "memory_mb", m.compat.memory_mb);
    take(c, "cpus", m.compat.cpus);
    take(c, "accel", m.compat.accel);
    take(c, "root_image", m.compat.root_image);
    if (j.contains("transient")) take(j, "transient", m.transient);
  } catch (const std::exception& e) {
    return Fail("snapshot manifest: field \"" + field + "\": " + e.what());
  }
  if (!IsPlainName(m.state_file) || m.state_file == kManifestName)
    return Fail("snapshot manifest: state_file \"" + m.state_file + "\" is not a plain file name");
  if (!IsSha256Hex(m.sha256)) return Fail("snapshot manifest: sha256 is not 64 hex digits");
  if (m.size_bytes == 0) return Fail("snapshot manifest: size_bytes is 0");
  if (m.version >= 2) {
    if (!IsPlainName(m.memory_file) || m.memory_file == kManifestName ||
        m.memory_file == m.state_file)
      return Fail("snapshot manifest: memory_file \"" + m.memory_file +
                  "\" is not a plain file name of its own");
    if (!IsSha256Hex(m.memory_sha256) && !(m.transient && m.memory_sha256.empty()))
      return Fail("snapshot manifest: memory_sha256 is not 64 hex digits");
    if (m.memory_bytes == 0 || m.memory_bytes % MemoryDigest::kPageSize != 0)
      return Fail("snapshot manifest: memory_bytes " + std::to_string(m.memory_bytes) +
                  " is not a whole number of pages");
  }
  return m;
}

std::string SaveUri(const std::string& dir, const SnapshotManifest& m) {
  std::string tmp = host::ShellQuote(dir + "/" + m.state_file + ".tmp");
  // -1: the fastest level; the stream is mostly page data and zero flags.
  if (m.compression == SnapshotCompression::kZstd) return "exec:zstd -q -1 -T1 -c > " + tmp;
  return "exec:cat > " + tmp;
}

std::string LoadUri(const std::string& dir, const SnapshotManifest& m) {
  std::string file = host::ShellQuote(dir + "/" + m.state_file);
  if (m.compression == SnapshotCompression::kZstd) return "exec:zstd -q -d -c " + file;
  return "exec:cat " + file;
}

Result<SnapshotManifest> CommitSnapshot(const std::string& dir, SnapshotManifest m,
                                        const SyncDirectory& sync_dir_or_not,
                                        Durability durability) {
  if (!IsPlainName(m.state_file)) return Fail("snapshot: bad state file name " + m.state_file);
  const bool durable = durability == Durability::kDurable;
  const auto fsync_file = [durable](const std::string& path) -> Status {
    return durable ? FsyncPath(path, O_RDONLY) : Status{};
  };
  const auto sync_dir = [&](const std::string& path) -> Status {
    return durable ? sync_dir_or_not(path) : Status{};
  };
  std::string tmp = dir + "/" + m.state_file + ".tmp";
  std::string final_path = dir + "/" + m.state_file;
  CELLA_TRY(fsync_file(tmp));
  struct stat st {};
  if (::stat(tmp.c_str(), &st) != 0) return FailErrno("stat " + tmp);
  if (st.st_size <= 0) return Fail("snapshot: QEMU wrote nothing to " + tmp);
  m.size_bytes = static_cast<uint64_t>(st.st_size);
  if (m.sha256.empty()) m.sha256 = CELLA_TRY(host::Sha256OfFile(tmp));
  if (!m.memory_file.empty()) {
    if (!IsPlainName(m.memory_file) || m.memory_file == m.state_file)
      return Fail("snapshot: bad memory file name " + m.memory_file);
    std::string memory_tmp = dir + "/" + m.memory_file + ".tmp";
    CELLA_TRY(fsync_file(memory_tmp));
    if (::stat(memory_tmp.c_str(), &st) != 0) return FailErrno("stat " + memory_tmp);
    if (uint64_t(st.st_size) != m.memory_bytes)
      return Fail("snapshot: the memory file " + memory_tmp + " has " + std::to_string(st.st_size) +
                  " bytes, the guest " + std::to_string(m.memory_bytes));
    if (m.memory_sha256.empty() && !m.transient)
      m.memory_sha256 = CELLA_TRY(MemoryFileDigest(memory_tmp));
    std::string memory_final = dir + "/" + m.memory_file;
    if (::rename(memory_tmp.c_str(), memory_final.c_str()) != 0)
      return FailErrno("rename " + memory_tmp);
  }
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) return FailErrno("rename " + tmp);
  // The state file's name is durable before the manifest (the commit) is.
  CELLA_TRY(sync_dir(dir));
  std::string manifest_path = dir + "/" + kManifestName;
  std::string manifest_tmp = manifest_path + ".tmp";
  CELLA_TRY(WriteStringToFile(manifest_tmp, EncodeManifest(m), 0600));
  CELLA_TRY(fsync_file(manifest_tmp));
  if (::rename(manifest_tmp.c_str(), manifest_path.c_str()) != 0)
    return FailErrno("rename " + manifest_tmp);
  if (Status synced = sync_dir(dir); !synced) {
    // The caller is told the commit failed and removes the directory; if
    // that fails too, a manifest left behind would make the snapshot look
    // committed (resumable). The manifest goes first, as a resume's does.
    if (::unlink(manifest_path.c_str()) != 0 && errno != ENOENT)
      return FailErrno("remove " + manifest_path + " after: " + synced.error().message);
    return std::unexpected(synced.error());
  }
  return m;
}

uint64_t SnapshotAllocatedBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    struct stat st {};
    if (::lstat(entry.path().c_str(), &st) == 0) total += uint64_t(st.st_blocks) * 512;
  }
  return total;
}

Result<SnapshotManifest> VerifySnapshot(const std::string& dir) {
  SnapshotManifest m = CELLA_TRY(ReadSnapshotManifest(dir));
  CELLA_TRY(VerifySnapshotChecksum(dir, m));
  return m;
}

Status VerifySnapshotChecksum(const std::string& dir, const SnapshotManifest& m) {
  std::string state = dir + "/" + m.state_file;
  std::string sum = CELLA_TRY(host::Sha256OfFile(state));
  if (sum != m.sha256)
    return Fail("snapshot " + state + " is corrupt: checksum mismatch (sha256 " +
                sum.substr(0, 12) + ", the manifest recorded " + m.sha256.substr(0, 12) + ")");
  if (!m.memory_file.empty() && !m.transient) {
    std::string memory = dir + "/" + m.memory_file;
    std::string memory_sum = CELLA_TRY(MemoryFileDigest(memory));
    if (memory_sum != m.memory_sha256)
      return Fail("snapshot " + memory + " is corrupt: checksum mismatch (sha256 " +
                  memory_sum.substr(0, 12) + ", the manifest recorded " +
                  m.memory_sha256.substr(0, 12) + ")");
  }
  return {};
}

Result<SnapshotManifest> ReadSnapshotManifest(const std::string& dir) {
  std::string manifest_path = dir + "/" + kManifestName;
  if (::access(manifest_path.c_str(), F_OK) != 0) {
    if (errno == ENOENT)
      return std::unexpected(
          Error{"no snapshot in " + dir + " (no " + kManifestName + ")", ENOENT});
    return FailErrno("access " + manifest_path);
  }
  std::string text = CELLA_TRY(ReadFileToString(manifest_path, kMaxManifest));
  SnapshotManifest m = CELLA_TRY_CTX(DecodeManifest(text), manifest_path);
  std::string state = dir + "/" + m.state_file;
  struct stat st {};
  if (::stat(state.c_str(), &st) != 0) return FailErrno("snapshot state " + state);
  if (static_cast<uint64_t>(st.st_size) != m.size_bytes)
    return Fail("snapshot " + state + " is corrupt: " + std::to_string(st.st_size) +
                " bytes, the manifest recorded " + std::to_string(m.size_bytes) +
                (static_cast<uint64_t>(st.st_size) < m.size_bytes ? " (truncated)" : ""));
  if (!m.memory_file.empty()) {
    std::string memory = dir + "/" + m.memory_file;
    if (::stat(memory.c_str(), &st) != 0) return FailErrno("snapshot memory " + memory);
    // QEMU maps it as the guest's RAM: a short file would fault the guest.
    if (static_cast<uint64_t>(st.st_size) != m.memory_bytes)
      return Fail("snapshot " + memory + " is corrupt: " + std::to_string(st.st_size) +
                  " bytes, the guest has " + std::to_string(m.memory_bytes) +
                  (static_cast<uint64_t>(st.st_size) < m.memory_bytes ? " (truncated)" : ""));
  }
  return m;
}

namespace {

Status PwriteAll(int fd, std::string_view bytes, off_t offset, const std::string& what) {
  while (!bytes.empty()) {
    ssize_t n = ::pwrite(fd, bytes.data(), bytes.size(), offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("write " + what);
    bytes.remove_prefix(size_t(n));
    offset += n;
  }
  return {};
}

// Copies [offset, offset+length) of `in` to the same place in `out`.
Status CopyRange(int in, int out, off_t offset, off_t length, const std::string& what) {
  off_t in_off = offset, out_off = offset;
  while (length > 0) {
    ssize_t n = ::copy_file_range(in, &in_off, out, &out_off, static_cast<size_t>(length), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP)) {
      // No in-kernel copy between these files: through a buffer.
      std::vector<char> buf(1 << 20);
      while (length > 0) {
        size_t want = static_cast<size_t>(std::min<off_t>(length, off_t(buf.size())));
        ssize_t r = ::pread(in, buf.data(), want, in_off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return FailErrno("read " + what);
        if (r == 0) return Fail("copy " + what + ": it shrank while being copied");
        CELLA_TRY(PwriteAll(out, std::string_view(buf.data(), size_t(r)), out_off, what));
        in_off += r;
        out_off += r;
        length -= r;
      }
      return {};
    }
    if (n < 0) return FailErrno("copy_file_range " + what);
    if (n == 0) return Fail("copy " + what + ": it shrank while being copied");
    length -= n;
  }
  return {};
}

}  // namespace

Result<bool> CloneOrCopySparse(const std::string& from, const std::string& to) {
  UniqueFd in(::open(from.c_str(), O_RDONLY | O_CLOEXEC));
  if (!in) return FailErrno("open " + from);
  struct stat st {};
  if (::fstat(in.Get(), &st) != 0) return FailErrno("stat " + from);
  if (!S_ISREG(st.st_mode)) return Fail(from + " is not a regular file");
  UniqueFd out(::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!out) return FailErrno("create " + to);
  auto fail = [&](Error e) -> Result<bool> {
    out.Reset();
    ::unlink(to.c_str());
    return std::unexpected(std::move(e));
  };
  // The copy must be on disk before the snapshot that names it commits: a
  // later rename orders nothing for the data (a crash would restore a guest
  // over a zero-filled disk).
  if (::ioctl(out.Get(), FICLONE, in.Get()) == 0) {
    if (::fsync(out.Get()) != 0) return fail(Error::FromErrno("fsync " + to));
    return true;
  }
  if (errno != EOPNOTSUPP && errno != EXDEV && errno != EINVAL && errno != ENOTTY &&
      errno != ENOSYS)
    return fail(Error::FromErrno("clone " + from));
  if (::ftruncate(out.Get(), st.st_size) != 0) return fail(Error::FromErrno("truncate " + to));
  off_t offset = 0;
  while (offset < st.st_size) {
    off_t data = ::lseek(in.Get(), offset, SEEK_DATA);
    if (data < 0 && errno == ENXIO) break;  // only a hole is left
    if (data < 0) return fail(Error::FromErrno("seek data in " + from));
    off_t hole = ::lseek(in.Get(), data, SEEK_HOLE);
    if (hole < 0) return fail(Error::FromErrno("seek hole in " + from));
    hole = std::min<off_t>(hole, st.st_size);
    if (auto copied = CopyRange(in.Get(), out.Get(), data, hole - data, from + " to " + to);
        !copied)
      return fail(copied.error());
    offset = hole;
  }
  if (::fsync(out.Get()) != 0) return fail(Error::FromErrno("fsync " + to));
  return false;
}

Result<std::vector<uint8_t>> FreshRngSeed() {
  std::vector<uint8_t> seed(kRngSeedBytes);
  size_t got = 0;
  while (got < seed.size()) {
    ssize_t n = ::getrandom(seed.data() + got, seed.size() - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("getrandom");
    got += static_cast<size_t>(n);
  }
  return seed;
}

Status FsyncFile(const std::string& path) { return FsyncPath(path, O_RDONLY); }

Status RemoveSnapshot(const std::string& dir) {
  // The commit point goes first: a removal cut short leaves files that
  // are never trusted, not a manifest whose files are gone.
  const std::string manifest = dir + "/" + kManifestName;
  if (::unlink(manifest.c_str()) != 0 && errno != ENOENT && errno != ENOTDIR)
    return FailErrno("remove " + manifest);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  if (ec) return Fail("remove snapshot " + dir + ": " + ec.message());
  return {};
}

}  // namespace cella::sandbox
