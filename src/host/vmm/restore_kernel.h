// The kernel a restoring QEMU is given. A warm clone, a resume and a fork
// copy take guest RAM from a template or a snapshot and never run the
// kernel QEMU loads; QEMU still reads `-kernel` and `-initrd` whole into its
// own memory at start-up and keeps them for a reset that `-no-reboot` never
// performs (measured: ~13.5 MiB of a clone's anonymous memory for the
// Debian cloud kernel, and the time to read and fault it in). A restore is
// given the kernel's boot-protocol header instead (setup sectors plus one
// page), which QEMU's bzImage loader accepts, and no initrd: the machine
// and its migrated state are the same, the guest is never told. A kernel
// booted through PVH (an ELF, host/kernel/pvh.h) gets an ELF naming the same
// entry with nothing to load: QEMU then picks the same option ROM.
#pragma once

#include <string>

#include "base/result.h"

namespace cella::vmm {

// Bytes of payload kept after the setup sectors (any non-empty amount
// satisfies QEMU's loader; a page keeps it well clear of its checks).
inline constexpr size_t kRestoreKernelPayload = 4096;

// Writes the header-only copy of the bzImage at `kernel_path` (or the PVH
// stub of the ELF there) to `out_path`, replacing it, and returns true;
// returns false, writing nothing, when the kernel is neither a bzImage (no
// "HdrS" boot-protocol signature) nor a PVH ELF, in which case the caller
// passes the real kernel and initrd.
Result<bool> WriteRestoreKernel(const std::string& kernel_path, const std::string& out_path);

}  // namespace cella::vmm
