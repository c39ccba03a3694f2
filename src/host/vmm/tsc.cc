#include "host/vmm/tsc.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>

#include "base/io.h"
#include "base/unique_fd.h"

namespace cella::vmm {

namespace {

std::string Join(const std::string& root, std::string_view rel) {
  if (root.empty() || root == "/") return "/" + std::string(rel);
  return (root.back() == '/' ? root : root + "/") + std::string(rel);
}

// "2596.148" -> 2596148 (MHz with up to 3 decimals -> kHz), no floating point.
std::optional<uint64_t> MhzTextToKhz(std::string_view text) {
  size_t i = 0;
  while (i < text.size() && text[i] == ' ') ++i;
  uint64_t whole = 0;
  size_t start = i;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    whole = whole * 10 + static_cast<uint64_t>(text[i] - '0');
    if (whole > 1'000'000) return std::nullopt;  // > 1 THz: not a clock
    ++i;
  }
  if (i == start) return std::nullopt;
  uint64_t frac = 0;
  int digits = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      if (digits < 3) {
        frac = frac * 10 + static_cast<uint64_t>(text[i] - '0');
        ++digits;
      }
      ++i;
    }
  }
  while (digits < 3) {
    frac *= 10;
    ++digits;
  }
  uint64_t khz = whole * 1000 + frac;
  if (khz == 0) return std::nullopt;
  return khz;
}

std::optional<uint64_t> LastValueAfter(std::string_view log, std::string_view marker) {
  std::optional<uint64_t> found;
  size_t pos = 0;
  while ((pos = log.find(marker, pos)) != std::string_view::npos) {
    pos += marker.size();
    size_t end = log.find('\n', pos);
    std::string_view rest = log.substr(pos, end == std::string_view::npos ? end : end - pos);
    if (rest.find("MHz") != std::string_view::npos) {
      if (auto khz = MhzTextToKhz(rest)) found = khz;
    }
  }
  return found;
}

// /dev/kmsg yields one record per read() and EAGAIN at the end (O_NONBLOCK);
// a plain file (tests) reads as usual. Bounded either way.
Result<std::string> ReadKernelLog(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  std::string out;
  char buf[8192];
  for (int records = 0; records < 200000 && out.size() < (16u << 20); ++records) {
    ssize_t n = ::read(fd.Get(), buf, sizeof(buf));
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      if (out.back() != '\n') out.push_back('\n');
      continue;
    }
    if (n == 0 || errno == EAGAIN) break;
    if (errno == EINTR) continue;
    if (errno == EPIPE) continue;  // a record was overwritten while we read: skip it
    return FailErrno("read " + path);
  }
  return out;
}

}  // namespace

std::optional<uint64_t> ParseTscKhzFromKernelLog(std::string_view log) {
  if (auto refined = LastValueAfter(log, "Refined TSC clocksource calibration:")) return refined;
  return LastValueAfter(log, "tsc: Detected");
}

std::optional<uint64_t> ParseCpuMhzFromCpuinfo(std::string_view cpuinfo) {
  size_t pos = 0;
  while (pos < cpuinfo.size()) {
    size_t end = cpuinfo.find('\n', pos);
    std::string_view line = cpuinfo.substr(pos, end == std::string_view::npos ? end : end - pos);
    pos = end == std::string_view::npos ? cpuinfo.size() : end + 1;
    if (!line.starts_with("cpu MHz")) continue;
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    std::string_view value = line.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t'))
      value.remove_prefix(1);
    return MhzTextToKhz(value);
  }
  return std::nullopt;
}

Result<uint64_t> HostTscKhz(const std::string& host_root) {
  std::string sys_path = Join(host_root, "sys/devices/system/cpu/cpu0/tsc_freq_khz");
  if (auto text = ReadFileToString(sys_path, 4096)) {
    uint64_t khz = 0;
    auto [ptr, ec] = std::from_chars(text->data(), text->data() + text->size(), khz);
    if (ec == std::errc() && khz > 0) return khz;
  }
  std::string kmsg = Join(host_root, "dev/kmsg");
  if (auto log = ReadKernelLog(kmsg)) {
    if (auto khz = ParseTscKhzFromKernelLog(*log)) return *khz;
  }
  std::string cpuinfo_path = Join(host_root, "proc/cpuinfo");
  auto cpuinfo = ReadFileToString(cpuinfo_path, 4u << 20);
  if (cpuinfo) {
    if (auto khz = ParseCpuMhzFromCpuinfo(*cpuinfo)) return *khz;
  }
  return Fail("cannot determine the host TSC frequency: no " + sys_path + ", no TSC line in " +
              kmsg + ", no \"cpu MHz\" in " + cpuinfo_path);
}

}  // namespace cella::vmm
