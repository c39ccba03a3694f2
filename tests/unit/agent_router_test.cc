// The agent link router (src/host/agent/router.h): many AgentClients share
// one link to the real cella-agent binary; misbehaving clients cost only
// themselves; the guest going away fails everybody promptly.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <atomic>
#include <filesystem>
#include <mutex>
#include <thread>

#include "agent_test_support.h"
#include "guest/agent/agent.h"
#include "host/agent/router.h"
#include "protocol/wire.h"
#include "support/echo_server.h"
#include "support/temp_dir.h"

namespace cella::testing {
namespace {

using host::AgentClient;
using host::ExecCallbacks;
using host::Router;
using protocol::Channel;
using protocol::Frame;
using protocol::FrameType;

// The real agent on one end of a socket pair, the router on the other.
struct RoutedAgent {
  ~RoutedAgent() {
    router.reset();  // closes the link: the agent sees EOF and exits
    testing::ReapAgent(pid);
  }
  pid_t pid = -1;
  std::unique_ptr<Router> router;
};

std::unique_ptr<RoutedAgent> StartRouted(host::RouterHooks hooks = {},
                                         host::RouterOptions options = {}) {
  auto [pid, fd] = SpawnAgentRaw();
  auto routed = std::make_unique<RoutedAgent>();
  routed->pid = pid;
  if (pid < 0) {
    ADD_FAILURE() << "could not start the agent";
    return nullptr;
  }
  auto router = Router::Start(std::move(fd), std::move(hooks), std::chrono::seconds(10), options);
  if (!router) {
    ADD_FAILURE() << "router: " << router.error().message;
    return nullptr;
  }
  routed->router = std::move(*router);
  return routed;
}

std::unique_ptr<AgentClient> Connect(Router& router) {
  auto fd = router.ConnectLocal();
  if (!fd) {
    ADD_FAILURE() << "ConnectLocal: " << fd.error().message;
    return nullptr;
  }
  host::AgentClientOptions options;
  options.handshake_timeout = std::chrono::seconds(10);
  auto client = AgentClient::Connect(std::move(*fd), options);
  if (!client) {
    ADD_FAILURE() << "connect through the router: " << client.error().message;
    return nullptr;
  }
  return std::move(*client);
}

// A client speaking raw frames, for what AgentClient would never send.
class RawClient {
 public:
  explicit RawClient(UniqueFd fd) : fd_(std::move(fd)) {}

