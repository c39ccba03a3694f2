// Egress control end to end: a Debian guest (curl, python3) behind a sealed
// network whose every flow passes the supervisor's proxy. Origins run on
// 127.0.0.1 only (tests/fixtures/egress_origin.py, certificates from a test
// CA made per test by egress_certs.sh) and are reached only through `.test`
// names pinned with --resolve; nothing here resolves or contacts a public
// name or address.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "image_fixture.h"
#include "process.h"
#include "support/tcp.h"

namespace cella::test {
namespace {

using cella::testing::FreePort;

constexpr const char* kSecretValue = "sk-test-5f0e1d2c3b4a";

class Egress : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(ImageFixture::Get().ok()) << "image fixtures unavailable";
    home_ = FreshCellaHome();
    certs_ = home_ + "/origin-certs";
    auto made =
        RunProcess({std::string(CELLA_SOURCE_DIR) + "/tests/fixtures/egress_certs.sh", certs_});
    ASSERT_EQ(made.exit_code, 0) << Describe(made);
    StartOrigin();
    ASSERT_FALSE(ports_.empty());
    image_ = ImageFixture::Get().Value("PLAIN_REGISTRY") + "/test/debian";
  }
  void TearDown() override {
    for (const auto& id : sandboxes_) CellaIn(home_, {"rm", "-f", id});
    if (origin_pid_ > 0) {
      ::kill(origin_pid_, SIGKILL);
      ::waitpid(origin_pid_, nullptr, 0);
    }
    if (!HasFailure()) RemoveCellaHomes();
  }

