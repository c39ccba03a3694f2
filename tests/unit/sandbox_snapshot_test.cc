// The snapshot files (host/sandbox/snapshot.h): the manifest is read
// strictly, a snapshot is trusted only once committed and only while its
// size and checksum match, and the exec: pipelines QEMU runs write and read
// the same bytes (run here through /bin/sh, as QEMU does).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "base/io.h"
#include "base/unique_fd.h"
#include "host/os/process.h"
#include "host/sandbox/snapshot.h"
#include "support/temp_dir.h"

namespace cella::sandbox {
namespace {

SnapshotManifest Sample() {
  SnapshotManifest m;
  m.state_file = "machine.state.zst";
  m.compression = SnapshotCompression::kZstd;
  m.size_bytes = 1234;
  m.sha256 = std::string(64, 'a');
  m.created_ms = 1700000000000;
  m.memory_bytes = 256u << 20;
  m.compat = {"QEMU emulator version 7.2.0",
              "/k/vmlinuz 100 5",
              "/c/initramfs 200 6",
              256,
              1.5,
              "tcg",
              "/images/abc.erofs"};
  return m;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// What QEMU does with an exec: URI: /bin/sh -c, the stream on stdin/stdout.
void RunShell(const std::string& uri, const std::string& input_file,
              const std::string& output_file) {
  ASSERT_TRUE(uri.starts_with("exec:")) << uri;
  std::string cmd = uri.substr(5);
  if (!input_file.empty()) cmd = "(" + cmd + ") < " + host::ShellQuote(input_file);
  if (!output_file.empty()) cmd = "(" + cmd + ") > " + host::ShellQuote(output_file);
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

TEST(SnapshotManifest, RoundTripsEveryField) {
  SnapshotManifest m = Sample();
  auto back = DecodeManifest(EncodeManifest(m));
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->state_file, m.state_file);
  EXPECT_EQ(back->compression, m.compression);
  EXPECT_EQ(back->size_bytes, m.size_bytes);
  EXPECT_EQ(back->sha256, m.sha256);
  EXPECT_EQ(back->created_ms, m.created_ms);
  EXPECT_EQ(back->memory_bytes, m.memory_bytes);
  EXPECT_EQ(back->compat, m.compat);
}

TEST(SnapshotManifest, RefusesWhatItCannotTrust) {
  auto decode_with = [](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = nlohmann::json::parse(EncodeManifest(Sample()));
    edit(j);
    return DecodeManifest(j.dump());
  };
  auto path = decode_with([](auto& j) { j["state_file"] = "../../etc/passwd"; });
  ASSERT_FALSE(path);
  EXPECT_NE(path.error().message.find("not a plain file name"), std::string::npos);
  auto sum = decode_with([](auto& j) { j["sha256"] = "xyz"; });
  ASSERT_FALSE(sum);
  EXPECT_NE(sum.error().message.find("sha256"), std::string::npos);
  auto codec = decode_with([](auto& j) { j["compression"] = "lzma"; });
  ASSERT_FALSE(codec);
  EXPECT_NE(codec.error().message.find("lzma"), std::string::npos);
  auto type = decode_with([](auto& j) { j["compat"]["memory_mb"] = "lots"; });
  ASSERT_FALSE(type);
  EXPECT_NE(type.error().message.find("memory_mb"), std::string::npos) << type.error().message;
  auto missing = decode_with([](auto& j) { j.erase("size_bytes"); });
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("size_bytes"), std::string::npos);
  auto version = decode_with([](auto& j) { j["version"] = 99; });
  ASSERT_FALSE(version);
  EXPECT_NE(version.error().message.find("version 99"), std::string::npos);
  EXPECT_FALSE(DecodeManifest("[1,2]"));
  EXPECT_FALSE(DecodeManifest("{"));
}

TEST(SnapshotManifest, FormatTwoNamesItsMemoryFile) {
  SnapshotManifest m = Sample();
  m.compression = SnapshotCompression::kNone;
  m.state_file = "machine.state";
  m.memory_file = kMemoryFileName;
  m.memory_sha256 = std::string(64, 'b');
  nlohmann::json j = nlohmann::json::parse(EncodeManifest(m));
  EXPECT_EQ(j["version"], 2);
  auto back = DecodeManifest(j.dump());
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->version, 2);
  EXPECT_EQ(back->memory_file, m.memory_file);
  EXPECT_EQ(back->memory_sha256, m.memory_sha256);
  // Format 1 stays format 1 and readable.
  EXPECT_EQ(nlohmann::json::parse(EncodeManifest(Sample()))["version"], 1);

