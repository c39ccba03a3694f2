#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

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

  std::string Lines(int tail, const std::string& path = "");

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

// output.rec read as lines: "O:" / "E:" before each line, "|" where a line
// has no newline.
std::string LogFiles::Lines(int tail, const std::string& path) {
  std::string out;
  LogLineJoiner joiner;
  auto reached =
      CopyLogLines(path.empty() ? path_ : path, tail, joiner, false, [&](const LogLine& line) {
        out += line.is_stderr ? "E:" : "O:";
        out += std::to_string(line.unix_nanos) + ":";
        out.append(line.text);
        out += line.line_end ? "\n" : "|";
        return Status{};
      });
  EXPECT_TRUE(reached) << reached.error().message;
  return out;
}

TEST_F(LogFiles, TailCountsLinesNotThePiecesOfAnUnbufferedWriter) {
  // "x" then "\n", three times: three lines, each at its first piece's time.
  std::ofstream(path_) << EncodeLogRecords(1, false, "a") << EncodeLogRecords(2, false, "\n")
                       << EncodeLogRecords(3, false, "b") << EncodeLogRecords(4, false, "\n")
                       << EncodeLogRecords(5, false, "c") << EncodeLogRecords(6, false, "\n");
  EXPECT_EQ(Lines(1), "O:5:c\n");
  EXPECT_EQ(Lines(2), "O:3:b\nO:5:c\n");
  EXPECT_EQ(Lines(3), "O:1:a\nO:3:b\nO:5:c\n");
  EXPECT_EQ(Lines(9), "O:1:a\nO:3:b\nO:5:c\n");
  EXPECT_EQ(Lines(-1), "O:1:a\nO:3:b\nO:5:c\n");
  EXPECT_EQ(Lines(0), "");
}

TEST_F(LogFiles, TailJoinsEachStreamOnItsOwnAcrossTheOtherAndTheRotation) {
  // stdout's "long" is begun before stderr's lines and ended after them;
  // the lines are in the order of their ends, the tail in that order too.
  std::ofstream(OlderGeneration(path_))
      << EncodeLogRecords(1, false, "first\n") << EncodeLogRecords(2, false, "lo");
  std::ofstream(path_) << EncodeLogRecords(3, true, "err1\n") << EncodeLogRecords(4, false, "n")
                       << EncodeLogRecords(5, true, "err2\n") << EncodeLogRecords(6, false, "g\n")
                       << EncodeLogRecords(7, true, "err3\n") << EncodeLogRecords(8, false, "un");
  const std::string all = "O:1:first\nE:3:err1\nE:5:err2\nO:2:long\nE:7:err3\nO:8:un|";
  EXPECT_EQ(Lines(-1), all);
  EXPECT_EQ(Lines(1), "O:8:un|");
  EXPECT_EQ(Lines(2), "E:7:err3\nO:8:un|");
  EXPECT_EQ(Lines(3), "O:2:long\nE:7:err3\nO:8:un|");
  EXPECT_EQ(Lines(4), "E:5:err2\nO:2:long\nE:7:err3\nO:8:un|");
  EXPECT_EQ(Lines(5), "E:3:err1\nE:5:err2\nO:2:long\nE:7:err3\nO:8:un|");
  EXPECT_EQ(Lines(6), all);
  EXPECT_EQ(Lines(60), all);
}

TEST_F(LogFiles, TwoUnfinishedLinesAreRankedByTheirLastPiece) {
  std::ofstream(path_) << EncodeLogRecords(1, true, "e") << EncodeLogRecords(2, false, "o1\n")
                       << EncodeLogRecords(3, false, "o") << EncodeLogRecords(4, true, "rr");
  EXPECT_EQ(Lines(1), "E:1:err|");
  EXPECT_EQ(Lines(2), "O:3:o|E:1:err|");
  EXPECT_EQ(Lines(3), "O:2:o1\nO:3:o|E:1:err|");
}

