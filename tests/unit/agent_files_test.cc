#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>

#include "agent_test_support.h"
#include "support/echo_server.h"

namespace cella::testing {
namespace {

using host::RemoveMode;
using host::WriteFileOptions;

// Every test runs twice: file operations on the agent's loop, and on
// threads of their own (how the agent runs them once it serves host
// shares, whose lookups the loop relays). A user must not be able to tell
// the two apart.
class AgentFiles : public AgentTest, public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override {
    AgentTest::SetUp();
    dir_ = "/tmp/cella-agent-files-" + std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    agent_ = StartAgent(AgentArgs());
    ASSERT_TRUE(agent_ && agent_->client);
  }
  void TearDown() override {
    agent_.reset();
    std::filesystem::remove_all(dir_);
    AgentTest::TearDown();
  }
  std::vector<std::string> AgentArgs() const {
    if (GetParam()) return {"--as-if-serving-shares"};
    return {};
  }
  host::AgentClient& client() { return *agent_->client; }
  std::string dir_;
  std::unique_ptr<AgentProcess> agent_;
};

INSTANTIATE_TEST_SUITE_P(Modes, AgentFiles, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& mode) {
                           return mode.param ? "OffTheLoop" : "OnTheLoop";
                         });

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(gen());
  return s;
}

TEST_P(AgentFiles, RoundTripsContentAndMode) {
  struct Case {
    size_t size;
    uint32_t mode;
  };
  for (auto [size, mode] : {Case{0, 0600}, Case{100'000, 0755}, Case{50'000'000, 0640}}) {
    std::string path = dir_ + "/f" + std::to_string(size);
    std::string content = RandomBytes(size, static_cast<uint32_t>(size));
    WriteFileOptions opts;
    opts.mode = mode;
    auto w = client().WriteFile(path, content, opts);
    ASSERT_TRUE(w.has_value()) << w.error().message;
    auto r = client().ReadFile(path);
    ASSERT_TRUE(r.has_value()) << r.error().message;
    EXPECT_EQ(r->size(), size);
    EXPECT_TRUE(std::hash<std::string>{}(*r) == std::hash<std::string>{}(content) && *r == content)
        << "content differs for size " << size;
    auto st = client().Stat(path);
    ASSERT_TRUE(st.has_value()) << st.error().message;
    EXPECT_EQ(st->mode, mode);
    EXPECT_EQ(st->size, size);
    EXPECT_EQ(st->type, host::FileType::kFile);
  }
  // No temp files are left beside the targets.
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_)) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 3);
}

TEST_P(AgentFiles, WriteReplacesAtomicallyAndCanCreateParents) {
  std::string nested = dir_ + "/a/b/c.txt";
  auto no_parents = client().WriteFile(nested, "x");
  ASSERT_FALSE(no_parents.has_value());
  EXPECT_EQ(no_parents.error().errno_value, ENOENT);
  WriteFileOptions opts;
  opts.parents = WriteFileOptions::Parents::kCreate;
  opts.uid = 65534;
  opts.gid = 65534;
  ASSERT_TRUE(client().WriteFile(nested, "first", opts).has_value());
  ASSERT_TRUE(client().WriteFile(nested, "second", opts).has_value());
  EXPECT_EQ(client().ReadFile(nested).value_or("?"), "second");
  auto st = client().Stat(nested);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->uid, 65534u);
  EXPECT_EQ(st->gid, 65534u);
}

