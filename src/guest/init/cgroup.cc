#include "guest/init/cgroup.h"

#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "guest/init/console.h"
#include "guest/init/format.h"
#include "guest/init/fs_util.h"

namespace cella::init {

Status ApplyCpuQuota(double cpus) {
  if (cpus <= 0) return {};
  std::string cpu_max = CELLA_TRY(CpuMaxContent(cpus));
  CELLA_TRY_CTX(WriteExisting(std::string(kCgroupRoot) + "/cgroup.subtree_control", "+cpu"),
                "enable the cpu controller");
  if (::mkdir(kSandboxCgroup, 0755) != 0 && errno != EEXIST)
    return FailErrno(std::string("mkdir ") + kSandboxCgroup);
  CELLA_TRY(WriteExisting(std::string(kSandboxCgroup) + "/cpu.max", cpu_max));
  CELLA_TRY(
      WriteExisting(std::string(kSandboxCgroup) + "/cgroup.procs", std::to_string(::getpid())));
  Debug("cpu quota " + cpu_max + " on " + kSandboxCgroup);
  return {};
}

}  // namespace cella::init
