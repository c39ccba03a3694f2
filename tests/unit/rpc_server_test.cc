// The JSON-RPC server's framing and errors, with no VM: a factory that
// refuses, pipes for stdin/stdout.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "host/rpc/base64.h"
#include "host/rpc/params.h"
#include "host/rpc/server.h"
#include "protocol/messages.h"
#include "protocol/wire.h"
#include "rpc_test_support.h"

namespace cella::rpc {
namespace {

using nlohmann::json;

// Feeds `input` to a server whose factory fails, returns every line it wrote.
std::vector<json> Serve(const std::string& input, std::string* factory_saw = nullptr) {
  ServerOptions options;
  options.max_line_bytes = 1024;
  return ServeLines(
      input,
      [factory_saw](const CreateParams& p) -> Result<std::unique_ptr<Sandbox>> {
        if (factory_saw) *factory_saw = p.image;
        return Fail("no VMs in unit tests");
      },
      options);
}

TEST(RpcServer, MalformedInputGetsTheMatchingErrorAndServingGoesOn) {
  std::string big(2000, 'x');
  auto lines = Serve(
      "{not json\n"
      "[1,2]\n"
      "{\"jsonrpc\":\"1.0\",\"method\":\"exec\",\"id\":1}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"nope\",\"id\":2}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"exec\",\"id\":3,\"params\":{\"command\":\"true\"}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"exec\",\"id\":4,\"params\":{\"command\":5}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"port_forward\",\"id\":5}\n" +
      big + "\n" +
      "{\"jsonrpc\":\"2.0\",\"method\":\"read_file\",\"id\":6,\"params\":{\"path\":\"/x\"}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"log_stream\",\"id\":7}\n");
  ASSERT_EQ(lines.size(), 10u);
  std::map<std::string, int> by_id;
  std::vector<int> null_ids;
  for (const auto& l : lines) {
    ASSERT_EQ(l["jsonrpc"], "2.0");
    if (l["id"].is_null()) {
      null_ids.push_back(l["error"]["code"].get<int>());
    } else {
      by_id[l["id"].dump()] = l["error"]["code"].get<int>();
    }
  }
  EXPECT_EQ(null_ids, (std::vector<int>{kParseError, kInvalidRequest, kInvalidRequest}));
  EXPECT_EQ(by_id["1"], kInvalidRequest);
  EXPECT_EQ(by_id["2"], kMethodNotFound);
  EXPECT_EQ(by_id["3"], kVmFailed);  // no sandbox yet
  EXPECT_EQ(by_id["4"], kInvalidParams);
  EXPECT_EQ(by_id["5"], kInvalidParams);  // port_forward without its forwards
  EXPECT_EQ(by_id["6"], kVmFailed);
  EXPECT_EQ(by_id["7"], kVmFailed);  // log_stream: no sandbox yet
}

TEST(RpcServer, CreateRefusesUnsupportedFieldsByNameAndReportsFactoryFailures) {
  std::string saw;
  auto lines = Serve(
      "{\"jsonrpc\":\"2.0\",\"method\":\"create\",\"id\":1,\"params\":{}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"create\",\"id\":2,\"params\":{\"image\":\"alpine\","
      "\"vfs\":{\"workspace\":\"/w\"}}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"create\",\"id\":3,\"params\":{\"image\":\"alpine\","
      "\"network\":{\"policy_script\":\"x\"}}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"create\",\"id\":4,\"params\":{\"image\":\"alpine\","
      "\"resources\":{\"cpus\":\"two\"}}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"create\",\"id\":5,\"params\":{\"image\":\"alpine:3\"}}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"close\",\"id\":6}\n"
      "{\"jsonrpc\":\"2.0\",\"method\":\"exec\",\"id\":7,\"params\":{\"command\":\"true\"}}\n",
      &saw);
  ASSERT_EQ(lines.size(), 6u);  // nothing is read after close
  EXPECT_EQ(lines[0]["error"]["code"], kInvalidParams);
  EXPECT_NE(lines[0]["error"]["message"].get<std::string>().find("image is required"),
            std::string::npos);
  EXPECT_EQ(lines[1]["error"]["code"], kInvalidParams);
  EXPECT_NE(lines[1]["error"]["message"].get<std::string>().find("vfs"), std::string::npos);
  EXPECT_NE(lines[2]["error"]["message"].get<std::string>().find("network.policy_script"),
            std::string::npos);
  EXPECT_NE(lines[3]["error"]["message"].get<std::string>().find("resources.cpus"),
            std::string::npos);
  EXPECT_EQ(lines[4]["error"]["code"], kVmFailed);
  EXPECT_EQ(saw, "alpine:3");
  EXPECT_EQ(lines[5]["id"], 6);
  EXPECT_TRUE(lines[5]["result"].is_object());
}

TEST(RpcServer, CancelOfAnUnknownRequestSaysSo) {
  auto lines =
      Serve("{\"jsonrpc\":\"2.0\",\"method\":\"cancel\",\"id\":1,\"params\":{\"id\":9}}\n");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["result"]["cancelled"], false);
}

// A guest that starts every exec and then never grants stdin credit: it
// reads (and discards) what the host sends, and ends an exec only when the
// host signals it.
class CreditlessGuest {
 public:
  explicit CreditlessGuest(UniqueFd fd) : fd_(std::move(fd)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~CreditlessGuest() {
    ::shutdown(fd_.Get(), SHUT_RDWR);
    thread_.join();
  }
  std::atomic<int> signals{0};

 private:
  void SendFrame(uint32_t stream, protocol::FrameType type, protocol::Channel channel,
                 std::string_view body) {
    std::vector<std::byte> out;
    protocol::EncodeFrame(stream, type, channel, protocol::AsBytes(body), out);
    (void)WriteAll(fd_.Get(), std::span<const std::byte>(out));
  }
  void Run() {
    using protocol::Channel;
    using protocol::FrameType;
    SendFrame(0, FrameType::kHello, Channel::kControl, R"({"version":1,"role":"agent"})");
    protocol::FrameDecoder decoder;
    std::vector<std::byte> buf(65536);
    for (;;) {
      auto n = ReadSome(fd_.Get(), buf);
      if (!n || *n == 0) return;
      decoder.Feed(std::span(buf.data(), *n));
      for (;;) {
        auto f = decoder.Next();
        if (!f || !f->has_value()) break;
        const protocol::Frame& frame = **f;
        if (frame.type == FrameType::kOpen) {
          SendFrame(frame.stream_id, FrameType::kOpened, Channel::kControl,
                    protocol::EncodePid(4242));
        } else if (frame.type == FrameType::kSignal) {
          ++signals;
          SendFrame(frame.stream_id, FrameType::kEof, Channel::kStdout, "");
          SendFrame(frame.stream_id, FrameType::kEof, Channel::kStderr, "");
          protocol::ExecOutcome outcome;
          outcome.signal = SIGKILL;
          SendFrame(frame.stream_id, FrameType::kResult, Channel::kControl,
                    protocol::EncodeExecOutcome(outcome));
        }
      }
    }
  }
  UniqueFd fd_;
  std::thread thread_;
};

class FakeSandbox final : public Sandbox {
 public:
  explicit FakeSandbox(std::unique_ptr<host::AgentClient> agent) : agent_(std::move(agent)) {}
  const std::string& id() const override { return id_; }
  host::AgentClient& agent() override { return *agent_; }
  host::ExecRequest ExecDefaults() const override { return {}; }
  Result<AllowListChange> EditAllowList(const std::vector<std::string>&,
                                        const std::vector<std::string>&) override {
    return Fail("fake");
  }
  Status Close(std::chrono::milliseconds) override { return {}; }

