// `cella cp` engine (src/host/sandbox/copy.h) against the real agent binary
// over a socket pair: the "guest" filesystem is a temp dir on this host.
// Ownership checks need root (chown to arbitrary ids), which these tests
// have here; without it they are reported as skipped.
#include "host/sandbox/copy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <filesystem>
#include <map>
#include <random>
#include <set>

#include "agent_test_support.h"
#include "protocol/wire.h"

namespace cella::testing {
namespace {

using sandbox::CopyFromGuest;
using sandbox::CopyStats;
using sandbox::CopyToGuest;

constexpr int64_t kPast = 1'000'000'000;  // 2001-09-09

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(gen());
  return s;
}

// Test fixtures are built with plain syscalls, never through the code under
// test; every step is asserted.
void MakeFile(const std::string& path, std::string_view content, mode_t mode,
              std::optional<std::pair<uid_t, gid_t>> owner = std::nullopt,
              std::optional<int64_t> mtime = std::nullopt) {
  ASSERT_TRUE(WriteStringToFile(path, content, mode).has_value()) << path;
  if (owner) {
    ASSERT_EQ(::chown(path.c_str(), owner->first, owner->second), 0) << path;
  }
  ASSERT_EQ(::chmod(path.c_str(), mode), 0) << path;  // after chown, and past the umask
  if (mtime) {
    struct timespec times[2] = {{0, UTIME_OMIT}, {*mtime, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0) << path;
  }
}

void MakeDir(const std::string& path, mode_t mode = 0755) {
  ASSERT_EQ(::mkdir(path.c_str(), 0700), 0) << path << ": " << std::strerror(errno);
  ASSERT_EQ(::chmod(path.c_str(), mode), 0) << path;
}

void SetAttrs(const std::string& path, std::optional<mode_t> mode,
              std::optional<std::pair<uid_t, gid_t>> owner, std::optional<int64_t> mtime) {
  if (owner) {
    ASSERT_EQ(::lchown(path.c_str(), owner->first, owner->second), 0) << path;
  }
  if (mode) {
    ASSERT_EQ(::chmod(path.c_str(), *mode), 0) << path;
  }
  if (mtime) {
    struct timespec times[2] = {{0, UTIME_OMIT}, {*mtime, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, AT_SYMLINK_NOFOLLOW), 0) << path;
  }
}

struct stat Lstat(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path << ": " << std::strerror(errno);
  return st;
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::string ReadLink(const std::string& path) {
  char buf[4096];
  ssize_t n = ::readlink(path.c_str(), buf, sizeof(buf));
  return n < 0 ? std::string("<not a link>") : std::string(buf, static_cast<size_t>(n));
}

// Everything cp promises to keep, per entry, relative to the tree's root
// ("." is the root itself).
std::map<std::string, std::string> Describe(const std::string& root) {
  std::map<std::string, std::string> out;
  std::function<void(const std::string&, const std::string&)> walk = [&](const std::string& path,
                                                                         const std::string& rel) {
    struct stat st = Lstat(path);
    std::string d = "mode=" + std::to_string(st.st_mode & 07777) +
                    " uid=" + std::to_string(st.st_uid) + " gid=" + std::to_string(st.st_gid) +
                    " mtime=" + std::to_string(st.st_mtim.tv_sec);
    if (S_ISLNK(st.st_mode)) {
      // A symlink's own mode is always 0777 on Linux; nothing to keep.
      d = "link->" + ReadLink(path) + " uid=" + std::to_string(st.st_uid) +
          " gid=" + std::to_string(st.st_gid) + " mtime=" + std::to_string(st.st_mtim.tv_sec);
    } else if (S_ISREG(st.st_mode)) {
      auto content = ReadFileToString(path, 64u << 20);
      d = "file size=" + std::to_string(st.st_size) +
          " hash=" + std::to_string(std::hash<std::string>{}(content.value_or("<unreadable>"))) +
          " " + d;
    } else if (S_ISDIR(st.st_mode)) {
      d = "dir " + d;
      for (const auto& e : std::filesystem::directory_iterator(path)) {
        std::string name = e.path().filename();
        walk(path + "/" + name, rel == "." ? name : rel + "/" + name);
      }
    } else {
      d = "other " + d;
    }
    out[rel] = d;
  };
  walk(root, ".");
  return out;
}

class Copy : public AgentTest {
 protected:
  void SetUp() override {
    AgentTest::SetUp();
    root_ = "/tmp/cella-copy-test-" + std::to_string(::getpid());
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_ + "/host");
    std::filesystem::create_directories(root_ + "/guest");
    std::filesystem::create_directories(root_ + "/back");
    host_ = root_ + "/host";
    guest_ = root_ + "/guest";
    back_ = root_ + "/back";
    agent_ = StartAgent();
    ASSERT_TRUE(agent_ && agent_->client);
  }
  void TearDown() override {
    agent_.reset();
    std::filesystem::remove_all(root_);
    AgentTest::TearDown();
  }
  host::AgentClient& agent() { return *agent_->client; }

  std::string root_, host_, guest_, back_;
  std::unique_ptr<AgentProcess> agent_;
};

#define REQUIRE_ROOT() \
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to create files owned by other ids"

TEST_F(Copy, RoundTripsATreeWithModesOwnersMtimesAndSymlinks) {
  REQUIRE_ROOT();
  const std::string src = host_ + "/src";
  const std::string big = RandomBytes(5u << 20, 11);
  MakeDir(src);
  MakeFile(src + "/empty", "", 0600);
  MakeFile(src + "/big", big, 0751, std::pair{1234u, 5678u}, kPast);
  MakeFile(src + "/setuid", "#!/bin/sh\n", 04755, std::pair{0u, 0u});
  MakeDir(src + "/ro");
  MakeFile(src + "/ro/a", "aaa", 0444);
  MakeFile(src + "/ro/b", "bbb", 0644, std::pair{1u, 2u});
  MakeDir(src + "/private");
  MakeDir(src + "/private/nested");
  MakeDir(src + "/private/nested/deeper");
  MakeFile(src + "/private/nested/deeper/file", "deep", 0640);
  MakeDir(src + "/sticky");
  ASSERT_EQ(::symlink("big", (src + "/rel-link").c_str()), 0);
  ASSERT_EQ(::symlink("/etc/passwd", (src + "/abs-link").c_str()), 0);
  ASSERT_EQ(::symlink("/nonexistent/dangling", (src + "/dangling").c_str()), 0);
  SetAttrs(src + "/rel-link", std::nullopt, std::pair{1234u, 5678u}, kPast + 1);
  SetAttrs(src + "/abs-link", std::nullopt, std::nullopt, kPast + 2);
  // Directory attributes last: filling them changed their mtimes.
  SetAttrs(src + "/ro", 0555, std::pair{1234u, 5678u}, kPast + 3);
  SetAttrs(src + "/private", 0700, std::nullopt, kPast + 4);
  SetAttrs(src + "/private/nested/deeper", 0750, std::nullopt, kPast + 5);
  SetAttrs(src + "/private/nested", 0711, std::nullopt, kPast + 6);
  SetAttrs(src + "/sticky", 01777, std::nullopt, kPast + 7);
  SetAttrs(src, 0755, std::pair{42u, 43u}, kPast + 8);
  const auto expected = Describe(src);
  ASSERT_EQ(expected.size(), 15u);

  auto to = CopyToGuest(agent(), src, guest_ + "/in");
  ASSERT_TRUE(to.has_value()) << to.error().message;
  EXPECT_EQ(Describe(guest_ + "/in"), expected);
  EXPECT_EQ(to->files, 6u);
  EXPECT_EQ(to->dirs, 6u);
  EXPECT_EQ(to->symlinks, 3u);
  EXPECT_EQ(to->bytes, big.size() + 10 + 3 + 3 + 4);
  EXPECT_EQ(to->skipped, 0u);

  auto from = CopyFromGuest(agent(), guest_ + "/in", back_ + "/out");
  ASSERT_TRUE(from.has_value()) << from.error().message;
  EXPECT_EQ(Describe(back_ + "/out"), expected);
  EXPECT_EQ(from->files, 6u);
  EXPECT_EQ(from->dirs, 6u);
  EXPECT_EQ(from->symlinks, 3u);
  EXPECT_EQ(from->bytes, to->bytes);

  // The properties the brief names, spelled out.
  struct stat b = Lstat(back_ + "/out/big");
  EXPECT_EQ(b.st_mode & 07777, 0751u);
  EXPECT_EQ(b.st_uid, 1234u);
  EXPECT_EQ(b.st_gid, 5678u);
  EXPECT_EQ(b.st_mtim.tv_sec, kPast);
  EXPECT_EQ(ReadFileToString(back_ + "/out/big", 6u << 20).value_or(""), big);
  EXPECT_EQ(Lstat(back_ + "/out/empty").st_size, 0);
  EXPECT_EQ(Lstat(back_ + "/out/ro").st_mode & 07777, 0555u);
  EXPECT_EQ(Lstat(back_ + "/out/private").st_mode & 07777, 0700u);
  EXPECT_EQ(Lstat(back_ + "/out/setuid").st_mode & 07777, 04755u);
  EXPECT_TRUE(S_ISLNK(Lstat(back_ + "/out/abs-link").st_mode));
  EXPECT_EQ(ReadLink(back_ + "/out/abs-link"), "/etc/passwd");
  EXPECT_EQ(ReadLink(back_ + "/out/rel-link"), "big");
  // Nothing is left behind by the temp-and-rename writes.
  for (const auto& e : std::filesystem::recursive_directory_iterator(back_))
    EXPECT_EQ(e.path().filename().string().rfind(".cella-", 0), std::string::npos) << e.path();
}

TEST_F(Copy, ASourceSymlinkIsCopiedAsALinkUnlessGivenWithASlashOrDot) {
  MakeDir(host_ + "/real");
  MakeFile(host_ + "/real/f", "x", 0644);
  ASSERT_EQ(::symlink("real", (host_ + "/link").c_str()), 0);
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/link", guest_ + "/as-link").has_value());
  EXPECT_EQ(ReadLink(guest_ + "/as-link"), "real");
  auto through = CopyToGuest(agent(), host_ + "/link/", guest_ + "/as-dir");
  ASSERT_TRUE(through.has_value()) << through.error().message;
  EXPECT_TRUE(S_ISDIR(Lstat(guest_ + "/as-dir").st_mode));
  EXPECT_TRUE(Exists(guest_ + "/as-dir/f"));
}

TEST_F(Copy, DestinationRulesToTheGuest) {
  MakeFile(host_ + "/file", "content", 0644);
  MakeDir(host_ + "/dir");
  MakeFile(host_ + "/dir/inner", "i", 0644);
  MakeDir(guest_ + "/existing");
  MakeFile(guest_ + "/plain", "p", 0644);

  // File into an existing directory: under its own name.
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/file", guest_ + "/existing").has_value());
  EXPECT_EQ(ReadFileToString(guest_ + "/existing/file", 100).value_or(""), "content");
  // A trailing slash demands an existing directory.
  auto slash = CopyToGuest(agent(), host_ + "/file", guest_ + "/missing/");
  ASSERT_FALSE(slash.has_value());
  EXPECT_EQ(slash.error().errno_value, ENOENT);
  EXPECT_NE(slash.error().message.find(guest_ + "/missing/"), std::string::npos)
      << slash.error().message;
  EXPECT_FALSE(Exists(guest_ + "/missing"));
  EXPECT_EQ(CopyToGuest(agent(), host_ + "/file", guest_ + "/plain/").error().errno_value, ENOTDIR);
  // Otherwise the destination is the new name; its parent must exist.
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/file", guest_ + "/renamed").has_value());
  EXPECT_EQ(ReadFileToString(guest_ + "/renamed", 100).value_or(""), "content");
  auto no_parent = CopyToGuest(agent(), host_ + "/file", guest_ + "/nope/renamed");
  ASSERT_FALSE(no_parent.has_value());
  EXPECT_EQ(no_parent.error().errno_value, ENOENT);
  // An existing file is replaced.
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/file", guest_ + "/plain").has_value());
  EXPECT_EQ(ReadFileToString(guest_ + "/plain", 100).value_or(""), "content");

  // Directory: missing destination = a copy named as the destination.
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/dir", guest_ + "/newdir").has_value());
  EXPECT_TRUE(Exists(guest_ + "/newdir/inner"));
  // Existing directory: under the source's name.
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/dir", guest_ + "/existing").has_value());
  EXPECT_TRUE(Exists(guest_ + "/existing/dir/inner"));
  // "/." copies the contents, into an existing or a new directory.
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/dir/.", guest_ + "/existing").has_value());
  EXPECT_TRUE(Exists(guest_ + "/existing/inner"));
  ASSERT_TRUE(CopyToGuest(agent(), host_ + "/dir/.", guest_ + "/fresh").has_value());
  EXPECT_TRUE(Exists(guest_ + "/fresh/inner"));
  EXPECT_FALSE(Exists(guest_ + "/fresh/dir"));
  // A directory onto a file is refused, and the file is untouched.
  auto onto_file = CopyToGuest(agent(), host_ + "/dir", guest_ + "/renamed");
  ASSERT_FALSE(onto_file.has_value());
  EXPECT_EQ(onto_file.error().errno_value, ENOTDIR);
  EXPECT_EQ(ReadFileToString(guest_ + "/renamed", 100).value_or(""), "content");
  EXPECT_EQ(CopyToGuest(agent(), host_ + "/dir", guest_ + "/nope/dir").error().errno_value, ENOENT);
  // A missing source says which.
  auto missing = CopyToGuest(agent(), host_ + "/absent", guest_ + "/x");
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().errno_value, ENOENT);
  EXPECT_NE(missing.error().message.find(host_ + "/absent"), std::string::npos);
}

TEST_F(Copy, DestinationRulesFromTheGuest) {
  MakeFile(guest_ + "/file", "content", 0644);
  MakeDir(guest_ + "/dir");
  MakeFile(guest_ + "/dir/inner", "i", 0644);
  MakeDir(back_ + "/existing");
  MakeFile(back_ + "/plain", "p", 0644);

  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/file", back_ + "/existing").has_value());
  EXPECT_EQ(ReadFileToString(back_ + "/existing/file", 100).value_or(""), "content");
  auto slash = CopyFromGuest(agent(), guest_ + "/file", back_ + "/missing/");
  ASSERT_FALSE(slash.has_value());
  EXPECT_EQ(slash.error().errno_value, ENOENT);
  EXPECT_FALSE(Exists(back_ + "/missing"));
  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/file", back_ + "/renamed").has_value());
  EXPECT_EQ(ReadFileToString(back_ + "/renamed", 100).value_or(""), "content");
  EXPECT_EQ(CopyFromGuest(agent(), guest_ + "/file", back_ + "/nope/x").error().errno_value,
            ENOENT);
  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/file", back_ + "/plain").has_value());
  EXPECT_EQ(ReadFileToString(back_ + "/plain", 100).value_or(""), "content");

  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/dir", back_ + "/newdir").has_value());
  EXPECT_TRUE(Exists(back_ + "/newdir/inner"));
  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/dir", back_ + "/existing").has_value());
  EXPECT_TRUE(Exists(back_ + "/existing/dir/inner"));
  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/dir/.", back_ + "/existing").has_value());
  EXPECT_TRUE(Exists(back_ + "/existing/inner"));
  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/dir/.", back_ + "/fresh").has_value());
  EXPECT_TRUE(Exists(back_ + "/fresh/inner"));
  EXPECT_FALSE(Exists(back_ + "/fresh/dir"));
  auto onto_file = CopyFromGuest(agent(), guest_ + "/dir", back_ + "/renamed");
  ASSERT_FALSE(onto_file.has_value());
  EXPECT_EQ(onto_file.error().errno_value, ENOTDIR);
  EXPECT_EQ(ReadFileToString(back_ + "/renamed", 100).value_or(""), "content");
  // A file never replaces a directory inside a merge either.
  MakeDir(back_ + "/clash");
  MakeDir(back_ + "/clash/inner");
  auto clash = CopyFromGuest(agent(), guest_ + "/dir/.", back_ + "/clash");
  ASSERT_FALSE(clash.has_value());
  EXPECT_EQ(clash.error().errno_value, EISDIR);
  EXPECT_TRUE(S_ISDIR(Lstat(back_ + "/clash/inner").st_mode));
}

TEST_F(Copy, FifosAreSkippedAndCounted) {
  MakeDir(host_ + "/d");
  MakeFile(host_ + "/d/f", "x", 0644);
  ASSERT_EQ(::mkfifo((host_ + "/d/pipe").c_str(), 0644), 0);
  auto to = CopyToGuest(agent(), host_ + "/d", guest_ + "/d");
  ASSERT_TRUE(to.has_value()) << to.error().message;
  EXPECT_EQ(to->skipped, 1u);
  EXPECT_EQ(to->files, 1u);
  ASSERT_EQ(to->warnings.size(), 1u);
  EXPECT_NE(to->warnings[0].find(host_ + "/d/pipe"), std::string::npos) << to->warnings[0];
  EXPECT_FALSE(Exists(guest_ + "/d/pipe"));

  ASSERT_EQ(::mkfifo((guest_ + "/d/guest-pipe").c_str(), 0644), 0);
  auto from = CopyFromGuest(agent(), guest_ + "/d", back_ + "/d");
  ASSERT_TRUE(from.has_value()) << from.error().message;
  EXPECT_EQ(from->skipped, 1u);
  EXPECT_EQ(from->files, 1u);
  EXPECT_FALSE(Exists(back_ + "/d/guest-pipe"));
  EXPECT_TRUE(Exists(back_ + "/d/f"));
}

TEST_F(Copy, GuestSymlinksPointingOutsideAreCopiedAsLinksNeverFollowed) {
  MakeDir(guest_ + "/evil");
  ASSERT_EQ(::symlink("/etc", (guest_ + "/evil/etc").c_str()), 0);
  ASSERT_EQ(::symlink("/etc/passwd", (guest_ + "/evil/passwd").c_str()), 0);
  ASSERT_EQ(::symlink("../../../../../../../../tmp", (guest_ + "/evil/up").c_str()), 0);
  auto from = CopyFromGuest(agent(), guest_ + "/evil", back_ + "/evil");
  ASSERT_TRUE(from.has_value()) << from.error().message;
  EXPECT_EQ(from->symlinks, 3u);
  EXPECT_EQ(from->files, 0u);
  EXPECT_TRUE(S_ISLNK(Lstat(back_ + "/evil/etc").st_mode));
  EXPECT_EQ(ReadLink(back_ + "/evil/etc"), "/etc");
  EXPECT_TRUE(S_ISLNK(Lstat(back_ + "/evil/passwd").st_mode));
  EXPECT_TRUE(S_ISLNK(Lstat(back_ + "/evil/up").st_mode));
}

TEST_F(Copy, AMergeNeverDescendsThroughAHostSymlinkAGuestCopyLeft) {
  // A first copy leaves back/evil/victim -> a host directory outside back/;
  // a second copy whose tree has a directory of that name must not write
  // through the link.
  const std::string victim = root_ + "/victim";
  MakeDir(victim);
  MakeDir(guest_ + "/evil");
  ASSERT_EQ(::symlink(victim.c_str(), (guest_ + "/evil/victim").c_str()), 0);
  ASSERT_TRUE(CopyFromGuest(agent(), guest_ + "/evil", back_ + "/evil").has_value());
  ASSERT_EQ(ReadLink(back_ + "/evil/victim"), victim);

  MakeDir(guest_ + "/evil2");
  MakeDir(guest_ + "/evil2/victim");
  MakeFile(guest_ + "/evil2/victim/planted", "pwned", 0644);
  auto second = CopyFromGuest(agent(), guest_ + "/evil2/.", back_ + "/evil");
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().errno_value, ENOTDIR) << second.error().message;
  EXPECT_FALSE(Exists(victim + "/planted"));
  EXPECT_TRUE(S_ISLNK(Lstat(back_ + "/evil/victim").st_mode));
}

