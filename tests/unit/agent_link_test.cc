// The link itself: handshake, malformed frames and garbage in both
// directions. Fake agents are a thread on the other end of a socket pair.
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>

#include "agent_test_support.h"
#include "protocol/wire.h"
#include "support/temp_dir.h"

namespace cella::testing {
namespace {

using protocol::Channel;
using protocol::FrameType;

struct Pair {
  UniqueFd host;
  UniqueFd fake;
};

Pair MakePair() {
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

std::vector<std::byte> FrameBytes(uint32_t stream, FrameType type, Channel ch,
                                  std::string_view body) {
  std::vector<std::byte> out;
  protocol::EncodeFrame(stream, type, ch, protocol::AsBytes(body), out);
  return out;
}

std::vector<std::byte> AgentHello() {
  return FrameBytes(0, FrameType::kHello, Channel::kControl, R"({"version":1,"role":"agent"})");
}

// Reads frames from fd until one satisfies pred or the peer closes.
std::optional<protocol::Frame> ReadUntil(int fd, protocol::FrameDecoder& decoder,
                                         const std::function<bool(const protocol::Frame&)>& pred) {
  std::vector<std::byte> buf(65536);
  for (;;) {
    for (;;) {
      auto f = decoder.Next();
      if (!f || !f->has_value()) break;
      if (pred(**f)) return std::move(**f);
    }
    auto n = ReadSome(fd, buf);
    if (!n || *n == 0) return std::nullopt;
    decoder.Feed(std::span(buf.data(), *n));
  }
}

// A fake agent: answers the handshake, waits for the first Open, then
// sends `reply` (arbitrary bytes) and keeps draining until the host closes.
std::thread FakeAgent(UniqueFd fd, std::vector<std::byte> reply) {
  return std::thread([fd = std::move(fd), reply = std::move(reply)]() mutable {
    if (!WriteAll(fd.Get(), AgentHello())) return;
    protocol::FrameDecoder decoder;
    ReadUntil(fd.Get(), decoder,
              [](const protocol::Frame& f) { return f.type == FrameType::kOpen; });
    if (!WriteAll(fd.Get(), reply)) return;
    ReadUntil(fd.Get(), decoder, [](const protocol::Frame&) { return false; });
  });
}

host::AgentClientOptions WithTimeout(std::chrono::milliseconds timeout) {
  host::AgentClientOptions options;
  options.handshake_timeout = timeout;
  return options;
}

class AgentLink : public AgentTest {};

TEST_F(AgentLink, GarbageInsteadOfHelloFailsTheHandshake) {
  auto p = MakePair();
  ASSERT_TRUE(WriteAll(p.fake.Get(), std::string(64, '\xff')).has_value());
  auto c = host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::seconds(5)));
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error().errno_value, EPROTO) << c.error().message;
}

TEST_F(AgentLink, SilentPeerTimesOutTheHandshake) {
  auto p = MakePair();
  auto c =
      host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::milliseconds(200)));
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error().errno_value, ETIMEDOUT) << c.error().message;
}

TEST_F(AgentLink, WrongVersionIsRefused) {
  auto p = MakePair();
  ASSERT_TRUE(WriteAll(p.fake.Get(), FrameBytes(0, FrameType::kHello, Channel::kControl,
                                                R"({"version":7,"role":"agent"})"))
                  .has_value());
  auto c = host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::seconds(5)));
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error().errno_value, EPROTONOSUPPORT);
}

Result<host::ExecResult> ExecAgainst(std::vector<std::byte> reply,
                                     std::optional<Error>* link_error) {
  auto p = MakePair();
  auto fake = FakeAgent(std::move(p.fake), std::move(reply));
  auto c = host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::seconds(5)));
  if (!c) {
    fake.join();
    return std::unexpected(c.error());
  }
  auto r = (*c)->Exec(Sh("true"));
  *link_error = (*c)->LinkError();
  c->reset();  // closes the link: the fake agent sees EOF
  fake.join();
  return r;
}

