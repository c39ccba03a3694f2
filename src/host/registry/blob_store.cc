#include "host/registry/blob_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <memory>

#include "base/io.h"
#include "host/os/paths.h"
#include "host/registry/reference.h"

namespace cella::registry {

std::string BlobStore::PathFor(std::string_view digest) const {
  std::string_view hex = digest.substr(digest.find(':') + 1);
  return Dir() + "/" + std::string(hex);
}

Result<bool> BlobStore::Has(std::string_view digest, int64_t size) const {
  CELLA_TRY(DigestHex(digest));
  std::string path = PathFor(digest);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return false;
    return FailErrno("stat " + path);
  }
  if (!S_ISREG(st.st_mode)) return Fail(path + ": not a regular file");
  return size < 0 || st.st_size == size;
}

Status BlobStore::PutBytes(std::string_view digest, std::string_view bytes) const {
  auto writer = CELLA_TRY(
      BlobWriter::Open(*this, digest, static_cast<int64_t>(bytes.size()), ResumeMode::kStartOver));
  if (writer.AlreadyStored()) return {};
  CELLA_TRY(writer.Write(bytes));
  return writer.Commit();
}

Result<BlobWriter> BlobWriter::Open(const BlobStore& store, std::string_view digest, int64_t size,
                                    ResumeMode mode) {
  std::string hex = CELLA_TRY(DigestHex(digest));
  if (size < 0) return Fail("blob " + std::string(digest) + ": negative size");
  CELLA_TRY(host::MakeDirs(store.Dir(), 0755));
  BlobWriter w;
  w.digest_ = std::string(digest);
  w.size_ = size;
  w.final_path_ = store.Dir() + "/" + hex;
  w.partial_path_ = w.final_path_ + ".partial";
  std::string lock_path = w.final_path_ + ".lock";
  w.lock_ = UniqueFd(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!w.lock_) return FailErrno("open " + lock_path);
  int rc;
  do rc = ::flock(w.lock_.Get(), LOCK_EX);
  while (rc != 0 && errno == EINTR);
  if (rc != 0) return FailErrno("flock " + lock_path);

  bool present = CELLA_TRY(store.Has(digest, size));
  if (present) {
    w.already_stored_ = true;
    return w;
  }
  w.fd_ = UniqueFd(::open(w.partial_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!w.fd_) return FailErrno("open " + w.partial_path_);
  w.hash_ = std::make_unique<host::Sha256>();
  struct stat st {};
  if (::fstat(w.fd_.Get(), &st) != 0) return FailErrno("fstat " + w.partial_path_);
  if (mode == ResumeMode::kResume && st.st_size > 0 && st.st_size <= size) {
    CELLA_TRY(w.hash_->UpdateFromFile(w.partial_path_));
    w.offset_ = st.st_size;
    if (::lseek(w.fd_.Get(), 0, SEEK_END) < 0) return FailErrno("lseek " + w.partial_path_);
  } else if (st.st_size > 0) {
    CELLA_TRY(w.Restart());
  }
  return w;
}

Status BlobWriter::Restart() {
  if (::ftruncate(fd_.Get(), 0) != 0) return FailErrno("ftruncate " + partial_path_);
  if (::lseek(fd_.Get(), 0, SEEK_SET) < 0) return FailErrno("lseek " + partial_path_);
  hash_ = std::make_unique<host::Sha256>();
  offset_ = 0;
  return {};
}

Status BlobWriter::Write(std::string_view bytes) {
  if (static_cast<int64_t>(bytes.size()) > size_ - offset_) {
    return Fail("blob " + digest_ + ": size mismatch: more than the expected " +
                std::to_string(size_) + " bytes received");
  }
  CELLA_TRY_CTX(WriteAll(fd_.Get(), bytes), partial_path_);
  hash_->Update(bytes);
  offset_ += static_cast<int64_t>(bytes.size());
  return {};
}

Status BlobWriter::Commit() {
  auto discard = [&](std::string message) -> Status {
    // Wrong content: resuming from it would only fail again.
    if (::unlink(partial_path_.c_str()) != 0 && errno != ENOENT)
      return FailErrno(message + "; and unlink " + partial_path_);
    return Fail(std::move(message));
  };
  if (offset_ != size_) {
    return discard("blob " + digest_ + ": size mismatch: expected " + std::to_string(size_) +
                   " bytes, got " + std::to_string(offset_));
  }
  std::string actual = "sha256:" + hash_->HexDigest();
  if (actual != digest_) {
    return discard("blob " + digest_ + ": digest mismatch: content hashes to " + actual);
  }
  if (::fsync(fd_.Get()) != 0) return FailErrno("fsync " + partial_path_);
  if (::rename(partial_path_.c_str(), final_path_.c_str()) != 0)
    return FailErrno("rename " + partial_path_ + " -> " + final_path_);
  fd_.Reset();
  std::string dir = final_path_.substr(0, final_path_.rfind('/'));
  CELLA_TRY(FsyncDirectory(dir));
  return {};
}

}  // namespace cella::registry
