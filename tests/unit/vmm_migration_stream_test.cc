// ZeroPageFilter on synthetic QEMU 7.2 migration streams: what it leaves
// out, that the result loads (tests/support/migration_stream_model.h) to
// exactly what the original loads to, in whatever pieces it arrives, and
// what it passes through or refuses.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "host/vmm/migration_stream.h"
#include "support/migration_stream_model.h"

namespace cella::vmm {
namespace {

using testing::LoadModel;
using testing::StreamWriter;

ZeroPageFilter MemFilter() { return ZeroPageFilter({kGuestRamBlock}); }

std::span<const uint8_t> Bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Feeds `in` in pieces of `piece` bytes (0: whole).
Result<std::string> FilterAll(ZeroPageFilter& f, std::string_view in, size_t piece = 0) {
  std::string out;
  if (piece == 0) piece = in.size() + 1;
  for (size_t at = 0; at < in.size(); at += piece)
    CELLA_TRY(f.Feed(Bytes(in.substr(at, piece)), out));
  CELLA_TRY(f.Finish());
  return out;
}

std::string TypicalStream() { return testing::TypicalMigrationStream(); }

using testing::PageMapSink;

TEST(ZeroPageFilter, LeavesOutZeroPagesOfGuestRamAndLoadsTheSame) {
  std::string in = TypicalStream();
  ZeroPageFilter f = MemFilter();
  auto out = FilterAll(f, in);
  ASSERT_TRUE(out) << out.error().message;
  EXPECT_EQ(f.DroppedPages(), 2u);
  EXPECT_FALSE(f.PassingThrough());
  // Out: one record naming "mem" (8+1+3+1 bytes), one continuing (8+1);
  // the next kept record names "mem" itself (+1+3).
  EXPECT_EQ(out->size(), in.size() - 13 - 9 + 4);
  auto want = LoadModel(in);
  auto got = LoadModel(*out);
  ASSERT_TRUE(want);
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, *want);
  EXPECT_EQ(got->ram["mem"].size(), 2u);  // 'b' at 12288, 'c' at 8192; 4096 zeroed again
  EXPECT_FALSE(got->device_state.empty());
}

TEST(ZeroPageFilter, ExtractsGuestRamToItsSinkAndLoadsTheSameOverIt) {
  std::string in = TypicalStream();
  PageMapSink sink;
  ZeroPageFilter f({kGuestRamBlock}, kGuestRamBlock, &sink);
  auto out = FilterAll(f, in);
  ASSERT_TRUE(out) << out.error().message;
  EXPECT_EQ(sink.size, 4u * 4096);
  // Two zero pages never given content are left out; the other four
  // records of "mem" (three pages, one zeroed again) went to the sink.
  EXPECT_EQ(f.DroppedPages(), 2u);
  EXPECT_EQ(f.ExtractedPages(), 4u);
  auto alone = LoadModel(*out);
  ASSERT_TRUE(alone);
  EXPECT_FALSE(alone->ram.contains(kGuestRamBlock)) << "no page of guest RAM is in the stream";
  EXPECT_EQ(alone->ram["pc.bios"].size(), 0u);
  testing::LoadedMachine initial = sink.AsRam();
  auto got = LoadModel(*out, &initial);
  auto want = LoadModel(in);
  ASSERT_TRUE(got);
  ASSERT_TRUE(want);
  EXPECT_EQ(*got, *want);
  EXPECT_EQ(sink.pages.size(), 2u);  // 'b' at 12288, 'c' at 8192
  EXPECT_EQ(sink.contract_breaches, 0u);
}

TEST(ZeroPageFilter, ABlockListedAgainKeepsWhatThePagesWereGiven) {
  for (bool resized : {false, true}) {
    for (bool extract : {false, true}) {
      StreamWriter w;
      w.Header();
      w.SectionStart(2, "ram");
      w.MemSize({{"mem", 4 * 4096}});
      w.Eos();
      w.SectionPart(2);
      w.Record("mem", 0, /*zero=*/false, 'a');
      w.Eos();
      w.SectionPart(2, /*end=*/true);
      // Listed again: "mem" at 0 is still 'a' for the loader, so the zero
      // record after it must take effect.
      w.MemSize({{"mem", (resized ? 8 : 4) * 4096}});
      w.Record("mem", 0, /*zero=*/true, 0);
      w.Eos();
      w.bytes += std::string("\x04\x00\x00\x00\x03\x01x\x00\x00\x00\x00\x00\x00\x00\x01\x08", 16);
      PageMapSink sink;
      ZeroPageFilter f =
          extract ? ZeroPageFilter({kGuestRamBlock}, kGuestRamBlock, &sink) : MemFilter();
      auto out = FilterAll(f, w.bytes);
      const std::string label = std::string(resized ? "resized, " : "same size, ") +
                                (extract ? "extracting" : "zero pages only");
      if (resized && extract) {
        // Pages went to the sink and the loader's block differs: the
        // rest cannot pass through as it is; the save fails instead.
        EXPECT_FALSE(out) << label;
        continue;
      }
      ASSERT_TRUE(out) << label << ": " << out.error().message;
      EXPECT_EQ(f.PassingThrough(), resized) << label;
      testing::LoadedMachine initial = sink.AsRam();
      auto got = LoadModel(*out, &initial);
      auto want = LoadModel(w.bytes);
      ASSERT_TRUE(got) << label;
      ASSERT_TRUE(want) << label;
      EXPECT_EQ(*got, *want) << label;
      EXPECT_EQ(sink.contract_breaches, 0u) << label;
      EXPECT_FALSE(want->ram.contains("mem")) << "the page was zeroed again";
    }
  }
}

TEST(ZeroPageFilter, SameOutputWhateverThePiecesAre) {
  std::string in = TypicalStream();
  ZeroPageFilter whole = MemFilter();
  auto expected = FilterAll(whole, in);
  ASSERT_TRUE(expected);
  for (size_t piece : {1, 2, 3, 7, 9, 13, 4096, 4097}) {
    ZeroPageFilter f = MemFilter();
    auto out = FilterAll(f, in, piece);
    ASSERT_TRUE(out) << "piece " << piece << ": " << out.error().message;
    EXPECT_EQ(*out, *expected) << "piece " << piece;
  }
}

TEST(ZeroPageFilter, KeepsEverythingWhenNoBlockIsNamed) {
  std::string in = TypicalStream();
  ZeroPageFilter f({});
  auto out = FilterAll(f, in);
  ASSERT_TRUE(out);
  EXPECT_EQ(*out, in);
  EXPECT_EQ(f.DroppedPages(), 0u);
}

TEST(ZeroPageFilter, PassesThroughWhatItDoesNotKnowBeforeLeavingAnythingOut) {
  // Not a QEVM stream; a configuration with subsections (x-ignore-shared's
  // capability list); an unknown RAM record kind (XBZRLE) before any drop.
  std::string not_qevm = "not a migration stream at all";
  StreamWriter sub;
  sub.Header();
  sub.bytes += "\x05";
  sub.bytes += std::string(
      "\x1a"
      "configuration/capabilities"
      "\x00\x00\x00\x01",
      31);
  sub.SectionStart(2, "ram");
  sub.MemSize({{"mem", 4096}});
  sub.Eos();
  sub.SectionPart(2, true);
  sub.Record("mem", 0, true, 0);
  sub.Eos();
  StreamWriter xbzrle;
  xbzrle.Header();
  xbzrle.SectionStart(2, "ram");
  xbzrle.MemSize({{"mem", 4096}});
  xbzrle.Eos();
  xbzrle.SectionPart(2, true);
  testing::PutBe(xbzrle.bytes, 0x40, 8);
  xbzrle.Record("mem", 0, true, 0);
  xbzrle.Eos();
  for (const std::string& in : {not_qevm, sub.bytes, xbzrle.bytes}) {
    for (size_t piece : {0, 1, 5}) {
      ZeroPageFilter f = MemFilter();
      auto out = FilterAll(f, in, piece);
      ASSERT_TRUE(out) << out.error().message;
      EXPECT_EQ(*out, in);
      EXPECT_TRUE(f.PassingThrough());
      EXPECT_EQ(f.DroppedPages(), 0u);
    }
  }
}

// Found by fuzz_migration_stream: a block list claiming a RAM block of
// ~280 TiB made the filter allocate its page bitmap for it (and abort).
TEST(ZeroPageFilter, AnImplausiblyLargeRamBlockPassesThroughWithoutItsBitmap) {
  StreamWriter w;
  w.Header();
  w.SectionStart(2, "ram");
  w.MemSize({{"mem", uint64_t{1} << 48}});
  w.Eos();
  w.SectionPart(2, true);
  w.Record("mem", 0, true, 0);
  w.Eos();
  ZeroPageFilter f = MemFilter();
  auto out = FilterAll(f, w.bytes);
  ASSERT_TRUE(out) << out.error().message;
  EXPECT_EQ(*out, w.bytes);
  EXPECT_TRUE(f.PassingThrough());
  EXPECT_EQ(f.DroppedPages(), 0u);
}

// A block list that runs on would only grow the filter's buffer: past 64 KiB
// the stream passes through (nothing was left out yet).
TEST(ZeroPageFilter, AnEndlessBlockListPassesThrough) {
  std::vector<std::pair<std::string, uint64_t>> blocks(10'000, {"b", 4096});
  blocks.push_back({"mem", 4096});
  StreamWriter w;
  w.Header();
  w.SectionStart(2, "ram");
  w.MemSize(blocks);
  w.Eos();
  w.SectionPart(2, true);
  w.Record("mem", 0, true, 0);
  w.Eos();
  for (size_t piece : {0, 4096}) {
    ZeroPageFilter f = MemFilter();
    auto out = FilterAll(f, w.bytes, piece);
    ASSERT_TRUE(out) << out.error().message;
    EXPECT_EQ(*out, w.bytes);
    EXPECT_TRUE(f.PassingThrough());
    EXPECT_EQ(f.DroppedPages(), 0u);
  }
}

TEST(ZeroPageFilter, FailsWhenTheStreamBreaksAfterAPageWasLeftOut) {
  // The record that named "mem" was left out, then an unknown record kind:
  // copying on would make the loader read it against another block.
  StreamWriter w;
  w.Header();
  w.SectionStart(2, "ram");
  w.MemSize({{"pc.bios", 4096}, {"mem", 8192}});
  w.Eos();
  w.SectionPart(2);
  w.Record("pc.bios", 0, false, 'x');
  w.Record("mem", 0, true, 0);
  testing::PutBe(w.bytes, 4096 | 0x40 | 0x20, 8);
  w.bytes.append(64, 'z');
  ZeroPageFilter f = MemFilter();
  auto out = FilterAll(f, w.bytes);
  ASSERT_FALSE(out);
  EXPECT_NE(out.error().message.find("after zero pages were left out"), std::string::npos)
      << out.error().message;
}

TEST(ZeroPageFilter, ATruncatedStreamFailsAtTheEnd) {
  std::string in = TypicalStream();
  // Cut inside the RAM sections (before the device state).
  for (size_t cut : {size_t{4}, size_t{20}, in.size() / 2}) {
    ZeroPageFilter f = MemFilter();
    auto out = FilterAll(f, in.substr(0, cut));
    EXPECT_FALSE(out) << "cut at " << cut;
  }
}

// Random streams as QEMU could write them: every one loads the same after
// the filter (or the filter says why not).
TEST(ZeroPageFilter, RandomStreamsLoadTheSame) {
  std::mt19937 rng(1234);
  const std::vector<std::string> blocks = {"mem", "pc.bios", "/rom@etc/acpi/tables"};
  for (int round = 0; round < 300; ++round) {
    StreamWriter w;
    w.Header(rng() % 4 != 0);
    w.SectionStart(2, "ram");
    w.MemSize({{"mem", 64 * 4096}, {"pc.bios", 8 * 4096}, {"/rom@etc/acpi/tables", 8 * 4096}});
    w.Eos();
    if (rng() % 2) w.Footer(2);
    int parts = 1 + int(rng() % 3);
    for (int part = 0; part < parts; ++part) {
      bool end = part == parts - 1;
      w.SectionPart(2, end);
      int records = int(rng() % 40);
      for (int r = 0; r < records; ++r) {
        const std::string& block = blocks[rng() % 10 < 7 ? 0 : 1 + rng() % 2];
        uint64_t pages = block == "mem" ? 64 : 8;
        int kind = int(rng() % 10);
        char fill = kind < 6 ? 0 : char('a' + rng() % 3);
        w.Record(block, (rng() % pages) * 4096, kind < 8, fill, rng() % 8 == 0);
      }
      w.Eos();
      if (rng() % 2) w.Footer(2);
    }
    w.bytes += std::string("\x04\x00\x00\x00\x03\x01x\x00\x00\x00\x00\x00\x00\x00\x01\x08", 16);
    auto want = LoadModel(w.bytes);
    ASSERT_TRUE(want) << "round " << round;
    ZeroPageFilter f = MemFilter();
    auto out = FilterAll(f, w.bytes, 1 + rng() % 5000);
    ASSERT_TRUE(out) << "round " << round << ": " << out.error().message;
    auto got = LoadModel(*out);
    ASSERT_TRUE(got) << "round " << round;
    EXPECT_EQ(*got, *want) << "round " << round;
    // Extracting "mem" to a memory file: the rest loads onto it the same.
    PageMapSink sink;
    ZeroPageFilter extracting({kGuestRamBlock}, kGuestRamBlock, &sink);
    auto rest = FilterAll(extracting, w.bytes, 1 + rng() % 5000);
    ASSERT_TRUE(rest) << "round " << round << ": " << rest.error().message;
    testing::LoadedMachine initial = sink.AsRam();
    auto over_file = LoadModel(*rest, &initial);
    ASSERT_TRUE(over_file) << "round " << round;
    EXPECT_EQ(*over_file, *want) << "round " << round;
    EXPECT_EQ(sink.contract_breaches, 0u) << "round " << round;
  }
}

}  // namespace
}  // namespace cella::vmm
