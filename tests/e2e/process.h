// Runs a child process with a bounded lifetime and collects its output.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace cella::test {

struct ProcessResult {
  int exit_code = -1;  // -1 when killed by a signal or the timeout
  int signal = 0;
  bool timed_out = false;
  std::string out;
  std::string err;
};

// Runs argv with stdin fed from `input`, extra environment on top of the
// current one, and SIGKILL (of the whole process group) after `timeout`.
ProcessResult RunProcess(const std::vector<std::string>& argv, const std::string& input = "",
                         std::chrono::seconds timeout = std::chrono::seconds(120),
                         const std::map<std::string, std::string>& extra_env = {});

// `cella ARGS...` with the binary under test.
ProcessResult RunCella(const std::vector<std::string>& args, const std::string& input = "",
                       std::chrono::seconds timeout = std::chrono::seconds(120));

}  // namespace cella::test