// ---- a lying guest --------------------------------------------------------

struct Reply {
  protocol::FrameType type;
  protocol::Channel channel;
  std::string body;
};

Reply ControlReply(protocol::FrameType type, std::string body) {
  return {type, protocol::Channel::kControl, std::move(body)};
}

// A fake agent on the other end of a socket pair: answers each Open with
// the frames `answer` returns, and ignores everything else (windows, closes).
class FakeGuest {
 public:
  using Answer = std::function<std::vector<Reply>(const protocol::Request&)>;

  explicit FakeGuest(Answer answer) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      ADD_FAILURE() << "socketpair: " << std::strerror(errno);
      return;
    }
    host_end_.Reset(sv[0]);
    thread_ = std::thread(
        [fd = UniqueFd(sv[1]), answer = std::move(answer)]() mutable { Serve(fd.Get(), answer); });
  }
  ~FakeGuest() {
    client_.reset();  // closes the link; the thread sees EOF
    host_end_.Reset();
    if (thread_.joinable()) thread_.join();
  }

  host::AgentClient* Connect() {
    host::AgentClientOptions options;
    options.handshake_timeout = std::chrono::seconds(10);
    auto client = host::AgentClient::Connect(std::move(host_end_), options);
    if (!client) {
      ADD_FAILURE() << client.error().message;
      return nullptr;
    }
    client_ = std::move(*client);
    return client_.get();
  }

 private:
  static void Serve(int fd, const Answer& answer) {
    auto send = [&](uint32_t stream, protocol::FrameType type, std::string_view body,
                    protocol::Channel channel = protocol::Channel::kControl) {
      std::vector<std::byte> out;
      protocol::EncodeFrame(stream, type, channel, protocol::AsBytes(body), out);
      return WriteAll(fd, out).has_value();
    };
    if (!send(0, protocol::FrameType::kHello, R"({"version":1,"role":"agent"})")) return;
    protocol::FrameDecoder decoder;
    std::vector<std::byte> buf(65536);
    for (;;) {
      auto n = ReadSome(fd, buf);
      if (!n || *n == 0) return;
      decoder.Feed(std::span(buf.data(), *n));
      for (;;) {
        auto frame = decoder.Next();
        if (!frame || !frame->has_value()) break;
        const protocol::Frame& f = **frame;
        if (f.type != protocol::FrameType::kOpen) continue;
        auto request = protocol::DecodeRequest(f.PayloadText());
        if (!request) {
          (void)send(f.stream_id, protocol::FrameType::kError,
                     protocol::EncodeError({EINVAL, request.error().message}));
          continue;
        }
        for (const Reply& reply : answer(*request))
          if (!send(f.stream_id, reply.type, reply.body, reply.channel)) return;
      }
    }
  }

  UniqueFd host_end_;
  std::unique_ptr<host::AgentClient> client_;
  std::thread thread_;
};

