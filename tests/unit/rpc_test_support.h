// Drives an rpc::Server over pipes with no VM, for the rpc unit tests.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "base/io.h"
#include "host/rpc/server.h"

namespace cella::rpc {

// Feeds `input` to a Server made with `factory` and `options` until it
// ends (at the input's EOF) and returns every JSON line it wrote.
inline std::vector<nlohmann::json> ServeLines(const std::string& input, SandboxFactory factory,
                                              ServerOptions options) {
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
    Server server(std::move(factory), in[0], out[1], std::move(options));
    EXPECT_TRUE(server.Serve());
  }
  ::close(out[1]);
  writer.join();
  reader.join();
  ::close(in[0]);
  ::close(out[0]);
  std::vector<nlohmann::json> lines;
  size_t start = 0;
  while (start < output.size()) {
    size_t nl = output.find('\n', start);
    lines.push_back(nlohmann::json::parse(output.substr(start, nl - start)));
    start = nl + 1;
  }
  return lines;
}

}  // namespace cella::rpc
