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
#include <span>
#include <string>
#include <string_view>

#include "host/vmm/migration_stream.h"
#include "support/migration_stream_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool extract = (data[0] & 1) != 0;
  const size_t piece = 1 + (data[0] >> 1) * 37;
  std::string_view in(reinterpret_cast<const char*>(data + 1), size - 1);
  cella::testing::PageMapSink sink;
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
  if (sink.contract_breaches != 0) std::abort();
  auto want = cella::testing::LoadModel(in);
  if (!want) return 0;
  cella::testing::LoadedMachine initial = sink.AsRam();
  auto got = cella::testing::LoadModel(out, &initial);
  if (!got || !(*got == *want)) std::abort();
  return 0;
}