protocol::FileInfo Info(std::string name, protocol::FileType type) {
  protocol::FileInfo info;
  info.name = std::move(name);
  info.type = type;
  info.mode = type == protocol::FileType::kDir ? 0755 : 0644;
  info.mtime = kPast;
  return info;
}

// A guest whose /src directory lists `entries`, and whose every file reads
// as "pwned"; other requests fail.
FakeGuest::Answer ListingGuest(std::vector<protocol::FileInfo> entries) {
  using protocol::FrameType;
  return [entries](const protocol::Request& r) -> std::vector<Reply> {
    if (auto* st = std::get_if<protocol::StatRequest>(&r); st && st->path == "/src")
      return {ControlReply(FrameType::kResult,
                           protocol::EncodeFileInfo(Info("src", protocol::FileType::kDir)))};
    if (auto* l = std::get_if<protocol::ListRequest>(&r); l && l->path == "/src")
      return {ControlReply(FrameType::kResult, protocol::EncodeList(entries))};
    if (std::holds_alternative<protocol::ReadFileRequest>(r))
      return {ControlReply(FrameType::kOpened, protocol::EncodeReadFileOpened({5, 0644})),
              Reply{FrameType::kData, protocol::Channel::kStdout, "pwned"},
              Reply{FrameType::kEof, protocol::Channel::kStdout, ""},
              ControlReply(FrameType::kResult, protocol::EncodeSize(5))};
    return {ControlReply(FrameType::kError, protocol::EncodeError({ENOENT, "not in this fake"}))};
  };
}