  auto decode_with = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json copy = j;
    edit(copy);
    return DecodeManifest(copy.dump());
  };
  auto escape = decode_with([](auto& c) { c["memory_file"] = "../upper.img"; });
  ASSERT_FALSE(escape);
  EXPECT_NE(escape.error().message.find("memory_file"), std::string::npos);
  auto same = decode_with([](auto& c) { c["memory_file"] = "machine.state"; });
  EXPECT_FALSE(same) << "the memory file cannot be the state file";
  auto no_sum = decode_with([](auto& c) { c.erase("memory_sha256"); });
  ASSERT_FALSE(no_sum);
  EXPECT_NE(no_sum.error().message.find("memory_sha256"), std::string::npos);
  auto odd = decode_with([](auto& c) { c["memory_bytes"] = 4097; });
  EXPECT_FALSE(odd) << "a memory file of no whole number of pages";
  // Version 1 never has a memory file: a stream without guest RAM must not
  // be loaded as if it held it.
  auto v1 = decode_with([](auto& c) { c["version"] = 1; });
  ASSERT_FALSE(v1);
  EXPECT_NE(v1.error().message.find("memory_file"), std::string::npos) << v1.error().message;
  auto v2_without = decode_with([](auto& c) { c.erase("memory_file"); });
  EXPECT_FALSE(v2_without);
}

TEST(MemoryDigest, DependsOnContentNotOnHowTheFileIsLaidOut) {
  testing::TempDir dir("memdigest");
  constexpr size_t kPage = MemoryDigest::kPageSize;
  auto write_file = [&](const std::string& name, bool holes) {
    std::string path = dir / name;
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    EXPECT_TRUE(fd);
    EXPECT_EQ(::ftruncate(fd.Get(), off_t(600 * kPage)), 0);
    auto put = [&](size_t page, char fill) {
      std::string bytes(kPage, fill);
      EXPECT_EQ(::pwrite(fd.Get(), bytes.data(), bytes.size(), off_t(page * kPage)),
                ssize_t(kPage));
    };
    if (!holes)  // the same zeros, written out
      for (size_t page = 0; page < 600; ++page) put(page, 0);
    put(3, 'a');
    put(300, 'b');
    put(599, 'c');
    return path;
  };
  auto sparse = MemoryFileDigest(write_file("sparse", true));
  auto dense = MemoryFileDigest(write_file("dense", false));
  ASSERT_TRUE(sparse) << sparse.error().message;
  ASSERT_TRUE(dense) << dense.error().message;
  EXPECT_EQ(*sparse, *dense);
  // The writer's way: pages in order, zero ones skipped.
  MemoryDigest on_the_way;
  on_the_way.AddPage(0, std::string(kPage, '\0'));
  on_the_way.AddPage(3, std::string(kPage, 'a'));
  on_the_way.AddPage(300, std::string(kPage, 'b'));
  on_the_way.AddPage(599, std::string(kPage, 'c'));
  EXPECT_EQ(on_the_way.HexDigest(), *sparse);
  // The same bytes one page further on are another memory.
  MemoryDigest moved;
  moved.AddPage(4, std::string(kPage, 'a'));
  moved.AddPage(300, std::string(kPage, 'b'));
  moved.AddPage(599, std::string(kPage, 'c'));
  EXPECT_NE(moved.HexDigest(), *sparse);
}

