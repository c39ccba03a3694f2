// Test support for rootfs_*_test.cc: builds layer tarballs with libarchive's
// writer, temp directories, and runs external checkers with a time bound.
#pragma once

#include <archive.h>
#include <archive_entry.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "support/temp_dir.h"

namespace cella::rootfs::testing {

enum class Compression { kNone, kGzip, kZstd };

struct EntryMeta {
  unsigned mode = 0644;
  int64_t uid = 0;
  int64_t gid = 0;
  int64_t mtime = 1'700'000'000;
  long mtime_nsec = 0;
  std::vector<std::pair<std::string, std::string>> xattrs = {};
};

// Writes a pax tar (optionally compressed) to a file, entry by entry.
class TarBuilder {
 public:
  explicit TarBuilder(std::string path, Compression compression = Compression::kNone)
      : path_(std::move(path)), a_(archive_write_new()) {
    archive_write_set_format_pax(a_);
    // Names as raw bytes: the tests run in the C locale, where libarchive
    // cannot convert non-ASCII names to UTF-8.
    archive_write_set_format_option(a_, "pax", "hdrcharset", "BINARY");
    if (compression == Compression::kGzip) archive_write_add_filter_gzip(a_);
    if (compression == Compression::kZstd) archive_write_add_filter_zstd(a_);
    archive_write_set_bytes_in_last_block(a_, 1);
    if (archive_write_open_filename(a_, path_.c_str()) != ARCHIVE_OK) {
      ADD_FAILURE() << "open " << path_ << ": " << archive_error_string(a_);
    }
  }
  TarBuilder(const TarBuilder&) = delete;
  ~TarBuilder() { Close(); }

  TarBuilder& File(const std::string& path, const std::string& content, EntryMeta meta = {}) {
    return Add(path, AE_IFREG, meta, content.size(), [&](archive* a) {
      if (!content.empty()) archive_write_data(a, content.data(), content.size());
    });
  }
  // A file of `size` bytes whose content is Pattern(offset), written in chunks.
  TarBuilder& PatternFile(const std::string& path, uint64_t size, EntryMeta meta = {}) {
    return Add(path, AE_IFREG, meta, size, [&](archive* a) {
      std::string chunk;
      for (uint64_t off = 0; off < size; off += chunk.size()) {
        chunk = Pattern(off, std::min<uint64_t>(size - off, 1 << 20));
        archive_write_data(a, chunk.data(), chunk.size());
      }
    });
  }
  TarBuilder& Dir(const std::string& path, EntryMeta meta = {.mode = 0755}) {
    return Add(path, AE_IFDIR, meta, 0, nullptr);
  }
  TarBuilder& Symlink(const std::string& path, const std::string& target, EntryMeta meta = {}) {
    meta.mode = 0777;
    return Add(path, AE_IFLNK, meta, 0, nullptr,
               [&](archive_entry* e) { archive_entry_set_symlink(e, target.c_str()); });
  }
  TarBuilder& Hardlink(const std::string& path, const std::string& target) {
    return Add(path, AE_IFREG, {}, 0, nullptr,
               [&](archive_entry* e) { archive_entry_set_hardlink(e, target.c_str()); });
  }
  TarBuilder& Device(const std::string& path, unsigned type, unsigned major, unsigned minor,
                     EntryMeta meta = {}) {
    return Add(path, type, meta, 0, nullptr, [&](archive_entry* e) {
      archive_entry_set_rdevmajor(e, major);
      archive_entry_set_rdevminor(e, minor);
    });
  }
  TarBuilder& Fifo(const std::string& path, EntryMeta meta = {}) {
    return Add(path, AE_IFIFO, meta, 0, nullptr);
  }
  TarBuilder& Close() {
    if (a_ != nullptr) {
      EXPECT_EQ(archive_write_close(a_), ARCHIVE_OK) << archive_error_string(a_);
      archive_write_free(a_);
      a_ = nullptr;
    }
    return *this;
  }
  const std::string& path() const { return path_; }

  // Deterministic, position-dependent bytes (so misplaced blocks show).
  static std::string Pattern(uint64_t offset, uint64_t length) {
    std::string out(length, '\0');
    for (uint64_t i = 0; i < length; ++i) {
      uint64_t v = (offset + i) / 8 * 0x9e3779b97f4a7c15ull;
      out[i] = static_cast<char>(v >> (8 * ((offset + i) % 8)));
    }
    return out;
  }

 private:
  TarBuilder& Add(const std::string& path, unsigned type, const EntryMeta& meta, uint64_t size,
                  const std::function<void(archive*)>& data,
                  const std::function<void(archive_entry*)>& extra = nullptr) {
    archive_entry* e = archive_entry_new();
    archive_entry_set_pathname(e, path.c_str());
    archive_entry_set_filetype(e, type);
    archive_entry_set_perm(e, meta.mode);
    archive_entry_set_uid(e, meta.uid);
    archive_entry_set_gid(e, meta.gid);
    archive_entry_set_mtime(e, meta.mtime, meta.mtime_nsec);
    archive_entry_set_size(e, static_cast<la_int64_t>(size));
    for (const auto& [name, value] : meta.xattrs) {
      archive_entry_xattr_add_entry(e, name.c_str(), value.data(), value.size());
    }
    if (extra) extra(e);
    if (archive_write_header(a_, e) != ARCHIVE_OK) {
      ADD_FAILURE() << "write header " << path << ": " << archive_error_string(a_);
    }
    if (data) data(a_);
    archive_entry_free(e);
    return *this;
  }

  std::string path_;
  archive* a_;
};

using ::cella::testing::TempDir;

// Runs a shell command bounded by `timeout`; returns its exit status and
// combined output.
inline std::pair<int, std::string> RunCommand(const std::string& command, int seconds = 120) {
  std::string full = "timeout -k 5 " + std::to_string(seconds) + " " + command + " 2>&1";
  FILE* pipe = ::popen(full.c_str(), "r");
  if (pipe == nullptr) return {-1, "popen failed"};
  std::string output;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) output.append(buf, n);
  int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

// Loop-mounts an erofs image read-only for the test's duration. Mounting
// needs root; the product never does this.
class MountedImage {
 public:
  explicit MountedImage(const std::string& image, const std::string& mountpoint)
      : mountpoint_(mountpoint) {
    std::filesystem::create_directories(mountpoint_);
    auto [status, output] =
        RunCommand("mount -t erofs -o loop,ro '" + image + "' '" + mountpoint_ + "'", 60);
    mounted_ = status == 0;
    error_ = output;
  }
  ~MountedImage() {
    if (mounted_ && ::umount2(mountpoint_.c_str(), MNT_DETACH) != 0) {
      ADD_FAILURE() << "umount " << mountpoint_ << ": " << strerror(errno);
    }
  }
  bool mounted() const { return mounted_; }
  const std::string& error() const { return error_; }
  std::string operator/(const std::string& path) const { return mountpoint_ + "/" + path; }

 private:
  std::string mountpoint_;
  bool mounted_ = false;
  std::string error_;
};

}  // namespace cella::rootfs::testing