class CopyFromLyingGuest : public AgentTest {
 protected:
  void SetUp() override {
    AgentTest::SetUp();
    back_ = "/tmp/cella-copy-lying-" + std::to_string(::getpid());
    std::filesystem::remove_all(back_);
    std::filesystem::create_directories(back_ + "/inside");
  }
  void TearDown() override {
    std::filesystem::remove_all(back_);
    AgentTest::TearDown();
  }
  // Every path under back_ after the copy, besides the destination itself.
  std::set<std::string> Tree() {
    std::set<std::string> out;
    for (const auto& e : std::filesystem::recursive_directory_iterator(back_))
      out.insert(e.path().string().substr(back_.size()));
    return out;
  }
  std::string back_;
};

TEST_F(CopyFromLyingGuest, RefusesListedNamesThatAreNotOneComponent) {
  for (std::string bad : {"../escaped", "a/b", "..", ".", "/abs", ""}) {
    SCOPED_TRACE(bad);
    FakeGuest guest(ListingGuest({Info(bad, protocol::FileType::kFile)}));
    host::AgentClient* client = guest.Connect();
    ASSERT_NE(client, nullptr);
    auto copied = CopyFromGuest(*client, "/src", back_ + "/inside/out");
    // Nothing but the (empty) destination directory was created.
    EXPECT_EQ(Tree(), (std::set<std::string>{"/inside", "/inside/out"}));
    std::filesystem::remove_all(back_ + "/inside/out");
    ASSERT_FALSE(copied.has_value());
    EXPECT_EQ(copied.error().errno_value, EPROTO);
    EXPECT_NE(copied.error().message.find("invalid name"), std::string::npos)
        << copied.error().message;
  }
}