 private:
  std::string id_ = "0123456789abcdef0123456789abcdef";
  std::unique_ptr<host::AgentClient> agent_;
};

bool IdIs(const json& line, int id) {
  auto it = line.find("id");
  return it != line.end() && it->is_number_integer() && it->get<int>() == id;
}

// Reads lines from fd until one satisfies pred (bounded by a poll time-out).
std::optional<json> AwaitLine(int fd, std::string& pending,
                              const std::function<bool(const json&)>& pred) {
  for (;;) {
    for (size_t nl; (nl = pending.find('\n')) != std::string::npos;) {
      json line = json::parse(pending.substr(0, nl));
      pending.erase(0, nl + 1);
      if (pred(line)) return line;
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20'000) != 1) return std::nullopt;
    char buffer[4096];
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n <= 0) return std::nullopt;
    pending.append(buffer, static_cast<size_t>(n));
  }
}

// A guest that never grants stdin credit must not wedge the server: stdin
// queues (bounded) for its exec while other requests are answered, and a
// queue that makes no progress ends that exec with −32001.
TEST(RpcServer, AGuestThatGrantsNoStdinCreditCannotWedgeTheServer) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  CreditlessGuest guest{UniqueFd(sv[1])};
  auto client = host::AgentClient::Connect(UniqueFd(sv[0]));
  ASSERT_TRUE(client) << client.error().message;
  std::unique_ptr<host::AgentClient> agent = std::move(*client);