  void Send(uint32_t stream, FrameType type, Channel channel, std::string_view body) {
    std::vector<std::byte> out;
    protocol::EncodeFrame(stream, type, channel, protocol::AsBytes(body), out);
    SendBytes(out);
  }
  void SendBytes(std::span<const std::byte> bytes) {
    // The router may already have hung up on us; that is what some tests want.
    (void)::send(fd_.Get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
  }
  void Hello(uint32_t version = protocol::kProtocolVersion) {
    Send(0, FrameType::kHello, Channel::kControl,
         protocol::EncodeHello({version, protocol::Role::kHost}));
  }

  // The next frame; nullopt when the router closed the connection. Bounded:
  // a silent router fails the test instead of hanging it.
  std::optional<Frame> Next(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::vector<std::byte> buf(65536);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto f = decoder_.Next();
      if (!f) return std::nullopt;
      if (f->has_value()) return std::move(**f);
      auto left =
          std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        ADD_FAILURE() << "no frame from the router within " << timeout.count() << " ms";
        return std::nullopt;
      }
      pollfd p{fd_.Get(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      auto n = ReadSome(fd_.Get(), buf);
      if (!n || *n == 0) return std::nullopt;
      decoder_.Feed(std::span(buf.data(), *n));
    }
  }

  // Skips frames until the router hangs up; false if it never does.
  bool HungUp() {
    for (int i = 0; i < 1000; ++i) {
      if (!Next()) return !::testing::Test::HasFailure();
    }
    return false;
  }

 private:
  UniqueFd fd_;
  protocol::FrameDecoder decoder_;
};

RawClient ConnectRaw(Router& router) {
  auto fd = router.ConnectLocal();
  EXPECT_TRUE(fd.has_value()) << fd.error().message;
  return RawClient(fd ? std::move(*fd) : UniqueFd());
}

RawClient HandshakenRaw(Router& router) {
  RawClient raw = ConnectRaw(router);
  raw.Hello();
  auto hello = raw.Next();
  EXPECT_TRUE(hello && hello->type == FrameType::kHello);
  return raw;
}

// The agent's Hello, as a fake guest on the router's upstream sends it.
std::vector<std::byte> GuestHello() {
  std::vector<std::byte> hello;
  protocol::EncodeFrame(0, FrameType::kHello, Channel::kControl,
                        protocol::AsBytes(protocol::EncodeHello(
                            {protocol::kProtocolVersion, protocol::Role::kAgent})),
                        hello);
  return hello;
}

// The agent link as a socket pair, the guest's Hello already sent on its
// guest end: {guest end, the end Router::Start takes}; both invalid when
// that could not be done.
std::pair<UniqueFd, UniqueFd> LinkWithGuestHello() {
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) return {};
  UniqueFd guest(pair[0]), router_end(pair[1]);
  const std::vector<std::byte> hello = GuestHello();
  if (::send(guest.Get(), hello.data(), hello.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(hello.size()))
    return {};
  return {std::move(guest), std::move(router_end)};
}

class AgentRouter : public AgentTest {};

TEST_F(AgentRouter, TwoClientsRunExecsAtTheSameTime) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto a = Connect(*routed->router);
  auto b = Connect(*routed->router);
  ASSERT_TRUE(a && b);
  // Both are running (each waits for the other's file) before either ends,
  // so their streams are interleaved on the one link.
  std::string dir = ::testing::TempDir() + "router_two_" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  auto script = [&](const std::string& me, const std::string& other, int code) {
    return Sh("touch " + dir + "/" + me + "; while [ ! -e " + dir + "/" + other +
              " ]; do sleep 0.01; done; echo out-" + me + "; echo err-" + me + " >&2; exit " +
              std::to_string(code));
  };
  Result<host::ExecResult> ra, rb;
  std::thread ta([&] { ra = a->Exec(script("a", "b", 3)); });
  std::thread tb([&] { rb = b->Exec(script("b", "a", 5)); });
  ta.join();
  tb.join();
  ASSERT_TRUE(ra.has_value()) << ra.error().message;
  ASSERT_TRUE(rb.has_value()) << rb.error().message;
  EXPECT_EQ(ra->status.exit_code, 3);
  EXPECT_EQ(ra->stdout_data, "out-a\n");
  EXPECT_EQ(ra->stderr_data, "err-a\n");
  EXPECT_EQ(rb->status.exit_code, 5);
  EXPECT_EQ(rb->stdout_data, "out-b\n");
  EXPECT_EQ(rb->stderr_data, "err-b\n");
  std::filesystem::remove_all(dir);
}

TEST_F(AgentRouter, TwentyConcurrentExecsAcrossThreeClients) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  std::vector<std::unique_ptr<AgentClient>> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(Connect(*routed->router));
    ASSERT_TRUE(clients.back());
  }
  constexpr int kExecs = 20;
  std::vector<Result<host::ExecResult>> results(kExecs);
  std::vector<std::thread> threads;
  for (int i = 0; i < kExecs; ++i) {
    threads.emplace_back([&, i] {
      std::string n = std::to_string(i);
      results[i] =
          clients[i % 3]->Exec(Sh("sleep 0.0" + std::to_string(i % 10) + "; echo stdout-" + n +
                                  "; echo stderr-" + n + " >&2; exit " + std::to_string(i + 1)));
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kExecs; ++i) {
    ASSERT_TRUE(results[i].has_value()) << i << ": " << results[i].error().message;
    EXPECT_EQ(results[i]->status.exit_code, i + 1) << i;
    EXPECT_EQ(results[i]->stdout_data, "stdout-" + std::to_string(i) + "\n");
    EXPECT_EQ(results[i]->stderr_data, "stderr-" + std::to_string(i) + "\n");
  }
  // Every stream ended, so every mapping was freed.
  EXPECT_EQ(routed->router->Stats().live_streams, 0u);
}

TEST_F(AgentRouter, TwentyMegabytesPassWithBoundedBuffering) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto client = Connect(*routed->router);
  ASSERT_TRUE(client);
  constexpr int64_t kTotal = 20'000'000;
  std::atomic<int64_t> counted{0};
  std::atomic<int64_t> wrong{0};
  std::atomic<int> chunks{0};
  ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view data) {
    for (char ch : data)
      if (ch != 'y' && ch != '\n') ++wrong;
    counted += static_cast<int64_t>(data.size());
    // A consumer slower than the producer: only flow control keeps the
    // router from buffering the difference.
    if (chunks++ % 8 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  };
  auto session = client->StartExec(Sh("yes | head -c " + std::to_string(kTotal)), std::move(cb));
  ASSERT_TRUE(session.has_value()) << session.error().message;
  auto status = (*session)->Wait();
  ASSERT_TRUE(status.has_value()) << status.error().message;
  EXPECT_EQ(status->exit_code, 0);
  EXPECT_EQ(counted.load(), kTotal);
  EXPECT_EQ(wrong.load(), 0);
  // Two channels' windows (256 KiB each) plus frame headers is all the
  // guest may have in flight, so all the router can hold.
  size_t peak = routed->router->Stats().peak_buffered_bytes;
  RecordProperty("peak_buffered_bytes", std::to_string(peak));
  EXPECT_GT(peak, 0u);
  EXPECT_LT(peak, size_t{2} << 20) << "the router buffered the stream";
}

// Waits until `pid` no longer exists in the guest, asking through `client`.
bool GoneInGuest(AgentClient& client, int64_t pid) {
  for (int i = 0; i < 500; ++i) {
    auto r = client.Exec(Sh("kill -0 " + std::to_string(pid) + " 2>/dev/null"));
    if (!r) {
      ADD_FAILURE() << "probe exec failed: " << r.error().message;
      return false;
    }
    if (r->status.exit_code != 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

TEST_F(AgentRouter, ClientDisconnectKillsItsExecsOnly) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto b = Connect(*routed->router);
  ASSERT_TRUE(b);
  // B has a process of its own running across A's disconnect.
  std::string b_out;
  std::mutex mu;
  ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view d) {
    std::lock_guard lock(mu);
    b_out.append(d);
  };
  protocol::ExecRequest reader = Sh("read line; echo got-$line");
  reader.stdin_open = true;
  auto b_session = b->StartExec(reader, cb);
  ASSERT_TRUE(b_session.has_value()) << b_session.error().message;

  int64_t a_pid = 0;
  {
    // A speaks raw frames so that nothing but the router can send the Close:
    // it just drops the connection.
    RawClient a = HandshakenRaw(*routed->router);
    protocol::ExecRequest sleeper = Cmd({"sleep", "1000"});
    sleeper.timeout_ms = 0;
    a.Send(7, FrameType::kOpen, Channel::kControl, protocol::EncodeRequest(sleeper));
    auto opened = a.Next();
    ASSERT_TRUE(opened.has_value());
    ASSERT_EQ(opened->type, FrameType::kOpened) << opened->PayloadText();
    EXPECT_EQ(opened->stream_id, 7u) << "the client sees its own stream id";
    auto pid = protocol::DecodePid(opened->PayloadText());
    ASSERT_TRUE(pid.has_value());
    a_pid = *pid;
    auto still = b->Exec(Sh("kill -0 " + std::to_string(a_pid)));
    ASSERT_TRUE(still.has_value()) << still.error().message;
    ASSERT_EQ(still->status.exit_code, 0) << "A's sleep should be running";
  }  // A disconnects here
  EXPECT_TRUE(GoneInGuest(*b, a_pid)) << "A's exec survived its client";

  ASSERT_TRUE((*b_session)->WriteStdin("hello\n").has_value());
  auto st = (*b_session)->Wait();
  ASSERT_TRUE(st.has_value()) << st.error().message;
  EXPECT_EQ(st->exit_code, 0);
  std::lock_guard lock(mu);
  EXPECT_EQ(b_out, "got-hello\n");
}

TEST_F(AgentRouter, PingReachesTheGuestAndTheAnswerOnlyItsSender) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto a = Connect(*routed->router);
  ASSERT_TRUE(a);
  RawClient raw = HandshakenRaw(*routed->router);
  raw.Send(0, FrameType::kPing, Channel::kControl, "raw-ping");
  for (int i = 0; i < 20; ++i) {
    auto pinged = a->Ping(std::chrono::seconds(10));
    ASSERT_TRUE(pinged.has_value()) << pinged.error().message;
  }
  // The raw client gets exactly its own payload back, none of A's pongs.
  auto pong = raw.Next();
  ASSERT_TRUE(pong.has_value());
  EXPECT_EQ(pong->type, FrameType::kPong);
  EXPECT_EQ(pong->stream_id, 0u);
  EXPECT_EQ(pong->PayloadText(), "raw-ping");
  raw.Send(0, FrameType::kPing, Channel::kControl, "second");
  auto pong2 = raw.Next();
  ASSERT_TRUE(pong2.has_value());
  EXPECT_EQ(pong2->PayloadText(), "second");
}

TEST_F(AgentRouter, MisbehavingClientsAreDroppedAndOthersContinue) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto good = Connect(*routed->router);
  ASSERT_TRUE(good);
  // A session of the good client spans all the bad behaviour below.
  std::string good_out;
  std::mutex mu;
  ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view d) {
    std::lock_guard lock(mu);
    good_out.append(d);
  };
  protocol::ExecRequest reader = Sh("read x; echo $x");
  reader.stdin_open = true;
  auto session = good->StartExec(reader, cb);
  ASSERT_TRUE(session.has_value()) << session.error().message;

  {  // garbage instead of Hello
    RawClient raw = ConnectRaw(*routed->router);
    raw.SendBytes(protocol::AsBytes(std::string(64, '\xff')));
    EXPECT_TRUE(raw.HungUp());
  }
  {  // garbage after a good handshake
    RawClient raw = HandshakenRaw(*routed->router);
    raw.SendBytes(protocol::AsBytes(std::string(64, '\xff')));
    EXPECT_TRUE(raw.HungUp());
  }
  {  // a wrong protocol version is told why, then dropped
    RawClient raw = ConnectRaw(*routed->router);
    raw.Hello(99);
    auto err = raw.Next();
    ASSERT_TRUE(err.has_value());
    EXPECT_EQ(err->type, FrameType::kError);
    auto body = protocol::DecodeError(err->PayloadText());
    ASSERT_TRUE(body.has_value());
    EXPECT_EQ(body->errno_value, EPROTONOSUPPORT);
    EXPECT_TRUE(raw.HungUp());
  }
  {  // stream-0 frames other than Ping
    RawClient raw = HandshakenRaw(*routed->router);
    raw.Send(0, FrameType::kOpen, Channel::kControl, R"({"op":"list","path":"/"})");
    EXPECT_TRUE(raw.HungUp());
  }
  {  // frames for a stream it never opened: an Error, and it stays connected
    RawClient raw = HandshakenRaw(*routed->router);
    raw.Send(42, FrameType::kData, Channel::kStdin, "x");
    auto err = raw.Next();
    ASSERT_TRUE(err.has_value());
    EXPECT_EQ(err->type, FrameType::kError);
    EXPECT_EQ(err->stream_id, 42u);
    auto body = protocol::DecodeError(err->PayloadText());
    ASSERT_TRUE(body.has_value());
    EXPECT_EQ(body->errno_value, EBADF);
    raw.Send(0, FrameType::kPing, Channel::kControl, "still-here");
    auto pong = raw.Next();
    ASSERT_TRUE(pong.has_value());
    EXPECT_EQ(pong->PayloadText(), "still-here");
  }
  {  // things the agent would end the whole link for: reused ids, overrunning
     // the stdin window. Only this client pays.
    RawClient raw = HandshakenRaw(*routed->router);
    raw.Send(5, FrameType::kOpen, Channel::kControl, R"({"op":"list","path":"/"})");
    raw.Send(5, FrameType::kOpen, Channel::kControl, R"({"op":"list","path":"/"})");
    EXPECT_TRUE(raw.HungUp());
    RawClient flood = HandshakenRaw(*routed->router);
    protocol::ExecRequest cat = Cmd({"cat"});
    cat.stdin_open = true;
    flood.Send(1, FrameType::kOpen, Channel::kControl, protocol::EncodeRequest(cat));
    flood.Send(1, FrameType::kData, Channel::kStdin, std::string(300 * 1024, 'z'));
    EXPECT_TRUE(flood.HungUp());
  }

  ASSERT_TRUE((*session)->WriteStdin("alive\n").has_value());
  auto st = (*session)->Wait();
  ASSERT_TRUE(st.has_value()) << st.error().message;
  EXPECT_EQ(st->exit_code, 0);
  {
    std::lock_guard lock(mu);
    EXPECT_EQ(good_out, "alive\n");
  }
  auto r = good->Exec(Sh("echo fine"));
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->stdout_data, "fine\n");
  EXPECT_FALSE(routed->router->UpstreamError().has_value());
}

