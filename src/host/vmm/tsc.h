// The host's TSC frequency, passed to the guest as tsc_early_khz=: without
// it, TCG guests hang at random in TSC calibration (3 of 15 boots measured;
// 0 of 30 with it). Thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace cella::vmm {

// "tsc: Refined TSC clocksource calibration: 2596.148 MHz" is preferred over
// "tsc: Detected 2596.148 MHz processor" (the last one of each kind wins).
// Accepts dmesg text or /dev/kmsg records. nullopt when neither is present.
std::optional<uint64_t> ParseTscKhzFromKernelLog(std::string_view log);
// First "cpu MHz : X" line of /proc/cpuinfo.
std::optional<uint64_t> ParseCpuMhzFromCpuinfo(std::string_view cpuinfo);

// Tries, in order: <root>/sys/devices/system/cpu/cpu0/tsc_freq_khz,
// the kernel log (<root>/dev/kmsg, when readable), <root>/proc/cpuinfo.
Result<uint64_t> HostTscKhz(const std::string& host_root = "/");

}  // namespace cella::vmm
