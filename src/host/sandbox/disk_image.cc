#include "host/sandbox/disk_image.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cctype>
#include <charconv>
#include <cmath>

#include "base/unique_fd.h"
#include "host/os/process.h"

namespace cella::sandbox {

Status MakeExt4Image(const std::string& path, uint64_t size_bytes, const std::string& label) {
  {
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd) return FailErrno("create " + path);
    if (::ftruncate(fd.Get(), static_cast<off_t>(size_bytes)) != 0) {
      Error e = FailErrno("size " + path).error();
      (void)::unlink(path.c_str());
      return std::unexpected(e);
    }
  }
  // The root of a fresh volume is world-writable-free 0755 root; lazy init
  // defers inode-table zeroing to the guest's first mount.
  auto made = host::CheckCommand({"mkfs.ext4", "-q", "-F", "-m", "0", "-L", label.substr(0, 16),
                                  "-E", "lazy_itable_init=1,lazy_journal_init=1", path},
                                 std::chrono::seconds(60));
  if (!made) {
    (void)::unlink(path.c_str());
    return std::unexpected(std::move(made.error()).WithContext("make ext4 image " + path));
  }
  return {};
}

Result<bool> Ext4NeverMounted(const std::string& path) {
  // The ext4 superblock, 1024 bytes at offset 1024 (little-endian fields).
  constexpr off_t kSuperblockOffset = 1024;
  constexpr size_t kLastMountTime = 0x2c;  // s_mtime, le32
  constexpr size_t kMountCount = 0x34;     // s_mnt_count, le16
  constexpr size_t kMagic = 0x38;          // s_magic, le16 0xEF53
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  unsigned char sb[0x40];
  ssize_t n = ::pread(fd.Get(), sb, sizeof sb, kSuperblockOffset);
  if (n < 0) return FailErrno("read the superblock of " + path);
  const auto le16 = [&](size_t at) { return static_cast<unsigned>(sb[at] | sb[at + 1] << 8); };
  if (n != static_cast<ssize_t>(sizeof sb) || le16(kMagic) != 0xEF53)
    return Fail(path + " is not an ext4 image");
  const bool never_mounted_time = sb[kLastMountTime] == 0 && sb[kLastMountTime + 1] == 0 &&
                                  sb[kLastMountTime + 2] == 0 && sb[kLastMountTime + 3] == 0;
  return le16(kMountCount) == 0 && never_mounted_time;
}

Status RecoverExt4Image(const std::string& path) {
  UniqueFd lock(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!lock) return FailErrno("open " + path);
  while (::flock(lock.Get(), LOCK_EX) != 0) {
    if (errno != EINTR) return FailErrno("lock " + path);
  }
  auto ran = host::RunCommand({"e2fsck", "-p", path}, std::chrono::minutes(5));
  if (!ran) return std::unexpected(std::move(ran.error()).WithContext("check " + path));
  // 0: clean; 1: errors fixed; 2: fixed, reboot advised (meaningless here).
  if (ran->exit_code < 0 || ran->exit_code > 2) {
    return Fail("volume image " + path + " needs a manual repair (e2fsck -p exit " +
                std::to_string(ran->exit_code) + "): " + ran->output);
  }
  return {};
}

Result<uint64_t> ParseByteSize(std::string_view text) {
  std::string_view s = text;
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  std::string number(s.substr(0, i));
  std::string unit(s.substr(i));
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (number.empty()) return Fail("size \"" + std::string(text) + "\": want a number like 10G");
  double value = 0;
  auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), value);
  if (ec != std::errc() || end != number.data() + number.size() || !std::isfinite(value))
    return Fail("size \"" + std::string(text) + "\": not a number");
  double scale = 1;
  if (unit.empty() || unit == "b") {
    scale = 1;
  } else if (unit == "k" || unit == "kb" || unit == "kib") {
    scale = 1024.0;
  } else if (unit == "m" || unit == "mb" || unit == "mib") {
    scale = 1024.0 * 1024;
  } else if (unit == "g" || unit == "gb" || unit == "gib") {
    scale = 1024.0 * 1024 * 1024;
  } else if (unit == "t" || unit == "tb" || unit == "tib") {
    scale = 1024.0 * 1024 * 1024 * 1024;
  } else {
    return Fail("size \"" + std::string(text) + "\": unknown unit (use k, m, g or t)");
  }
  double bytes = value * scale;
  if (bytes > 16.0 * 1024 * 1024 * 1024 * 1024)
    return Fail("size \"" + std::string(text) + "\": at most 16t");
  return static_cast<uint64_t>(bytes);
}

Result<uint64_t> ParseDiskSize(std::string_view text) {
  uint64_t bytes = CELLA_TRY(ParseByteSize(text));
  if (bytes < (uint64_t{16} << 20)) return Fail("size \"" + std::string(text) + "\": at least 16m");
  // ext4 and the block layer want whole 4 KiB blocks.
  return bytes / 4096 * 4096;
}

}  // namespace cella::sandbox
