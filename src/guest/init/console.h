// Console output of the guest init. PID 1's stdout/stderr are the console
// (ttyS0): one line per event, prefixed "cella-init: ", written with a single
// write(2) so lines from PID 1 and the workload do not interleave mid-line.
//
// Also the last resort: PowerOff() never returns, because PID 1 exiting
// panics the kernel. Single-threaded use (PID 1 has one thread).
#pragma once

#include <string_view>

#include "base/result.h"

namespace cella::init {

enum class Verbosity { kQuiet, kDebug };

void SetVerbosity(Verbosity verbosity);
bool DebugEnabled();

// "cella-init: <text>\n" on stderr.
void Say(std::string_view text);
// Same, only with cella.debug=1.
void Debug(std::string_view text);
// The line the host watches for: "cella-init: error: <message>".
void SayError(std::string_view message);

// Makes sure fds 0, 1 and 2 are open on /dev/console (the kernel only sets
// them up when the initramfs has a /dev/console node). Call once /dev is
// mounted.
Status EnsureConsoleStdio();

// sync(), then reboot(RB_POWER_OFF). Falls back to halt, then reboot, then
// sleeping forever, because there is nothing else PID 1 may do.
[[noreturn]] void PowerOff();

// SayError(error), then PowerOff().
[[noreturn]] void FailAndPowerOff(const Error& error);

// The last resort when an exception escaped (possibly bad_alloc): reports
// "cella-init: error: unexpected exception: <what>" and powers off like
// PowerOff(), without allocating or throwing.
[[noreturn]] void PanicAndPowerOff(const char* what) noexcept;

}  // namespace cella::init
