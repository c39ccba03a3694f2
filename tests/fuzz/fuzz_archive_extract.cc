// Feeds arbitrary bytes to the image-archive extractor (`cella import`) as
// an archive file (any format and compression libarchive detects). Nothing
// may crash, and whatever the archive holds, nothing may appear outside the
// destination directory: the destination's parent must hold only it.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "host/registry/archive_extract.h"

namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "%s\n", what.c_str());
  std::abort();
}

// Leaked on purpose: the atexit cleanup runs after static destructors.
const std::string& WorkDir() {
  static const std::string* dir = [] {
    // tmpfs when there is one: every input writes and removes a tree.
    const char* base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    auto* path = new std::string(std::string(base) + "/cella-fuzz-archive-XXXXXX");
    if (::mkdtemp(path->data()) == nullptr) std::abort();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(WorkDir(), ec);
    });
    return path;
  }();
  return *dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fs = std::filesystem;
  const std::string archive = WorkDir() + "/archive";
  const std::string box = WorkDir() + "/box";
  const std::string dest = box + "/dest";
  {
    std::ofstream out(archive, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) Die("could not write the archive file");
  }
  std::error_code ec;
  fs::create_directories(box, ec);
  if (ec) Die("could not create " + box);
  cella::registry::ExtractLimits limits{
      .max_bytes = 8u << 20, .max_ratio = 100, .ratio_floor_bytes = 4u << 20, .max_entries = 2000};
  (void)cella::registry::ExtractImageArchive(archive, dest, limits);
  // Whatever happened, nothing may have been created beside dest or beside
  // the work files (a symlink planted by one entry carrying a later one out).
  for (const auto& entry : fs::directory_iterator(box)) {
    if (entry.path() != dest) Die("entry outside the destination: " + entry.path().string());
  }
  for (const auto& entry : fs::directory_iterator(WorkDir())) {
    if (entry.path() != archive && entry.path() != box)
      Die("entry outside the destination: " + entry.path().string());
  }
  fs::remove_all(box, ec);
  if (ec) Die("could not clean " + box + ": " + ec.message());
  return 0;
}
