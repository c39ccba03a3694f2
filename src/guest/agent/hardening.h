// Child-side hardening applied just before exec (unless the request is
// privileged): drop dangerous capabilities from the bounding set, set
// no_new_privs, and install a seccomp filter refusing ptrace-style and
// kexec syscalls with EPERM.
//
// Both functions run between fork and exec: they only make syscalls on
// static data (no allocation, no locks) and return 0 or an errno value.
#pragma once

namespace cella::agent {

// PR_CAPBSET_DROP of CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_RAWIO,
// CAP_SYS_PTRACE, CAP_SYS_BOOT. Needs CAP_SETPCAP, so call it before
// switching to an unprivileged user.
int DropBoundingCapabilities();

// PR_SET_NO_NEW_PRIVS, then the seccomp filter. Works unprivileged (after
// setuid) because no_new_privs is set first.
int ApplyNoNewPrivsAndSeccomp();

}  // namespace cella::agent
