// Shared state of the image e2e tests: the registries and OCI images of
// tests/fixtures/registry.sh (started once per test run: by the ctest fixture
// `image_registries_start`, or by the first test process when the binary is
// run by hand), and a private cella home per test whose kernel is the
// default home's.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "process.h"

namespace cella::test {

class ImageFixture {
 public:
  // Starts (or finds) the registries; ADD_FAILUREs and returns an empty
  // fixture when that fails, so tests fail with the script's output.
  static const ImageFixture& Get();

  // A value from the fixture's env file (ports, digests...); "" when absent.
  std::string Value(const std::string& key) const;
  bool ok() const { return !values_.empty(); }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::map<std::string, std::string> values_;
};

// A fresh cella home for the current test (plus `suffix`, for tests that
// need several): /tmp/cella-it-<hash of fixture dir and test name>, wiped
// first; <home>/kernel links to
// the default home's kernel so runs can boot.
std::string FreshCellaHome(const std::string& suffix = "");

// Removes every home FreshCellaHome made in this process (call when a test
// passed; failed tests keep theirs for post-mortems).
void RemoveCellaHomes();

// `cella ARGS...` with CELLA_HOME=home.
ProcessResult CellaIn(const std::string& home, const std::vector<std::string>& args,
                      const std::string& input = "",
                      std::chrono::seconds timeout = std::chrono::seconds(300));

std::string Describe(const ProcessResult& r);

}  // namespace cella::test
