// The JSON bodies of agent frames (results, errors, listings, requests) are
// decoded from untrusted bytes on both sides. Every decoder must return a
// value or an error, never crash; what decodes must re-encode and decode to
// the same thing.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "protocol/messages.h"

namespace {

template <class T, class Decode, class Encode>
void RoundTrip(std::string_view input, Decode decode, Encode encode) {
  auto first = decode(input);
  if (!first) return;
  auto second = decode(encode(*first));
  if (!second) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cella::protocol;
  std::string_view input(reinterpret_cast<const char*>(data), size);
  RoundTrip<Hello>(input, DecodeHello, EncodeHello);
  RoundTrip<Request>(input, DecodeRequest, EncodeRequest);
  RoundTrip<ExecOutcome>(input, DecodeExecOutcome, EncodeExecOutcome);
  RoundTrip<int64_t>(input, DecodePid, EncodePid);
  RoundTrip<ReadFileOpened>(input, DecodeReadFileOpened, EncodeReadFileOpened);
  RoundTrip<uint64_t>(input, DecodeSize, EncodeSize);
  RoundTrip<FileInfo>(input, DecodeFileInfo, EncodeFileInfo);
  RoundTrip<std::vector<FileInfo>>(input, DecodeList, EncodeList);
  RoundTrip<ErrorBody>(input, DecodeError, EncodeError);
  (void)DecodeEmpty(input);
  return 0;
}
