// vmm::ZeroPageFilter on arbitrary bytes (QEMU's migration stream as our
// snapshot writer receives it): it never crashes, and whenever it accepts a
// stream that the model loader (tests/support/migration_stream_model.h)
// loads, the filtered stream loads to the same RAM and device state. The
// first byte picks how the input is cut into pieces and whether guest RAM
// is extracted to a sink (a snapshot's memory file): then the filtered
// stream, loaded over the sink's pages, must give the same, and the sink
// must never see a page outside the size it was given.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <span>
#include <string>
#include <string_view>

#include "host/vmm/migration_stream.h"
#include "support/migration_stream_model.h"

namespace {

struct CheckedSink : cella::vmm::RamBlockSink {
  bool sized = false;
  uint64_t size = 0;
  std::map<uint64_t, std::string> pages;
  cella::Status SetSize(uint64_t bytes) override {
    sized = true;
    size = bytes;
    return {};
  }
  void Check(uint64_t offset, size_t length) const {
    if (!sized || offset % 4096 != 0 || length != 4096 || offset >= size || size - offset < length)
      std::abort();
  }
  cella::Status WritePage(uint64_t offset, std::span<const uint8_t> page) override {
    Check(offset, page.size());
    std::string bytes(reinterpret_cast<const char*>(page.data()), page.size());
    if (bytes == std::string(4096, '\0')) {
      pages.erase(offset);
    } else {
      pages[offset] = std::move(bytes);
    }
    return {};
  }
  cella::Status FillPage(uint64_t offset, uint8_t byte) override {
    Check(offset, 4096);
    if (byte == 0) {
      pages.erase(offset);
    } else {
      pages[offset] = std::string(4096, char(byte));
    }
    return {};
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool extract = (data[0] & 1) != 0;
  const size_t piece = 1 + (data[0] >> 1) * 37;
  std::string_view in(reinterpret_cast<const char*>(data + 1), size - 1);
  CheckedSink sink;
  cella::vmm::ZeroPageFilter filter =
      extract ? cella::vmm::ZeroPageFilter({cella::vmm::kGuestRamBlock}, cella::vmm::kGuestRamBlock,
                                           &sink)
              : cella::vmm::ZeroPageFilter({cella::vmm::kGuestRamBlock});
  std::string out;
  for (size_t at = 0; at < in.size(); at += piece) {
    std::string_view part = in.substr(at, piece);
    auto fed = filter.Feed(
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(part.data()), part.size()), out);
    if (!fed) return 0;
  }
  if (!filter.Finish()) return 0;
  auto want = cella::testing::LoadModel(in);
  if (!want) return 0;
  cella::testing::LoadedMachine initial;
  if (!sink.pages.empty()) initial.ram[cella::vmm::kGuestRamBlock] = sink.pages;
  auto got = cella::testing::LoadModel(out, &initial);
  if (!got || !(*got == *want)) std::abort();
  return 0;
}
