// Feeds arbitrary bytes to the layer applier as an OCI layer (any
// compression libarchive detects), then writes whatever tree resulted as an
// erofs image. Neither may crash, hang or grow without bound; limits are
// small so each input stays cheap.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>

#include "host/rootfs/erofs_writer.h"
#include "host/rootfs/layer.h"
#include "host/rootfs/tree.h"

namespace {

// Leaked on purpose: the atexit cleanup runs after static destructors.
const std::string& WorkDir() {
  static const std::string* dir = [] {
    auto* path = new std::string("/tmp/cella-fuzz-tar-XXXXXX");
    if (::mkdtemp(path->data()) == nullptr) std::abort();
    std::atexit([] {
      ::unlink((WorkDir() + "/image.erofs").c_str());
      ::rmdir(WorkDir().c_str());
    });
    return path;
  }();
  return *dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cella::rootfs;
  auto tree = Tree::Create(WorkDir());
  if (!tree) std::abort();  // the work dir exists: this must not fail
  Limits limits{.max_entries = 2000,
                .max_content_bytes = 4u << 20,
                .max_path_bytes = 4096,
                .max_xattr_bytes = 64 * 1024};
  auto applied = ApplyLayerBytes(*tree, std::as_bytes(std::span(data, size)), limits);
  if (applied && applied->entries > limits.max_entries) std::abort();
  if (tree->content_bytes > limits.max_content_bytes) std::abort();
  // Write even after a failed layer: a partial tree must still be writable.
  std::string out = WorkDir() + "/image.erofs";
  auto written = WriteErofs(*tree, out, WriteOptions{.durability = Durability::kNoFsync});
  if (!written) {
    std::fprintf(stderr, "WriteErofs failed: %s\n", written.error().message.c_str());
    std::abort();
  }
  return 0;
}
