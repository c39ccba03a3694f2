#include "guest/init/template_point.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"
#include "guest/agent/resume.h"
#include "guest/init/console.h"
#include "guest/init/serve_agent.h"
#include "protocol/config.h"
#include "protocol/warm.h"

namespace cella::init {
namespace {

constexpr const char* kBlkDriverDir = "/sys/bus/virtio/drivers/virtio_blk";

std::string Trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

Status WriteSysfs(const std::string& path, std::string_view value) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  ssize_t n = ::write(fd.Get(), value.data(), value.size());
  if (n < 0) return FailErrno("write " + path + " <- " + std::string(value));
  if (static_cast<size_t>(n) != value.size()) return Fail("short write to " + path);
  return {};
}

// The serial of the one block device under /sys/.../virtioN/block/.
Result<std::string> DiskSerialOf(const std::string& device_dir) {
  std::string block_dir = device_dir + "/block";
  DIR* dir = ::opendir(block_dir.c_str());
  if (dir == nullptr) return FailErrno("opendir " + block_dir);
  std::string serial;
  bool found = false;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (!name.starts_with("vd")) continue;
    found = true;
    auto text = ReadFileToString(block_dir + "/" + name + "/serial", 4096);
    if (text) serial = Trimmed(*text);
  }
  ::closedir(dir);
  if (!found) return Fail("no block device under " + block_dir);
  return serial;
}

// Unbinds every bound virtio-blk device whose disk is not the image's;
// returns their device names ("virtio3") to bind again later.
Result<std::vector<std::string>> UnbindSandboxDisks() {
  std::vector<std::string> devices;
  DIR* dir = ::opendir(kBlkDriverDir);
  if (dir == nullptr) return FailErrno(std::string("opendir ") + kBlkDriverDir);
  errno = 0;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name.starts_with("virtio")) devices.push_back(name);
  }
  int err = errno;
  ::closedir(dir);
  if (err != 0) return FailErrno(std::string("readdir ") + kBlkDriverDir, err);
  std::vector<std::string> unbound;
  for (const std::string& device : devices) {
    std::string serial = CELLA_TRY(DiskSerialOf(std::string(kBlkDriverDir) + "/" + device));
    if (serial.starts_with("cella-lower") || serial == "cella-root") continue;
    CELLA_TRY(WriteSysfs(std::string(kBlkDriverDir) + "/unbind", device));
    Debug("template point: unbound " + device + " (" + serial + ")");
    unbound.push_back(device);
  }
  return unbound;
}

// Reads one line from the port (blocking: the template waits here for ever,
// its clone gets the line at once); bounded by kMaxWarmLine.
Result<std::string> ReadLine(int fd) {
  std::string line;
  char c = 0;
  while (line.size() < protocol::kMaxWarmLine) {
    ssize_t n = ::read(fd, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("read agent port");
    // No host connected: the port reads EOF. Wait for one.
    if (n == 0) {
      ::usleep(20'000);
      continue;
    }
    line.push_back(c);
    if (c == '\n') return line;
  }
  return Fail("warm go line longer than " + std::to_string(protocol::kMaxWarmLine) + " bytes");
}

}  // namespace

Status AwaitWarmStart(Deadline port_deadline) {
  std::vector<std::string> unbound = CELLA_TRY_CTX(UnbindSandboxDisks(), "unbind sandbox disks");
  std::string port = CELLA_TRY(FindVirtioPort(protocol::kDefaultAgentPort, port_deadline));
  protocol::WarmGo go;
  {
    UniqueFd fd(::open(port.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY));
    if (!fd) return FailErrno("open agent port " + port);
    std::string_view hello = protocol::kTemplatePointLine;
    ssize_t n = ::write(fd.Get(), hello.data(), hello.size());
    if (n != static_cast<ssize_t>(hello.size())) return FailErrno("write template point");
    std::string line = CELLA_TRY(ReadLine(fd.Get()));
    go = CELLA_TRY(protocol::ParseWarmGo(line));
  }
  // First the RNG: nothing below may draw from the template's CRNG state.
  CELLA_TRY(agent::ReseedKernelRng(go.seed));
  timespec now{};
  now.tv_sec = static_cast<time_t>(go.realtime_ns / 1'000'000'000);
  now.tv_nsec = static_cast<long>(go.realtime_ns % 1'000'000'000);
  if (::clock_settime(CLOCK_REALTIME, &now) != 0) return FailErrno("clock_settime");
  for (const std::string& device : unbound)
    CELLA_TRY(WriteSysfs(std::string(kBlkDriverDir) + "/bind", device));
  Debug("warm start: " + std::to_string(unbound.size()) + " disks probed afresh");
  return {};
}

Status RecordStartKind(bool warm) {
  if (::mkdir("/run/cella", 0755) != 0 && errno != EEXIST) return FailErrno("mkdir /run/cella");
  return WriteStringToFile(kStartKindPath, warm ? "warm\n" : "cold\n", 0644);
}

}  // namespace cella::init
