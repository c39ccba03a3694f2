// The pieces of the sandbox supervisor that need no VM: the recorded spec,
// size and port parsing, disk images, the control socket, and published
// ports forwarded to a real agent over a socketpair.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "agent_test_support.h"
#include "host/os/process.h"
#include "host/sandbox/control.h"
#include "host/sandbox/disk_image.h"
#include "host/sandbox/port_forward.h"
#include "host/sandbox/spec.h"
#include "support/echo_server.h"
#include "support/tcp.h"

namespace cella::sandbox {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/cella-sandbox-test-XXXXXX";
  EXPECT_NE(::mkdtemp(tmpl), nullptr);
  return tmpl;
}

TEST(SandboxSpec, RoundTripsEveryField) {
  SandboxSpec spec;
  spec.guest.cmd = {"sh", "-c", "echo hi"};
  spec.guest.env = {{"A", "b"}};
  spec.guest.keep_alive = true;
  spec.guest.tty = true;
  spec.image = "127.0.0.1:5000/app:1";
  spec.root_image_path = "/var/lib/cella/images/rootfs/x.erofs";
  spec.shape.cpus = 1.5;
  spec.shape.memory_mib = 768;
  spec.volumes.push_back({"data", "/v/data.img", "/data", protocol::MountMode::kOverlay, "/o.img"});
  spec.ports.push_back({"127.0.0.1", 8080, 80});
  spec.kernel_path = "/k/vmlinuz";
  spec.accel = "tcg";
  spec.boot_timeout_s = 33;
  spec.upper_image = "/s/upper.img";
  spec.volumes.push_back(
      {"0123abcd", "/v/anon.img", "/anon", protocol::MountMode::kReadWrite, "", true});
  spec.restart = *ParseRestartPolicy("on-failure:4");
  auto back = DecodeSpec(EncodeSpec(spec));
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->guest, spec.guest);
  EXPECT_EQ(back->restart, spec.restart);
  ASSERT_EQ(back->volumes.size(), 2u);
  EXPECT_FALSE(back->volumes[0].anonymous);
  EXPECT_TRUE(back->volumes[1].anonymous);
  back->volumes.pop_back();
  EXPECT_EQ(back->image, spec.image);
  EXPECT_EQ(back->root_image_path, spec.root_image_path);
  EXPECT_EQ(back->shape.cpus, 1.5);
  EXPECT_EQ(back->shape.memory_mib, 768);
  ASSERT_EQ(back->volumes.size(), 1u);
  EXPECT_EQ(back->volumes[0].mode, protocol::MountMode::kOverlay);
  EXPECT_EQ(back->volumes[0].overlay_path, "/o.img");
  ASSERT_EQ(back->ports.size(), 1u);
  EXPECT_EQ(back->ports[0].host_port, 8080);
  EXPECT_EQ(back->ports[0].guest_port, 80);
  EXPECT_EQ(back->kernel_path, "/k/vmlinuz");
  EXPECT_EQ(back->accel, "tcg");
  EXPECT_EQ(back->boot_timeout_s, 33);
  EXPECT_EQ(back->upper_image, "/s/upper.img");
}

TEST(SandboxSpec, DefaultNetworkFieldsRoundTripAndOldSpecsKeepNat) {
  SandboxSpec spec;
  spec.egress.enabled = true;
  spec.egress.all_public = true;
  spec.egress.host_loopback = true;
  spec.egress.allow_private = true;
  spec.egress.dns_servers = {"192.0.2.53"};
  auto back = DecodeSpec(EncodeSpec(spec));
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_TRUE(back->egress.enabled);
  EXPECT_TRUE(back->egress.all_public);
  EXPECT_TRUE(back->egress.host_loopback);
  EXPECT_TRUE(back->egress.allow_private);
  EXPECT_EQ(back->egress.dns_servers, std::vector<std::string>{"192.0.2.53"});

  // A spec stored before the default network: no new fields, NAT kept.
  nlohmann::json old = nlohmann::json::parse(EncodeSpec(SandboxSpec{}));
  for (const char* field : {"all_public", "host_loopback", "dns_servers"})
    old["egress"].erase(field);
  old.erase("restart");  // before --restart: no policy
  auto decoded = DecodeSpec(old.dump());
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_EQ(decoded->restart.kind, RestartPolicy::Kind::kNo);
  EXPECT_FALSE(decoded->egress.enabled);
  EXPECT_FALSE(decoded->egress.all_public);
  EXPECT_FALSE(decoded->egress.host_loopback);
  EXPECT_TRUE(decoded->egress.dns_servers.empty());
}