TEST_F(AgentRouter, UpstreamDeathFailsEveryClientPromptly) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto a = Connect(*routed->router);
  auto b = Connect(*routed->router);
  ASSERT_TRUE(a && b);
  protocol::ExecRequest sleeper = Cmd({"sleep", "1000"});
  sleeper.timeout_ms = 0;
  auto session = a->StartExec(sleeper, {});
  ASSERT_TRUE(session.has_value()) << session.error().message;
  int64_t sleeper_pid = (*session)->pid();

  ASSERT_EQ(::kill(routed->pid, SIGKILL), 0);
  // Bounded by the fixture's alarm: a hang here is the failure.
  auto waited = (*session)->Wait();
  ASSERT_FALSE(waited.has_value());
  EXPECT_NE(waited.error().message.find("guest agent link is gone"), std::string::npos)
      << waited.error().message;
  auto r = b->Exec(Sh("echo hi"));
  EXPECT_FALSE(r.has_value());
  EXPECT_FALSE(b->Ping(std::chrono::seconds(10)).has_value());
  auto err = routed->router->UpstreamError();
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->errno_value, EPIPE) << err->message;
  // Latecomers are refused with the reason.
  auto late = routed->router->ConnectLocal();
  EXPECT_FALSE(late.has_value());
  // The SIGKILLed agent could not clean up its child: do it here.
  ::kill(static_cast<pid_t>(sleeper_pid), SIGKILL);
  ::waitpid(routed->pid, nullptr, 0);
  routed->pid = -1;
}