TEST_F(CopyFromLyingGuest, RefusesANameListedTwice) {
  // First as a symlink to /etc, then as a directory to descend into.
  auto link = Info("x", protocol::FileType::kSymlink);
  link.link_target = "/etc";
  FakeGuest guest(ListingGuest({link, Info("x", protocol::FileType::kDir)}));
  host::AgentClient* client = guest.Connect();
  ASSERT_NE(client, nullptr);
  auto copied = CopyFromGuest(*client, "/src", back_ + "/inside/out");
  ASSERT_FALSE(copied.has_value());
  EXPECT_EQ(copied.error().errno_value, EPROTO);
  EXPECT_NE(copied.error().message.find("twice"), std::string::npos) << copied.error().message;
}

}  // namespace
}  // namespace cella::testing

namespace cella::testing {
namespace {

// A guest's setuid/setgid bits never reach the host outside archive mode.
TEST_F(Copy, SetuidBitsFromTheGuestAreDroppedWithoutArchive) {
  MakeFile(guest_ + "/suid", "#!/bin/sh\n", 06777);
  MakeDir(guest_ + "/sgid-dir");
  SetAttrs(guest_ + "/sgid-dir", 02755, std::nullopt, kPast);
  const sandbox::CopyOptions plain{.ownership = sandbox::Ownership::kDestinationDefault};
  auto file = CopyFromGuest(agent(), guest_ + "/suid", back_ + "/suid", plain);
  ASSERT_TRUE(file.has_value()) << file.error().message;
  EXPECT_EQ(Lstat(back_ + "/suid").st_mode & 07777, 0777u);
  EXPECT_EQ(Lstat(back_ + "/suid").st_uid, ::geteuid());
  auto dir = CopyFromGuest(agent(), guest_ + "/sgid-dir", back_ + "/sgid-dir", plain);
  ASSERT_TRUE(dir.has_value()) << dir.error().message;
  EXPECT_EQ(Lstat(back_ + "/sgid-dir").st_mode & 07777, 0755u);
}

}  // namespace
}  // namespace cella::testing
