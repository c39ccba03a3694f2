// The supervisor's event ring (host/sandbox/event_ring.h): bounded, the
// oldest dropped and counted, readers resume by sequence number, a waiting
// reader is woken by news or Close, and one batch stays under the control
// socket's reply cap.
#include <gtest/gtest.h>

#include <chrono>
#include <limits>
#include <string>
#include <thread>

#include "host/sandbox/event_ring.h"

namespace cella::sandbox {
namespace {

using std::chrono::milliseconds;

TEST(EventRing, ReadersResumeBySequenceAndSeeWhatWasDropped) {
  EventRing ring(3);
  for (int i = 0; i < 5; ++i) ring.Push({{"n", i}});
  // 0 and 1 were dropped to keep three.
  auto batch = ring.Read(0, milliseconds(0));
  EXPECT_EQ(batch.dropped, 2u);
  ASSERT_EQ(batch.events.size(), 3u);
  EXPECT_EQ(batch.events.front()["n"], 2);
  EXPECT_EQ(batch.next, 5u);
  EXPECT_EQ(ring.total_dropped(), 2u);
  // Nothing new: an empty batch at once when not asked to wait.
  auto none = ring.Read(batch.next, milliseconds(0));
  EXPECT_TRUE(none.events.empty());
  EXPECT_EQ(none.next, 5u);
}

TEST(EventRing, FromNowOnSkipsThePast) {
  EventRing ring;
  ring.Push({{"old", true}});
  auto now = ring.Read(std::numeric_limits<uint64_t>::max(), milliseconds(0));
  EXPECT_TRUE(now.events.empty());
  ring.Push({{"new", true}});
  auto next = ring.Read(now.next, milliseconds(0));
  ASSERT_EQ(next.events.size(), 1u);
  EXPECT_TRUE(next.events[0].contains("new"));
}

TEST(EventRing, AWaitingReaderWakesForNewsAndForClose) {
  EventRing ring;
  std::thread pusher([&] {
    std::this_thread::sleep_for(milliseconds(50));
    ring.Push({{"late", 1}});
  });
  auto batch = ring.Read(0, std::chrono::hours(1));
  pusher.join();
  ASSERT_EQ(batch.events.size(), 1u);
  std::thread closer([&] {
    std::this_thread::sleep_for(milliseconds(50));
    ring.Close();
  });
  auto closed = ring.Read(batch.next, std::chrono::hours(1));
  closer.join();
  EXPECT_TRUE(closed.events.empty());
}

TEST(EventRing, ABatchStaysUnderTheReplyCap) {
  EventRing ring(100);
  for (int i = 0; i < 100; ++i) ring.Push({{"pad", std::string(4000, 'x')}});
  auto batch = ring.Read(0, milliseconds(0));
  EXPECT_GT(batch.events.size(), 0u);
  EXPECT_LT(batch.events.size(), 100u);
  EXPECT_LE(nlohmann::json(batch.events).dump().size(), EventRing::kMaxBatchBytes + 1024);
  EXPECT_EQ(batch.next, batch.events.size());
}

TEST(EventRing, NetworkEventsTakeMatchlocksShapeAndOnlyPrintableText) {
  net::EgressEvent e;
  e.method = "GET";
  e.url = std::string("http://a.test/\xff\x01x");
  e.host = "a.test";
  e.protocol = "http";
  e.status_code = 403;
  e.blocked = true;
  e.block_reason = "not on the allow list";
  nlohmann::json j = NetworkEventJson(e);
  EXPECT_EQ(j["type"], "network");
  EXPECT_GT(j["timestamp"].get<int64_t>(), 0);
  EXPECT_EQ(j["network"]["url"], "http://a.test/??x");
  EXPECT_EQ(j["network"]["status_code"], 403);
  EXPECT_EQ(j["network"]["blocked"], true);
  EXPECT_EQ(j["network"]["block_reason"], "not on the allow list");
  EXPECT_NO_THROW((void)j.dump());
}

}  // namespace
}  // namespace cella::sandbox