TEST_F(AgentRouter, ListenServesClientsOnAUnixSocket) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  std::string dir = ::testing::TempDir() + "router_listen_" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::string path = dir + "/mux.sock";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  {  // a stale socket file from an earlier supervisor
    UniqueFd stale(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::bind(stale.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  }
  auto listening = routed->router->Listen(path);
  ASSERT_TRUE(listening.has_value()) << listening.error().message;
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_FALSE(routed->router->Listen(path).has_value()) << "a second Listen must be refused";

  std::vector<std::unique_ptr<AgentClient>> clients;
  for (int i = 0; i < 2; ++i) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::connect(fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0)
        << strerror(errno);
    auto client = AgentClient::Connect(std::move(fd));
    ASSERT_TRUE(client.has_value()) << client.error().message;
    clients.push_back(std::move(*client));
  }
  for (int i = 0; i < 2; ++i) {
    auto r = clients[i]->Exec(Sh("echo via-socket-" + std::to_string(i)));
    ASSERT_TRUE(r.has_value()) << r.error().message;
    EXPECT_EQ(r->stdout_data, "via-socket-" + std::to_string(i) + "\n");
  }
  clients.clear();
  routed->router->Stop();
  EXPECT_FALSE(std::filesystem::exists(path)) << "Stop leaves no socket file behind";
  std::filesystem::remove_all(dir);
}

