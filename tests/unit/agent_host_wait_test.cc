// WaitForHost (guest/agent/host_wait.h) on stream sockets, which report
// POLLHUP once the peer is gone as a virtio port does while no host is
// connected. The SIGIO wake-up itself needs the guest's virtio_console
// driver (covered by the e2e standby/resume and fork tests).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/unique_fd.h"
#include "guest/agent/host_wait.h"

namespace cella::agent {
namespace {

TEST(HostWait, AConnectedPeerIsSeenAtOnce) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  UniqueFd a(fds[0]), b(fds[1]);
  auto waited = WaitForHost(a.Get(), std::chrono::seconds(30), std::chrono::milliseconds(10));
  ASSERT_TRUE(waited) << waited.error().message;
  EXPECT_TRUE(waited->connected);
}

TEST(HostWait, NoPeerEndsAfterTheTimeoutNotConnectedAndLeavesTheDescriptorAsItWas) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  UniqueFd a(fds[0]), b(fds[1]);
  b.Reset();  // the "host" went away: POLLHUP from now on
  const int flags_before = ::fcntl(a.Get(), F_GETFL);
  auto waited = WaitForHost(a.Get(), std::chrono::milliseconds(20), std::chrono::milliseconds(10));
  ASSERT_TRUE(waited) << waited.error().message;
  EXPECT_FALSE(waited->connected);
  // O_ASYNC is off again: serving a link must not queue a SIGIO per chunk.
  EXPECT_EQ(::fcntl(a.Get(), F_GETFL), flags_before);
}

TEST(HostWait, AClosedDescriptorIsAnError) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  ::close(fds[1]);
  const int closed = fds[0];
  ::close(closed);
  EXPECT_FALSE(WaitForHost(closed, std::chrono::milliseconds(20), std::chrono::milliseconds(10)));
}

// After a release the agent serves once the next host has written, never
// on the port's connected state alone.
TEST(HostWait, AfterAReleaseOnlyAHostsBytesCount) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  UniqueFd agent(fds[0]), host(fds[1]);
  // Connected but silent: not yet.
  auto silent = WaitForHostData(agent.Get(), std::chrono::milliseconds(50));
  ASSERT_TRUE(silent) << silent.error().message;
  EXPECT_FALSE(*silent);
  ASSERT_EQ(::write(host.Get(), "H", 1), 1);
  auto spoke = WaitForHostData(agent.Get(), std::chrono::seconds(30));
  ASSERT_TRUE(spoke) << spoke.error().message;
  EXPECT_TRUE(*spoke);
}

// No host: a read would not block (it says EOF), so poll reports POLLIN
// with POLLHUP. That is no host's bytes: serving it would end at once, and
// the next attempt's close would discard a Hello that came in between.
TEST(HostWait, AfterAReleaseAGoneHostIsNotData) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  UniqueFd agent(fds[0]), host(fds[1]);
  host.Reset();
  auto waited = WaitForHostData(agent.Get(), std::chrono::milliseconds(50));
  ASSERT_TRUE(waited) << waited.error().message;
  EXPECT_FALSE(*waited);
}

}  // namespace
}  // namespace cella::agent
