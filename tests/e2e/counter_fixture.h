// A sandbox whose main process counts in a shell variable, for the tests of
// what survives a machine snapshot (standby/resume, fork): the count is
// memory only the running VM has (a cold boot would start again at 1),
// written out every tenth of a second.
#pragma once

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "lifecycle_fixture.h"

namespace cella::test {

// The main process (its pid in /root/pid, its count in /root/count).
inline const std::vector<std::string> kCounter = {
    "@builtin", "sh", "-c",
    "echo $$ > /root/pid; n=0; while :; do n=$((n+1)); echo $n > /root/count.new; "
    "mv /root/count.new /root/count; sleep 0.1; done"};

class CounterTest : public LifecycleTest {
 protected:
  std::string Exec(const std::string& id, const std::string& script) {
    return ExecScript(id, script);
  }
  long Count(const std::string& id) { return std::stol("0" + Exec(id, "cat /root/count")); }
  // Waits (bounded) until the counter of `id` is above `than`; returns it.
  long CountAbove(const std::string& id, long than) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    long n = Count(id);
    while (n <= than && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      n = Count(id);
    }
    return n;
  }
};

}  // namespace cella::test
