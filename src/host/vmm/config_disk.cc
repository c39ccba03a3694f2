#include "host/vmm/config_disk.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>

#include "base/io.h"
#include "host/os/process.h"

namespace cella::vmm {

Result<std::string> WriteConfigDisk(const std::string& json, const std::string& out_path) {
  if (out_path.empty()) return Fail("WriteConfigDisk: empty output path");
  std::string parent = out_path.substr(0, out_path.find_last_of('/') + 1);
  std::string dir = (parent.empty() ? std::string("./") : parent) + ".config-disk.XXXXXX";
  if (::mkdtemp(dir.data()) == nullptr) return FailErrno("mkdtemp " + dir);
  std::string file = dir + "/config.json";
  auto build = [&]() -> Status {
    CELLA_TRY(WriteStringToFile(file, json, 0644));
    // 1 KiB blocks, no journal, few inodes: the smallest image mkfs accepts
    // quickly. Size: the content twice over plus fixed metadata room.
    size_t kib = std::max<size_t>(1024, (json.size() * 2) / 1024 + 512);
    if (::unlink(out_path.c_str()) != 0 && errno != ENOENT) return FailErrno("unlink " + out_path);
    CELLA_TRY(host::CheckCommand({"mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "16", "-O",
                                  "^has_journal,^resize_inode", "-E", "root_owner=0:0", "-L",
                                  "cella-config", "-d", dir, out_path, std::to_string(kib) + "k"},
                                 std::chrono::seconds(60)));
    return {};
  };
  Status st = build();
  if (::unlink(file.c_str()) != 0 && errno != ENOENT && st) st = FailErrno("unlink " + file);
  if (::rmdir(dir.c_str()) != 0 && st) st = FailErrno("rmdir " + dir);
  if (!st) return std::unexpected(std::move(st.error()).WithContext("config disk " + out_path));
  return out_path;
}

}  // namespace cella::vmm
