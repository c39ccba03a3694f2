// Kernel modules and block devices, udev-less: loads the modules the host
// listed in /lib/modules/cella.order and keeps /dev/disk/by-id/virtio-<serial>
// links in step with /sys/block/vd*/serial.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "base/result.h"
#include "guest/init/format.h"

namespace cella::init {

inline constexpr const char* kModuleOrderPath = "/lib/modules/cella.order";
inline constexpr const char* kConfigDiskSerial = "cella-config";
inline constexpr const char* kConfigDiskLink = "/dev/disk/by-id/virtio-cella-config";
// The seed's fixed config disk position, used when disks have no serials.
inline constexpr const char* kConfigDiskFallback = "/dev/vdc";

using Deadline = std::chrono::steady_clock::time_point;

// The module groups listed in order_path (format.h: ParseModuleOrder). A
// missing, unreadable or malformed order file is an error.
Result<std::vector<ModuleGroup>> ReadModuleOrder(const std::string& order_path);

// Loads the group's modules in order with finit_module. EEXIST counts as
// loaded; any other failure prints one line and continues (a later mount or
// device wait then fails with the precise error). Returns how many loaded.
int LoadModuleGroup(const ModuleGroup& group);

// Creates /dev/disk/by-id/virtio-<serial> -> ../../vdX for every virtio disk
// that has a serial. Idempotent.
Status ScanDiskLinks();

// Waits until device exists (rescanning disk links), or fails at deadline.
Status WaitForDevice(const std::string& device, Deadline deadline);

// The config disk: the "cella-config" serial link, or /dev/vdc when the
// disks carry no serials (seed layout). Waits until deadline.
Result<std::string> FindConfigDevice(Deadline deadline);

}  // namespace cella::init
