#include "guest/agent/resume.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>

#include "base/io.h"

namespace cella::agent {

Result<uint64_t> ApplyResume(const protocol::ResumedRequest& request,
                             const std::string& count_path) {
  timespec now{};
  now.tv_sec = static_cast<time_t>(request.realtime_ns / 1'000'000'000);
  now.tv_nsec = static_cast<long>(request.realtime_ns % 1'000'000'000);
  if (::clock_settime(CLOCK_REALTIME, &now) != 0) return FailErrno("clock_settime");

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