TEST_F(AgentLink, OversizeFrameHeaderFailsTheLinkCleanly) {
  auto reply = FrameBytes(1, FrameType::kData, Channel::kStdout, "");
  uint32_t huge = protocol::kMaxPayload + 1;
  for (int i = 0; i < 4; ++i) reply[i] = static_cast<std::byte>((huge >> (8 * i)) & 0xff);
  std::optional<Error> link_error;
  auto r = ExecAgainst(reply, &link_error);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().errno_value, EPROTO);
  EXPECT_NE(r.error().message.find("exceeds the limit"), std::string::npos) << r.error().message;
  ASSERT_TRUE(link_error.has_value());
}

TEST_F(AgentLink, RandomGarbageAfterHandshakeFailsTheLinkCleanly) {
  std::vector<std::byte> garbage;
  for (int i = 0; i < 4096; ++i) garbage.push_back(static_cast<std::byte>((i * 131 + 7) & 0xff));
  std::optional<Error> link_error;
  auto r = ExecAgainst(garbage, &link_error);
  ASSERT_FALSE(r.has_value());
  EXPECT_TRUE(link_error.has_value());
}

TEST_F(AgentLink, DataBeyondTheWindowFailsTheLink) {
  auto reply = FrameBytes(1, FrameType::kOpened, Channel::kControl, R"({"pid":5})");
  std::string chunk(protocol::kDataChunk, 'z');
  for (int i = 0; i < 5; ++i) {  // 320 KiB > the 256 KiB window
    auto f = FrameBytes(1, FrameType::kData, Channel::kStdout, chunk);
    reply.insert(reply.end(), f.begin(), f.end());
  }
  auto p = MakePair();
  auto fake = FakeAgent(std::move(p.fake), std::move(reply));
  auto c = host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::seconds(5)));
  ASSERT_TRUE(c.has_value()) << c.error().message;
  host::AgentClient* client = c->get();
  host::ExecCallbacks cb;
  // The first chunk's callback holds its credit until the link has failed,
  // so everything after the first 256 KiB is beyond the window.
  cb.on_stdout = [client](std::string_view) {
    while (!client->LinkError()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  };
  auto session = client->StartExec(Sh("true"), cb);
  ASSERT_TRUE(session.has_value()) << session.error().message;
  auto status = (*session)->Wait();
  ASSERT_FALSE(status.has_value());
  EXPECT_NE(status.error().message.find("window"), std::string::npos) << status.error().message;
  session->reset();
  c->reset();
  fake.join();
}

// A peer that stopped reading (a guest powering off after a short `cella
// run`) while its Result is still on the way: the host's write finds it
// gone (EPIPE) but that must not throw away what the peer still sends.
TEST_F(AgentLink, AWriteToAPeerThatStoppedReadingKeepsItsResult) {
  auto p = MakePair();
  std::atomic<bool> host_wrote{false};
  std::thread fake([fd = std::move(p.fake), &host_wrote]() mutable {
    if (!WriteAll(fd.Get(), AgentHello())) return;
    protocol::FrameDecoder decoder;
    ReadUntil(fd.Get(), decoder,
              [](const protocol::Frame& f) { return f.type == FrameType::kOpen; });
    // Stop reading before the Opened goes out: the host writes its stdin's
    // end only once it has the Opened, so that write always finds us gone.
    (void)::shutdown(fd.Get(), SHUT_RD);
    auto opened = FrameBytes(1, FrameType::kOpened, Channel::kControl, R"({"pid":5})");
    if (!WriteAll(fd.Get(), opened)) return;
    while (!host_wrote) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::vector<std::byte> rest;
    for (auto frame :
         {FrameBytes(1, FrameType::kData, Channel::kStdout, "lo\n"),
          FrameBytes(1, FrameType::kEof, Channel::kStdout, ""),
          FrameBytes(1, FrameType::kEof, Channel::kStderr, ""),
          FrameBytes(1, FrameType::kResult, Channel::kControl,
                     protocol::EncodeExecOutcome({.exit_code = 0, .signal = std::nullopt}))})
      rest.insert(rest.end(), frame.begin(), frame.end());
    (void)WriteAll(fd.Get(), rest);
  });
  auto c = host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::seconds(5)));
  ASSERT_TRUE(c.has_value()) << c.error().message;
  std::string out;
  host::ExecCallbacks cb;
  cb.on_stdout = [&](std::string_view data) { out.append(data); };
  auto session = (*c)->StartExec(Sh("ls"), cb);
  ASSERT_TRUE(session.has_value()) << session.error().message;
  // What `cella run` without -i does first: close the guest's stdin.
  auto closed = (*session)->CloseStdin();
  EXPECT_FALSE(closed.has_value()) << "the write should have found the peer gone";
  host_wrote = true;
  auto status = (*session)->Wait();
  ASSERT_TRUE(status.has_value()) << status.error().message;
  EXPECT_EQ(status->exit_code, 0);
  EXPECT_EQ(out, "lo\n");
  session->reset();
  c->reset();
  fake.join();
}

