#include "guest/init/console.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"

namespace cella::init {
namespace {
Verbosity g_verbosity = Verbosity::kQuiet;

void WriteLine(std::string_view prefix, std::string_view text) {
  std::string line;
  line.reserve(prefix.size() + text.size() + 1);
  line += prefix;
  line += text;
  line += '\n';
  // Nowhere left to report a console write failure: the console is the
  // reporting channel itself.
  (void)WriteAll(STDERR_FILENO, line);
}
}  // namespace

void SetVerbosity(Verbosity verbosity) { g_verbosity = verbosity; }
bool DebugEnabled() { return g_verbosity == Verbosity::kDebug; }

void Say(std::string_view text) { WriteLine("cella-init: ", text); }

void Debug(std::string_view text) {
  if (!DebugEnabled()) return;
  // Boot timelines (docs/performance.md): wall clock (the host's on a warm
  // start, set by the go line) and time since the kernel started.
  timespec wall{};
  timespec up{};
  (void)::clock_gettime(CLOCK_REALTIME, &wall);
  (void)::clock_gettime(CLOCK_MONOTONIC, &up);
  char stamp[64];
  int n = std::snprintf(stamp, sizeof stamp, "t=%lld.%03ld up=%lld.%03ld ",
                        static_cast<long long>(wall.tv_sec), wall.tv_nsec / 1'000'000,
                        static_cast<long long>(up.tv_sec), up.tv_nsec / 1'000'000);
  std::string prefix = "cella-init: debug: ";
  if (n > 0) prefix.append(stamp, static_cast<size_t>(n));
  WriteLine(prefix, text);
}

void SayError(std::string_view message) { WriteLine("cella-init: error: ", message); }

Status EnsureConsoleStdio() {
  bool all_open = true;
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) < 0) all_open = false;
  }
  if (all_open) return {};
  int console = ::open("/dev/console", O_RDWR | O_NOCTTY);
  if (console < 0) return FailErrno("open /dev/console");
  for (int fd = 0; fd <= 2; ++fd) {
    if (fd == console) continue;
    if (::dup2(console, fd) < 0) {
      int err = errno;
      if (console > 2) ::close(console);
      return FailErrno("dup2 /dev/console to fd " + std::to_string(fd), err);
    }
  }
  if (console > 2) ::close(console);
  return {};
}

namespace {

// A filesystem left mounted read-write at power-off keeps its "needs
// recovery" mark, and the next sandbox that attaches it read-only cannot
// mount it. Remounting read-only flushes the journal and clears the mark.
// Best effort: a file still open for writing makes it fail (EBUSY), and
// then the sync below is what remains.
void RemountBlockFilesystemsReadOnly() {
  auto mounts = ReadFileToString("/proc/self/mounts", 1 << 20);
  if (!mounts) return;
  std::vector<std::string> targets;
  size_t pos = 0;
  while (pos < mounts->size()) {
    size_t end = mounts->find('\n', pos);
    if (end == std::string::npos) end = mounts->size();
    std::string_view line(mounts->data() + pos, end - pos);
    pos = end + 1;
    // device target fstype options ...
    size_t a = line.find(' ');
    size_t b = a == std::string_view::npos ? a : line.find(' ', a + 1);
    size_t c = b == std::string_view::npos ? b : line.find(' ', b + 1);
    if (c == std::string_view::npos) continue;
    std::string_view target = line.substr(a + 1, b - a - 1);
    std::string_view fstype = line.substr(b + 1, c - b - 1);
    std::string_view options = line.substr(c + 1);
    if (fstype != "ext4" || !options.starts_with("rw")) continue;
    // Mount points with spaces are escaped (\040); ours have none.
    if (target.find('\\') != std::string_view::npos) continue;
    targets.emplace_back(target);
  }
  // Innermost first.
  for (auto it = targets.rbegin(); it != targets.rend(); ++it) {
    if (::mount(nullptr, it->c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr) != 0)
      Debug("remount " + *it + " read-only: " + std::strerror(errno));
  }
}

}  // namespace

void PowerOff() {
  ::sync();
  RemountBlockFilesystemsReadOnly();
  ::reboot(RB_POWER_OFF);
  SayError(std::string("reboot(RB_POWER_OFF): ") + std::strerror(errno) + "; trying halt");
  ::reboot(RB_HALT_SYSTEM);
  ::reboot(RB_AUTOBOOT);
  SayError("cannot power off, halt or reboot; sleeping forever");
  for (;;) ::pause();
}

void FailAndPowerOff(const Error& error) {
  SayError(error.message);
  PowerOff();
}

void PanicAndPowerOff(const char* what) noexcept {
  static constexpr std::string_view kPrefix = "cella-init: error: unexpected exception: ";
  std::array<iovec, 3> parts{{
      {const_cast<char*>(kPrefix.data()), kPrefix.size()},
      {const_cast<char*>(what), std::strlen(what)},
      {const_cast<char*>("\n"), 1},
  }};
  // The console is the reporting channel itself: nowhere to report its failure.
  (void)::writev(STDERR_FILENO, parts.data(), static_cast<int>(parts.size()));
  ::sync();
  // Each call returns only on failure; the next one is the fallback.
  (void)::reboot(RB_POWER_OFF);
  (void)::reboot(RB_HALT_SYSTEM);
  (void)::reboot(RB_AUTOBOOT);
  for (;;) ::pause();
}

}  // namespace cella::init
