// cella fork's hold on Ctrl-C around a long control call (the source's
// save): the first Ctrl-C is noted, a second one or SIGTERM gives up the
// wait at once, and the signal taken acts again once the hold ends.
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/interrupt_hold.h"
#include "host/sandbox/control.h"
#include "support/temp_dir.h"

namespace cella::cli {
namespace {

std::atomic<int> g_caught{0};
void Count(int) { g_caught.fetch_add(1); }

// Runs a control call that the server answers only when released, sends
// `signals` to this thread one at a time (each once the last was taken),
// and returns the call's result.
struct HeldCall {
  Result<nlohmann::json> result;
  int asked = 0;
  bool server_done_early = false;
};

HeldCall CallAndSignal(const std::vector<int>& signals) {
  testing::TempDir dir;
  const std::string path = dir / "control.sock";
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false;
  bool release = false;
  int asked = 0;
  bool finished = false;
  auto server = sandbox::ControlServer::Start(path, [&](const nlohmann::json&) -> nlohmann::json {
    std::unique_lock lock(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return release; });  // a save that takes its time
    finished = true;
    return {{"ok", true}};
  });
  EXPECT_TRUE(server) << server.error().message;
  HeldCall out{Fail("not run")};
  {
    InterruptHold hold;
    const pthread_t me = ::pthread_self();
    std::jthread sender([&] {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return entered; });
      for (size_t i = 0; i < signals.size(); ++i) {
        ::pthread_kill(me, signals[i]);
        // Standard signals do not queue: the next goes once this is taken.
        cv.wait(lock, [&] { return asked > static_cast<int>(i); });
      }
    });
    out.result = sandbox::ControlCall(path, {{"op", "snapshot"}}, std::chrono::minutes(5),
                                      hold.WakeFd(), [&] {
                                        bool give_up = hold.GiveUp();
                                        std::lock_guard lock(mu);
                                        ++asked;
                                        cv.notify_all();
                                        return give_up;
                                      });
    sender.join();
    {
      std::lock_guard lock(mu);
      out.server_done_early = finished;
    }
    EXPECT_FALSE(hold.Check());
    EXPECT_EQ(hold.Check().error().errno_value, EINTR);
    EXPECT_EQ(g_caught.load(), 0);  // held while the hold lasts
  }
  out.asked = asked;
  {
    std::lock_guard lock(mu);
    release = true;
    cv.notify_all();
  }
  (*server)->Stop();
  return out;
}

class InterruptHoldTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct sigaction sa {};
    sa.sa_handler = Count;
    sigemptyset(&sa.sa_mask);
    for (int s : {SIGINT, SIGTERM}) ASSERT_EQ(::sigaction(s, &sa, &old_[s == SIGINT ? 0 : 1]), 0);
    g_caught = 0;
  }
  void TearDown() override {
    ::sigaction(SIGINT, &old_[0], nullptr);
    ::sigaction(SIGTERM, &old_[1], nullptr);
  }
  struct sigaction old_[2]{};
};

TEST_F(InterruptHoldTest, ASecondCtrlCGivesUpTheWaitAtOnce) {
  HeldCall call = CallAndSignal({SIGINT, SIGINT});
  ASSERT_FALSE(call.result);
  EXPECT_EQ(call.result.error().errno_value, ECANCELED) << call.result.error().message;
  EXPECT_EQ(call.asked, 2);
  EXPECT_FALSE(call.server_done_early);  // the wait ended before the "save" did
  EXPECT_EQ(g_caught.load(), 1);         // raised again once the hold ended
}

TEST_F(InterruptHoldTest, SigtermGivesUpTheWaitAtOnce) {
  HeldCall call = CallAndSignal({SIGTERM});
  ASSERT_FALSE(call.result);
  EXPECT_EQ(call.result.error().errno_value, ECANCELED) << call.result.error().message;
  EXPECT_EQ(call.asked, 1);
  EXPECT_FALSE(call.server_done_early);
  EXPECT_EQ(g_caught.load(), 1);
}

}  // namespace
}  // namespace cella::cli
