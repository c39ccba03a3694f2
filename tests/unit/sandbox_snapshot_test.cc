// The snapshot files (host/sandbox/snapshot.h): the manifest is read
// strictly, a snapshot is trusted only once committed and only while its
// size and checksum match, and the exec: pipelines QEMU runs write and read
// the same bytes (run here through /bin/sh, as QEMU does).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "base/io.h"
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
