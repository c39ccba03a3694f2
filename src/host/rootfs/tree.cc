#include "host/rootfs/tree.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

namespace cella::rootfs {

namespace {

Result<UniqueFd> OpenAnonymousSpool(const std::string& work_dir) {
  int fd = ::open(work_dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) return UniqueFd(fd);
  // Filesystems without O_TMPFILE: a named file, unlinked at once.
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
    return FailErrno("open spool in work dir " + work_dir);
  }
  std::string path = work_dir + "/.cella-rootfs-spool-XXXXXX";
  fd = ::mkostemp(path.data(), O_CLOEXEC);
  if (fd < 0) return FailErrno("mkostemp " + path);
  UniqueFd owned(fd);
  if (::unlink(path.c_str()) != 0) return FailErrno("unlink spool " + path);
  return owned;
}

}  // namespace

Result<Tree> Tree::Create(const std::string& work_dir) {
  Tree tree;
  tree.spool_fd_ = CELLA_TRY(OpenAnonymousSpool(work_dir));
  tree.root_ = std::make_shared<Inode>();
  tree.root_->type = InodeType::kDirectory;
  tree.root_->permissions = 0755;
  return tree;
}

uint64_t Tree::ReserveSpool(uint64_t size) {
  uint64_t offset = spool_end_;
  spool_end_ += (size + kBlockSize - 1) / kBlockSize * kBlockSize;
  return offset;
}

}  // namespace cella::rootfs
