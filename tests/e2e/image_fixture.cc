#include "image_fixture.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string_view>
#include <thread>

namespace cella::test {
namespace {

// Set by ctest (the fixture tests start and stop the registries there).
bool ManagedByCtest() { return std::getenv("CELLA_IMAGE_FIXTURES_MANAGED") != nullptr; }

// The cold pass of the suite (ctest's ".cold" entries) comes as the value
// "cold": gtest_discover_tests keeps only one ENVIRONMENT entry, so the
// CELLA_COLD=1 every cella this process starts inherits is set here.
[[maybe_unused]] const bool kColdPass = [] {
  const char* managed = std::getenv("CELLA_IMAGE_FIXTURES_MANAGED");
  if (managed == nullptr || std::string_view(managed) != "cold") return false;
  return ::setenv("CELLA_COLD", "1", 1) == 0;
}();

// Stops the registries at exit when this process started them itself.
class StopRegistriesAtExit : public ::testing::Environment {
 public:
  void TearDown() override {
    if (!started_here) return;
    RunProcess({CELLA_REGISTRY_SCRIPT, "stop", CELLA_IMAGE_FIXTURE_DIR}, "",
               std::chrono::seconds(60));
  }
  bool started_here = false;
};

StopRegistriesAtExit* g_stopper = static_cast<StopRegistriesAtExit*>(
    ::testing::AddGlobalTestEnvironment(new StopRegistriesAtExit));

std::vector<std::string>& HomesMade() {
  static std::vector<std::string> homes;
  return homes;
}

std::string DefaultHome() {
  if (const char* home = std::getenv("CELLA_HOME")) return home;
  if (::geteuid() == 0) return "/var/lib/cella";
  if (const char* xdg = std::getenv("XDG_DATA_HOME")) return std::string(xdg) + "/cella";
  const char* user_home = std::getenv("HOME");
  return std::string(user_home ? user_home : "/") + "/.local/share/cella";
}

}  // namespace

const ImageFixture& ImageFixture::Get() {
  static const ImageFixture fixture = [] {
    ImageFixture f;
    f.dir_ = CELLA_IMAGE_FIXTURE_DIR;
    // Building the images takes ~30 s the first time on a machine (Debian).
    auto r = RunProcess({CELLA_REGISTRY_SCRIPT, "start", f.dir_}, "", std::chrono::seconds(600));
    if (r.exit_code != 0) {
      ADD_FAILURE() << "registry.sh start failed: " << Describe(r);
      return f;
    }
    if (r.out.find("started") == 0 && !ManagedByCtest()) g_stopper->started_here = true;
    std::ifstream env(f.dir_ + "/env");
    std::string line;
    while (std::getline(env, line)) {
      size_t eq = line.find('=');
      if (eq != std::string::npos) f.values_[line.substr(0, eq)] = line.substr(eq + 1);
    }
    if (f.values_.empty()) ADD_FAILURE() << "no values in " << f.dir_ << "/env";
    return f;
  }();
  return fixture;
}

std::string ImageFixture::Value(const std::string& key) const {
  auto it = values_.find(key);
  return it == values_.end() ? std::string() : it->second;
}

std::string FreshCellaHome(const std::string& suffix) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "adhoc";
  name += suffix;
  // The suite's cold pass runs the same test beside the warm one.
  if (const char* cold = std::getenv("CELLA_COLD");
      cold != nullptr && std::string_view(cold) == "1")
    name += ".cold";
  // Short and under /tmp: the sandbox's Unix socket paths live in the home
  // and must fit in 107 bytes. Keyed by the fixture dir so build dirs differ.
  char key[17];
  std::snprintf(key, sizeof key, "%016zx",
                std::hash<std::string>{}(std::string(CELLA_IMAGE_FIXTURE_DIR) + "/" + name));
  std::filesystem::path home = std::filesystem::path("/tmp") / ("cella-it-" + std::string(key));
  std::filesystem::remove_all(home);
  std::filesystem::create_directories(home);
  std::filesystem::create_directory_symlink(std::filesystem::path(DefaultHome()) / "kernel",
                                            home / "kernel");
  HomesMade().push_back(home.string());
  return home.string();
}

void RemoveCellaHomes() {
  for (const auto& home : HomesMade()) {
    // A foreground run's supervisor may still be removing its own sandbox
    // directory after the CLI returned: an entry vanishing under remove_all
    // is that race, not a failure. Bounded retries.
    std::error_code ec;
    for (int attempt = 0; attempt < 50; ++attempt) {
      std::filesystem::remove_all(home, ec);
      if (!ec) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (ec) ADD_FAILURE() << "could not remove " << home << ": " << ec.message();
  }
  HomesMade().clear();
}

ProcessResult CellaIn(const std::string& home, const std::vector<std::string>& args,
                      const std::string& input, std::chrono::seconds timeout) {
  std::vector<std::string> argv{CELLA_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunProcess(argv, input, timeout, {{"CELLA_HOME", home}});
}

std::string Describe(const ProcessResult& r) {
  return "exit=" + std::to_string(r.exit_code) + " signal=" + std::to_string(r.signal) +
         (r.timed_out ? " TIMED OUT" : "") + "\nstdout:\n" + r.out + "\nstderr:\n" + r.err;
}

}  // namespace cella::test