TEST_F(AgentLink, FrameForAStreamNeverOpenedFailsTheLink) {
  std::optional<Error> link_error;
  auto r = ExecAgainst(FrameBytes(99, FrameType::kResult, Channel::kControl, R"({"exit_code":0})"),
                       &link_error);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().errno_value, EPROTO);
}

// A restored snapshot's agent may have written a Hello per link attempt
// while no host was connected; QEMU delivers them all when one connects.
TEST_F(AgentLink, LeftoverHellosBeforeAnythingElseAreDroppedButNotLaterOnes) {
  auto append = [](std::vector<std::byte>& out, const std::vector<std::byte>& more) {
    out.insert(out.end(), more.begin(), more.end());
  };
  const auto result = FrameBytes(1, FrameType::kResult, Channel::kControl, R"({"exit_code":0})");
  std::vector<std::byte> leftovers = AgentHello();
  append(leftovers, AgentHello());
  append(leftovers, result);
  std::optional<Error> link_error;
  auto r = ExecAgainst(leftovers, &link_error);
  ASSERT_TRUE(r.has_value()) << r.error().message;
  EXPECT_EQ(r->status.ShellCode(), 0);
  EXPECT_FALSE(link_error.has_value());

  std::vector<std::byte> late = FrameBytes(1, FrameType::kData, Channel::kStdout, "x");
  append(late, AgentHello());
  append(late, result);
  auto refused = ExecAgainst(late, &link_error);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().errno_value, EPROTO) << refused.error().message;
}

TEST_F(AgentLink, MalformedResultJsonFailsOnlyThatCall) {
  for (std::string body : {"{not json", R"({"exit_code":"zero"})", R"({"exit_code":1,"signal":2})",
                           R"({"exit_code":0,"extra":1})", "[1,2,3]", R"({"exit_code":1e400})"}) {
    std::optional<Error> link_error;
    auto r = ExecAgainst(FrameBytes(1, FrameType::kResult, Channel::kControl, body), &link_error);
    ASSERT_FALSE(r.has_value()) << body;
    EXPECT_EQ(r.error().errno_value, EINVAL) << body << ": " << r.error().message;
    EXPECT_FALSE(link_error.has_value()) << body;
  }
}

TEST_F(AgentLink, AgentClosingWakesEveryWaiter) {
  auto agent = StartAgent();
  ASSERT_TRUE(agent && agent->client);
  std::vector<std::thread> waiters;
  std::atomic<int> failed{0};
  for (int i = 0; i < 4; ++i) {
    waiters.emplace_back([&] {
      auto r = agent->client->Exec(Cmd({"sleep", "30"}));
      if (!r) ++failed;
    });
  }
  ASSERT_TRUE(agent->client->Ping(std::chrono::seconds(5)).has_value());
  std::this_thread::sleep_for(
      std::chrono::milliseconds(100));  // let the execs start (not a timing assertion)
  ::kill(agent->pid, SIGKILL);
  for (auto& t : waiters) t.join();
  EXPECT_EQ(failed.load(), 4);
  EXPECT_TRUE(agent->client->LinkError().has_value());
}

