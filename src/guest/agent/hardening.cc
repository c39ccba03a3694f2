#include "guest/agent/hardening.h"

#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>

namespace cella::agent {
namespace {

constexpr unsigned kDroppedCaps[] = {CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PTRACE,
                                     CAP_SYS_BOOT};

constexpr unsigned kNrOffset = offsetof(struct seccomp_data, nr);
constexpr unsigned kArchOffset = offsetof(struct seccomp_data, arch);
constexpr unsigned kRetEperm = SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);
// x32 syscalls share AUDIT_ARCH_X86_64 but set this bit in nr; refusing them
// keeps "ptrace via the x32 table" from slipping past the number checks.
constexpr unsigned kX32SyscallBit = 0x40000000;

#define CELLA_DENY(nr) \
  BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, kRetEperm)

// Foreign architectures (i386 via int 0x80) get EPERM for everything: their
// syscall numbers differ, so the checks below would not apply to them.
const struct sock_filter kFilter[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, kArchOffset),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, kRetEperm),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, kNrOffset),
    BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, kX32SyscallBit, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, kRetEperm),
    CELLA_DENY(__NR_ptrace),
    CELLA_DENY(__NR_process_vm_readv),
    CELLA_DENY(__NR_process_vm_writev),
    CELLA_DENY(__NR_kexec_load),
    CELLA_DENY(__NR_kexec_file_load),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

#undef CELLA_DENY

}  // namespace

int DropBoundingCapabilities() {
  for (unsigned cap : kDroppedCaps) {
    // EINVAL: the kernel does not know this capability; nothing to drop.
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) return errno;
  }
  return 0;
}

int ApplyNoNewPrivsAndSeccomp() {
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
  struct sock_fprog prog = {
      static_cast<unsigned short>(sizeof(kFilter) / sizeof(kFilter[0])),
      const_cast<struct sock_filter*>(kFilter),
  };
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) return errno;
  return 0;
}

}  // namespace cella::agent
