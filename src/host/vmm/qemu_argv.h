// The QEMU command line for a VM: a pure function of the VM description, so
// it is unit-tested without starting anything.
//
// Machine: `-M microvm` (virtio over mmio, ACPI, no PCI/firmware): the
// fastest QEMU machine to boot. Measured here (QEMU 7.2) it offers 24
// virtio-mmio transports (ACPI on, second IO-APIC); every disk, the
// virtio-serial device (agent link) and the NIC take one, so we count them
// and refuse a VM that needs more (kMicrovmVirtioTransports).
// `pit=off,pic=off,rtc=off` hung Debian's kernel, so the defaults stay.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/vmm/accel.h"
#include "host/vmm/vm_config.h"

namespace cella::vmm {

// QEMU device id of the agent's virtio-serial port.
inline constexpr const char* kAgentPortId = "agentport";

inline constexpr int kMicrovmVirtioTransports = 24;
// sockaddr_un.sun_path holds 107 characters plus the NUL.
inline constexpr size_t kMaxUnixSocketPath = 107;

struct QemuLaunch {
  std::string qemu_binary = "qemu-system-x86_64";
  Accel accel = Accel::kTcg;
  uint64_t tsc_khz = 0;      // 0: no tsc_early_khz= (only sane with KVM)
  std::string agent_socket;  // resolved paths (ResolveStatePaths)
  std::string qmp_socket;
  std::string console_log;
  // For a VM that restores (VMConfig.IncomingMigration): a header-only copy
  // of the kernel (restore_kernel.h) passed instead of KernelPath, and no
  // initrd. Empty: the real kernel and initrd, as for a boot.
  std::string restore_kernel;
};

// Per-VM runtime files, from VMConfig (SocketPath/LogPath win over StateDir).
struct StatePaths {
  std::string agent_socket;
  std::string qmp_socket;
  std::string console_log;
  std::string qemu_log;  // QEMU's own stdout/stderr
};
Result<StatePaths> ResolveStatePaths(const VMConfig& config);

// "console=ttyS0 panic=-1 quiet tsc_early_khz=<kHz> no_timer_check pci=off" +
// KernelArgs.
std::string BuildKernelCmdline(const VMConfig& config, uint64_t tsc_khz);

// An ordinary cold boot (no template part, no restore): its guest asks for
// its config on the agent port (protocol/warm.h) instead of mounting the
// config disk, and the kernel command line says so.
bool BootsWithColdGo(const VMConfig& config);

// How many virtio-mmio transports the VM uses.
int CountVirtioTransports(const VMConfig& config);

// Descriptors QEMU must inherit, in order: the i-th is fd
// host::kFirstInheritedFd + i in QEMU (host/os/process.h). Today only the
// TAP (VMConfig.NetworkFD), which BuildQemuArgv names as kQemuTapChildFd.
inline constexpr int kQemuTapChildFd = 3;  // == host::kFirstInheritedFd
std::vector<int> QemuChildFds(const VMConfig& config);

// Validates the config (errors name the field) and builds argv[0..].
// NetworkFD >= 0: `-netdev tap,fd=<kQemuTapChildFd>` (the caller passes
// QemuChildFds to the child); otherwise QEMU user-mode networking unless
// NoNetwork.
Result<std::vector<std::string>> BuildQemuArgv(const VMConfig& config, const QemuLaunch& launch);

// QEMU's option syntax doubles a comma inside a value.
std::string QemuEscape(std::string_view value);

}  // namespace cella::vmm