// The real agent against raw frames from the host side.
class RawAgent : public AgentTest {
 protected:
  void SetUp() override {
    AgentTest::SetUp();
    auto [pid, fd] = SpawnAgentRaw();
    pid_ = pid;
    fd_ = std::move(fd);
    ASSERT_GT(pid_, 0);
  }
  void TearDown() override {
    fd_.Reset();
    int status = 0;
    ::waitpid(pid_, &status, 0);  // the agent exits once the link is gone
    AgentTest::TearDown();
  }
  void Send(uint32_t stream, FrameType type, Channel ch, std::string_view body) {
    ASSERT_TRUE(WriteAll(fd_.Get(), FrameBytes(stream, type, ch, body)).has_value());
  }
  void Handshake() {
    Send(0, FrameType::kHello, Channel::kControl, R"({"version":1,"role":"host"})");
  }
  pid_t pid_ = -1;
  UniqueFd fd_;
  protocol::FrameDecoder decoder_;
};

TEST_F(RawAgent, BadRequestFailsOnlyItsStream) {
  Handshake();
  Send(1, FrameType::kOpen, Channel::kControl, "{\"op\":\"exec\",\"argv\":[]}");
  Send(2, FrameType::kOpen, Channel::kControl, "not json at all");
  Send(3, FrameType::kOpen, Channel::kControl, R"({"op":"teleport"})");
  Send(0, FrameType::kPing, Channel::kControl, "still-alive");
  int errors = 0;
  auto pong = ReadUntil(fd_.Get(), decoder_, [&](const protocol::Frame& f) {
    if (f.type == FrameType::kError) {
      auto body = protocol::DecodeError(f.PayloadText());
      EXPECT_TRUE(body.has_value());
      if (body) {
        EXPECT_EQ(body->errno_value, EINVAL) << body->message;
      }
      ++errors;
    }
    return f.type == FrameType::kPong;
  });
  ASSERT_TRUE(pong.has_value());
  EXPECT_EQ(pong->PayloadText(), "still-alive");
  EXPECT_EQ(errors, 3);
}

TEST_F(RawAgent, OversizeHeaderEndsTheLink) {
  Handshake();
  auto header = FrameBytes(1, FrameType::kData, Channel::kStdin, "");
  uint32_t huge = 64u << 20;
  for (int i = 0; i < 4; ++i) header[i] = static_cast<std::byte>((huge >> (8 * i)) & 0xff);
  ASSERT_TRUE(WriteAll(fd_.Get(), header).has_value());
  bool saw_error = false;
  auto last = ReadUntil(fd_.Get(), decoder_, [&](const protocol::Frame& f) {
    if (f.stream_id == 0 && f.type == FrameType::kError) saw_error = true;
    return false;
  });
  EXPECT_FALSE(last.has_value());  // the agent closed the link
  EXPECT_TRUE(saw_error);
}

TEST_F(RawAgent, VersionMismatchIsAnsweredWithAnError) {
  Send(0, FrameType::kHello, Channel::kControl, R"({"version":2,"role":"host"})");
  std::optional<int> err;
  ReadUntil(fd_.Get(), decoder_, [&](const protocol::Frame& f) {
    if (f.type == FrameType::kError) {
      auto body = protocol::DecodeError(f.PayloadText());
      if (body) err = body->errno_value;
    }
    return false;
  });
  EXPECT_EQ(err, EPROTONOSUPPORT);
}

}  // namespace
}  // namespace cella::testing