// A format-2 manifest as the writer fills it before the commit: raw state
// file, memory file of `pages` pages, checksums still to compute.
SnapshotManifest FormatTwoBeforeCommit(uint64_t pages) {
  SnapshotManifest m = Sample();
  m.compression = SnapshotCompression::kNone;
  m.state_file = "machine.state";
  m.sha256.clear();
  m.memory_bytes = pages * MemoryDigest::kPageSize;
  m.memory_file = kMemoryFileName;
  return m;
}

TEST(SnapshotFormatTwo, CommitsVerifiesAndRefusesADamagedMemoryFile) {
  testing::TempDir dir("snapmem");
  constexpr size_t kPage = MemoryDigest::kPageSize;
  std::string snap = dir / "snap";
  ASSERT_EQ(::mkdir(snap.c_str(), 0700), 0);
  SnapshotManifest m = FormatTwoBeforeCommit(64);
  ASSERT_TRUE(WriteStringToFile(snap + "/machine.state.tmp", "device state", 0600));
  std::string memory_tmp = snap + "/" + kMemoryFileName + ".tmp";
  ASSERT_TRUE(WriteStringToFile(memory_tmp, "", 0600));
  ASSERT_EQ(::truncate(memory_tmp.c_str(), off_t(m.memory_bytes)), 0);
  {
    UniqueFd fd(::open(memory_tmp.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd);
    std::string page(kPage, 'm');
    ASSERT_EQ(::pwrite(fd.Get(), page.data(), page.size(), off_t(10 * kPage)), ssize_t(kPage));
  }
  auto committed = CommitSnapshot(snap, m);
  ASSERT_TRUE(committed) << committed.error().message;
  EXPECT_EQ(committed->memory_sha256, *MemoryFileDigest(snap + "/" + kMemoryFileName));
  auto verified = VerifySnapshot(snap);
  ASSERT_TRUE(verified) << verified.error().message;
  EXPECT_EQ(verified->memory_file, kMemoryFileName);

  // One flipped byte of guest memory: never run.
  std::string memory = snap + "/" + kMemoryFileName;
  {
    UniqueFd fd(::open(memory.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd);
    ASSERT_EQ(::pwrite(fd.Get(), "X", 1, off_t(10 * kPage + 7)), 1);
  }
  auto corrupt = VerifySnapshot(snap);
  ASSERT_FALSE(corrupt);
  EXPECT_NE(corrupt.error().message.find("checksum mismatch"), std::string::npos)
      << corrupt.error().message;
  EXPECT_NE(corrupt.error().message.find(kMemoryFileName), std::string::npos);
  // Short: QEMU would map past its end.
  ASSERT_EQ(::truncate(memory.c_str(), off_t(32 * kPage)), 0);
  auto truncated = ReadSnapshotManifest(snap);
  ASSERT_FALSE(truncated);
  EXPECT_NE(truncated.error().message.find("truncated"), std::string::npos)
      << truncated.error().message;
  // Gone.
  ASSERT_EQ(::unlink(memory.c_str()), 0);
  EXPECT_FALSE(ReadSnapshotManifest(snap));
}

// A fork's snapshot: its copies read it at once, so its memory goes
// without a checksum; only such a manifest may lack one, and its state
// file is still checked.
TEST(SnapshotFormatTwo, OnlyATransientSnapshotGoesWithoutAMemoryChecksum) {
  testing::TempDir dir("snaptransient");
  constexpr size_t kPage = MemoryDigest::kPageSize;
  std::string snap = dir / "snap";
  ASSERT_EQ(::mkdir(snap.c_str(), 0700), 0);
  SnapshotManifest m = FormatTwoBeforeCommit(16);
  m.transient = true;
  ASSERT_TRUE(WriteStringToFile(snap + "/machine.state.tmp", "device state", 0600));
  std::string memory_tmp = snap + "/" + kMemoryFileName + ".tmp";
  ASSERT_TRUE(WriteStringToFile(memory_tmp, std::string(16 * kPage, 'm'), 0600));
  auto committed = CommitSnapshot(snap, m, FsyncDirectory, Durability::kTransient);
  ASSERT_TRUE(committed) << committed.error().message;
  EXPECT_TRUE(committed->memory_sha256.empty());
  auto verified = VerifySnapshot(snap);
  ASSERT_TRUE(verified) << verified.error().message;
  EXPECT_TRUE(verified->transient);

  // The state file is checked as in any snapshot.
  ASSERT_TRUE(WriteStringToFile(snap + "/machine.state", "device stat!", 0600));
  auto corrupt = VerifySnapshot(snap);
  ASSERT_FALSE(corrupt);
  EXPECT_NE(corrupt.error().message.find("checksum mismatch"), std::string::npos)
      << corrupt.error().message;

  // Without the mark, a memory file with no checksum is not trusted.
  nlohmann::json j = nlohmann::json::parse(EncodeManifest(*committed));
  EXPECT_EQ(j["transient"], true);
  EXPECT_EQ(j["memory_sha256"], "");
  j.erase("transient");
  auto unmarked = DecodeManifest(j.dump());
  ASSERT_FALSE(unmarked);
  EXPECT_NE(unmarked.error().message.find("memory_sha256"), std::string::npos);
  j["transient"] = "yes";
  EXPECT_FALSE(DecodeManifest(j.dump())) << "transient is a boolean";
  // Every other snapshot's manifest says nothing of it.
  EXPECT_FALSE(nlohmann::json::parse(EncodeManifest(Sample())).contains("transient"));
}

TEST(SnapshotCompat, QemuVersionIsAskedOnceForAnUnchangedBinary) {
  testing::TempDir dir("qemuversion");
  const std::string qemu = dir / "qemu-system-x86_64";
  const std::string calls = dir / "calls";
  auto install = [&](const std::string& version) {
    ASSERT_TRUE(WriteStringToFile(qemu,
                                  "#!/bin/sh\necho x >> '" + calls + "'\necho '" + version +
                                      "'\necho 'Copyright (c) 2003-2022'\n",
                                  0755));
    // Settled: written a while ago (a fresh file is never remembered).
    timespec old_times[2] = {{1700000000, 0}, {1700000000, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, qemu.c_str(), old_times, 0), 0);
  };
  auto call_count = [&] {
    auto text = ReadFileToString(calls, 1 << 16);
    return text ? std::count(text->begin(), text->end(), '\n') : 0;
  };
  install("QEMU emulator version 7.2.0");
  // ctime is now: the first answer is not remembered until it settles.
  auto first = CachedQemuVersion(qemu, dir / "cache");
  ASSERT_TRUE(first) << first.error().message;
  EXPECT_EQ(*first, "QEMU emulator version 7.2.0");
  EXPECT_EQ(call_count(), 1);
  auto again = CachedQemuVersion(qemu, dir / "cache");
  ASSERT_TRUE(again);
  EXPECT_EQ(call_count(), 2) << "a binary changed seconds ago is asked again";
  // Once it has settled (its ctime is older than a few seconds), it is
  // asked once and remembered. ctime cannot be set back: wait it out.
  std::this_thread::sleep_for(std::chrono::milliseconds(3100));
  ASSERT_TRUE(CachedQemuVersion(qemu, dir / "cache"));
  EXPECT_EQ(call_count(), 3);
  auto cached = CachedQemuVersion(qemu, dir / "cache");
  ASSERT_TRUE(cached);
  EXPECT_EQ(*cached, "QEMU emulator version 7.2.0");
  EXPECT_EQ(call_count(), 3) << "remembered";
  // A new binary (an upgrade) is asked again and its answer is the new one.
  install("QEMU emulator version 8.0.0");
  auto upgraded = CachedQemuVersion(qemu, dir / "cache");
  ASSERT_TRUE(upgraded);
  EXPECT_EQ(*upgraded, "QEMU emulator version 8.0.0");
  EXPECT_EQ(call_count(), 4);
  EXPECT_FALSE(CachedQemuVersion(dir / "no-such-qemu", dir / "cache"));
}

TEST(SnapshotCompat, AMismatchNamesThePartThatDiffers) {
  SnapshotCompat saved = Sample().compat;
  EXPECT_EQ(CompatMismatch(saved, saved), "");
  SnapshotCompat now = saved;
  now.memory_mb = 1024;
  EXPECT_EQ(CompatMismatch(saved, now),
            "the memory size differs (snapshot: 256 MiB, now: 1024 MiB)");
  now = saved;
  now.qemu_version = "QEMU emulator version 8.0.0";
  EXPECT_NE(CompatMismatch(saved, now).find("QEMU version"), std::string::npos);
  now = saved;
  now.kernel = "/k/vmlinuz 101 7";
  EXPECT_NE(CompatMismatch(saved, now).find("guest kernel"), std::string::npos);
  now = saved;
  now.initramfs = "/c/other";
  EXPECT_NE(CompatMismatch(saved, now).find("initramfs"), std::string::npos);
  now = saved;
  now.root_image = "/images/def.erofs";
  EXPECT_NE(CompatMismatch(saved, now).find("root image"), std::string::npos);
}

class SnapshotFilesTest : public ::testing::TestWithParam<SnapshotCompression> {
 protected:
  // Writes `payload` the way QEMU would (through SaveUri) and commits it.
  SnapshotManifest WriteAndCommit(const std::string& payload) {
    SnapshotManifest m = Sample();
    m.compression = GetParam();
    m.state_file = GetParam() == SnapshotCompression::kZstd ? "s.zst" : "s.raw";
    m.sha256.clear();  // set, the commit would take it as the writer's checksum
    std::string in = dir_.path() + "/payload";
    EXPECT_TRUE(WriteStringToFile(in, payload, 0600));
    RunShell(SaveUri(snap_, m), in, "");
    auto committed = CommitSnapshot(snap_, m);
    EXPECT_TRUE(committed) << committed.error().message;
    return committed ? *committed : m;
  }

  void SetUp() override {
    // A quote in the path: the pipelines must survive it.
    snap_ = dir_.path() + "/it's here";
    ASSERT_EQ(::mkdir(snap_.c_str(), 0700), 0);
  }
  testing::TempDir dir_;
  std::string snap_;
};

TEST_P(SnapshotFilesTest, ACommitWhoseLastSyncFailsLeavesNoManifest) {
  SnapshotManifest m = Sample();
  m.compression = GetParam();
  m.state_file = GetParam() == SnapshotCompression::kZstd ? "s.zst" : "s.raw";
  std::string in = dir_.path() + "/payload";
  ASSERT_TRUE(WriteStringToFile(in, std::string(5000, 'p'), 0600));
  RunShell(SaveUri(snap_, m), in, "");
  // The first directory fsync (the state file's name) works, the second
  // (the manifest's) fails: the caller's clean-up may fail as well, so what
  // is left must not look like a committed snapshot.
  int syncs = 0;
  auto committed = CommitSnapshot(snap_, m, [&](const std::string&) -> Status {
    if (++syncs == 2) return Fail("fsync: injected EIO");
    return {};
  });
  ASSERT_FALSE(committed);
  EXPECT_NE(committed.error().message.find("injected"), std::string::npos);
  EXPECT_EQ(syncs, 2);
  auto verified = VerifySnapshot(snap_);
  ASSERT_FALSE(verified);
  EXPECT_EQ(verified.error().errno_value, ENOENT) << verified.error().message;
}

TEST_P(SnapshotFilesTest, CommittedSnapshotsVerifyAndReadBackTheSameBytes) {
  std::string payload(300000, '\0');
  for (size_t i = 0; i < payload.size(); i += 7) payload[i] = static_cast<char>(i % 251);
  SnapshotManifest m = WriteAndCommit(payload);
  EXPECT_EQ(::access((snap_ + "/" + m.state_file + ".tmp").c_str(), F_OK), -1)
      << "the temporary name is gone";
  auto verified = VerifySnapshot(snap_);
  ASSERT_TRUE(verified) << verified.error().message;
  EXPECT_EQ(verified->sha256, m.sha256);
  std::string out = dir_.path() + "/out";
  RunShell(LoadUri(snap_, *verified), "", out);
  EXPECT_EQ(Slurp(out), payload);
}

TEST_P(SnapshotFilesTest, TruncatedOrCorruptStateIsNeverTrusted) {
  SnapshotManifest m = WriteAndCommit(std::string(100000, 'x') + "tail");
  std::string state = snap_ + "/" + m.state_file;
  ASSERT_EQ(::truncate(state.c_str(), static_cast<off_t>(m.size_bytes / 2)), 0);
  auto truncated = VerifySnapshot(snap_);
  ASSERT_FALSE(truncated);
  EXPECT_NE(truncated.error().message.find("truncated"), std::string::npos)
      << truncated.error().message;

  m = WriteAndCommit(std::string(100000, 'y'));
  std::string bytes = Slurp(state);
  bytes[bytes.size() / 2] ^= 0x55;
  ASSERT_TRUE(WriteStringToFile(state, bytes, 0600));
  auto corrupt = VerifySnapshot(snap_);
  ASSERT_FALSE(corrupt);
  EXPECT_NE(corrupt.error().message.find("checksum mismatch"), std::string::npos)
      << corrupt.error().message;
}

TEST_P(SnapshotFilesTest, AnInterruptedWriteLeavesNoSnapshot) {
  // QEMU (or its supervisor) killed mid-stream: a temporary file and no
  // manifest. Nothing there may be resumed from.
  ASSERT_TRUE(WriteStringToFile(snap_ + "/s.zst.tmp", "half a stream", 0600));
  auto none = VerifySnapshot(snap_);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().errno_value, ENOENT);
  ASSERT_TRUE(RemoveSnapshot(snap_));
  EXPECT_EQ(::access(snap_.c_str(), F_OK), -1);
  EXPECT_TRUE(RemoveSnapshot(snap_)) << "removing what is gone is fine";
}

TEST(SnapshotDisks, ACopyHasTheSameBytesAndStaysSparse) {
  testing::TempDir dir;
  const std::string from = dir.path() + "/upper.img", to = dir.path() + "/copy.img";
  const off_t size = 64 << 20;
  {
    int fd = ::open(from.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, size), 0);
    std::string block(8192, 'a');
    ASSERT_EQ(::pwrite(fd, block.data(), block.size(), 0), ssize_t(block.size()));
    block.assign(12345, 'b');
    ASSERT_EQ(::pwrite(fd, block.data(), block.size(), 20 << 20), ssize_t(block.size()));
    block.assign(100, 'c');  // the very end
    ASSERT_EQ(::pwrite(fd, block.data(), block.size(), size - 100), ssize_t(block.size()));
    ASSERT_EQ(::close(fd), 0);
  }
  auto copied = CloneOrCopySparse(from, to);
  ASSERT_TRUE(copied) << copied.error().message;
  EXPECT_EQ(Slurp(to), Slurp(from));
  struct stat st {};
  ASSERT_EQ(::stat(to.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, size);
  EXPECT_LT(uint64_t(st.st_blocks) * 512, uint64_t(size) / 4) << "the holes were written out";
  // An existing target is never overwritten; a failed copy leaves nothing.
  auto again = CloneOrCopySparse(from, to);
  EXPECT_FALSE(again);
  auto missing = CloneOrCopySparse(dir.path() + "/none", dir.path() + "/out");
  EXPECT_FALSE(missing);
  EXPECT_EQ(::access((dir.path() + "/out").c_str(), F_OK), -1);
}

INSTANTIATE_TEST_SUITE_P(Codecs, SnapshotFilesTest,
                         ::testing::Values(SnapshotCompression::kNone, SnapshotCompression::kZstd),
                         [](const auto& param_info) {
                           return std::string(ToString(param_info.param));
                         });

}  // namespace
}  // namespace cella::sandbox
