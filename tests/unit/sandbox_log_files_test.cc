#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "host/sandbox/log_files.h"

namespace cella::sandbox {
namespace {

class LogFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "cella-logs-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/output.log";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static std::string Slurp(const std::string& path) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }
  static uint64_t Size(const std::string& path) {
    std::error_code ec;
    auto size = std::filesystem::file_size(path, ec);
    return ec ? 0 : size;
  }
  std::string ReadAll(int tail) {
    auto from = TailPosition(path_, tail);
    EXPECT_TRUE(from) << from.error().message;
    if (!from) return {};
    std::string out;
    auto reached = CopyLog(path_, *from, [&](std::string_view block) -> Status {
      out.append(block);
      return {};
    });
    EXPECT_TRUE(reached) << reached.error().message;
    return out;
  }
  static std::span<const std::byte> Bytes(const std::string& text) {
    return std::as_bytes(std::span(text.data(), text.size()));
  }

  std::string dir_;
  std::string path_;
};

TEST_F(LogFiles, AFloodStaysWithinTwiceTheCapAndKeepsTheNewestLines) {
  constexpr uint64_t kCap = 64 * 1024;
  auto writer = CappedLogWriter::Open(path_, kCap);
  ASSERT_TRUE(writer) << writer.error().message;
  std::string last;
  for (int i = 0; i < 20000; ++i) {  // ~270 KB: rotates several times
    last = "line " + std::to_string(i) + "\n";
    ASSERT_TRUE(writer->Write(Bytes(last)));
  }
  EXPECT_LE(Size(path_), kCap);
  EXPECT_LE(Size(OlderGeneration(path_)), kCap);
  EXPECT_GT(Size(OlderGeneration(path_)), 0u);
  EXPECT_EQ(ReadAll(1), "line 19999\n");
  EXPECT_EQ(ReadAll(3), "line 19997\nline 19998\nline 19999\n");
  // Everything kept reads in order across the two generations.
  std::string all = ReadAll(-1);
  EXPECT_GE(all.size(), kCap);
  EXPECT_TRUE(all.ends_with("line 19998\nline 19999\n"));
  std::istringstream lines(all);
  std::string line;
  int previous = -1;
  while (std::getline(lines, line)) {
    int n = std::stoi(line.substr(5));
    if (previous >= 0) {
      EXPECT_EQ(n, previous + 1) << line;
    }
    previous = n;
  }
}

TEST_F(LogFiles, ReopeningCountsWhatTheFileAlreadyHolds) {
  {
    auto writer = CappedLogWriter::Open(path_, 8192);
    ASSERT_TRUE(writer);
    ASSERT_TRUE(writer->Write(Bytes(std::string(6000, 'a') + "\n")));
  }
  auto writer = CappedLogWriter::Open(path_, 8192);
  ASSERT_TRUE(writer);
  ASSERT_TRUE(writer->Write(Bytes(std::string(6000, 'b') + "\n")));
  EXPECT_EQ(Size(path_), 6001u);
  EXPECT_EQ(Size(OlderGeneration(path_)), 6001u);
  EXPECT_EQ(ReadAll(1), std::string(6000, 'b') + "\n");
  EXPECT_EQ(ReadAll(2).size(), 12002u);
}

TEST_F(LogFiles, TailCountsLinesAcrossTheRotationBoundaryAndWithoutAFinalNewline) {
  std::ofstream(OlderGeneration(path_)) << "one\ntwo\nthree\n";
  std::ofstream(path_) << "four\nfive";
  EXPECT_EQ(ReadAll(1), "five");
  EXPECT_EQ(ReadAll(2), "four\nfive");
  EXPECT_EQ(ReadAll(3), "three\nfour\nfive");
  EXPECT_EQ(ReadAll(10), "one\ntwo\nthree\nfour\nfive");
  EXPECT_EQ(ReadAll(0), "");
  EXPECT_EQ(ReadAll(-1), "one\ntwo\nthree\nfour\nfive");
}

TEST_F(LogFiles, TailOfAnEmptyLiveFileReadsTheOlderOne) {
  std::ofstream(OlderGeneration(path_)) << "a\nb\n";
  std::ofstream(path_) << "";
  EXPECT_EQ(ReadAll(1), "b\n");
  EXPECT_EQ(ReadAll(5), "a\nb\n");
}

TEST_F(LogFiles, MissingFilesReadAsEmpty) {
  EXPECT_EQ(ReadAll(-1), "");
  EXPECT_EQ(ReadAll(5), "");
}

TEST_F(LogFiles, TailOfALongLogReadsOnlyItsEnd) {
  // 8 MB with lines far longer than the scan block: the answer still
  // starts exactly at a line start.
  {
    std::ofstream out(path_);
    for (int i = 0; i < 80; ++i) out << std::string(100 * 1024, 'x') << i << "\n";
  }
  std::string two = ReadAll(2);
  EXPECT_EQ(two, std::string(100 * 1024, 'x') + "78\n" + std::string(100 * 1024, 'x') + "79\n");
}

TEST_F(LogFiles, TrimAppendedLogMovesTheBytesAsideAndEmptiesTheLiveFile) {
  std::string content;
  for (int i = 0; i < 2000; ++i) content += "console line " + std::to_string(i) + "\n";
  std::ofstream(path_) << content;
  auto small = TrimAppendedLog(path_, 1 << 20);
  ASSERT_TRUE(small);
  EXPECT_FALSE(*small);  // under the cap: left alone
  auto trimmed = TrimAppendedLog(path_, 8192);
  ASSERT_TRUE(trimmed) << trimmed.error().message;
  EXPECT_TRUE(*trimmed);
  EXPECT_EQ(Size(path_), 0u);
  // Only the newest cap bytes are kept aside.
  EXPECT_EQ(Slurp(OlderGeneration(path_)), content.substr(content.size() - 8192));
  EXPECT_FALSE(std::filesystem::exists(OlderGeneration(path_) + ".tmp"));
  EXPECT_EQ(ReadAll(1), "console line 1999\n");
}

}  // namespace
}  // namespace cella::sandbox
