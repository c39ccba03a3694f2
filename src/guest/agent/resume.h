// What the guest does when the host says it woke the VM from a snapshot
// (protocol op `resumed`): the wall clock is set to the host's (it stood
// still while the VM slept), and a resume counter that guest programs can
// read goes up by one, so they can re-check their time-outs; and the kernel's
// RNG is reseeded from host bytes, so copies of one snapshot (fork, restore,
// warm templates) do not produce the same "random" numbers.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "base/result.h"
#include "protocol/messages.h"

namespace cella::agent {

// Where the count lives: one decimal number and a newline, replaced
// atomically. /run is a tmpfs, so it restarts at 0 on a cold boot.
inline constexpr const char* kResumeCountPath = "/run/cella/resume-count";

// Mixes `seed` into the kernel's entropy pool (ioctl RNDADDENTROPY on
// /dev/urandom, crediting its bits: they come from the host's getrandom) and
// then forces the CRNG to reseed from the pool at once (RNDRESEEDCRNG), so
// every read of /dev/urandom or getrandom() after it depends on the seed.
// Without the forced reseed the kernel would keep serving from the restored
// CRNG state for up to a minute. Needs CAP_SYS_ADMIN (the agent is root).
// An empty seed or one above protocol::kMaxRngSeed is refused; every
// failing call is an error naming it (no partial success is reported).
Status ReseedKernelRng(std::span<const uint8_t> seed);
// The same on another device node (tests: a file that is not a random
// device must fail at the ioctl, not succeed silently).
Status ReseedKernelRngAt(const std::string& device, std::span<const uint8_t> seed);

// Sets CLOCK_REALTIME to request.realtime_ns, reseeds the RNG when the
// request carries a seed (ReseedKernelRng), then increments the number in
// `count_path` (missing or unreadable = 0; the directory is created).
// Returns the new count. A clock that cannot be set or an RNG that cannot
// be reseeded is an error (the count is left alone: a program must not
// believe its clock is right or its random numbers its own).
Result<uint64_t> ApplyResume(const protocol::ResumedRequest& request,
                             const std::string& count_path = kResumeCountPath);

}  // namespace cella::agent
