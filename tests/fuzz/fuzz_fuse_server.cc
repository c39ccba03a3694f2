// Fuzzes the host FUSE server (share/fuse_server.h): the guest kernel's
// requests are untrusted bytes. The input is a sequence of requests, each
// prefixed by a u16 length; the server runs INIT first and then each request
// against a fresh temp directory with a few files. Nothing may crash, every
// reply must be a well-formed fuse_out_header of its own length, and nothing
// may appear outside the share (the harness's sibling directory stays
// untouched). A saved state must load back.
#include <linux/fuse.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "host/share/fuse_server.h"

namespace {

struct Dirs {
  std::string base, share, outside;
};

const Dirs& Setup() {
  static Dirs dirs = [] {
    char tmpl[] = "/tmp/cella-fuzz-fuse-XXXXXX";
    if (!mkdtemp(tmpl)) std::abort();
    Dirs d{tmpl, std::string(tmpl) + "/share", std::string(tmpl) + "/outside"};
    std::filesystem::create_directories(d.outside);
    std::ofstream(d.outside + "/secret") << "secret";
    return d;
  }();
  return dirs;
}

void ResetShare(const Dirs& d) {
  std::filesystem::remove_all(d.share);
  std::filesystem::create_directories(d.share + "/dir");
  std::ofstream(d.share + "/dir/file") << "hello";
  std::filesystem::create_symlink(d.outside, d.share + "/out");
}

void CheckReply(const std::vector<std::byte>& reply) {
  if (reply.empty()) return;
  fuse_out_header h;
  if (reply.size() < sizeof h) std::abort();
  std::memcpy(&h, reply.data(), sizeof h);
  if (h.len != reply.size() || h.error > 0 || h.error < -4095) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Dirs& d = Setup();
  ResetShare(d);
  cella::share::FuseServerOptions options;
  options.read_only = size > 0 && (data[0] & 1);
  auto server = cella::share::FuseServer::Open(d.share, options);
  if (!server) std::abort();
  fuse_in_header h{};
  fuse_init_in init{};
  init.major = 7;
  init.minor = 38;
  h.len = sizeof h + sizeof init;
  h.opcode = FUSE_INIT;
  std::vector<std::byte> req(h.len);
  std::memcpy(req.data(), &h, sizeof h);
  std::memcpy(req.data() + sizeof h, &init, sizeof init);
  CheckReply((*server)->Handle(req));
  size_t pos = size > 0 ? 1 : 0;
  while (pos + 2 <= size) {
    size_t len = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    len = std::min(len, size - pos);
    std::vector<std::byte> one(reinterpret_cast<const std::byte*>(data + pos),
                               reinterpret_cast<const std::byte*>(data + pos + len));
    pos += len;
    // Most inputs get a truthful length field, so the body is exercised.
    if (one.size() >= 4) {
      uint32_t l = static_cast<uint32_t>(one.size());
      std::memcpy(one.data(), &l, sizeof l);
    }
    CheckReply((*server)->Handle(one));
  }
  std::string state = (*server)->SaveState();
  auto again = cella::share::FuseServer::Open(d.share, {});
  if (!again || !(*again)->LoadState(state)) {
    std::fprintf(stderr, "state did not load back: %s\n", state.c_str());
    std::abort();
  }
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(d.outside)) ++entries;
  if (entries != 1) {
    std::fprintf(stderr, "something appeared outside the share\n");
    std::abort();
  }
  return 0;
}