  int in[2], out[2];
  ASSERT_EQ(::pipe2(in, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  ServerOptions options;
  options.max_stdin_queue = 64 * 1024;
  options.stdin_stall = std::chrono::milliseconds(300);
  std::unique_ptr<Sandbox> sandbox = std::make_unique<FakeSandbox>(std::move(agent));
  auto server = std::make_unique<Server>(
      [&](const CreateParams&) -> Result<std::unique_ptr<Sandbox>> {
        if (!sandbox) return Fail("one sandbox only");
        return std::move(sandbox);
      },
      in[0], out[1], options);
  std::thread serving([&] { EXPECT_TRUE(server->Serve()); });
  auto send = [&](const std::string& line) { ASSERT_TRUE(WriteAll(in[1], line + "\n")); };
  std::string pending;
  send(R"({"jsonrpc":"2.0","method":"create","id":1,"params":{"image":"x"}})");
  auto created = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 1); });
  ASSERT_TRUE(created && created->contains("result")) << (created ? created->dump() : "");

  send(R"({"jsonrpc":"2.0","method":"exec_pipe","id":2,"params":{"command":"cat"}})");
  auto ready = AwaitLine(out[0], pending,
                         [](const json& l) { return l.value("method", "") == "exec_pipe.ready"; });
  ASSERT_TRUE(ready);
  // 256 KiB of initial credit, then a 64 KiB queue, then nowhere to go.
  std::string chunk = Base64Encode(std::string(48 * 1024, 'a'));
  for (int i = 0; i < 12; ++i)
    send(R"({"jsonrpc":"2.0","method":"exec_pipe.stdin","params":{"id":2,"data":")" + chunk +
         "\"}}");
  // The reader thread is not held: a later request is answered.
  send(R"({"jsonrpc":"2.0","method":"cancel","id":3,"params":{"id":99}})");
  std::optional<json> ended, cancel;
  auto both = AwaitLine(out[0], pending, [&](const json& l) {
    if (IdIs(l, 2)) ended = l;
    if (IdIs(l, 3)) cancel = l;
    return ended && cancel;
  });
  ASSERT_TRUE(both) << "the server stopped answering";
  EXPECT_EQ((*cancel)["result"]["cancelled"], false);
  EXPECT_EQ((*ended)["error"]["code"], kExecFailed) << ended->dump();
  EXPECT_NE((*ended)["error"]["message"].get<std::string>().find("stdin"), std::string::npos);
  // The stalled process was killed: its Signal frame is on the link before
  // the answer, but the fake guest's thread reads it in its own time.
  for (int i = 0; i < 1000 && guest.signals.load() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_GE(guest.signals.load(), 1);

  send(R"({"jsonrpc":"2.0","method":"close","id":4})");
  auto closed = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 4); });
  EXPECT_TRUE(closed && closed->contains("result"));
  ::close(in[1]);
  serving.join();
  server.reset();
  ::close(in[0]);
  ::close(out[0]);
  ::close(out[1]);
}

