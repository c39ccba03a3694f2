#include "guest/init/fuse_share.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <string>

#include "guest/init/fs_util.h"

namespace cella::init {
namespace {

// index -> the /dev/fuse descriptor its mount was made with (never closed:
// closing the last one would abort the mount).
std::map<uint32_t, UniqueFd>& Mounted() {
  static std::map<uint32_t, UniqueFd> mounted;
  return mounted;
}

Status MountShare(const protocol::HostShare& share, int fuse_fd) {
  bool is_file = !share.file.empty();
  UniqueFd target = is_file ? CELLA_TRY(OpenFileBeneath("/", share.path))
                            : CELLA_TRY(OpenDirBeneath("/", share.path));
  std::string options = "fd=" + std::to_string(fuse_fd) +
                        (is_file ? ",rootmode=100000" : ",rootmode=40000") +
                        ",user_id=0,group_id=0,allow_other,default_permissions";
  unsigned long flags = MS_NOSUID | MS_NODEV;
  if (share.mode != protocol::MountMode::kReadWrite) flags |= MS_RDONLY;
  return Mount("cella-" + share.tag, FdPath(target.Get()), "fuse", flags, options);
}

}  // namespace

Result<UniqueFd> ServeFuseShare(const protocol::Config& config, uint32_t index) {
  if (index >= config.host_shares.size())
    return std::unexpected(Error{"serve_share: no share " + std::to_string(index), EINVAL});
  const protocol::HostShare& share = config.host_shares[index];
  if (!share.fuse)
    return std::unexpected(
        Error{"serve_share: share " + std::to_string(index) + " is not served over FUSE", EINVAL});
  auto& mounted = Mounted();
  auto it = mounted.find(index);
  if (it == mounted.end()) {
    UniqueFd fuse(::open("/dev/fuse", O_RDWR | O_CLOEXEC));
    if (!fuse) return FailErrno("open /dev/fuse (is fuse.ko loaded?)");
    CELLA_TRY_CTX(MountShare(share, fuse.Get()),
                  "host_shares[" + std::to_string(index) + "] (" + share.path + ")");
    it = mounted.emplace(index, std::move(fuse)).first;
  }
  UniqueFd copy(::fcntl(it->second.Get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) return FailErrno("dup /dev/fuse");
  return copy;
}

}  // namespace cella::init
