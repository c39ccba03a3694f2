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
// would, then closes it.
Result<SnapshotStreamWriter::Written> Save(const std::string& dir, const SnapshotManifest& m,
                                           const std::string& stream) {
  auto writer = CELLA_TRY(SnapshotStreamWriter::Start(dir, m));
  UniqueFd qemu = writer->TakeQemuEnd();
  std::thread qemu_side([&] {
    for (size_t at = 0; at < stream.size(); at += 1000)
      EXPECT_TRUE(WriteAll(qemu.Get(), std::string_view(stream).substr(at, 1000)));
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
