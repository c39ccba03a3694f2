// Holding Ctrl-C back while a command makes things it must remove again
// (`cella fork`): SIGINT, SIGTERM and SIGHUP are blocked for the holder's
// lifetime, and the command looks at them between its steps (Check).
//
// During a long wait (the source's save, up to its time-out) the command
// watches WakeFd(): the first Ctrl-C is only noted (the wait goes on, the
// command stops at its next Check), a second Ctrl-C, or SIGTERM or SIGHUP,
// gives up at once (GiveUp() says true). Either way the command cleans up
// first; a signal taken is raised again when the holder ends, so the CLI
// ends of it as it would have.
//
// Threads started meanwhile inherit the mask; the supervisors spawned reset
// it. One holder at a time, on the thread that made it.
#pragma once

#include <signal.h>

#include "base/result.h"
#include "base/unique_fd.h"

namespace cella::cli {

class InterruptHold {
 public:
  InterruptHold();
  ~InterruptHold();
  InterruptHold(const InterruptHold&) = delete;
  InterruptHold& operator=(const InterruptHold&) = delete;

  // Fails (EINTR) once one of the signals came, taken or pending.
  Status Check() const;
  // Readable when one of the signals is pending (-1 if none could be made:
  // then waits cannot be given up early, only by Check after them).
  int WakeFd() const { return signal_fd_.Get(); }
  // After WakeFd() became readable: takes the signal; true when the wait
  // should be given up (a second SIGINT, any SIGTERM or SIGHUP). Prints a
  // hint to stderr at the first Ctrl-C.
  bool GiveUp();

 private:
  sigset_t set_{};
  sigset_t old_{};
  UniqueFd signal_fd_;
  int taken_ = 0;  // the last signal taken from signal_fd_ (0: none)
  int interrupts_ = 0;
};

}  // namespace cella::cli