TEST_F(AgentRouter, ListenRefusesToReplaceANonSocket) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  std::string path = ::testing::TempDir() + "router_regular_" + std::to_string(::getpid());
  ASSERT_TRUE(WriteStringToFile(path, "keep me", 0644).has_value());
  auto listening = routed->router->Listen(path);
  ASSERT_FALSE(listening.has_value());
  EXPECT_EQ(listening.error().errno_value, EEXIST);
  auto kept = ReadFileToString(path, 100);
  ASSERT_TRUE(kept.has_value());
  EXPECT_EQ(*kept, "keep me");
  std::filesystem::remove(path);
}

using ::cella::testing::EchoServer;

TEST_F(AgentRouter, PortForwardThroughTheRouter) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto client = Connect(*routed->router);
  ASSERT_TRUE(client);
  EchoServer server;
  ASSERT_NE(server.port(), 0);
  auto port = client->OpenPort(server.port());
  ASSERT_TRUE(port.has_value()) << port.error().message;
  // More than one window each way: credit must flow through the router.
  std::string sent;
  for (int i = 0; sent.size() < 900'000; ++i) sent += std::to_string(i) + ",";
  ExpectEchoedThrough(**port, sent);
}

// The standalone agent binary has no main process: this test runs the Agent
// class in a forked child (single-threaded at fork time, as Agent requires).
TEST_F(AgentRouter, AttachMainIsTeedToTheHooks) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(sv[0]);
    agent::AgentOptions options;
    protocol::ExecRequest main =
        Sh("echo main-out; echo main-err >&2; read line; echo in-$line; exit 7");
    main.stdin_open = true;
    options.main_request = main;
    auto agent = agent::Agent::Create(std::move(options));
    if (!agent) _exit(120);
    auto served = (*agent)->Serve(UniqueFd(sv[1]));
    _exit(served ? 0 : 121);
  }
  ::close(sv[1]);

  std::mutex mu;
  std::string teed_out, teed_err, teed_result;
  host::RouterHooks hooks;
  hooks.on_main_output = [&](Channel channel, std::span<const std::byte> bytes) {
    std::lock_guard lock(mu);
    (channel == Channel::kStdout ? teed_out : teed_err)
        .append(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  };
  hooks.on_main_result = [&](std::string_view json) {
    std::lock_guard lock(mu);
    teed_result = json;
  };
  auto router = Router::Start(UniqueFd(sv[0]), std::move(hooks), std::chrono::seconds(10));
  ASSERT_TRUE(router.has_value()) << router.error().message;
  auto client = Connect(**router);
  ASSERT_TRUE(client);
  auto other = Connect(**router);  // an ordinary exec is not teed
  ASSERT_TRUE(other);
  auto plain = other->Exec(Sh("echo not-main"));
  ASSERT_TRUE(plain.has_value()) << plain.error().message;

  std::string seen_out;
  ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view d) { seen_out.append(d); };
  auto session = client->AttachMain(cb);
  ASSERT_TRUE(session.has_value()) << session.error().message;
  ASSERT_TRUE((*session)->WriteStdin("put\n").has_value());
  auto st = (*session)->Wait();
  ASSERT_TRUE(st.has_value()) << st.error().message;
  EXPECT_EQ(st->exit_code, 7);
  EXPECT_EQ(seen_out, "main-out\nin-put\n");
  {
    // The hooks ran on the router thread before it forwarded each frame.
    std::lock_guard lock(mu);
    EXPECT_EQ(teed_out, "main-out\nin-put\n");
    EXPECT_EQ(teed_err, "main-err\n");
    auto outcome = protocol::DecodeExecOutcome(teed_result);
    ASSERT_TRUE(outcome.has_value()) << teed_result;
    EXPECT_EQ(outcome->exit_code, 7);
  }
  client.reset();
  other.reset();
  router->reset();
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