TEST_P(AgentFiles, StreamsThroughDescriptors) {
  std::string content = RandomBytes(3'000'000, 7);
  std::string src = dir_ + "/src", dst = dir_ + "/dst", back = dir_ + "/back";
  ASSERT_TRUE(WriteStringToFile(src, content, 0644).has_value());
  UniqueFd in(::open(src.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(in);
  ASSERT_TRUE(client().WriteFileFrom(dst, in.Get()).has_value());
  UniqueFd out(::open(back.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  ASSERT_TRUE(out);
  auto n = client().ReadFileTo(dst, out.Get());
  ASSERT_TRUE(n.has_value()) << n.error().message;
  EXPECT_EQ(*n, content.size());
  EXPECT_EQ(ReadFileToString(back, 10'000'000).value_or(""), content);
}

// cp out of a guest caps each file at its listed size: whatever more the
// guest sends never reaches the host file, and the link stays usable.
TEST_P(AgentFiles, ReadFileToStopsAtItsCapWithExactlyThatManyBytes) {
  std::string content = RandomBytes(700'000, 9);
  std::string src = dir_ + "/big", back = dir_ + "/capped";
  ASSERT_TRUE(WriteStringToFile(src, content, 0644).has_value());
  UniqueFd out(::open(back.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  ASSERT_TRUE(out);
  auto n = client().ReadFileTo(src, out.Get(), 100'000);
  ASSERT_FALSE(n.has_value());
  EXPECT_EQ(n.error().errno_value, EFBIG) << n.error().message;
  EXPECT_EQ(ReadFileToString(back, 10'000'000).value_or(""), content.substr(0, 100'000));
  EXPECT_EQ(client().ReadFile(dir_ + "/big").value_or("").size(), content.size());
}

TEST_P(AgentFiles, ListsAndStatsWithLstatSemantics) {
  ASSERT_TRUE(client().MakeDirs(dir_ + "/sub/deeper", 0700).has_value());
  ASSERT_TRUE(client().WriteFile(dir_ + "/file", "12345").has_value());
  ASSERT_EQ(::symlink("file", (dir_ + "/link").c_str()), 0);
  auto list = client().ListFiles(dir_);
  ASSERT_TRUE(list.has_value()) << list.error().message;
  std::sort(list->begin(), list->end(), [](auto& a, auto& b) { return a.name < b.name; });
  ASSERT_EQ(list->size(), 3u);
  EXPECT_EQ((*list)[0].name, "file");
  EXPECT_EQ((*list)[0].type, host::FileType::kFile);
  EXPECT_EQ((*list)[0].size, 5u);
  EXPECT_EQ((*list)[1].name, "link");
  EXPECT_EQ((*list)[1].type, host::FileType::kSymlink);
  EXPECT_EQ((*list)[2].name, "sub");
  EXPECT_EQ((*list)[2].type, host::FileType::kDir);
  auto link = client().Stat(dir_ + "/link");
  ASSERT_TRUE(link.has_value());
  EXPECT_EQ(link->type, host::FileType::kSymlink);
  auto deeper = client().Stat(dir_ + "/sub/deeper");
  ASSERT_TRUE(deeper.has_value());
  EXPECT_EQ(deeper->type, host::FileType::kDir);
  EXPECT_EQ(deeper->mode, 0700u);
  EXPECT_GT(deeper->mtime, 1'600'000'000);
}

TEST_P(AgentFiles, ErrorsKeepTheirErrno) {
  auto missing = client().ReadFile(dir_ + "/missing");
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().errno_value, ENOENT);
  auto is_dir = client().ReadFile(dir_);
  ASSERT_FALSE(is_dir.has_value());
  EXPECT_EQ(is_dir.error().errno_value, EISDIR);
  EXPECT_EQ(client().Stat(dir_ + "/missing").error().errno_value, ENOENT);
  ASSERT_TRUE(client().WriteFile(dir_ + "/plain", "x").has_value());
  EXPECT_EQ(client().ListFiles(dir_ + "/plain").error().errno_value, ENOTDIR);
  EXPECT_EQ(client().WriteFile(dir_, "x").error().errno_value, EISDIR);
  EXPECT_EQ(client().MakeDirs(dir_ + "/plain/sub").error().errno_value, ENOTDIR);
}

TEST_P(AgentFiles, RemovesFilesAndTrees) {
  WriteFileOptions mkdirs;
  mkdirs.parents = WriteFileOptions::Parents::kCreate;
  ASSERT_TRUE(client().WriteFile(dir_ + "/t/a/b/file", "x", mkdirs).has_value());
  ASSERT_EQ(::symlink("/etc", (dir_ + "/t/a/etc-link").c_str()), 0);
  auto not_empty = client().Remove(dir_ + "/t");
  ASSERT_FALSE(not_empty.has_value());
  EXPECT_EQ(not_empty.error().errno_value, ENOTEMPTY);
  ASSERT_TRUE(client().Remove(dir_ + "/t", RemoveMode::kRecursive).has_value());
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/t"));
  EXPECT_TRUE(std::filesystem::exists("/etc/passwd"));  // the symlink was not followed
  EXPECT_EQ(client().Remove(dir_ + "/t").error().errno_value, ENOENT);
}

struct stat Lstat(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path << ": " << std::strerror(errno);
  return st;
}

std::string ReadLink(const std::string& path) {
  char buf[4096];
  ssize_t n = ::readlink(path.c_str(), buf, sizeof(buf));
  return n < 0 ? std::string("<readlink failed>") : std::string(buf, static_cast<size_t>(n));
}

constexpr int64_t kPast = 1'000'000'000;  // 2001-09-09

TEST_P(AgentFiles, WriteFileKeepsTheRequestedMtime) {
  WriteFileOptions opts;
  opts.mtime = kPast;
  ASSERT_TRUE(client().WriteFile(dir_ + "/old", "x", opts).has_value());
  EXPECT_EQ(Lstat(dir_ + "/old").st_mtim.tv_sec, kPast);
  auto st = client().Stat(dir_ + "/old");
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->mtime, kPast);
}

TEST_P(AgentFiles, StatAndListReportOwnersAndLinkTargetsWithoutFollowing) {
  ASSERT_TRUE(client().WriteFile(dir_ + "/owned", "12345").has_value());
  ASSERT_EQ(::chown((dir_ + "/owned").c_str(), 1234, 5678), 0);
  ASSERT_EQ(::symlink("/etc/passwd", (dir_ + "/abs").c_str()), 0);
  ASSERT_EQ(::symlink("owned", (dir_ + "/rel").c_str()), 0);
  ASSERT_EQ(::lchown((dir_ + "/rel").c_str(), 42, 43), 0);

  auto abs = client().Stat(dir_ + "/abs");
  ASSERT_TRUE(abs.has_value()) << abs.error().message;
  EXPECT_EQ(abs->type, host::FileType::kSymlink);
  EXPECT_EQ(abs->link_target, "/etc/passwd");
  auto file = client().Stat(dir_ + "/owned");
  ASSERT_TRUE(file.has_value());
  EXPECT_FALSE(file->link_target.has_value());

  auto list = client().ListFiles(dir_);
  ASSERT_TRUE(list.has_value()) << list.error().message;
  std::map<std::string, host::FileInfo> by_name;
  for (auto& e : *list) by_name[e.name] = e;
  ASSERT_EQ(by_name.size(), 3u);
  EXPECT_EQ(by_name["owned"].uid, 1234u);
  EXPECT_EQ(by_name["owned"].gid, 5678u);
  EXPECT_FALSE(by_name["owned"].link_target.has_value());
  EXPECT_EQ(by_name["rel"].type, host::FileType::kSymlink);
  EXPECT_EQ(by_name["rel"].link_target, "owned");
  EXPECT_EQ(by_name["rel"].uid, 42u);
  EXPECT_EQ(by_name["rel"].gid, 43u);
  EXPECT_EQ(by_name["abs"].link_target, "/etc/passwd");
}

TEST_P(AgentFiles, MakesSymlinksWithOwnerAndMtimeReplacingFilesButNotDirectories) {
  ASSERT_TRUE(
      client().MakeSymlink(dir_ + "/link", "../somewhere/else", 1234, 5678, kPast).has_value());
  struct stat st = Lstat(dir_ + "/link");
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  EXPECT_EQ(ReadLink(dir_ + "/link"), "../somewhere/else");
  EXPECT_EQ(st.st_uid, 1234u);
  EXPECT_EQ(st.st_gid, 5678u);
  EXPECT_EQ(st.st_mtim.tv_sec, kPast);

  ASSERT_TRUE(client().WriteFile(dir_ + "/file", "content").has_value());
  ASSERT_TRUE(client().MakeSymlink(dir_ + "/file", "/etc").has_value());
  EXPECT_EQ(ReadLink(dir_ + "/file"), "/etc");
  ASSERT_TRUE(client().MakeSymlink(dir_ + "/link", "new-target").has_value());
  EXPECT_EQ(ReadLink(dir_ + "/link"), "new-target");

  ASSERT_TRUE(client().MakeDirs(dir_ + "/dir").has_value());
  auto onto_dir = client().MakeSymlink(dir_ + "/dir", "x");
  ASSERT_FALSE(onto_dir.has_value());
  EXPECT_EQ(onto_dir.error().errno_value, EISDIR);
  EXPECT_TRUE(S_ISDIR(Lstat(dir_ + "/dir").st_mode));
  auto no_parent = client().MakeSymlink(dir_ + "/missing/link", "x");
  ASSERT_FALSE(no_parent.has_value());
  EXPECT_EQ(no_parent.error().errno_value, ENOENT);
  // No temp links are left behind by the replacements or the failures.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir_))
    names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"dir", "file", "link"}));
}

TEST_P(AgentFiles, MkdirOwnerAppliesToTheCreatedFinalComponentOnly) {
  host::MakeDirsOptions opts;
  opts.mode = 0750;
  opts.uid = 1234;
  opts.gid = 5678;
  ASSERT_TRUE(client().MakeDirs(dir_ + "/p/q/final", opts).has_value());
  struct stat final_st = Lstat(dir_ + "/p/q/final");
  EXPECT_EQ(final_st.st_uid, 1234u);
  EXPECT_EQ(final_st.st_gid, 5678u);
  EXPECT_EQ(Lstat(dir_ + "/p/q").st_uid, 0u);
  EXPECT_EQ(Lstat(dir_ + "/p").st_uid, 0u);
  // An existing directory keeps its owner.
  opts.uid = 99;
  opts.gid = 99;
  ASSERT_TRUE(client().MakeDirs(dir_ + "/p/q/final/", opts).has_value());
  EXPECT_EQ(Lstat(dir_ + "/p/q/final").st_uid, 1234u);
}

TEST_P(AgentFiles, SetAttributesAppliesModeAfterOwnerAndNeverFollowsSymlinks) {
  WriteFileOptions plain;
  plain.mode = 0644;
  ASSERT_TRUE(client().WriteFile(dir_ + "/tool", "#!/bin/sh\n", plain).has_value());
  host::FileAttributes attrs;
  attrs.mode = 04751;
  attrs.uid = 1234;
  attrs.gid = 5678;
  attrs.mtime = kPast;
  ASSERT_TRUE(client().SetAttributes(dir_ + "/tool", attrs).has_value());
  struct stat st = Lstat(dir_ + "/tool");
  EXPECT_EQ(st.st_mode & 07777, 04751u);  // setuid survives: chmod came after chown
  EXPECT_EQ(st.st_uid, 1234u);
  EXPECT_EQ(st.st_gid, 5678u);
  EXPECT_EQ(st.st_mtim.tv_sec, kPast);

  ASSERT_EQ(::symlink("tool", (dir_ + "/link").c_str()), 0);
  host::FileAttributes owner_and_time;
  owner_and_time.uid = 7;
  owner_and_time.gid = 8;
  owner_and_time.mtime = kPast + 5;
  ASSERT_TRUE(client().SetAttributes(dir_ + "/link", owner_and_time).has_value());
  struct stat link = Lstat(dir_ + "/link");
  EXPECT_EQ(link.st_uid, 7u);
  EXPECT_EQ(link.st_mtim.tv_sec, kPast + 5);
  struct stat target = Lstat(dir_ + "/tool");
  EXPECT_EQ(target.st_uid, 1234u);
  EXPECT_EQ(target.st_mtim.tv_sec, kPast);

  host::FileAttributes mode_only;
  mode_only.mode = 0600;
  auto on_link = client().SetAttributes(dir_ + "/link", mode_only);
  ASSERT_FALSE(on_link.has_value());
  EXPECT_EQ(on_link.error().errno_value, EOPNOTSUPP);
  EXPECT_EQ(Lstat(dir_ + "/tool").st_mode & 07777, 04751u);
  EXPECT_EQ(client().SetAttributes(dir_ + "/missing", mode_only).error().errno_value, ENOENT);
  EXPECT_EQ(client().SetAttributes(dir_ + "/tool", host::FileAttributes{}).error().errno_value,
            EINVAL);
}

TEST_P(AgentFiles, AListingTooLargeForOneReplyFailsItsStreamNotTheLink) {
  // ~300 bytes of JSON per entry: 4000 entries pass the 1 MiB payload cap.
  std::string big = dir_ + "/big";
  ASSERT_EQ(::mkdir(big.c_str(), 0755), 0);
  for (int i = 0; i < 4000; ++i) {
    std::string name = big + "/" + std::string(200, 'n') + std::to_string(i);
    UniqueFd fd(::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd) << name;
  }
  auto list = client().ListFiles(big);
  ASSERT_FALSE(list.has_value());
  EXPECT_EQ(list.error().errno_value, E2BIG) << list.error().message;
  EXPECT_FALSE(client().LinkError().has_value());
  EXPECT_TRUE(client().Stat(big).has_value());
}

TEST_P(AgentFiles, ShutdownCarriesItsGraceAndClampsAnOversizedOne) {
  // The standalone agent accepts the op (its grace applies in the guest
  // init); an oversized grace is clamped by the client, not refused.
  EXPECT_TRUE(client().Shutdown(std::chrono::hours(5)).has_value());
  EXPECT_TRUE(client().Shutdown(std::chrono::milliseconds(2500)).has_value());
  EXPECT_TRUE(client().Shutdown().has_value());
}

using ::cella::testing::EchoServer;

TEST_P(AgentFiles, PortForwardCarriesBytesBothWaysWithHalfClose) {
  EchoServer server;
  ASSERT_NE(server.port(), 0);
  auto port = client().OpenPort(server.port());
  ASSERT_TRUE(port.has_value()) << port.error().message;
  std::string sent = RandomBytes(700'000, 3);
  ExpectEchoedThrough(**port, sent);
}

TEST_P(AgentFiles, PortForwardToAClosedPortIsRefused) {
  uint16_t free_port;
  {
    EchoServer probe;  // binds an ephemeral port, then releases it
    free_port = probe.port();
  }
  auto port = client().OpenPort(free_port);
  ASSERT_FALSE(port.has_value());
  EXPECT_EQ(port.error().errno_value, ECONNREFUSED);
}

}  // namespace
}  // namespace cella::testing