namespace cella::testing {
namespace {

// A stopped or starved agent never accepts the shutdown request; stop used
// to wait on it forever with QEMU up. Now the caller gets ETIMEDOUT.
TEST_F(AgentLink, ShutdownThatIsNeverAnsweredTimesOut) {
  auto p = MakePair();
  auto fake = FakeAgent(std::move(p.fake), {});
  {
    auto c = host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::seconds(5)));
    ASSERT_TRUE(c.has_value()) << c.error().message;
    auto st = (*c)->Shutdown(std::chrono::seconds(1), std::chrono::milliseconds(300));
    ASSERT_FALSE(st.has_value());
    EXPECT_EQ(st.error().errno_value, ETIMEDOUT) << st.error().message;
  }
  fake.join();
}

// The supervisor's start-up waits for the main process to start and each
// forwarded connection for its port, shares for their relay and their
// placing (shares_mounted): a guest that
// never answers must fail those waits, not hold them forever.
TEST_F(AgentLink, MainPortAndShareRequestsThatAreNeverAnsweredTimeOut) {
  using std::chrono::milliseconds;
  for (int which = 0; which < 4; ++which) {
    auto p = MakePair();
    auto fake = FakeAgent(std::move(p.fake), {});
    {
      auto c = host::AgentClient::Connect(std::move(p.host), WithTimeout(std::chrono::seconds(5)));
      ASSERT_TRUE(c.has_value()) << c.error().message;
      std::optional<Error> err;
      if (which == 0) {
        auto r = (*c)->AttachMain({}, milliseconds(300));
        ASSERT_FALSE(r.has_value());
        err = r.error();
      } else if (which == 1) {
        auto r = (*c)->OpenPort(8080, milliseconds(300));
        ASSERT_FALSE(r.has_value());
        err = r.error();
      } else if (which == 2) {
        auto r = (*c)->ServeShare(0, milliseconds(300));
        ASSERT_FALSE(r.has_value());
        err = r.error();
      } else {
        auto r = (*c)->SharesMounted(milliseconds(300));
        ASSERT_FALSE(r.has_value());
        err = r.error();
      }
      EXPECT_EQ(err->errno_value, ETIMEDOUT) << which << ": " << err->message;
    }
    fake.join();
  }
}

