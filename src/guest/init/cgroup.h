// The sandbox's CPU limit: a cgroup v2 quota that PID 1 joins before it
// starts anything, so every process in the guest inherits it.
#pragma once

#include "base/result.h"

namespace cella::init {

inline constexpr const char* kCgroupRoot = "/sys/fs/cgroup";
inline constexpr const char* kSandboxCgroup = "/sys/fs/cgroup/sandbox";

// Enables +cpu in the root's subtree_control, creates kSandboxCgroup with
// cpu.max for `cpus` (fractional), and moves the calling process into it.
// cpus <= 0 does nothing.
Status ApplyCpuQuota(double cpus);

}  // namespace cella::init