TEST_F(LogFiles, AFollowerKeepsTheTailsUnfinishedLine) {
  std::ofstream(path_) << EncodeLogRecords(1, false, "a\n") << EncodeLogRecords(2, false, "pro");
  std::string out;
  LogLineSink sink = [&](const LogLine& line) {
    out += std::to_string(line.unix_nanos) + ":" + std::string(line.text) +
           (line.line_end ? "\n" : "|");
    return Status{};
  };
  LogLineJoiner joiner;
  auto reached = CopyLogLines(path_, 1, joiner, true, sink);
  ASSERT_TRUE(reached) << reached.error().message;
  EXPECT_EQ(out, "");
  ASSERT_TRUE(joiner.Feed(EncodeLogRecords(3, false, "mpt\n"), sink));
  ASSERT_TRUE(joiner.Finish(sink));
  EXPECT_EQ(out, "2:prompt\n");
}

TEST_F(LogFiles, ALineTailOfALongLogReadsOnlyItsEnd) {
  // Tens of thousands of records; a torn last write is no line.
  {
    std::ofstream out(path_);
    for (int i = 0; i < 40000; ++i)
      out << EncodeLogRecords(i, i % 2 == 1, i % 3 == 0 ? "piece" : "line\n");
    out << "123 O tor";
  }
  auto from = TailRecordPosition(path_, 2);
  ASSERT_TRUE(from) << from.error().message;
  EXPECT_GT(from->offset, static_cast<off_t>(Size(path_) - 200));
  // stdout's last line began with 39996's piece; stderr's last is unfinished.
  EXPECT_EQ(Lines(2), "O:39996:pieceline\nE:39999:piece|");
}

