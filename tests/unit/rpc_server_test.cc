// The JSON-RPC server's framing and errors, with no VM: a factory that
// refuses, pipes for stdin/stdout.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "host/rpc/base64.h"
#include "host/rpc/params.h"
#include "host/rpc/server.h"

namespace cella::rpc {
namespace {

using nlohmann::json;

// Feeds `input` to a server whose factory fails, returns every line it wrote.
std::vector<json> Serve(const std::string& input, std::string* factory_saw = nullptr) {
  int in[2], out[2];
  EXPECT_EQ(::pipe2(in, O_CLOEXEC), 0);
  EXPECT_EQ(::pipe2(out, O_CLOEXEC), 0);
  std::thread writer([&] {
    EXPECT_TRUE(WriteAll(in[1], input));
    ::close(in[1]);
  });
  std::string output;
  std::thread reader([&] {
    char buffer[4096];
    for (;;) {
      ssize_t n = ::read(out[0], buffer, sizeof buffer);
      if (n <= 0) break;
      output.append(buffer, static_cast<size_t>(n));
    }
  });
  {
    ServerOptions options;
    options.max_line_bytes = 1024;
    Server server(
        [&](const CreateParams& p) -> Result<std::unique_ptr<Sandbox>> {
          if (factory_saw) *factory_saw = p.image;
          return Fail("no VMs in unit tests");
        },
        in[0], out[1], options);
    EXPECT_TRUE(server.Serve());
  }
  ::close(out[1]);
  writer.join();
  reader.join();
  ::close(in[0]);
  ::close(out[0]);
  std::vector<json> lines;
  size_t start = 0;
  while (start < output.size()) {
    size_t nl = output.find('\n', start);
    lines.push_back(json::parse(output.substr(start, nl - start)));
    start = nl + 1;
  }
  return lines;
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
  EXPECT_EQ(by_id["5"], kMethodNotFound);
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