TEST_F(AgentRouter, StopDisconnectsClients) {
  auto routed = StartRouted();
  ASSERT_TRUE(routed);
  auto client = Connect(*routed->router);
  ASSERT_TRUE(client);
  routed->router->Stop();
  EXPECT_FALSE(client->Exec(Sh("true")).has_value());
  auto err = routed->router->UpstreamError();
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->errno_value, ECANCELED);
  EXPECT_FALSE(routed->router->ConnectLocal().has_value());
}

}  // namespace
}  // namespace cella::testing

namespace cella::testing {
namespace {

// A hostile guest sends 1 MiB Pings and never reads the Pongs. The router
// used to queue every Pong (1.3 GB seen); now it stops reading the guest.
TEST_F(AgentRouter, GuestPingFloodKeepsTheRouterBounded) {
  auto [guest, router_end] = LinkWithGuestHello();
  ASSERT_TRUE(guest && router_end);
  host::RouterOptions options;
  options.max_upstream_buffer = size_t{4} << 20;
  auto router = Router::Start(std::move(router_end), {}, std::chrono::seconds(10), options);
  ASSERT_TRUE(router.has_value()) << router.error().message;

  std::vector<std::byte> ping;
  protocol::EncodeFrame(0, FrameType::kPing, Channel::kControl,
                        protocol::AsBytes(std::string(protocol::kMaxPayload, 'p')), ping);
  ASSERT_EQ(::fcntl(guest.Get(), F_SETFL, O_NONBLOCK), 0);
  const size_t flood = size_t{256} << 20;  // far more than any bound
  size_t sent = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (sent < flood && std::chrono::steady_clock::now() < deadline) {
    size_t off = sent % ping.size();
    ssize_t n = ::send(guest.Get(), ping.data() + off, ping.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    ASSERT_TRUE(errno == EAGAIN || errno == EINTR) << std::strerror(errno);
    pollfd p{guest.Get(), POLLOUT, 0};
    (void)::poll(&p, 1, 50);
  }
  // The router stopped taking the flood long before it was all sent...
  EXPECT_LT(sent, flood);
  // ...and what it holds stays within twice the bound plus one read's worth.
  auto stats = (*router)->Stats();
  EXPECT_LE(stats.peak_buffered_bytes, 2 * options.max_upstream_buffer + (size_t{2} << 20))
      << "sent " << sent;
  EXPECT_FALSE((*router)->UpstreamError().has_value());
}

// A restored snapshot's agent may have written a Hello per link attempt
// while no host was connected (QEMU delivers them all once one connects):
// those are dropped; a Hello after anything else still ends the link.
TEST_F(AgentRouter, LeftoverGuestHellosAreDroppedUntilTheGuestSaysSomethingElse) {
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd guest(pair[0]);
  auto frame = [](FrameType type, std::string_view body) {
    std::vector<std::byte> out;
    protocol::EncodeFrame(0, type, Channel::kControl, protocol::AsBytes(body), out);
    return out;
  };
  const auto hello =
      frame(FrameType::kHello,
            protocol::EncodeHello({protocol::kProtocolVersion, protocol::Role::kAgent}));
  auto send = [&](const std::vector<std::byte>& bytes) {
    return ::send(guest.Get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(bytes.size());
  };
  ASSERT_TRUE(send(hello));
  auto router = Router::Start(UniqueFd(pair[1]), {}, std::chrono::seconds(10), {});
  ASSERT_TRUE(router.has_value()) << router.error().message;
  ASSERT_TRUE(send(hello));
  ASSERT_TRUE(send(hello));
  // A guest Ping is answered: the link is alive after the leftovers.
  ASSERT_TRUE(send(frame(FrameType::kPing, "tag")));
  protocol::FrameDecoder decoder;
  std::vector<std::byte> buf(4096);
  bool pong = false;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!pong && std::chrono::steady_clock::now() < deadline) {
    pollfd p{guest.Get(), POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::read(guest.Get(), buf.data(), buf.size());
    ASSERT_GT(n, 0);
    decoder.Feed(std::span(buf).first(static_cast<size_t>(n)));
    for (;;) {
      auto f = decoder.Next();
      if (!f || !f->has_value()) break;
      if ((*f)->type == FrameType::kPong) pong = true;
    }
  }
  EXPECT_TRUE(pong);
  EXPECT_FALSE((*router)->UpstreamError().has_value());
  ASSERT_TRUE(send(hello));
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!(*router)->UpstreamError() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE((*router)->UpstreamError().has_value());
  EXPECT_EQ((*router)->UpstreamError()->errno_value, EPROTO);
}

// Before a snapshot the agent is asked to let go of its link (op release):
// it reads nothing more from it and answers from its port opened anew, so
// nothing may follow the request up, or it would reach that new port ahead
// of the next host's Hello.
TEST_F(AgentRouter, NothingGoesUpAfterARelease) {
  auto [guest, router_end] = LinkWithGuestHello();
  ASSERT_TRUE(guest && router_end);
  auto router = Router::Start(std::move(router_end), {}, std::chrono::seconds(10), {});
  ASSERT_TRUE(router.has_value()) << router.error().message;

  // Only the supervisor's own (in-process) client may ask: one coming in
  // through the mux socket is refused, and nothing of it goes up.
  TempDir dir("router_release");
  const std::string mux = dir / "mux.sock";
  ASSERT_TRUE((*router)->Listen(mux).has_value());
  UniqueFd outside_fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, mux.c_str(), mux.size() + 1);
  ASSERT_EQ(::connect(outside_fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  RawClient outside(std::move(outside_fd));
  outside.Hello();
  auto outside_hello = outside.Next();
  ASSERT_TRUE(outside_hello && outside_hello->type == FrameType::kHello);
  outside.Send(1, FrameType::kOpen, Channel::kControl,
               protocol::EncodeRequest(protocol::ReleaseRequest{}));
  auto refused = outside.Next();
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->type, FrameType::kError);
  EXPECT_NE(refused->PayloadText().find("supervisor"), std::string::npos) << refused->PayloadText();

  RawClient first = HandshakenRaw(**router);
  RawClient second = HandshakenRaw(**router);
  first.Send(1, FrameType::kOpen, Channel::kControl,
             protocol::EncodeRequest(protocol::ReleaseRequest{}));
  // What any client sends after it stays on the host; a request is told so.
  second.Send(0, FrameType::kPing, Channel::kControl, "late");
  second.Send(1, FrameType::kOpen, Channel::kControl, protocol::EncodeRequest(Cmd({"true"})));
  first.Send(2, FrameType::kOpen, Channel::kControl, protocol::EncodeRequest(Cmd({"true"})));
  auto cancelled = second.Next();
  ASSERT_TRUE(cancelled);
  EXPECT_EQ(cancelled->type, FrameType::kError);

  protocol::FrameDecoder decoder;
  std::vector<Frame> seen;
  std::vector<std::byte> buf(4096);
  auto quiet_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  while (std::chrono::steady_clock::now() < quiet_until) {
    pollfd p{guest.Get(), POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    ssize_t n = ::read(guest.Get(), buf.data(), buf.size());
    ASSERT_GT(n, 0);
    decoder.Feed(std::span(buf).first(static_cast<size_t>(n)));
    for (;;) {
      auto f = decoder.Next();
      ASSERT_TRUE(f.has_value());
      if (!f->has_value()) break;
      seen.push_back(std::move(**f));
    }
  }
  ASSERT_EQ(seen.size(), 2u) << "frames after the release reached the guest";
  EXPECT_EQ(seen[0].type, FrameType::kHello);
  EXPECT_EQ(seen[1].type, FrameType::kOpen);
  EXPECT_NE(seen[1].PayloadText().find("\"release\""), std::string::npos);
}

}  // namespace
}  // namespace cella::testing