TEST(SandboxSpec, DamagedSpecsAreErrorsNotGuesses) {
  EXPECT_FALSE(DecodeSpec("not json"));
  EXPECT_FALSE(DecodeSpec(R"({"version":99})"));
  auto wrong_type = DecodeSpec(R"({"version":1,"guest":{},"image":5})");
  ASSERT_FALSE(wrong_type);
  EXPECT_NE(wrong_type.error().message.find("sandbox spec"), std::string::npos);
}

TEST(DiskSize, ParsesDockerStyleSizes) {
  EXPECT_EQ(ParseDiskSize("64m").value(), uint64_t{64} << 20);
  EXPECT_EQ(ParseDiskSize("10G").value(), uint64_t{10} << 30);
  EXPECT_EQ(ParseDiskSize("1.5g").value(), uint64_t{3} << 29);
  EXPECT_EQ(ParseDiskSize("100MiB").value(), uint64_t{100} << 20);
  EXPECT_FALSE(ParseDiskSize("1m"));  // below the 16 MiB floor
  EXPECT_FALSE(ParseDiskSize("ten"));
  EXPECT_FALSE(ParseDiskSize("5q"));
  EXPECT_FALSE(ParseDiskSize(""));
}

TEST(PortMapping, ParsesHostGuestAndAddress) {
  auto plain = ParsePortMapping("8080:80");
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->host_ip, "127.0.0.1");
  EXPECT_EQ(plain->host_port, 8080);
  EXPECT_EQ(plain->guest_port, 80);
  auto any = ParsePortMapping("0.0.0.0:9000:9001/tcp");
  ASSERT_TRUE(any);
  EXPECT_EQ(any->host_ip, "0.0.0.0");
  EXPECT_EQ(any->host_port, 9000);
  EXPECT_EQ(any->guest_port, 9001);
  EXPECT_FALSE(ParsePortMapping("80"));
  EXPECT_FALSE(ParsePortMapping("0:80"));
  EXPECT_FALSE(ParsePortMapping("8080:70000"));
  EXPECT_FALSE(ParsePortMapping("8080:80/udp"));
  EXPECT_FALSE(ParsePortMapping("nothost:8080:80"));
}

TEST(DiskImage, MakesASparseExt4ImageAndNeverOverwrites) {
  std::string dir = TempDir();
  std::string image = dir + "/v.img";
  ASSERT_TRUE(MakeExt4Image(image, uint64_t{64} << 20, "vol"));
  struct stat st {};
  ASSERT_EQ(::stat(image.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 64 << 20);
  EXPECT_LT(st.st_blocks * 512, st.st_size / 2);  // sparse
  auto probe = host::CheckCommand({"dumpe2fs", "-h", image}, std::chrono::seconds(30));
  ASSERT_TRUE(probe) << probe.error().message;
  EXPECT_NE(probe->find("Filesystem volume name:   vol"), std::string::npos) << *probe;
  auto again = MakeExt4Image(image, uint64_t{64} << 20, "vol");
  EXPECT_FALSE(again);
  EXPECT_EQ(again.error().errno_value, EEXIST);
  std::filesystem::remove_all(dir);
}

TEST(DiskImage, AFreshImageIsSeenAsNeverMounted) {
  std::string dir = TempDir();
  std::string image = dir + "/upper.img";
  ASSERT_TRUE(MakeExt4Image(image, uint64_t{64} << 20, "cella-upper"));
  auto fresh = Ext4NeverMounted(image);
  ASSERT_TRUE(fresh) << fresh.error().message;
  EXPECT_TRUE(*fresh);
  // What a mount leaves in the superblock: a last-mount time and a mount
  // count. e2fsck resets the count and keeps the time: still used.
  auto mounted = host::CheckCommand({"debugfs", "-w", "-R", "ssv mtime 20261207120000", image},
                                    std::chrono::seconds(30));
  ASSERT_TRUE(mounted) << mounted.error().message;
  auto checked = Ext4NeverMounted(image);
  ASSERT_TRUE(checked) << checked.error().message;
  EXPECT_FALSE(*checked) << "count 0 but a mount time";
  auto counted = host::CheckCommand({"tune2fs", "-C", "1", image}, std::chrono::seconds(30));
  ASSERT_TRUE(counted) << counted.error().message;
  auto used = Ext4NeverMounted(image);
  ASSERT_TRUE(used) << used.error().message;
  EXPECT_FALSE(*used);
  std::ofstream(dir + "/not-ext4") << std::string(4096, 'x');
  EXPECT_FALSE(Ext4NeverMounted(dir + "/not-ext4"));
  EXPECT_FALSE(Ext4NeverMounted(dir + "/missing"));
  std::filesystem::remove_all(dir);
}

TEST(ControlSocket, RequestReplyAndErrors) {
  std::string dir = TempDir();
  std::string path = dir + "/control.sock";
  std::atomic<int> calls{0};
  auto server = ControlServer::Start(path, [&](const nlohmann::json& request) -> nlohmann::json {
    ++calls;
    if (request.value("op", "") == "echo") return {{"ok", true}, {"echo", request["value"]}};
    return {{"ok", false}, {"error", "unknown op"}};
  });
  ASSERT_TRUE(server) << server.error().message;
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto reply = ControlCall(path, {{"op", "echo"}, {"value", 7}}, std::chrono::seconds(5));
  ASSERT_TRUE(reply) << reply.error().message;
  EXPECT_EQ((*reply)["echo"], 7);
  auto refused = ControlCall(path, {{"op", "nope"}}, std::chrono::seconds(5));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().message, "unknown op");
  // A field of the wrong type throws inside the handler: an error reply,
  // never the end of the process, and the server goes on serving.
  auto mistyped = ControlCall(path, {{"op", 1}}, std::chrono::seconds(5));
  ASSERT_FALSE(mistyped);
  EXPECT_NE(mistyped.error().message.find("bad control request"), std::string::npos)
      << mistyped.error().message;
  EXPECT_TRUE(ControlCall(path, {{"op", "echo"}, {"value", 8}}, std::chrono::seconds(5)));
  (*server)->Stop();
  EXPECT_FALSE(ControlCall(path, {{"op", "echo"}}, std::chrono::seconds(1)));
  EXPECT_EQ(calls.load(), 4);
  std::filesystem::remove_all(dir);
}