TEST_F(LogFiles, AnOlderSandboxsOutputLogIsFoundForLogsAndAttach) {
  SandboxPaths paths = PathsFor(dir_, "abc");
  std::filesystem::create_directories(paths.dir);
  // Nothing yet: output.rec, where this version's supervisor writes.
  EXPECT_EQ(FindMainOutputLog(paths).path, paths.output_log);
  EXPECT_TRUE(FindMainOutputLog(paths).records);
  std::ofstream(OlderGeneration(paths.legacy_output_log)) << "old\n";
  EXPECT_EQ(FindMainOutputLog(paths).path, paths.legacy_output_log);
  EXPECT_FALSE(FindMainOutputLog(paths).records);
  std::ofstream(OlderGeneration(paths.output_log)) << "";
  EXPECT_EQ(FindMainOutputLog(paths).path, paths.output_log);
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

namespace cella::sandbox {
namespace {

std::vector<std::string> Decode(const std::string& bytes, size_t block) {
  LogRecordDecoder decoder;
  std::vector<std::string> out;
  for (size_t at = 0; at < bytes.size(); at += block) {
    auto st = decoder.Feed(std::string_view(bytes).substr(at, block), [&](const LogRecord& r) {
      out.push_back(std::to_string(r.unix_nanos) + (r.is_stderr ? " err " : " out ") +
                    (r.line_end ? "line " : "piece ") + std::string(r.payload));
      return Status{};
    });
    EXPECT_TRUE(st);
  }
  return out;
}

TEST(LogRecords, LinesAndPiecesOfEachStreamSurviveAnyBlockSize) {
  std::string file = EncodeLogRecords(5, false, "one\ntwo\npart") +
                     EncodeLogRecords(7, true, "oops\n") + EncodeLogRecords(9, false, "ial\n\n");
  EXPECT_EQ(file, "5 O one\n5 O two\n5 o part\n7 E oops\n9 O ial\n9 O \n");
  const std::vector<std::string> want = {"5 out line one",  "5 out line two", "5 out piece part",
                                         "7 err line oops", "9 out line ial", "9 out line "};
  for (size_t block : {1, 3, 7, 1000}) EXPECT_EQ(Decode(file, block), want) << block;
}

TEST(LogRecords, AMalformedLineIsShownNotDropped) {
  EXPECT_EQ(Decode("raw bytes of an old log\n12 X y\n", 4),
            (std::vector<std::string>{"0 out line raw bytes of an old log", "0 out line 12 X y"}));
}

TEST(LogRecords, AOneMebibyteWriteIsStoredAsRecordsThatFit) {
  // A frame's payload is up to 1 MiB: the guest's whole write, newline
  // included, comes back as one line, split into records that fit.
  const std::string big(size_t{1} << 20, 'x');
  const std::string file = EncodeLogRecords(1767366245123456789, false, big + "\n");
  size_t start = 0;
  for (size_t nl; (nl = file.find('\n', start)) != std::string::npos; start = nl + 1)
    EXPECT_LE(nl - start, kMaxRecordBytes);
  std::vector<std::string> records = Decode(file, 64 * 1024);
  ASSERT_EQ(records.size(), 2u);
  std::string joined;
  LogLineJoiner joiner;
  auto st = joiner.Feed(file, [&](const LogLine& line) {
    EXPECT_TRUE(line.line_end);
    EXPECT_EQ(line.unix_nanos, 1767366245123456789);
    joined.append(line.text);
    return Status{};
  });
  ASSERT_TRUE(st);
  EXPECT_EQ(joined, big);
}

TEST(LogRecords, ARecordOfExactlyTheLongestSizeIsARecord) {
  const std::string head = "5 O ";
  const std::string payload(kMaxRecordBytes - head.size(), 'y');
  // A partial record is kept in pieces when it is longer; this one is not.
  for (size_t block : {size_t{4096}, kMaxRecordBytes, kMaxRecordBytes + 1}) {
    std::vector<std::string> records = Decode(head + payload + "\n", block);
    ASSERT_EQ(records.size(), 1u) << block;
    EXPECT_EQ(records[0], "5 out line " + payload);
  }
}

TEST(LogRecords, TimesPrintAsDockerPrintsThem) {
  EXPECT_EQ(FormatRfc3339Nano(0), "1970-01-01T00:00:00.000000000Z");
  EXPECT_EQ(FormatRfc3339Nano(1767366245123456789), "2026-01-02T15:04:05.123456789Z");
}

TEST(LogTime, GoDurations) {
  EXPECT_EQ(*ParseGoDuration("10m"), 600'000'000'000);
  EXPECT_EQ(*ParseGoDuration("1h30m"), 5'400'000'000'000);
  EXPECT_EQ(*ParseGoDuration("1.5s"), 1'500'000'000);
  EXPECT_EQ(*ParseGoDuration("300ms"), 300'000'000);
  EXPECT_EQ(*ParseGoDuration("2us"), 2'000);
  EXPECT_EQ(*ParseGoDuration("0"), 0);
  for (const char* bad : {"", "10", "m", "1x", "-5m", "1.m.s", "1e3s", "99999999999h"})
    EXPECT_FALSE(ParseGoDuration(bad)) << bad;
}

TEST(LogTime, DockerSinceAndUntilForms) {
  const int64_t now = 1767366245'000000000;  // 2026-01-02T15:04:05Z
  EXPECT_EQ(*ParseLogTime("10m", now), now - 600'000'000'000);
  EXPECT_EQ(*ParseLogTime("0", now), 0);  // docker: the epoch, so --since 0 shows everything
  EXPECT_EQ(*ParseLogTime("2026-01-02T15:04:05Z", now), now);
  EXPECT_EQ(*ParseLogTime("2026-01-02T15:04:05.5Z", now), now + 500'000'000);
  EXPECT_EQ(*ParseLogTime("2026-01-02T17:04:05+02:00", now), now);
  EXPECT_EQ(*ParseLogTime("2026-01-02T10:04:05.000000001-05:00", now), now + 1);
  EXPECT_EQ(*ParseLogTime("1767366245", now), now);
  EXPECT_EQ(*ParseLogTime("1767366245.25", now), now + 250'000'000);
  // Without a zone: local time, as docker reads it.
  const char* old_tz = ::getenv("TZ");
  const std::string saved = old_tz ? old_tz : "";
  ::setenv("TZ", "UTC", 1);
  ::tzset();
  EXPECT_EQ(*ParseLogTime("2026-01-02T15:04:05", now), now);
  EXPECT_EQ(*ParseLogTime("2026-01-02", now), now - (15 * 3600 + 4 * 60 + 5) * 1'000'000'000LL);
  for (const char* bad : {"yesterday", "2026-13-01", "2026-01-02T25:00Z", "2026-01-02T15:04:05+2",
                          "2026/01/02", "12.5.3", "2999-01-01T00:00:00Z"})
    EXPECT_FALSE(ParseLogTime(bad, now)) << bad;
  if (old_tz) {
    ::setenv("TZ", saved.c_str(), 1);
  } else {
    ::unsetenv("TZ");
  }
  ::tzset();
}

}  // namespace
}  // namespace cella::sandbox
