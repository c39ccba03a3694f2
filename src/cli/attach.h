// Connects a guest process (exec session or the main process) to this
// terminal: output to stdout/stderr, stdin when interactive, SIGINT/SIGTERM/
// SIGHUP forwarded, and with a TTY the local terminal in raw mode and its
// window size followed (SIGWINCH).
//
// Call BlockForwardedSignals() in main's thread before any other thread
// starts, so the signals are only ever collected by the forwarder.
#pragma once

#include <functional>
#include <memory>

#include "base/result.h"
#include "host/agent/client.h"

namespace cella::cli {

void BlockForwardedSignals();

struct AttachOptions {
  bool interactive = false;  // forward stdin
  bool tty = false;          // the guest side has a pseudo-terminal
};

using SessionStarter =
    std::function<Result<std::unique_ptr<host::ExecSession>>(host::ExecCallbacks)>;

// Starts the session with callbacks writing to our stdout/stderr and runs it
// to its end.
Result<host::ExecStatus> AttachToTerminal(const SessionStarter& start, AttachOptions options);

// Rows and columns of our terminal, when stdin or stdout is one.
bool TerminalSize(uint16_t& rows, uint16_t& cols);

}  // namespace cella::cli
