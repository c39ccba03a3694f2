// SnapshotStreamWriter: what QEMU writes into its pipe end reaches the
// state file without the guest RAM's zero pages, raw (hashed on the way)
// or through zstd, and a stream cut short is refused.
#include <gtest/gtest.h>

#include <csignal>
#include <cstdlib>
#include <string>
#include <thread>

#include "base/io.h"
#include "host/os/digest.h"
#include "host/os/process.h"
#include "host/sandbox/snapshot_stream.h"
#include "host/vmm/migration_stream.h"
#include "support/migration_stream_model.h"
#include "support/temp_dir.h"

namespace cella::sandbox {
namespace {

std::string Filtered(const std::string& in) {
  vmm::ZeroPageFilter f({vmm::kGuestRamBlock});
  std::string out;
  EXPECT_TRUE(f.Feed({reinterpret_cast<const uint8_t*>(in.data()), in.size()}, out));
  EXPECT_TRUE(f.Finish());
  return out;
}

// Writes `stream` into the writer's QEMU end in small pieces, as QEMU
// would, then closes it. `refused`: the writer is expected to stop reading
// (a stream it refuses), so a failed write is what QEMU would see.
Result<SnapshotStreamWriter::Written> Save(const std::string& dir, const SnapshotManifest& m,
                                           const std::string& stream, bool refused = false) {
  auto writer = CELLA_TRY(SnapshotStreamWriter::Start(dir, m));
  UniqueFd qemu = writer->TakeQemuEnd();
  std::thread qemu_side([&] {
    for (size_t at = 0; at < stream.size(); at += 1000) {
      Status wrote = WriteAll(qemu.Get(), std::string_view(stream).substr(at, 1000));
      if (refused && !wrote) break;
      EXPECT_TRUE(wrote);
    }
    qemu.Reset();
  });
  qemu_side.join();
  return writer->Finish(std::chrono::seconds(30));
}

TEST(SnapshotStreamWriter, WritesTheRawStreamWithoutZeroPagesAndItsChecksum) {
  testing::TempDir dir("snapstream");
  SnapshotManifest m;
  m.state_file = "machine.state";
  m.compression = SnapshotCompression::kNone;
  std::string stream = testing::TypicalMigrationStream();
  auto written = Save(dir.path(), m, stream);
  ASSERT_TRUE(written) << written.error().message;
  EXPECT_EQ(written->dropped_zero_pages, 2u);
  auto file = ReadFileToString(dir / "machine.state.tmp", 1 << 20);
  ASSERT_TRUE(file);
  EXPECT_EQ(*file, Filtered(stream));
  EXPECT_LT(file->size(), stream.size());
  EXPECT_EQ(written->sha256, host::Sha256Hex(*file));
}

TEST(SnapshotStreamWriter, PutsGuestRamInTheMemoryFileAndTheRestInTheStateFile) {
  testing::TempDir dir("snapstream");
  SnapshotManifest m;
  m.state_file = "machine.state";
  m.compression = SnapshotCompression::kNone;
  m.memory_file = kMemoryFileName;
  m.memory_bytes = 4 * 4096;  // the typical stream's "mem"
  std::string stream = testing::TypicalMigrationStream();
  auto written = Save(dir.path(), m, stream);
  ASSERT_TRUE(written) << written.error().message;
  EXPECT_EQ(written->memory_file_pages, 4u);
  // The memory file is the guest RAM's length, its pages where they were.
  auto memory = ReadFileToString(dir / "memory.raw.tmp", 1 << 20);
  ASSERT_TRUE(memory);
  ASSERT_EQ(memory->size(), 4u * 4096);
  EXPECT_EQ(memory->substr(0, 4096), std::string(4096, '\0'));
  EXPECT_EQ(memory->substr(4096, 4096), std::string(4096, '\0')) << "zeroed again after 'a'";
  EXPECT_EQ(memory->substr(8192, 4096), std::string(4096, 'c'));
  EXPECT_EQ(memory->substr(12288, 4096), std::string(4096, 'b'));
  // The page zeroed again came after pages past it: the digest is left to
  // the commit, which reads the file.
  EXPECT_TRUE(written->memory_sha256.empty());
  auto state = ReadFileToString(dir / "machine.state.tmp", 1 << 20);
  ASSERT_TRUE(state);
  EXPECT_EQ(written->sha256, host::Sha256Hex(*state));
  testing::LoadedMachine ram;
  for (uint64_t page = 0; page < 4; ++page)
    if (memory->substr(page * 4096, 4096) != std::string(4096, '\0'))
      ram.ram["mem"][page * 4096] = memory->substr(page * 4096, 4096);
  auto over_file = testing::LoadModel(*state, &ram);
  auto want = testing::LoadModel(stream);
  ASSERT_TRUE(over_file);
  ASSERT_TRUE(want);
  EXPECT_EQ(*over_file, *want);
  EXPECT_LT(state->size(), 200u) << "no page of guest RAM in the state file";
}

TEST(SnapshotStreamWriter, HashesTheMemoryFileOnTheWayWhenPagesComeInOrder) {
  testing::StreamWriter w;
  w.Header();
  w.SectionStart(2, "ram");
  w.MemSize({{"mem", 64 * 4096}, {"pc.bios", 4096}});
  w.Eos();
  w.SectionPart(2, /*end=*/true);
  for (uint64_t page = 0; page < 64; ++page)
    w.Record("mem", page * 4096, /*zero=*/page % 3 != 0, page % 3 == 0 ? char('a' + page % 7) : 0);
  w.Record("pc.bios", 0, false, 'z');
  w.Eos();
  w.bytes += std::string("\x04\x00\x00\x00\x03\x01x\x00\x00\x00\x00\x00\x00\x00\x01\x08", 16);
  testing::TempDir dir("snapstream");
  SnapshotManifest m;
  m.state_file = "machine.state";
  m.compression = SnapshotCompression::kNone;
  m.memory_file = kMemoryFileName;
  m.memory_bytes = 64 * 4096;
  auto written = Save(dir.path(), m, w.bytes);
  ASSERT_TRUE(written) << written.error().message;
  ASSERT_FALSE(written->memory_sha256.empty());
  auto from_file = MemoryFileDigest(dir / "memory.raw.tmp");
  ASSERT_TRUE(from_file) << from_file.error().message;
  EXPECT_EQ(written->memory_sha256, *from_file);

  // Guest RAM of another size than the sandbox's: refused, not mapped.
  testing::TempDir other("snapstream");
  m.memory_bytes = 128 * 4096;
  ASSERT_NE(::signal(SIGPIPE, SIG_IGN), SIG_ERR);  // as in every cella process
  auto wrong = Save(other.path(), m, w.bytes, /*refused=*/true);
  ASSERT_FALSE(wrong);
  EXPECT_NE(wrong.error().message.find("guest RAM"), std::string::npos) << wrong.error().message;
}

TEST(SnapshotStreamWriter, CompressesWithZstd) {
  testing::TempDir dir("snapstream");
  SnapshotManifest m;
  m.state_file = "machine.state.zst";
  m.compression = SnapshotCompression::kZstd;
  std::string stream = testing::TypicalMigrationStream();
  auto written = Save(dir.path(), m, stream);
  ASSERT_TRUE(written) << written.error().message;
  EXPECT_TRUE(written->sha256.empty());  // zstd wrote the file: the commit hashes it
  auto plain = host::CheckCommand({"zstd", "-q", "-d", "-c", dir / "machine.state.zst.tmp"},
                                  std::chrono::seconds(30));
  ASSERT_TRUE(plain) << plain.error().message;
  EXPECT_EQ(*plain, Filtered(stream));
}

TEST(SnapshotStreamWriter, RefusesAStreamCutShort) {
  for (auto compression : {SnapshotCompression::kNone, SnapshotCompression::kZstd}) {
    testing::TempDir dir("snapstream");
    SnapshotManifest m;
    m.state_file = "machine.state";
    m.compression = compression;
    std::string stream = testing::TypicalMigrationStream();
    auto written = Save(dir.path(), m, stream.substr(0, stream.size() / 2));
    ASSERT_FALSE(written);
    EXPECT_NE(written.error().message.find("truncated"), std::string::npos)
        << written.error().message;
  }
}

TEST(SnapshotStreamWriter, AnAbandonedSaveEndsAtOnce) {
  testing::TempDir dir("snapstream");
  SnapshotManifest m;
  m.state_file = "machine.state.zst";
  m.compression = SnapshotCompression::kZstd;
  auto writer = SnapshotStreamWriter::Start(dir.path(), m);
  ASSERT_TRUE(writer);
  UniqueFd qemu = (*writer)->TakeQemuEnd();  // held open: no end of stream
  auto written = (*writer)->Finish(std::chrono::seconds(30), /*abandon=*/true);
  EXPECT_FALSE(written);
}

// A zstd that stops reading (hung, or its disk stalled) must not hold the
// save for ever: the writer's thread blocks writing into zstd's full pipe,
// and Finish kills zstd at its deadline so that write fails. (Before, the
// join waited on the thread for good.)
TEST(SnapshotStreamWriter, AZstdThatStopsReadingEndsTheSaveAtItsDeadline) {
  // As in every cella process (cli/main.cc): a write to a pipe whose reader
  // is gone is an EPIPE error value, not a signal.
  ASSERT_NE(::signal(SIGPIPE, SIG_IGN), SIG_ERR);
  testing::TempDir dir("snapstream");
  ASSERT_TRUE(WriteStringToFile(dir / "zstd", "#!/bin/sh\nexec sleep 600\n", 0755));
  const char* old_path = std::getenv("PATH");
  std::string saved_path = old_path ? old_path : "";
  ASSERT_EQ(::setenv("PATH", (dir.path() + ":" + saved_path).c_str(), 1), 0);
  SnapshotManifest m;
  m.state_file = "machine.state.zst";
  m.compression = SnapshotCompression::kZstd;
  auto writer = SnapshotStreamWriter::Start(dir.path(), m);
  ASSERT_EQ(::setenv("PATH", saved_path.c_str(), 1), 0);
  ASSERT_TRUE(writer) << writer.error().message;
  UniqueFd qemu = (*writer)->TakeQemuEnd();
  // Not a migration stream: passed through whole, far more than the pipes
  // hold. The writer stops on the first failed write (the reader gone).
  std::thread qemu_side([&] {
    std::string block(1 << 20, 'x');
    for (int i = 0; i < 64; ++i)
      if (!WriteAll(qemu.Get(), block)) break;
    qemu.Reset();
  });
  auto written = (*writer)->Finish(std::chrono::milliseconds(500));
  ASSERT_FALSE(written);
  EXPECT_NE(written.error().message.find("zstd"), std::string::npos) << written.error().message;
  qemu_side.join();
}

}  // namespace
}  // namespace cella::sandbox
