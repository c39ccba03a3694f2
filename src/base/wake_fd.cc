#include "base/wake_fd.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>

#include "base/check.h"

namespace cella {

Result<WakeFd> WakeFd::Create(const std::string& owner) {
  UniqueFd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd) return FailErrno(owner + ": eventfd");
  return WakeFd(std::move(fd));
}

void WakeFd::Signal() const {
  if (!fd_) return;  // never created: no thread can be waiting on it
  uint64_t one = 1;
  ssize_t n;
  do {
    n = ::write(fd_.Get(), &one, sizeof one);
  } while (n < 0 && errno == EINTR);
  if (n != static_cast<ssize_t>(sizeof one))
    Die(CELLA_HERE, "cannot wake a thread to stop it",
        n < 0 ? std::strerror(errno) : "short write");
}

}  // namespace cella