  void StartOrigin() {
    std::string ready = home_ + "/origin.ready";
    int in[2];
    ASSERT_EQ(::pipe(in), 0);
    origin_pid_ = ::fork();
    if (origin_pid_ == 0) {
      ::dup2(in[0], 0);
      ::close(in[1]);
      std::string script = std::string(CELLA_SOURCE_DIR) + "/tests/fixtures/egress_origin.py";
      ::execlp("python3", "python3", script.c_str(), "--certs", certs_.c_str(), "--ready",
               ready.c_str(), nullptr);
      ::_exit(127);
    }
    ::close(in[0]);
    origin_stdin_ = in[1];  // its EOF would end the origin: kept open until TearDown
    for (int i = 0; i < 200 && !std::filesystem::exists(ready); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::ifstream file(ready);
    std::string line;
    while (std::getline(file, line)) {
      auto eq = line.find('=');
      if (eq != std::string::npos) ports_[line.substr(0, eq)] = line.substr(eq + 1);
    }
  }

  // The flags that point the test names at the origins.
  std::vector<std::string> Pins() {
    std::vector<std::string> args = {"--upstream-ca", certs_ + "/ca.crt"};
    for (const char* name : {"api.test", "other.test", "a.glob.test", "secret.test"}) {
      args.push_back("--resolve");
      args.push_back(std::string(name) + ":80:127.0.0.1:" + ports_["HTTP_PORT"]);
      args.push_back("--resolve");
      args.push_back(std::string(name) + ":443:127.0.0.1:" + ports_["HTTPS_PORT"]);
    }
    args.push_back("--resolve");
    args.push_back("api.test:7000:127.0.0.1:" + ports_["ECHO_PORT"]);
    return args;
  }

  std::string RunDetached(std::vector<std::string> extra) {
    std::vector<std::string> args = {"run", "-d", "--image", image_};
    auto pins = Pins();
    args.insert(args.end(), pins.begin(), pins.end());
    args.insert(args.end(), extra.begin(), extra.end());
    // The image's own command (a shell) would end at once without stdin.
    args.insert(args.end(), {"--", "sleep", "100000"});
    auto r = CellaIn(home_, args);
    EXPECT_EQ(r.exit_code, 0) << Describe(r);
    std::string id = r.out;
    while (!id.empty() && id.back() == '\n') id.pop_back();
    if (!id.empty()) sandboxes_.push_back(id);
    return id;
  }

  ProcessResult Exec(const std::string& id, const std::string& script) {
    return CellaIn(home_, {"exec", id, "--", "sh", "-c", script});
  }

  // HTTP status curl saw (000 when the connection failed).
  std::string Status(const std::string& id, const std::string& url) {
    auto r = Exec(id, "curl -s -o /dev/null -m 20 -w '%{http_code}' '" + url + "'");
    return r.out;
  }

  std::string home_, certs_, image_;
  std::map<std::string, std::string> ports_;
  pid_t origin_pid_ = -1;
  int origin_stdin_ = -1;
  std::vector<std::string> sandboxes_;
};

TEST_F(Egress, AllowListDecidesHttpHttpsGlobsRuntimeChangesAndRawTcp) {
  std::string id = RunDetached({"--allow-host", "api.test,*.glob.test", "--network-intercept"});
  ASSERT_FALSE(id.empty());

  auto http = Exec(id, "curl -s -m 20 'http://api.test/echo?x=1'");
  ASSERT_EQ(http.exit_code, 0) << Describe(http);
  auto doc = nlohmann::json::parse(http.out, nullptr, false);
  ASSERT_TRUE(doc.is_object()) << http.out;
  EXPECT_EQ(doc["path"], "/echo");
  EXPECT_EQ(doc["query"], "x=1");

  // HTTPS through interception: the guest trusts cella's CA out of the box.
  auto https = Exec(id, "curl -s -m 20 'https://api.test/echo?y=2'");
  ASSERT_EQ(https.exit_code, 0) << Describe(https);
  EXPECT_NE(https.out.find("\"query\": \"y=2\""), std::string::npos) << https.out;
  // python3's ssl with its default trust store, no curl involved.
  auto python = Exec(id,
                     "python3 -c \"import socket, ssl; s = ssl.create_default_context()"
                     ".wrap_socket(socket.create_connection(('api.test', 443), timeout=20), "
                     "server_hostname='api.test'); s.sendall(b'GET /py HTTP/1.1\\r\\nHost: "
                     "api.test\\r\\nConnection: close\\r\\n\\r\\n'); "
                     "print(s.recv(12).decode())\"");
  EXPECT_EQ(python.out, "HTTP/1.1 200\n") << Describe(python);

  // A name not on the list does not even resolve (nothing is looked up on
  // the host); a Host header naming it on an allowed address is refused.
  EXPECT_EQ(Status(id, "http://other.test/"), "000");
  EXPECT_EQ(Status(id, "https://other.test/"), "000");
  auto spoofed = Exec(id,
                      "curl -s -o /dev/null -w '%{http_code}' -m 20 -H 'Host: other.test' "
                      "http://api.test/echo");
  EXPECT_EQ(spoofed.out, "403") << Describe(spoofed);
  auto sni_mismatch = Exec(id,
                           "curl -s -o /dev/null -w '%{http_code}' -m 20 --resolve "
                           "other.test:443:$(getent hosts api.test | cut -d' ' -f1) "
                           "https://other.test/echo");
  EXPECT_NE(sni_mismatch.out, "200") << Describe(sni_mismatch);
  EXPECT_EQ(Status(id, "https://a.glob.test/echo"), "200");
  EXPECT_NE(Status(id, "https://glob.test/echo"), "200");  // a glob is not its apex

  auto add = CellaIn(home_, {"allow-list", "add", id, "other.test"});
  ASSERT_EQ(add.exit_code, 0) << Describe(add);
  EXPECT_EQ(Status(id, "http://other.test/echo"), "200");
  auto ls = CellaIn(home_, {"allow-list", "ls", id});
  EXPECT_EQ(ls.out, "api.test\n*.glob.test\nother.test\n") << Describe(ls);
  ASSERT_EQ(CellaIn(home_, {"allow-list", "rm", id, "other.test"}).exit_code, 0);
  EXPECT_EQ(Status(id, "http://other.test/echo"), "000");

  // 20 edits at once all land (each used to overwrite the others' lists),
  // and an invalid entry is refused with the list left as it was.
  std::vector<std::thread> adders;
  std::vector<int> codes(20, -1);
  std::vector<std::string> outcomes(20);
  for (int i = 0; i < 20; ++i) {
    adders.emplace_back([&, i] {
      auto r = CellaIn(home_, {"allow-list", "add", id, "p" + std::to_string(i) + ".test"});
      codes[i] = r.exit_code;
      outcomes[i] = Describe(r);
    });
  }
  for (auto& t : adders) t.join();
  for (int i = 0; i < 20; ++i) EXPECT_EQ(codes[i], 0) << "add p" << i << ": " << outcomes[i];
  auto many = CellaIn(home_, {"allow-list", "ls", id});
  for (int i = 0; i < 20; ++i)
    EXPECT_NE(many.out.find("p" + std::to_string(i) + ".test\n"), std::string::npos)
        << "p" << i << " lost: " << many.out;
  auto bad = CellaIn(home_, {"allow-list", "add", id, "fine.test,bad!name.test"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_EQ(CellaIn(home_, {"allow-list", "ls", id}).out, many.out);
  auto missing = CellaIn(home_, {"allow-list", "rm", id, "p1.test,never.test"});
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_EQ(CellaIn(home_, {"allow-list", "ls", id}).out, many.out);

  // Non-HTTP TCP: to an allowed name's address it passes, elsewhere not.
  auto echo = Exec(id,
                   "python3 -c \"import socket; s=socket.create_connection(('api.test',7000),"
                   "timeout=20); s.sendall(b'raw-bytes'); s.shutdown(socket.SHUT_WR); "
                   "print(s.recv(100).decode())\"");
  EXPECT_EQ(echo.out, "raw-bytes\n") << Describe(echo);
  auto elsewhere = Exec(id,
                        "python3 -c \"import socket; s=socket.create_connection(('203.0.113.9',"
                        "7000),timeout=10); s.sendall(b'x'); print(repr(s.recv(10)))\"");
  EXPECT_NE(elsewhere.out, "b'x'\n") << Describe(elsewhere);

  // Private addresses: the gateway (the host, as in NAT mode) is blocked
  // until named explicitly.
  std::string gateway = "http://10.0.2.2:" + ports_["HTTP_PORT"] + "/echo";
  EXPECT_EQ(Status(id, gateway), "403");
  ASSERT_EQ(CellaIn(home_, {"allow-list", "add", id, "10.0.2.2"}).exit_code, 0);
  EXPECT_EQ(Status(id, gateway), "200");

  // UDP goes nowhere but the DNS service.
  auto udp = Exec(id,
                  "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                  " s.settimeout(3); s.sendto(b'x', ('203.0.113.9', 9)); "
                  "print('sent')\"");
  EXPECT_EQ(udp.exit_code, 0) << Describe(udp);
}

TEST_F(Egress, SecretsReachOnlyTheirHostAndNeverTheGuestOrDisk) {
  ASSERT_EQ(::setenv("API_KEY", kSecretValue, 1), 0);
  std::string id =
      RunDetached({"--allow-host", "api.test,secret.test", "--secret", "API_KEY@secret.test"});
  ASSERT_FALSE(id.empty());

  auto placeholder = Exec(id, "echo $API_KEY");
  EXPECT_TRUE(std::regex_match(placeholder.out, std::regex("CELLA_SECRET_[0-9a-f]{32}\n")))
      << placeholder.out;
  auto sent = Exec(id,
                   "curl -s -m 20 -H \"Authorization: Bearer $API_KEY\" "
                   "\"https://secret.test/echo?key=$API_KEY\"");
  ASSERT_EQ(sent.exit_code, 0) << Describe(sent);
  auto doc = nlohmann::json::parse(sent.out, nullptr, false);
  ASSERT_TRUE(doc.is_object()) << sent.out;
  EXPECT_EQ(doc["headers"]["Authorization"], std::string("Bearer ") + kSecretValue);
  EXPECT_EQ(doc["query"], std::string("key=") + kSecretValue);

  // To a host the secret is not for: refused, the origin never sees it.
  auto leaked = Exec(id,
                     "curl -s -o /dev/null -w '%{http_code}' -m 20 -H \"X-Key: $API_KEY\" "
                     "https://api.test/echo");
  EXPECT_EQ(leaked.out, "403") << Describe(leaked);

  // Nowhere in the guest: not in any environment, not in any file.
  auto environ = Exec(id, "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c " +
                              std::string(kSecretValue) + " || true");
  EXPECT_EQ(environ.out, "0\n") << Describe(environ);
  auto files = Exec(id, std::string("grep -rl ") + kSecretValue +
                            " / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "
                            "2>/dev/null; echo done");
  EXPECT_EQ(files.out, "done\n") << Describe(files);
  // Nowhere on the host's disk either: state store, spec, logs.
  auto on_disk = RunProcess({"grep", "-rl", kSecretValue, home_});
  EXPECT_EQ(on_disk.out, "") << Describe(on_disk);
  auto inspect = CellaIn(home_, {"inspect", id});
  EXPECT_EQ(inspect.out.find(kSecretValue), std::string::npos);

  // Two sandboxes, one name, two values: each gets its own.
  auto other = CellaIn(home_, [&] {
    std::vector<std::string> args = {"run",
                                     "--image",
                                     image_,
                                     "--allow-host",
                                     "secret.test",
                                     "--secret",
                                     "API_KEY=second-value@secret.test"};
    auto pins = Pins();
    args.insert(args.end(), pins.begin(), pins.end());
    args.insert(args.end(),
                {"--", "sh", "-c", "curl -s -m 20 -H \"X: $API_KEY\" https://secret.test/echo"});
    return args;
  }());
  ASSERT_EQ(other.exit_code, 0) << Describe(other);
  auto second = nlohmann::json::parse(other.out, nullptr, false);
  ASSERT_TRUE(second.is_object()) << other.out;
  EXPECT_EQ(second["headers"]["X"], "second-value");
  auto first_again = Exec(id, "curl -s -m 20 -H \"X: $API_KEY\" https://secret.test/echo");
  EXPECT_NE(first_again.out.find(kSecretValue), std::string::npos) << first_again.out;
  ::unsetenv("API_KEY");
}

TEST_F(Egress, StreamingAndUpgradesPassWithoutBuffering) {
  std::string id = RunDetached({"--allow-host", "api.test", "--network-intercept"});
  ASSERT_FALSE(id.empty());
  // The first event arrives while the origin still holds the second back.
  auto sse = Exec(id,
                  "curl -sN -m 60 https://api.test/sse > /tmp/sse & "
                  "for i in $(seq 100); do grep -q one /tmp/sse && break; sleep 0.2; done; "
                  "cat /tmp/sse; echo ---; curl -s -m 20 https://api.test/release >/dev/null; "
                  "wait; cat /tmp/sse");
  EXPECT_EQ(sse.out, "data: one\n\n---\ndata: one\n\ndata: two\n\n") << Describe(sse);
  auto chunked = Exec(id,
                      "printf 'hello chunks' | curl -s -m 20 -H 'Transfer-Encoding: chunked' "
                      "--data-binary @- https://api.test/upload");
  EXPECT_NE(chunked.out.find("\"body\": \"hello chunks\""), std::string::npos) << Describe(chunked);
  auto ws = Exec(
      id,
      "python3 - <<'PY'\n"
      "import socket, ssl\n"
      "s = ssl.create_default_context().wrap_socket(\n"
      "    socket.create_connection(('api.test', 443), timeout=20), server_hostname='api.test')\n"
      "s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: api.test\\r\\nUpgrade: websocket\\r\\n'\n"
      "          b'Connection: Upgrade\\r\\nSec-WebSocket-Key: x\\r\\n\\r\\n')\n"
      "head = b''\n"
      "while b'\\r\\n\\r\\n' not in head: head += s.recv(1)\n"
      "print(head.split(b'\\r\\n')[0].decode())\n"
      "s.sendall(b'ping-frame')\n"
      "print(s.recv(100).decode())\n"
      "PY");
  EXPECT_EQ(ws.out, "HTTP/1.1 101 Switching Protocols\nping-frame\n") << Describe(ws);
}

// After standby + resume the policy is the same (allowed host reachable,
// others blocked, the secret substituted), the -p forward serves again, and
// a name the guest resolved before the standby still reaches its host by
// the virtual address the guest kept, without resolving again (the DNS
// server's table is saved with the snapshot). A fork of the resumed
// sandbox has the same policy and names in its own network.
TEST_F(Egress, StandbyResumeAndForkKeepPolicySecretsNamesAndForwards) {
  ASSERT_EQ(::setenv("API_KEY", kSecretValue, 1), 0);
  const int host_port = FreePort();
  ASSERT_GT(host_port, 0);
  std::string id =
      RunDetached({"--allow-host", "api.test,secret.test", "--secret", "API_KEY@secret.test", "-p",
                   "127.0.0.1:" + std::to_string(host_port) + ":8080"});
  ASSERT_FALSE(id.empty());
  // Resolved once, before the standby; the address kept in a file.
  auto resolved = Exec(id, "getent hosts api.test | cut -d' ' -f1 > /root/ip; cat /root/ip");
  ASSERT_EQ(resolved.exit_code, 0) << Describe(resolved);
  ASSERT_TRUE(resolved.out.starts_with("198.1")) << "a virtual address: " << resolved.out;
  const std::string by_kept_ip =
      "curl -s -o /dev/null -m 20 -w '%{http_code}' --resolve api.test:80:$(cat /root/ip) "
      "http://api.test/echo";
  ASSERT_EQ(Exec(id, by_kept_ip).out, "200");
  // A tiny server in the guest (the image's python3 is minimal: no http.server).
  auto server = CellaIn(
      home_, {"exec", "-d", id, "--", "python3", "-c",
              "import socket\n"
              "s = socket.socket()\n"
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('0.0.0.0', 8080))\n"
              "s.listen(8)\n"
              "while True:\n"
              "    c, _ = s.accept()\n"
              "    c.recv(4096)\n"
              "    c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 10\\r\\n\\r\\nforwarded\\n')\n"
              "    c.close()\n"});
  ASSERT_EQ(server.exit_code, 0) << Describe(server);
  auto served = Exec(id,
                     "for i in $(seq 120); do curl -s -m 2 http://127.0.0.1:8080/page && break; "
                     "sleep 1; done");
  ASSERT_EQ(served.out, "forwarded\n") << Describe(served);
  const std::string page = "http://127.0.0.1:" + std::to_string(host_port) + "/page";
  EXPECT_EQ(RunProcess({"curl", "-s", "-m", "20", page}).out, "forwarded\n");

  ASSERT_EQ(CellaIn(home_, {"standby", id}, "", std::chrono::seconds(600)).exit_code, 0);
  auto resumed = CellaIn(home_, {"resume", id}, "", std::chrono::seconds(600));
  ASSERT_EQ(resumed.exit_code, 0) << Describe(resumed);

  auto check_policy = [&](const std::string& sandbox) {
    SCOPED_TRACE(sandbox);
    EXPECT_EQ(Exec(sandbox, by_kept_ip).out, "200") << "the kept virtual address still works";
    EXPECT_EQ(Status(sandbox, "http://api.test/echo"), "200");
    EXPECT_EQ(Status(sandbox, "http://other.test/"), "000") << "still blocked";
    auto sent = Exec(sandbox, "curl -s -m 20 -H \"X-Key: $API_KEY\" https://secret.test/echo");
    auto doc = nlohmann::json::parse(sent.out, nullptr, false);
    ASSERT_TRUE(doc.is_object()) << Describe(sent);
    EXPECT_EQ(doc["headers"]["X-Key"], kSecretValue) << "the secret is substituted";
  };
  check_policy(id);
  EXPECT_EQ(RunProcess({"curl", "-s", "-m", "20", page}).out, "forwarded\n")
      << "the -p forward serves again";

  auto forked = CellaIn(home_, {"fork", id}, "", std::chrono::seconds(600));
  ASSERT_EQ(forked.exit_code, 0) << Describe(forked);
  std::string copy = forked.out.substr(0, forked.out.find('\n'));
  sandboxes_.push_back(copy);
  check_policy(copy);
  check_policy(id);
  ::unsetenv("API_KEY");
}

}  // namespace
}  // namespace cella::test