// The real agent serving on a listening socket, one host after another as
// the guest's loop does (--listen); killed and reaped at the end.
class ListeningAgent {
 public:
  ListeningAgent(const std::string& path, std::vector<std::string> extra_args = {}) : path_(path) {
    std::vector<std::string> args = {CELLA_AGENT_PATH, "--listen", path};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    pid_ = ::fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~ListeningAgent() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  ListeningAgent(const ListeningAgent&) = delete;
  ListeningAgent& operator=(const ListeningAgent&) = delete;
  bool started() const { return pid_ > 0; }

  // A new host's connection (raw, no handshake), once the agent listens
  // (up to 5 s); invalid if it never did.
  UniqueFd Connect() const {
    for (int i = 0; i < 500; ++i) {
      UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::memcpy(addr.sun_path, path_.c_str(), path_.size() + 1);
      if (::connect(fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return UniqueFd();
  }

 private:
  std::string path_;
  pid_t pid_ = -1;
};

// An upload whose link ends before its Eof leaves nothing behind, neither
// the file nor its temporary one, whether it was written on the agent's
// loop or on a thread of its own (as once the agent serves host shares).
// The agent serves on as the guest's does (--listen: one host after another).
TEST_F(AgentLink, AnUploadCutOffByTheLinksEndLeavesNoFile) {
  for (bool off_loop : {false, true}) {
    SCOPED_TRACE(off_loop ? "off the loop" : "on the loop");
    TempDir dir("agentupload");
    TempDir target_dir("agentupload-target");
    const std::string path = dir / "agent.sock";
    ListeningAgent agent(path, off_loop ? std::vector<std::string>{"--as-if-serving-shares"}
                                        : std::vector<std::string>{});
    ASSERT_TRUE(agent.started());
    UniqueFd link = agent.Connect();
    ASSERT_TRUE(link) << "the agent never listened on " << path;
    const std::string target = target_dir / "uploaded.txt";
    auto send = [&](uint32_t stream, FrameType type, Channel ch, std::string_view body) {
      ASSERT_TRUE(WriteAll(link.Get(), FrameBytes(stream, type, ch, body)).has_value());
    };
    send(0, FrameType::kHello, Channel::kControl, R"({"version":1,"role":"host"})");
    send(1, FrameType::kOpen, Channel::kControl,
         R"({"op":"write_file","path":")" + target + R"(","mode":420})");
    send(1, FrameType::kData, Channel::kStdin, "the first half");
    // Once the Pong is back, the agent has taken the Open and the Data.
    send(0, FrameType::kPing, Channel::kControl, "after");
    protocol::FrameDecoder decoder;
    auto pong = ReadUntil(link.Get(), decoder,
                          [](const protocol::Frame& f) { return f.type == FrameType::kPong; });
    ASSERT_TRUE(pong) << "no Pong";
    link.Reset();
    // An off-loop upload's thread ends on its own, after the link: what it
    // leaves is looked at from 2 s on (a commit it should not have made
    // comes within milliseconds of the link's end), for at most 10 s.
    const auto closed = std::chrono::steady_clock::now();
    std::vector<std::string> left;
    for (int i = 0; i < 500; ++i) {
      left.clear();
      for (const auto& e : std::filesystem::directory_iterator(target_dir.path()))
        left.push_back(e.path().filename());
      if (left.empty() && std::chrono::steady_clock::now() - closed > std::chrono::seconds(2))
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_TRUE(left.empty()) << "left behind: " << (left.empty() ? "" : left[0]);
  }
}

// The real agent on a listening socket, serving one host after another as
// the guest's loop does: a released link ends (the agent reads nothing more
// from it, and a command still running on it is abandoned), and the next
// host is served.
TEST_F(AgentLink, ReleaseEndsTheLinkAndTheNextHostIsServed) {
  TempDir dir("agentrelease");
  const std::string path = dir / "agent.sock";
  ListeningAgent agent(path);
  ASSERT_TRUE(agent.started());
  auto connect = [&]() -> std::unique_ptr<host::AgentClient> {
    UniqueFd fd = agent.Connect();
    if (!fd) {
      ADD_FAILURE() << "the agent never listened on " << path;
      return nullptr;
    }
    auto client = host::AgentClient::Connect(std::move(fd), WithTimeout(std::chrono::seconds(10)));
    EXPECT_TRUE(client) << client.error().message;
    return client ? std::move(*client) : nullptr;
  };

  auto first = connect();
  ASSERT_TRUE(first);
  const std::string pid_file = dir / "sleeper.pid";
  auto running = first->StartExec(Sh("echo $$ > " + pid_file + "; exec sleep 30"), {});
  ASSERT_TRUE(running) << running.error().message;
  for (int i = 0; i < 500 && ::access(pid_file.c_str(), F_OK) != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  auto released = first->Release(std::chrono::seconds(10));
  ASSERT_TRUE(released) << released.error().message;
  // Nothing more is read from the released link: a request on it fails
  // (the agent closes it once its answer is out) instead of running.
  auto after = first->Exec(Sh("echo late"));
  EXPECT_FALSE(after) << "a released link still ran: " << after->stdout_data;

  auto second = connect();
  ASSERT_TRUE(second);
  // The sleeper was killed with its link (gone, or a zombie until reaped).
  // (SIGKILL is sent when the link ends; the process dies when next
  // scheduled: up to 10 s on a loaded machine.)
  auto r =
      second->Exec(Sh("echo next; p=$(cat " + pid_file +
                      "); for i in $(seq 100); do s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null);"
                      " if [ -z \"$s\" ] || [ \"$s\" = Z ]; then echo gone; break; fi;"
                      " sleep 0.1; done"));
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->stdout_data, "next\ngone\n") << "the released link's command was not abandoned";
}

}  // namespace
}  // namespace cella::testing
