// The upload journal: an upload interrupted by the VM's death leaves no temp
// file once the guest boots again, and the clean-up touches nothing else.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "base/io.h"
#include "guest/agent/fileops.h"
#include "guest/agent/upload_journal.h"
#include "support/temp_dir.h"

namespace cella::agent {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

constexpr const char* kSuffix = "0123456789abcdef";

void Touch(const std::string& path) { std::ofstream(path) << "x"; }

std::string Slurp(const std::string& path) {
  auto text = ReadFileToString(path, 1 << 20);
  EXPECT_TRUE(text) << path;
  return text ? *text : "";
}

// Uninstalls the process-wide journal whatever the test did.
class UploadJournalTest : public ::testing::Test {
 protected:
  void TearDown() override { UploadJournal::Install(UniqueFd()); }

  std::string InstallJournal() {
    std::string path = journal_dir_ / "journal";
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
    EXPECT_TRUE(fd) << path;
    UploadJournal::Install(std::move(fd));
    return path;
  }

  TempDir journal_dir_{"cella-journal"};
};

TEST(UploadTempName, MatchesOnlyTheAgentsTempNames) {
  EXPECT_TRUE(IsUploadTempName(std::string(".report.pdf.cella-") + kSuffix));
  EXPECT_TRUE(IsUploadTempName(std::string(".cella-ln-") + kSuffix));
  EXPECT_FALSE(IsUploadTempName("report.pdf"));
  EXPECT_FALSE(IsUploadTempName(std::string("report.cella-") + kSuffix));    // no leading dot
  EXPECT_FALSE(IsUploadTempName(std::string(".cella-") + kSuffix));          // no base name
  EXPECT_FALSE(IsUploadTempName(".x.cella-0123456789ABCDEF"));               // upper-case hex
  EXPECT_FALSE(IsUploadTempName(".x.cella-0123456789abcde"));                // 15 digits
  EXPECT_FALSE(IsUploadTempName(std::string(".x.cella-") + kSuffix + "0"));  // 17 digits
}

TEST(RemoveJournaledTemps, RemovesListedTempsAndNothingElse) {
  TempDir root("cella-root");
  TempDir outside("cella-outside");
  fs::create_directories(root / "a");
  const std::string temp = std::string("/a/.data.bin.cella-") + kSuffix;
  const std::string temp_link = std::string("/a/.cella-ln-") + kSuffix;
  Touch(root.path() + temp);
  fs::create_symlink("/etc/passwd", root.path() + temp_link);
  Touch(root / "a/data.bin");
  // A symlinked directory in the guest leading out of the root, holding a
  // temp-named file: the clean-up must not reach through it.
  const std::string escaped = std::string(".victim.cella-") + kSuffix;
  Touch(outside / escaped);
  fs::create_directory_symlink(outside.path(), root / "out");
  // A directory with a temp name is not a temp.
  const std::string dir_temp = std::string("/a/.dir.cella-") + kSuffix;
  fs::create_directories(root.path() + dir_temp);

  std::string journal = temp + "\n" + temp_link + "\n" + "/a/data.bin\n" + "/out/" + escaped +
                        "\n" + "/a/../out/" + escaped + "\n" + "relative/.x.cella-" + kSuffix +
                        "\n" + dir_temp + "\n" + "/missing/.y.cella-" + kSuffix + "\n" + "\n" +
                        "garbage";
  UniqueFd root_fd(::open(root.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  ASSERT_TRUE(root_fd);
  auto removed = RemoveJournaledTemps(root_fd.Get(), journal);
  ASSERT_TRUE(removed) << removed.error().message;
  EXPECT_EQ(*removed, 2u);
  EXPECT_FALSE(fs::exists(fs::symlink_status(root.path() + temp)));
  EXPECT_FALSE(fs::exists(fs::symlink_status(root.path() + temp_link)));
  EXPECT_TRUE(fs::exists("/etc/passwd"));
  EXPECT_TRUE(fs::exists(root / "a/data.bin"));
  EXPECT_TRUE(fs::exists(outside / escaped));
  EXPECT_TRUE(fs::is_directory(root.path() + dir_temp));
}

TEST_F(UploadJournalTest, ListsTempsInFlightAndEmptiesWhenNoneIs) {
  std::string journal = InstallJournal();
  TempDir dest("cella-dest");
  {
    auto first = AtomicFileWriter::Create(dest / "one", 0644, std::nullopt, std::nullopt,
                                          AtomicFileWriter::CreateParents::kNo);
    ASSERT_TRUE(first) << first.error().message;
    auto second = AtomicFileWriter::Create(dest / "two", 0644, std::nullopt, std::nullopt,
                                           AtomicFileWriter::CreateParents::kNo);
    ASSERT_TRUE(second) << second.error().message;
    std::string listed = Slurp(journal);
    // Both temps are listed, and each listed line names a file that exists now.
    size_t lines = 0;
    for (size_t at = 0; at < listed.size();) {
      size_t end = listed.find('\n', at);
      ASSERT_NE(end, std::string::npos);
      std::string path = listed.substr(at, end - at);
      EXPECT_TRUE(fs::exists(path)) << path;
      EXPECT_TRUE(IsUploadTempName(fs::path(path).filename().string())) << path;
      at = end + 1;
      ++lines;
    }
    EXPECT_EQ(lines, 2u);
    ASSERT_TRUE(first->Write(std::as_bytes(std::span(std::string_view("hello")))));
    ASSERT_TRUE(first->Commit());
    // One upload is still in flight: its line must stay.
    EXPECT_FALSE(Slurp(journal).empty());
  }
  EXPECT_EQ(Slurp(journal), "");
  EXPECT_EQ(Slurp(dest / "one"), "hello");
  EXPECT_FALSE(fs::exists(dest / "two"));
  EXPECT_EQ(dest.Entries(), 1u);
}

TEST_F(UploadJournalTest, AnInterruptedUploadIsCleanedFromItsJournal) {
  std::string journal = InstallJournal();
  TempDir root("cella-root");
  std::string temp;
  {
    auto writer = AtomicFileWriter::Create(root / "big.iso", 0644, std::nullopt, std::nullopt,
                                           AtomicFileWriter::CreateParents::kNo);
    ASSERT_TRUE(writer) << writer.error().message;
    // The VM dies here: copy what the disk holds (the journal and the temp)
    // before the writer's clean-up runs.
    std::string listed = Slurp(journal);
    ASSERT_FALSE(listed.empty());
    temp = listed.substr(0, listed.find('\n'));
    ASSERT_TRUE(fs::exists(temp));
    fs::copy_file(temp, temp + ".saved");
  }
  fs::rename(temp + ".saved", temp);  // as found at the next boot
  std::string guest_path = temp.substr(root.path().size());
  UniqueFd root_fd(::open(root.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  auto removed = RemoveJournaledTemps(root_fd.Get(), guest_path + "\n");
  ASSERT_TRUE(removed) << removed.error().message;
  EXPECT_EQ(*removed, 1u);
  EXPECT_EQ(root.Entries(), 0u);
}

// Uploads through a symlinked directory (a merged-/usr image's /bin) are
// listed by their real directory: the boot-time walk follows no symlink.
TEST_F(UploadJournalTest, ListsTheRealDirectoryOfATempBehindASymlink) {
  std::string journal = InstallJournal();
  TempDir dest("cella-dest");
  fs::create_directory(dest / "real");
  fs::create_directory_symlink(dest / "real", dest / "link");
  auto writer = AtomicFileWriter::Create(dest / "link/tool", 0755, std::nullopt, std::nullopt,
                                         AtomicFileWriter::CreateParents::kNo);
  ASSERT_TRUE(writer) << writer.error().message;
  std::string listed = Slurp(journal);
  std::string real = fs::canonical(dest / "real").string() + "/.tool.cella-";
  EXPECT_EQ(listed.rfind(real, 0), 0u) << listed;
  EXPECT_TRUE(fs::exists(listed.substr(0, listed.find('\n')))) << listed;
}

// A long upload keeps the journal from emptying; finished ones are dropped
// from it once it passes its compaction size, so it stays small.
TEST_F(UploadJournalTest, StaysSmallWhileOneUploadNeverEnds) {
  std::string journal = InstallJournal();
  TempDir dest("cella-dest");
  auto long_one = AtomicFileWriter::Create(dest / "long", 0644, std::nullopt, std::nullopt,
                                           AtomicFileWriter::CreateParents::kNo);
  ASSERT_TRUE(long_one) << long_one.error().message;
  for (int i = 0; i < 2000; ++i) {
    auto w = AtomicFileWriter::Create(dest / ("f" + std::to_string(i)), 0644, std::nullopt,
                                      std::nullopt, AtomicFileWriter::CreateParents::kNo);
    ASSERT_TRUE(w) << w.error().message;
    ASSERT_TRUE(w->Commit());
  }
  std::string listed = Slurp(journal);
  EXPECT_LE(listed.size(), UploadJournal::kCompactBytes + 4096);
  EXPECT_NE(listed.find(".long.cella-"), std::string::npos) << "the live upload was dropped";
}

TEST_F(UploadJournalTest, WithoutAJournalUploadsStillWork) {
  TempDir dest("cella-dest");
  auto writer = AtomicFileWriter::Create(dest / "f", 0600, std::nullopt, std::nullopt,
                                         AtomicFileWriter::CreateParents::kNo);
  ASSERT_TRUE(writer) << writer.error().message;
  ASSERT_TRUE(writer->Commit());
  EXPECT_EQ(dest.Entries(), 1u);
}

}  // namespace
}  // namespace cella::agent
