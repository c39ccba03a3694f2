#include "guest/agent/resume.h"

#include <fcntl.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"

namespace cella::agent {

Status ReseedKernelRngAt(const std::string& device, std::span<const uint8_t> seed) {
  if (seed.empty()) return Fail("rng reseed: empty seed");
  if (seed.size() > protocol::kMaxRngSeed)
    return Fail("rng reseed: seed of " + std::to_string(seed.size()) + " bytes is above " +
                std::to_string(protocol::kMaxRngSeed));
  UniqueFd fd(::open(device.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) return FailErrno("rng reseed: open " + device);
  // struct rand_pool_info ends in a flexible array: built in a buffer of
  // whole u32s so the header and the bytes are both aligned.
  std::vector<uint32_t> buffer(2 + (seed.size() + 3) / 4, 0);
  auto* info = reinterpret_cast<rand_pool_info*>(buffer.data());
  info->entropy_count = static_cast<int>(seed.size() * 8);
  info->buf_size = static_cast<int>(seed.size());
  std::memcpy(info->buf, seed.data(), seed.size());
  if (::ioctl(fd.Get(), RNDADDENTROPY, info) != 0)
    return FailErrno("rng reseed: ioctl RNDADDENTROPY on " + device);
  if (::ioctl(fd.Get(), RNDRESEEDCRNG) != 0)
    return FailErrno("rng reseed: ioctl RNDRESEEDCRNG on " + device);
  return {};
}

Status ReseedKernelRng(std::span<const uint8_t> seed) {
  return ReseedKernelRngAt("/dev/urandom", seed);
}

Result<uint64_t> ApplyResume(const protocol::ResumedRequest& request,
                             const std::string& count_path) {
  timespec now{};
  now.tv_sec = static_cast<time_t>(request.realtime_ns / 1'000'000'000);
  now.tv_nsec = static_cast<long>(request.realtime_ns % 1'000'000'000);
  if (::clock_settime(CLOCK_REALTIME, &now) != 0) return FailErrno("clock_settime");
  if (!request.rng_seed.empty()) CELLA_TRY(ReseedKernelRng(request.rng_seed));

  uint64_t count = 0;
  if (auto text = ReadFileToString(count_path, 64)) {
    const char* begin = text->data();
    std::from_chars(begin, begin + text->size(), count);  // garbage reads as 0
  }
  ++count;
  std::string dir = count_path.substr(0, count_path.find_last_of('/'));
  if (!dir.empty() && ::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return FailErrno("mkdir " + dir);
  std::string tmp = count_path + ".tmp";
  CELLA_TRY(WriteStringToFile(tmp, std::to_string(count) + "\n", 0644));
  if (::rename(tmp.c_str(), count_path.c_str()) != 0) return FailErrno("rename " + tmp);
  return count;
}

}  // namespace cella::agent