// A sandbox without a guest: its events and port forwards are scripted.
class EventfulSandbox final : public Sandbox {
 public:
  const std::string& id() const override { return id_; }
  host::AgentClient& agent() override { std::abort(); }  // never asked in this test
  host::ExecRequest ExecDefaults() const override { return {}; }
  Result<AllowListChange> EditAllowList(const std::vector<std::string>&,
                                        const std::vector<std::string>&) override {
    return Fail("fake");
  }
  Result<EventBatch> PollEvents(std::optional<uint64_t> from,
                                std::chrono::milliseconds wait) override {
    EventBatch batch;
    if (from == std::optional<uint64_t>(0)) {  // the first poll of a creator
      batch.dropped = 2;
      batch.events.push_back({{"type", "network"}, {"network", {{"host", "a.test"}}}});
      batch.next = 3;
      return batch;
    }
    std::this_thread::sleep_for(std::min(wait, std::chrono::milliseconds(20)));
    batch.next = from.value_or(3);
    return batch;
  }
  Result<PortBinding> ForwardPort(const std::string& address, uint16_t local,
                                  uint16_t remote) override {
    if (local == 1) return Fail("address in use");
    PortBinding made{address, static_cast<uint16_t>(local == 0 ? 40000 : local), remote};
    std::lock_guard lock(mu_);
    forwards_.push_back(made);
    return made;
  }
  Result<std::vector<PortBinding>> StopForward(const std::string& address,
                                               uint16_t local) override {
    std::lock_guard lock(mu_);
    std::vector<PortBinding> stopped;
    std::erase_if(forwards_, [&](const PortBinding& b) {
      if (b.local_port != local || (!address.empty() && b.address != address)) return false;
      stopped.push_back(b);
      return true;
    });
    if (stopped.empty()) return std::unexpected(Error{"no port forward there", ENOENT});
    return stopped;
  }
  std::vector<uint16_t> ForwardedPorts() {
    std::lock_guard lock(mu_);
    std::vector<uint16_t> ports;
    for (const auto& b : forwards_) ports.push_back(b.local_port);
    return ports;
  }
  Status Close(std::chrono::milliseconds) override { return {}; }

 private:
  std::mutex mu_;
  std::vector<PortBinding> forwards_;
  std::string id_ = "0123456789abcdef0123456789abcdef";
};

TEST(RpcServer, EventsArePassedOnAndPortForwardAnswersInMatchlocksShape) {
  int in[2], out[2];
  ASSERT_EQ(::pipe2(in, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  EventfulSandbox* made = nullptr;
  auto server = std::make_unique<Server>(
      [&](const CreateParams&) -> Result<std::unique_ptr<Sandbox>> {
        auto sandbox = std::make_unique<EventfulSandbox>();
        made = sandbox.get();
        return sandbox;
      },
      in[0], out[1]);
  std::thread serving([&] { EXPECT_TRUE(server->Serve()); });
  auto send = [&](const std::string& line) { ASSERT_TRUE(WriteAll(in[1], line + "\n")); };
  std::string pending;
  send(R"({"jsonrpc":"2.0","method":"create","id":1,"params":{"image":"x"}})");
  std::optional<json> event, dropped;
  auto both = AwaitLine(out[0], pending, [&](const json& l) {
    if (l.value("method", "") == "event") event = l;
    if (l.value("method", "") == "cella.events_dropped") dropped = l;
    return event && dropped;
  });
  ASSERT_TRUE(both) << "no event notification";
  EXPECT_EQ((*event)["params"]["network"]["host"], "a.test");
  EXPECT_EQ((*dropped)["params"]["dropped"], 2);

  send(
      R"({"jsonrpc":"2.0","method":"port_forward","id":2,"params":{"forwards":[{"local_port":0,"remote_port":80}],"addresses":["127.0.0.1","127.0.0.2"]}})");
  auto forwarded = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 2); });
  ASSERT_TRUE(forwarded && forwarded->contains("result")) << (forwarded ? forwarded->dump() : "");
  EXPECT_EQ((*forwarded)["result"]["bindings"],
            json::parse(R"([{"address":"127.0.0.1","local_port":40000,"remote_port":80},
                            {"address":"127.0.0.2","local_port":40000,"remote_port":80}])"));
  send(
      R"({"jsonrpc":"2.0","method":"port_forward","id":3,"params":{"forwards":[{"local_port":8080,"remote_port":70000}]}})");
  auto bad = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 3); });
  ASSERT_TRUE(bad);
  EXPECT_EQ((*bad)["error"]["code"], kInvalidParams);
  send(
      R"({"jsonrpc":"2.0","method":"port_forward","id":4,"params":{"forwards":[{"local_port":1,"remote_port":80}]}})");
  auto busy = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 4); });
  ASSERT_TRUE(busy);
  EXPECT_EQ((*busy)["error"]["code"], kVmFailed);
  EXPECT_NE((*busy)["error"]["message"].get<std::string>().find("address in use"),
            std::string::npos);
  // All or nothing: the forward this call made before the failing one is
  // stopped again.
  send(
      R"({"jsonrpc":"2.0","method":"port_forward","id":6,"params":{"forwards":[{"local_port":5000,"remote_port":80},{"local_port":1,"remote_port":80}]}})");
  auto partial = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 6); });
  ASSERT_TRUE(partial);
  EXPECT_EQ((*partial)["error"]["code"], kVmFailed);
  ASSERT_NE(made, nullptr);
  EXPECT_EQ(made->ForwardedPorts(), (std::vector<uint16_t>{40000, 40000}));
  // cella.port_forward_close: one port on every address it listens on;
  // a second close names nothing (-32602).
  send(
      R"({"jsonrpc":"2.0","method":"cella.port_forward_close","id":7,"params":{"local_port":40000}})");
  auto stopped = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 7); });
  ASSERT_TRUE(stopped && stopped->contains("result")) << (stopped ? stopped->dump() : "");
  EXPECT_EQ((*stopped)["result"]["closed"],
            json::parse(R"([{"address":"127.0.0.1","local_port":40000,"remote_port":80},
                            {"address":"127.0.0.2","local_port":40000,"remote_port":80}])"));
  EXPECT_TRUE(made->ForwardedPorts().empty());
  send(
      R"({"jsonrpc":"2.0","method":"cella.port_forward_close","id":8,"params":{"local_port":40000,"address":"127.0.0.1"}})");
  auto again = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 8); });
  ASSERT_TRUE(again);
  EXPECT_EQ((*again)["error"]["code"], kInvalidParams);
  send(
      R"({"jsonrpc":"2.0","method":"cella.port_forward_close","id":9,"params":{"local_port":"x"}})");
  auto typo = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 9); });
  ASSERT_TRUE(typo);
  EXPECT_EQ((*typo)["error"]["code"], kInvalidParams);

  send(R"({"jsonrpc":"2.0","method":"close","id":5})");
  auto closed = AwaitLine(out[0], pending, [](const json& l) { return IdIs(l, 5); });
  EXPECT_TRUE(closed && closed->contains("result"));
  ::close(in[1]);
  serving.join();
  server.reset();
  ::close(in[0]);
  ::close(out[0]);
  ::close(out[1]);
}