TEST(ControlServer, ASilentClientOrALongStopNeverDelaysAKill) {
  std::string dir = TempDir();
  std::string path = dir + "/control.sock";
  std::mutex mu;
  std::condition_variable cv;
  bool killed = false;
  auto server = ControlServer::Start(path, [&](const nlohmann::json& request) -> nlohmann::json {
    std::unique_lock lock(mu);
    if (request.value("op", "") == "stop") {
      // As the supervisor's stop does: wait for the end a kill brings.
      cv.wait_for(lock, std::chrono::seconds(20), [&] { return killed; });
      return {{"ok", killed}, {"error", "not killed"}};
    }
    killed = true;
    cv.notify_all();
    return {{"ok", true}};
  });
  ASSERT_TRUE(server) << server.error().message;
  // A client that connects and says nothing, and one that sends half a line.
  auto silent = ConnectUnixSocket(path);
  ASSERT_TRUE(silent);
  auto partial = ConnectUnixSocket(path);
  ASSERT_TRUE(partial);
  ASSERT_TRUE(WriteAll(partial->Get(), std::string_view("{\"op\":")));
  std::atomic<bool> stop_ok{false};
  std::thread stopper([&] {
    stop_ok = ControlCall(path, {{"op", "stop"}}, std::chrono::seconds(30)).has_value();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the stop get in first
  auto start = std::chrono::steady_clock::now();
  auto kill = ControlCall(path, {{"op", "kill"}}, std::chrono::seconds(3));
  auto took = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(kill) << kill.error().message;
  stopper.join();
  EXPECT_TRUE(stop_ok.load());  // the stop ended because the kill got through
  EXPECT_LT(took, std::chrono::seconds(3));
  (*server)->Stop();
  std::filesystem::remove_all(dir);
}

TEST(ControlServer, ACallPastTheCapWaitsForAFreeConnectionUntilItsDeadline) {
  std::string dir = TempDir();
  std::string path = dir + "/control.sock";
  // Every connection is held by a request whose handler waits for the gate:
  // held for as long as the test says, not for a read time-out.
  std::mutex mu;
  std::condition_variable cv;
  bool gate_open = false;
  size_t holding = 0;
  std::atomic<int> handled{0};
  auto server = ControlServer::Start(path, [&](const nlohmann::json& request) -> nlohmann::json {
    if (request.value("op", "") == "hold") {
      std::unique_lock lock(mu);
      ++holding;
      cv.notify_all();
      cv.wait_for(lock, std::chrono::seconds(60), [&] { return gate_open; });
      return {{"ok", true}};
    }
    ++handled;
    return {{"ok", true}};
  });
  ASSERT_TRUE(server) << server.error().message;
  std::vector<UniqueFd> holders;
  for (size_t i = 0; i < ControlServer::kMaxConnections; ++i) {
    auto fd = ConnectUnixSocket(path);
    ASSERT_TRUE(fd);
    ASSERT_TRUE(WriteAll(fd->Get(), std::string(R"({"op":"hold"})") + "\n"));
    holders.push_back(std::move(*fd));
  }
  auto open_gate = [&] {
    std::lock_guard lock(mu);
    gate_open = true;
    cv.notify_all();
  };
  // Opened however the test ends, so the server's stop does not wait for
  // the held handlers' time-out.
  struct GateOpener {
    std::function<void()> open;
    ~GateOpener() { open(); }
  } opener{open_gate};
  {
    std::unique_lock lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30),
                            [&] { return holding == ControlServer::kMaxConnections; }))
        << holding << " of the connections reached their handler";
  }
  // A call whose deadline passes while every connection is held fails,
  // saying why.
  auto refused = ControlCall(path, {{"op", "status"}}, std::chrono::milliseconds(500));
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("too many connections"), std::string::npos)
      << refused.error().message;
  // A call with time to spare is served once a connection frees up.
  Result<nlohmann::json> queued = Fail("not run");
  std::thread caller([&] {
    queued = ControlCall(path, {{"op", "status"}}, std::chrono::seconds(30));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(handled.load(), 0);  // still waiting: every connection is held
  open_gate();
  caller.join();
  EXPECT_TRUE(queued) << queued.error().message;
  EXPECT_EQ(handled.load(), 1);
  holders.clear();
  (*server)->Stop();
  std::filesystem::remove_all(dir);
}

TEST(ControlServer, APeerOfAnotherUserIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a peer as another user";
  std::string dir = TempDir();
  std::string path = dir + "/control.sock";
  std::atomic<int> calls{0};
  auto server = ControlServer::Start(path, [&](const nlohmann::json&) -> nlohmann::json {
    ++calls;
    return {{"ok", true}};
  });
  ASSERT_TRUE(server) << server.error().message;
  // The socket is 0600 and root-owned: let nobody reach the file so that
  // only the SO_PEERCRED check stands in the way.
  ASSERT_EQ(::chmod(dir.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(path.c_str(), 0666), 0);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(2);
    auto reply = ControlCall(path, {{"op", "status"}}, std::chrono::seconds(3));
    ::_exit(reply ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);  // connected, then refused
  EXPECT_EQ(calls.load(), 0);
  auto own = ControlCall(path, {{"op", "status"}}, std::chrono::seconds(3));
  EXPECT_TRUE(own) << own.error().message;
  (*server)->Stop();
  std::filesystem::remove_all(dir);
}

using ::cella::testing::EchoServer;

using ::cella::testing::Exchange;

TEST(PortForwarder, ForwardsConnectionsThroughTheAgent) {
  EchoServer echo;
  auto agent = testing::StartAgent();
  ASSERT_TRUE(agent);
  host::AgentClient* client = agent->client.get();
  auto forwarder = PortForwarder::Start("127.0.0.1", 0, echo.port(),
                                        [client](uint16_t port) { return client->OpenPort(port); });
  ASSERT_TRUE(forwarder) << forwarder.error().message;
  uint16_t port = (*forwarder)->BoundPort();
  ASSERT_NE(port, 0);
  std::string big(300'000, 'x');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  std::vector<std::thread> clients;
  std::atomic<int> good{0};
  for (int i = 0; i < 4; ++i) {
    clients.emplace_back([&] {
      if (Exchange(port, big) == big) ++good;
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(good.load(), 4);
  (*forwarder)->Stop();
  EXPECT_EQ(Exchange(port, "late"), "connect failed");
}

TEST(PortForwarder, BusyHostPortIsAClearError) {
  auto first = PortForwarder::Start("127.0.0.1", 0, 1, [](uint16_t) {
    return Result<std::unique_ptr<host::PortStream>>(Fail("unused"));
  });
  ASSERT_TRUE(first);
  auto second = PortForwarder::Start("127.0.0.1", (*first)->BoundPort(), 1, [](uint16_t) {
    return Result<std::unique_ptr<host::PortStream>>(Fail("unused"));
  });
  ASSERT_FALSE(second);
  EXPECT_NE(second.error().message.find("another program uses this port"), std::string::npos)
      << second.error().message;
}

}  // namespace
}  // namespace cella::sandbox
