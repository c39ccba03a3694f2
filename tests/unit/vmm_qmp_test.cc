// QmpClient against a scripted fake QEMU on a socket pair.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "host/vmm/qmp.h"

namespace cella::vmm {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;

// Reads one newline-terminated line (blocking; the test bounds it via the
// client's own timeouts and by closing the socket).
std::string ReadLine(int fd) {
  std::string line;
  char c;
  while (::read(fd, &c, 1) == 1) {
    if (c == '\n') return line;
    line.push_back(c);
  }
  return line;
}

void Send(int fd, const std::string& text) { ASSERT_TRUE(WriteAll(fd, text + "\n")); }

constexpr const char* kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}})";

struct FakeQemu {
  int client_fd = -1;
  int server_fd = -1;
  std::thread thread;
  std::vector<json> requests;

  explicit FakeQemu(std::function<void(FakeQemu&)> script) {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    client_fd = fds[0];
    server_fd = fds[1];
    thread = std::thread([this, script] {
      script(*this);
      ::close(server_fd);
    });
  }
  ~FakeQemu() { thread.join(); }
  // Reads a request and records it; returns its id.
  json Next() {
    json req = json::parse(ReadLine(server_fd), nullptr, false);
    requests.push_back(req);
    return req.is_object() && req.contains("id") ? req["id"] : json();
  }
  void Reply(const json& id, const json& ret) {
    Send(server_fd, json{{"return", ret}, {"id", id}}.dump());
  }
};

void Negotiate(FakeQemu& q) {
  Send(q.server_fd, kGreeting);
  q.Reply(q.Next(), json::object());
}

TEST(Qmp, HandshakeQueryStatusSkipsEvents) {
  FakeQemu q([](FakeQemu& f) {
    Negotiate(f);
    json id = f.Next();
    Send(f.server_fd, R"({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}})");
    f.Reply(id, {{"status", "running"}, {"running", true}});
  });
  auto client = QmpClient::Handshake(UniqueFd(q.client_fd), milliseconds(5000));
  ASSERT_TRUE(client) << client.error().message;
  auto status = client->QueryStatus();
  ASSERT_TRUE(status) << status.error().message;
  EXPECT_EQ(*status, "running");
  ASSERT_EQ(client->Events().size(), 1u);
  EXPECT_EQ(client->Events().front()["event"], "RESUME");
  client = std::unexpected(Error::Msg("done"));  // close our end so the fake exits
  ASSERT_EQ(q.requests.size(), 2u);
  EXPECT_EQ(q.requests[0]["execute"], "qmp_capabilities");
  EXPECT_EQ(q.requests[1]["execute"], "query-status");
}

TEST(Qmp, CommandsSentWithIdsAndErrorsReported) {
  FakeQemu q([](FakeQemu& f) {
    Negotiate(f);
    f.Reply(f.Next(), json::object());  // stop
    f.Reply(f.Next(), json::object());  // cont
    json id = f.Next();                 // system_powerdown -> error
    Send(f.server_fd,
         json{{"error", {{"class", "GenericError"}, {"desc", "no ACPI"}}}, {"id", id}}.dump());
  });
  auto client = QmpClient::Handshake(UniqueFd(q.client_fd), milliseconds(5000));
  ASSERT_TRUE(client) << client.error().message;
  EXPECT_TRUE(client->Stop());
  EXPECT_TRUE(client->Cont());
  auto st = client->SystemPowerdown();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("no ACPI"), std::string::npos) << st.error().message;
  client = std::unexpected(Error::Msg("done"));
  ASSERT_EQ(q.requests.size(), 4u);
  EXPECT_EQ(q.requests[1]["execute"], "stop");
  EXPECT_EQ(q.requests[2]["execute"], "cont");
  EXPECT_EQ(q.requests[3]["execute"], "system_powerdown");
  EXPECT_NE(q.requests[1]["id"], q.requests[2]["id"]);
}

TEST(Qmp, StaleRepliesIgnored) {
  FakeQemu q([](FakeQemu& f) {
    Negotiate(f);
    json id = f.Next();
    Send(f.server_fd, R"({"return": {"status": "paused"}, "id": 999})");
    f.Reply(id, {{"status", "running"}});
  });
  auto client = QmpClient::Handshake(UniqueFd(q.client_fd), milliseconds(5000));
  ASSERT_TRUE(client);
  EXPECT_EQ(client->QueryStatus().value(), "running");
  client = std::unexpected(Error::Msg("done"));
}

TEST(Qmp, QuitToleratesClosedConnection) {
  FakeQemu q([](FakeQemu& f) {
    Negotiate(f);
    f.Next();  // quit: QEMU exits without replying
  });
  auto client = QmpClient::Handshake(UniqueFd(q.client_fd), milliseconds(5000));
  ASSERT_TRUE(client);
  EXPECT_TRUE(client->Quit());
}

TEST(Qmp, SilentServerTimesOut) {
  FakeQemu q([](FakeQemu& f) {
    Negotiate(f);
    f.Next();
    ReadLine(f.server_fd);  // never answer; returns when the client closes
  });
  auto client = QmpClient::Handshake(UniqueFd(q.client_fd), milliseconds(5000));
  ASSERT_TRUE(client);
  auto r = client->Execute("query-status", nullptr, milliseconds(200));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().errno_value, ETIMEDOUT);
  client = std::unexpected(Error::Msg("done"));
}

TEST(Qmp, NoGreetingIsAnError) {
  FakeQemu q([](FakeQemu& f) { Send(f.server_fd, R"({"return": {}})"); });
  auto client = QmpClient::Handshake(UniqueFd(q.client_fd), milliseconds(2000));
  ASSERT_FALSE(client);
  EXPECT_NE(client.error().message.find("greeting"), std::string::npos);
}

TEST(Qmp, GarbageAndOversizedMessagesFail) {
  FakeQemu garbage([](FakeQemu& f) { Send(f.server_fd, "this is not json"); });
  EXPECT_FALSE(QmpClient::Handshake(UniqueFd(garbage.client_fd), milliseconds(2000)));

  FakeQemu huge([](FakeQemu& f) {
    std::string blob(kMaxQmpLine + 100, 'x');
    (void)WriteAll(f.server_fd, blob);  // no newline; the client must give up
  });
  auto client = QmpClient::Handshake(UniqueFd(huge.client_fd), milliseconds(5000));
  ASSERT_FALSE(client);
  EXPECT_NE(client.error().message.find("longer than"), std::string::npos)
      << client.error().message;
}

}  // namespace
}  // namespace cella::vmm
