// Shared by the lifecycle e2e tests: every test gets its own sandbox home
// (CELLA_SANDBOX_HOME: state store, sandbox dirs, volumes) so tests running
// in parallel never see each other's sandboxes, while the kernel and image
// caches stay shared. Whatever a test leaves running is removed after it.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "process.h"

namespace cella::test {

inline std::string Describe(const ProcessResult& r) {
  return "exit=" + std::to_string(r.exit_code) + " signal=" + std::to_string(r.signal) +
         (r.timed_out ? " TIMED OUT" : "") + "\nstdout:\n" + r.out + "\nstderr:\n" + r.err;
}

class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cella-life-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    home_ = tmpl;
    ASSERT_EQ(::setenv("CELLA_SANDBOX_HOME", home_.c_str(), 1), 0);
  }
  void TearDown() override {
    auto ps = RunCella({"ps", "-a", "--json"});
    auto list = nlohmann::json::parse(ps.out, nullptr, false);
    if (list.is_array()) {
      for (const auto& s : list) RunCella({"rm", "-f", s.value("id", std::string())});
    }
    std::error_code ec;
    std::filesystem::remove_all(home_, ec);
    ::unsetenv("CELLA_SANDBOX_HOME");
  }

  // `cella inspect REF` as JSON (the first element); null when it fails.
  nlohmann::json Inspect(const std::string& ref) {
    auto r = RunCella({"inspect", ref});
    auto doc = nlohmann::json::parse(r.out, nullptr, false);
    if (doc.is_discarded() || !doc.is_array() || doc.empty()) return nullptr;
    return doc[0];
  }

  std::string State(const std::string& ref) {
    auto doc = Inspect(ref);
    return doc.is_null() ? "" : doc.value("state", std::string());
  }

  // Polls until the sandbox is in `state` (bounded).
  bool WaitForState(const std::string& ref, const std::string& state,
                    std::chrono::seconds timeout = std::chrono::seconds(120)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (State(ref) == state) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }

  // `cella exec ID -- sh -c SCRIPT`, expected to succeed (a failure is
  // reported); its stdout without the trailing newlines.
  std::string ExecScript(const std::string& id, const std::string& script,
                         std::chrono::seconds timeout = std::chrono::seconds(120)) {
    auto r = RunCella({"exec", id, "--", "sh", "-c", script}, "", timeout);
    EXPECT_EQ(r.exit_code, 0) << id << ": " << script << "\n" << Describe(r);
    std::string out = r.out;
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }

  // `cella run -d ARGS...`; returns the printed ID (empty on failure).
  std::string RunDetached(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"run", "-d"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = RunCella(argv, "", std::chrono::seconds(300));
    EXPECT_EQ(r.exit_code, 0) << Describe(r);
    std::string id = r.out;
    while (!id.empty() && id.back() == '\n') id.pop_back();
    return id;
  }

  // Alive and not a zombie (the supervisor's parent may be slow to reap).
  static bool ProcessAlive(int pid) {
    if (pid <= 0) return false;
    std::string stat;
    {
      FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
      if (!f) return false;
      char buf[512];
      size_t n = std::fread(buf, 1, sizeof buf, f);
      std::fclose(f);
      stat.assign(buf, n);
    }
    auto paren = stat.rfind(')');
    return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] != 'Z';
  }

  // Waits (bounded) for a pid to be gone.
  static bool WaitGone(int pid, std::chrono::seconds timeout = std::chrono::seconds(20)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (ProcessAlive(pid)) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return true;
  }

  std::string home_;
};

}  // namespace cella::test