TEST(RpcParams, MatchlockConfigMapsOntoCella) {
  auto p = ParseCreateParams(json::parse(R"({
    "image": "python:3.12-alpine",
    "resources": {"cpus": 2, "memory_mb": 1024, "disk_size_mb": 0},
    "network": {"allowed_hosts": ["api.test"], "block_private_ips": false,
                "secrets": {"KEY": {"value": "s3cr@t", "hosts": ["api.test"]}}},
    "env": {"A": "1"},
    "image_config": {"working_dir": "/srv", "user": "nobody"}
  })"));
  ASSERT_TRUE(p) << p.error().message;
  EXPECT_EQ(p->cpus, 2);
  EXPECT_EQ(p->memory_mb, 1024);
  EXPECT_FALSE(p->allow_private);  // a policy keeps private addresses blocked
  ASSERT_EQ(p->secrets.size(), 1u);
  EXPECT_EQ(p->secrets[0].value, "s3cr@t");
  EXPECT_EQ(p->working_dir, "/srv");
  auto defaults = ParseCreateParams(json{{"image", "alpine"}});
  ASSERT_TRUE(defaults);
  EXPECT_EQ(defaults->cpus, 1);
  EXPECT_EQ(defaults->memory_mb, 512);
  auto bad_secret = ParseCreateParams(
      json::parse(R"({"image":"a","network":{"secrets":{"K":{"value":"hunter2","hosts":[]}}}})"));
  ASSERT_FALSE(bad_secret);
  EXPECT_EQ(bad_secret.error().message.find("hunter2"), std::string::npos);
  auto unknown = ParseCreateParams(json::parse(R"({"image":"a","gpu":true})"));
  ASSERT_FALSE(unknown);
  EXPECT_NE(unknown.error().message.find("gpu"), std::string::npos);
}

TEST(RpcBase64, RoundTripsAndRejectsGarbage) {
  for (const std::string& s :
       std::vector<std::string>{"", "a", "ab", "abc", "abcd", std::string("\0\xff\x10", 3)}) {
    auto back = Base64Decode(Base64Encode(s));
    ASSERT_TRUE(back);
    EXPECT_EQ(*back, s);
  }
  EXPECT_EQ(Base64Encode("hello"), "aGVsbG8=");
  EXPECT_FALSE(Base64Decode("aGVsbG8"));
  EXPECT_FALSE(Base64Decode("aG=sbG8="));
  EXPECT_FALSE(Base64Decode("aGVs!G8="));
}

}  // namespace
}  // namespace cella::rpc
