// The rpc's `cella.fork` method with no VM: its params reach the fork
// function as given (the sandbox ID defaulting to the one the server drives,
// none here), its result is {ids}, its failures are answered with the
// reason, and a server without a fork function says the method is absent.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "base/io.h"
#include "host/rpc/server.h"
#include "rpc_test_support.h"

namespace cella::rpc {
namespace {

using nlohmann::json;

std::map<int, json> ServeWith(const std::string& input, ServerOptions options) {
  std::map<int, json> by_id;
  for (json& line : ServeLines(
           input,
           [](const CreateParams&) -> Result<std::unique_ptr<Sandbox>> { return Fail("no VMs"); },
           std::move(options))) {
    const int id = line["id"].get<int>();  // read before the move below
    by_id[id] = std::move(line);
  }
  return by_id;
}

TEST(RpcFork, ParamsReachTheForkFunctionAndItsIdsOrErrorComeBack) {
  std::mutex mu;
  std::vector<std::string> calls;
  ServerOptions options;
  options.fork = [&](const std::string& id, int count,
                     const std::string& name) -> Result<std::vector<std::string>> {
    std::lock_guard lock(mu);
    calls.push_back(id + "/" + std::to_string(count) + "/" + name);
    if (id == "gone") return Fail("fork gone: no such sandbox");
    std::vector<std::string> ids;
    for (int i = 0; i < count; ++i) ids.push_back(id + "-copy" + std::to_string(i));
    return ids;
  };
  auto lines = ServeWith(
      R"({"jsonrpc":"2.0","method":"cella.fork","id":1,"params":{"id":"web","count":2,"name":"try"}})"
      "\n"
      R"({"jsonrpc":"2.0","method":"cella.fork","id":2,"params":{"id":"web"}})"
      "\n"
      R"({"jsonrpc":"2.0","method":"cella.fork","id":3,"params":{"id":"gone"}})"
      "\n"
      R"({"jsonrpc":"2.0","method":"cella.fork","id":4,"params":{}})"
      "\n"
      R"({"jsonrpc":"2.0","method":"cella.fork","id":5,"params":{"id":"web","count":0}})"
      "\n"
      R"({"jsonrpc":"2.0","method":"cella.fork","id":6,"params":{"id":"web","count":"2"}})"
      "\n",
      std::move(options));
  ASSERT_EQ(lines.size(), 6u);
  EXPECT_EQ(lines[1]["result"], json({{"ids", {"web-copy0", "web-copy1"}}}));
  EXPECT_EQ(lines[2]["result"], json({{"ids", {"web-copy0"}}})) << "count defaults to 1";
  EXPECT_EQ(lines[3]["error"]["code"], kVmFailed);
  EXPECT_NE(lines[3]["error"]["message"].get<std::string>().find("no such sandbox"),
            std::string::npos);
  EXPECT_EQ(lines[4]["error"]["code"], kInvalidParams) << "no id and no sandbox to default to";
  EXPECT_EQ(lines[5]["error"]["code"], kInvalidParams);
  EXPECT_EQ(lines[6]["error"]["code"], kInvalidParams);
  std::sort(calls.begin(), calls.end());
  EXPECT_EQ(calls, (std::vector<std::string>{"gone/1/", "web/1/", "web/2/try"}));
}

TEST(RpcFork, WithoutAForkFunctionTheMethodIsNotFound) {
  auto lines = ServeWith(R"({"jsonrpc":"2.0","method":"cella.fork","id":1,"params":{"id":"web"}})"
                         "\n",
                         ServerOptions{});
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[1]["error"]["code"], kMethodNotFound);
}

}  // namespace
}  // namespace cella::rpc
