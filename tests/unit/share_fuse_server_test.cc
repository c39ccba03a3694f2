// The host FUSE server without a VM: hand-built FUSE requests (what the
// guest kernel writes to /dev/fuse) over a temp directory. Covers the
// everyday operations, the escapes a hostile guest tries, ro/overlay and
// single-file enforcement, modes, and the node table's save/load.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fuse.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "host/share/fuse_server.h"
#include "support/temp_dir.h"

namespace cella::share {
namespace {

std::string ReadHost(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Drives a server like the guest kernel would.
class Guest {
 public:
  explicit Guest(FuseServer& server, bool init = true) : server_(server) {
    if (init) {
      fuse_init_in in{};
      in.major = 7;
      in.minor = 38;
      in.max_readahead = 65536;
      in.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ATOMIC_O_TRUNC;
      auto out = Call(FUSE_INIT, 0, Bytes(in));
      EXPECT_EQ(err, 0);
      fuse_init_out init_out;
      EXPECT_GE(out.size(), sizeof init_out);
      std::memcpy(&init_out, out.data(), sizeof init_out);
      EXPECT_EQ(init_out.max_write, kFuseMaxIo);
    }
  }

  template <class T>
  static std::string Bytes(const T& value) {
    return std::string(reinterpret_cast<const char*>(&value), sizeof value);
  }
  static std::string Name(const std::string& name) { return name + std::string(1, '\0'); }

  // Sends one request; returns the reply body and sets err (positive errno).
  std::string Call(uint32_t opcode, uint64_t node, const std::string& body) {
    fuse_in_header h{};
    h.len = static_cast<uint32_t>(sizeof h + body.size());
    h.opcode = opcode;
    h.unique = ++unique_;
    h.nodeid = node;
    h.uid = uid;
    h.gid = gid;
    std::string req = Bytes(h) + body;
    auto reply = server_.Handle(std::as_bytes(std::span(req.data(), req.size())));
    replied = !reply.empty();
    if (reply.empty()) {
      err = 0;
      return {};
    }
    fuse_out_header out;
    EXPECT_GE(reply.size(), sizeof out);
    std::memcpy(&out, reply.data(), sizeof out);
    EXPECT_EQ(out.len, reply.size());
    EXPECT_EQ(out.unique, unique_);
    err = -out.error;
    return std::string(reinterpret_cast<const char*>(reply.data()) + sizeof out,
                       reply.size() - sizeof out);
  }

  uint64_t Lookup(uint64_t parent, const std::string& name) {
    auto out = Call(FUSE_LOOKUP, parent, Name(name));
    if (err) return 0;
    fuse_entry_out e;
    std::memcpy(&e, out.data(), sizeof e);
    return e.nodeid;
  }
  fuse_attr GetAttr(uint64_t node) {
    fuse_getattr_in in{};
    auto out = Call(FUSE_GETATTR, node, Bytes(in));
    fuse_attr_out a{};
    if (!err) std::memcpy(&a, out.data(), sizeof a);
    return a.attr;
  }
  uint64_t Open(uint64_t node, uint32_t flags, bool dir = false) {
    fuse_open_in in{};
    in.flags = flags;
    auto out = Call(dir ? FUSE_OPENDIR : FUSE_OPEN, node, Bytes(in));
    if (err) return 0;
    fuse_open_out o;
    std::memcpy(&o, out.data(), sizeof o);
    return o.fh;
  }
  std::string Read(uint64_t node, uint64_t fh, uint64_t off, uint32_t size) {
    fuse_read_in in{};
    in.fh = fh;
    in.offset = off;
    in.size = size;
    return Call(FUSE_READ, node, Bytes(in));
  }
  uint32_t Write(uint64_t node, uint64_t fh, uint64_t off, const std::string& data) {
    fuse_write_in in{};
    in.fh = fh;
    in.offset = off;
    in.size = static_cast<uint32_t>(data.size());
    auto out = Call(FUSE_WRITE, node, Bytes(in) + data);
    if (err) return 0;
    fuse_write_out w;
    std::memcpy(&w, out.data(), sizeof w);
    return w.size;
  }
  // CREATE: {node, fh}.
  std::pair<uint64_t, uint64_t> Create(uint64_t parent, const std::string& name, uint32_t mode,
                                       uint32_t flags = O_RDWR | O_CREAT) {
    fuse_create_in in{};
    in.flags = flags;
    in.mode = S_IFREG | mode;
    auto out = Call(FUSE_CREATE, parent, Bytes(in) + Name(name));
    if (err) return {0, 0};
    fuse_entry_out e;
    fuse_open_out o;
    std::memcpy(&e, out.data(), sizeof e);
    std::memcpy(&o, out.data() + sizeof e, sizeof o);
    return {e.nodeid, o.fh};
  }
  uint64_t Mkdir(uint64_t parent, const std::string& name, uint32_t mode) {
    fuse_mkdir_in in{};
    in.mode = mode;
    auto out = Call(FUSE_MKDIR, parent, Bytes(in) + Name(name));
    if (err) return 0;
    fuse_entry_out e;
    std::memcpy(&e, out.data(), sizeof e);
    return e.nodeid;
  }
  void Release(uint64_t node, uint64_t fh, bool dir = false) {
    fuse_release_in in{};
    in.fh = fh;
    Call(dir ? FUSE_RELEASEDIR : FUSE_RELEASE, node, Bytes(in));
  }
  // Names READDIR returns for a directory node.
  std::vector<std::string> List(uint64_t node) {
    uint64_t fh = Open(node, O_RDONLY, true);
    EXPECT_EQ(err, 0);
    std::vector<std::string> names;
    uint64_t off = 0;
    for (int rounds = 0; rounds < 1000; ++rounds) {
      fuse_read_in in{};
      in.fh = fh;
      in.offset = off;
      in.size = 4096;
      auto out = Call(FUSE_READDIR, node, Bytes(in));
      EXPECT_EQ(err, 0);
      if (out.empty()) break;
      for (size_t pos = 0; pos < out.size();) {
        fuse_dirent d;
        std::memcpy(&d, out.data() + pos, FUSE_NAME_OFFSET);
        std::string name = out.substr(pos + FUSE_NAME_OFFSET, d.namelen);
        if (name != "." && name != "..") names.push_back(name);
        off = d.off;
        pos += FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + d.namelen);
      }
    }
    Release(node, fh, true);
    std::sort(names.begin(), names.end());
    return names;
  }

  int err = 0;
  bool replied = false;
  uint32_t uid = 0, gid = 0;  // the guest caller of the next requests

 private:
  FuseServer& server_;
  uint64_t unique_ = 0;
};

FuseServerOptions ReadOnly() {
  FuseServerOptions options;
  options.read_only = true;
  return options;
}

class FuseServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::filesystem::create_directories(outside_ / "secret");
    std::ofstream(outside_ / "secret/passwd") << "root:x:0:0";
    std::filesystem::create_directories(share_ / "dir");
    std::ofstream(share_ / "dir/hello.txt") << "hello world";
  }
  std::unique_ptr<FuseServer> Server(FuseServerOptions options = {}) {
    auto server = FuseServer::Open(share_.path(), options);
    EXPECT_TRUE(server) << server.error().message;
    return std::move(*server);
  }

  testing::TempDir share_{"cella-fuse-share"};
  testing::TempDir outside_{"cella-fuse-outside"};
};

TEST_F(FuseServerTest, RequestsBeforeInitFailAndInitNegotiatesBounds) {
  auto server = Server();
  Guest guest(*server, false);
  guest.Lookup(FUSE_ROOT_ID, "dir");
  EXPECT_EQ(guest.err, EIO);
  EXPECT_FALSE(server->initialized());
  Guest init(*server);
  EXPECT_TRUE(server->initialized());
  // A truncated header gets no reply; a length that lies gets EINVAL.
  std::string junk(10, 'x');
  EXPECT_TRUE(server->Handle(std::as_bytes(std::span(junk.data(), junk.size()))).empty());
  fuse_in_header h{};
  h.len = 1000;
  h.opcode = FUSE_GETATTR;
  h.nodeid = FUSE_ROOT_ID;
  auto reply = server->Handle(std::as_bytes(std::span(&h, 1)));
  ASSERT_GE(reply.size(), sizeof(fuse_out_header));
  fuse_out_header out;
  std::memcpy(&out, reply.data(), sizeof out);
  EXPECT_EQ(out.error, -EINVAL);
  // Unknown opcodes and xattrs: ENOSYS.
  init.Call(FUSE_GETXATTR, FUSE_ROOT_ID, std::string(16, '\0'));
  EXPECT_EQ(init.err, ENOSYS);
}

TEST_F(FuseServerTest, LookupReadWriteCreateRenameReaddir) {
  auto server = Server();
  Guest g(*server);
  uint64_t dir = g.Lookup(FUSE_ROOT_ID, "dir");
  ASSERT_NE(dir, 0u);
  EXPECT_TRUE(S_ISDIR(g.GetAttr(dir).mode));
  uint64_t hello = g.Lookup(dir, "hello.txt");
  ASSERT_NE(hello, 0u);
  EXPECT_EQ(g.GetAttr(hello).size, 11u);
  EXPECT_EQ(g.Lookup(dir, "hello.txt"), hello);  // same node, one more lookup
  g.Lookup(dir, "missing");
  EXPECT_EQ(g.err, ENOENT);

  uint64_t fh = g.Open(hello, O_RDWR);
  ASSERT_EQ(g.err, 0);
  EXPECT_EQ(g.Read(hello, fh, 6, 100), "world");
  EXPECT_EQ(g.Write(hello, fh, 0, "HELLO"), 5u);
  EXPECT_EQ(ReadHost(share_ / "dir/hello.txt"), "HELLO world");
  // Host writes are seen by the next read (no cache in the server).
  std::ofstream(share_ / "dir/hello.txt", std::ios::app) << "!";
  EXPECT_EQ(g.Read(hello, fh, 6, 100), "world!");
  // A huge read is capped, not allocated.
  EXPECT_EQ(g.Read(hello, fh, 0, 0xffffffff).size(), 12u);
  g.Release(hello, fh);

  auto [created, cfh] = g.Create(dir, "new.txt", 0640);
  ASSERT_EQ(g.err, 0);
  EXPECT_EQ(g.Write(created, cfh, 0, "fresh"), 5u);
  g.Release(created, cfh);
  struct stat st;
  ASSERT_EQ(stat((share_ / "dir/new.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_EQ(st.st_uid, getuid());  // owned by whoever runs the server
  EXPECT_EQ(ReadHost(share_ / "dir/new.txt"), "fresh");

  uint64_t sub = g.Mkdir(FUSE_ROOT_ID, "sub", 0755);
  ASSERT_EQ(g.err, 0);
  fuse_rename_in rn{};
  rn.newdir = sub;
  g.Call(FUSE_RENAME, dir, Guest::Bytes(rn) + Guest::Name("new.txt") + Guest::Name("moved.txt"));
  ASSERT_EQ(g.err, 0);
  EXPECT_EQ(ReadHost(share_ / "sub/moved.txt"), "fresh");
  // The renamed node follows its file.
  EXPECT_EQ(g.GetAttr(created).size, 5u);
  EXPECT_EQ(g.err, 0);

  EXPECT_EQ(g.List(FUSE_ROOT_ID), (std::vector<std::string>{"dir", "sub"}));
  EXPECT_EQ(g.List(sub), (std::vector<std::string>{"moved.txt"}));

  g.Call(FUSE_UNLINK, sub, Guest::Name("moved.txt"));
  EXPECT_EQ(g.err, 0);
  EXPECT_FALSE(std::filesystem::exists(share_ / "sub/moved.txt"));
  g.GetAttr(created);
  EXPECT_EQ(g.err, ENOENT);
  g.Call(FUSE_RMDIR, FUSE_ROOT_ID, Guest::Name("sub"));
  EXPECT_EQ(g.err, 0);

  // Many files in one directory come back over several READDIR calls.
  for (int i = 0; i < 300; ++i) std::ofstream(share_ / ("dir/f" + std::to_string(i)));
  EXPECT_EQ(g.List(dir).size(), 301u);

  // Forgetting drops nodes from the table.
  size_t before = server->node_count();
  fuse_forget_in f{};
  f.nlookup = 2;
  g.Call(FUSE_FORGET, hello, Guest::Bytes(f));
  EXPECT_FALSE(g.replied);
  EXPECT_EQ(server->node_count(), before - 1);
}

TEST_F(FuseServerTest, EscapesFailAndTouchNothingOutside) {
  std::filesystem::create_symlink(outside_ / "secret", share_ / "evil");
  std::filesystem::create_symlink(outside_ / "secret/passwd", share_ / "evil_file");
  auto server = Server();
  Guest g(*server);

  // Names with '/', ".", "..", NUL.
  for (std::string bad : {"..", ".", "../", "a/b", "/etc"}) {
    g.Lookup(FUSE_ROOT_ID, bad);
    EXPECT_EQ(g.err, EINVAL) << bad;
    g.Mkdir(FUSE_ROOT_ID, bad, 0755);
    EXPECT_EQ(g.err, EINVAL) << bad;
  }
  // A symlink to a directory outside is a symlink node; nothing beneath it
  // resolves, and it cannot be opened or read through.
  uint64_t evil = g.Lookup(FUSE_ROOT_ID, "evil");
  ASSERT_NE(evil, 0u);
  EXPECT_TRUE(S_ISLNK(g.GetAttr(evil).mode));
  g.Lookup(evil, "passwd");
  EXPECT_NE(g.err, 0);
  g.Create(evil, "planted", 0644);
  EXPECT_NE(g.err, 0);
  g.Mkdir(evil, "planted", 0755);
  EXPECT_NE(g.err, 0);
  EXPECT_EQ(g.Call(FUSE_READLINK, evil, ""), outside_ / "secret");
  uint64_t evil_file = g.Lookup(FUSE_ROOT_ID, "evil_file");
  g.Open(evil_file, O_RDONLY);
  EXPECT_NE(g.err, 0);
  g.Open(evil_file, O_RDWR | O_TRUNC);
  EXPECT_NE(g.err, 0);
  fuse_setattr_in sa{};
  sa.valid = FATTR_MODE;
  sa.mode = 0777;
  g.Call(FUSE_SETATTR, evil_file, Guest::Bytes(sa));
  EXPECT_NE(g.err, 0);
  sa.valid = FATTR_SIZE;
  sa.size = 0;
  g.Call(FUSE_SETATTR, evil_file, Guest::Bytes(sa));
  EXPECT_NE(g.err, 0);

  // A hardlink can only name a node of this share: an unknown node id (an
  // inode number of a file outside, say) is refused; linking the symlink
  // links the symlink itself, never its target.
  struct stat outside_st;
  ASSERT_EQ(stat((outside_ / "secret/passwd").c_str(), &outside_st), 0);
  fuse_link_in ln{};
  ln.oldnodeid = outside_st.st_ino;
  g.Call(FUSE_LINK, FUSE_ROOT_ID, Guest::Bytes(ln) + Guest::Name("hard"));
  EXPECT_NE(g.err, 0);
  ln.oldnodeid = evil_file;
  g.Call(FUSE_LINK, FUSE_ROOT_ID, Guest::Bytes(ln) + Guest::Name("hard"));
  EXPECT_EQ(g.err, 0);
  struct stat hard_st;
  ASSERT_EQ(lstat((share_ / "hard").c_str(), &hard_st), 0);
  EXPECT_TRUE(S_ISLNK(hard_st.st_mode));

  // Rename race: a directory the guest looked up is swapped for a symlink to
  // the outside behind the server's back; the node's path now crosses a
  // symlink and nothing resolves through it.
  uint64_t dir = g.Lookup(FUSE_ROOT_ID, "dir");
  uint64_t hello = g.Lookup(dir, "hello.txt");
  std::filesystem::rename(share_ / "dir", share_ / "dir.old");
  std::filesystem::create_symlink(outside_ / "secret", share_ / "dir");
  std::filesystem::copy_file(outside_ / "secret/passwd", outside_ / "secret/hello.txt");
  g.Open(hello, O_RDWR);
  EXPECT_NE(g.err, 0);
  g.Create(dir, "x", 0644);
  EXPECT_NE(g.err, 0);
  g.Call(FUSE_UNLINK, dir, Guest::Name("hello.txt"));
  EXPECT_NE(g.err, 0);

  // Nothing outside changed.
  EXPECT_EQ(ReadHost(outside_ / "secret/passwd"), "root:x:0:0");
  EXPECT_EQ(ReadHost(outside_ / "secret/hello.txt"), "root:x:0:0");
  struct stat after;
  ASSERT_EQ(stat((outside_ / "secret/passwd").c_str(), &after), 0);
  EXPECT_EQ(after.st_mode, outside_st.st_mode);
  EXPECT_EQ(std::filesystem::directory_iterator(outside_ / "secret") ==
                std::filesystem::directory_iterator(),
            false);
  EXPECT_FALSE(std::filesystem::exists(outside_ / "secret/planted"));
  EXPECT_FALSE(std::filesystem::exists(outside_ / "secret/x"));
  EXPECT_EQ(outside_.Entries(), 1u);
}

TEST_F(FuseServerTest, ReadOnlySharesRefuseEveryWriteOnTheHost) {
  auto server = Server(ReadOnly());
  Guest g(*server);
  uint64_t dir = g.Lookup(FUSE_ROOT_ID, "dir");
  uint64_t hello = g.Lookup(dir, "hello.txt");
  uint64_t fh = g.Open(hello, O_RDONLY);
  EXPECT_EQ(g.err, 0);
  EXPECT_EQ(g.Read(hello, fh, 0, 5), "hello");
  g.Write(hello, fh, 0, "X");  // a handle opened read-only cannot write
  EXPECT_EQ(g.err, EROFS);
  g.Open(hello, O_RDWR);
  EXPECT_EQ(g.err, EROFS);
  g.Open(hello, O_RDONLY | O_TRUNC);
  EXPECT_EQ(g.err, EROFS);
  g.Create(dir, "n", 0644);
  EXPECT_EQ(g.err, EROFS);
  g.Mkdir(dir, "n", 0755);
  EXPECT_EQ(g.err, EROFS);
  g.Call(FUSE_UNLINK, dir, Guest::Name("hello.txt"));
  EXPECT_EQ(g.err, EROFS);
  fuse_rename_in rn{};
  rn.newdir = FUSE_ROOT_ID;
  g.Call(FUSE_RENAME, dir, Guest::Bytes(rn) + Guest::Name("hello.txt") + Guest::Name("x"));
  EXPECT_EQ(g.err, EROFS);
  fuse_setattr_in sa{};
  sa.valid = FATTR_SIZE;
  g.Call(FUSE_SETATTR, hello, Guest::Bytes(sa));
  EXPECT_EQ(g.err, EROFS);
  g.Call(FUSE_SYMLINK, dir, Guest::Name("l") + Guest::Name("/etc"));
  EXPECT_EQ(g.err, EROFS);
  EXPECT_EQ(ReadHost(share_ / "dir/hello.txt"), "hello world");
  EXPECT_EQ(std::filesystem::directory_iterator(share_ / "dir")->path().filename(), "hello.txt");
}

TEST_F(FuseServerTest, SetuidBitsAreStrippedAndDevicesRefused) {
  auto server = Server();
  Guest g(*server);
  auto [node, fh] = g.Create(FUSE_ROOT_ID, "suid", 06755);
  ASSERT_EQ(g.err, 0);
  g.Release(node, fh);
  struct stat st;
  ASSERT_EQ(stat((share_ / "suid").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
  fuse_setattr_in sa{};
  sa.valid = FATTR_MODE;
  sa.mode = 04777;
  g.Call(FUSE_SETATTR, node, Guest::Bytes(sa));
  EXPECT_EQ(g.err, 0);
  ASSERT_EQ(stat((share_ / "suid").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0777u);
  g.Mkdir(FUSE_ROOT_ID, "sgid", 02775);
  ASSERT_EQ(stat((share_ / "sgid").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07000, 0u);

  for (uint32_t type : {S_IFCHR, S_IFBLK}) {
    fuse_mknod_in mk{};
    mk.mode = type | 0666;
    mk.rdev = makedev(1, 3);
    g.Call(FUSE_MKNOD, FUSE_ROOT_ID, Guest::Bytes(mk) + Guest::Name("dev"));
    EXPECT_EQ(g.err, EPERM);
  }
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::symlink_status(share_ / "dev")));
  fuse_mknod_in fifo{};
  fifo.mode = S_IFIFO | 0644;
  uint64_t fifo_node = 0;
  auto out = g.Call(FUSE_MKNOD, FUSE_ROOT_ID, Guest::Bytes(fifo) + Guest::Name("pipe"));
  ASSERT_EQ(g.err, 0);
  std::memcpy(&fifo_node, out.data(), sizeof fifo_node);
  // Opening a FIFO through the server never blocks it: refused.
  g.Open(fifo_node, O_RDONLY);
  EXPECT_EQ(g.err, EINVAL);
}

TEST_F(FuseServerTest, NewFilesBelongToTheGuestCallerOnlyWhenAskedAndRoot) {
  // Without owner_from_guest: whoever runs the server.
  auto plain = Server();
  Guest p(*plain);
  p.uid = 1234;
  p.gid = 2345;
  p.Mkdir(FUSE_ROOT_ID, "mine", 0755);
  struct stat st;
  ASSERT_EQ(stat((share_ / "mine").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, geteuid());
  if (geteuid() != 0) GTEST_SKIP() << "giving files to another uid needs root";
  FuseServerOptions options;
  options.owner_from_guest = true;
  auto server = Server(options);
  Guest g(*server);
  g.uid = 1234;
  g.gid = 2345;
  g.Create(FUSE_ROOT_ID, "theirs", 0644);
  ASSERT_EQ(g.err, 0);
  g.Mkdir(FUSE_ROOT_ID, "dir2", 0755);
  g.Call(FUSE_SYMLINK, FUSE_ROOT_ID, Guest::Name("link") + Guest::Name("target"));
  for (const char* name : {"theirs", "dir2", "link"}) {
    ASSERT_EQ(lstat((share_ / name).c_str(), &st), 0) << name;
    EXPECT_EQ(st.st_uid, 1234u) << name;
    EXPECT_EQ(st.st_gid, 2345u) << name;
  }
  // An existing file opened through CREATE keeps its owner.
  g.Create(FUSE_ROOT_ID, "mine", 0644);
  std::ofstream(share_ / "host.txt") << "x";
  g.Create(FUSE_ROOT_ID, "host.txt", 0644);
  ASSERT_EQ(g.err, 0);
  ASSERT_EQ(stat((share_ / "host.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 0u);
}

TEST_F(FuseServerTest, SingleFileShareIsItsFileAndNothingElse) {
  std::ofstream(share_ / "other") << "sibling";
  FuseServerOptions options;
  options.single_file = "other";
  auto server = Server(options);
  Guest g(*server);
  EXPECT_TRUE(S_ISREG(g.GetAttr(FUSE_ROOT_ID).mode));
  EXPECT_EQ(g.GetAttr(FUSE_ROOT_ID).size, 7u);
  uint64_t fh = g.Open(FUSE_ROOT_ID, O_RDWR);
  ASSERT_EQ(g.err, 0);
  EXPECT_EQ(g.Write(FUSE_ROOT_ID, fh, 0, "S"), 1u);
  EXPECT_EQ(ReadHost(share_ / "other"), "Sibling");
  g.Lookup(FUSE_ROOT_ID, "dir");
  EXPECT_EQ(g.err, ENOTDIR);
  g.Open(FUSE_ROOT_ID, O_RDONLY, true);
  EXPECT_NE(g.err, 0);
  g.Create(FUSE_ROOT_ID, "new", 0644);
  EXPECT_EQ(g.err, ENOTDIR);
  g.Call(FUSE_UNLINK, FUSE_ROOT_ID, Guest::Name("other"));
  EXPECT_EQ(g.err, ENOTDIR);
  EXPECT_EQ(share_.Entries(), 2u);
}

// A single-file overlay share: the root is the file's directory, showing
// only that file (overlayfs needs a directory as its lower); siblings stay
// unreachable and nothing changes on the host.
TEST_F(FuseServerTest, OnlyEntryShareShowsOneFileAndNothingElse) {
  std::ofstream(share_ / "other") << "sibling";
  FuseServerOptions options;
  options.only_entry = "other";
  options.read_only = true;
  auto server = Server(options);
  Guest g(*server);
  EXPECT_TRUE(S_ISDIR(g.GetAttr(FUSE_ROOT_ID).mode));
  EXPECT_EQ(g.List(FUSE_ROOT_ID), (std::vector<std::string>{"other"}));
  uint64_t other = g.Lookup(FUSE_ROOT_ID, "other");
  ASSERT_NE(other, 0u);
  uint64_t fh = g.Open(other, O_RDONLY);
  ASSERT_EQ(g.err, 0);
  EXPECT_EQ(g.Read(other, fh, 0, 100), "sibling");
  g.Release(other, fh);
  g.Lookup(FUSE_ROOT_ID, "dir");  // a sibling of the file
  EXPECT_EQ(g.err, ENOENT);
  g.Open(other, O_RDWR);
  EXPECT_EQ(g.err, EROFS);
  g.Create(FUSE_ROOT_ID, "new", 0644);
  EXPECT_NE(g.err, 0);
  g.Call(FUSE_UNLINK, FUSE_ROOT_ID, Guest::Name("other"));
  EXPECT_EQ(g.err, EPERM);
  EXPECT_EQ(share_.Entries(), 2u);
  EXPECT_EQ(ReadHost(share_ / "other"), "sibling");
  // Not both kinds at once.
  options.single_file = "other";
  EXPECT_FALSE(FuseServer::Open(share_.path(), options));
}

TEST_F(FuseServerTest, OpenDescriptorsAreBoundedAndReopenedByPath) {
  for (int i = 0; i < 300; ++i) std::ofstream(share_ / ("f" + std::to_string(i))) << i;
  auto server = Server();
  Guest g(*server);
  std::vector<std::pair<uint64_t, uint64_t>> open;
  for (int i = 0; i < 300; ++i) {
    uint64_t node = g.Lookup(FUSE_ROOT_ID, "f" + std::to_string(i));
    open.emplace_back(node, g.Open(node, O_RDONLY));
    ASSERT_EQ(g.err, 0);
  }
  EXPECT_LE(server->open_fd_count(), kFuseMaxOpenFds);
  for (int i = 0; i < 300; ++i)
    EXPECT_EQ(g.Read(open[i].first, open[i].second, 0, 10), std::to_string(i));
  EXPECT_LE(server->open_fd_count(), kFuseMaxOpenFds);
}

TEST_F(FuseServerTest, StateRoundTripKeepsNodesAndOpenHandles) {
  auto server = Server();
  Guest g(*server);
  uint64_t dir = g.Lookup(FUSE_ROOT_ID, "dir");
  uint64_t hello = g.Lookup(dir, "hello.txt");
  uint64_t fh = g.Open(hello, O_RDWR | O_APPEND);
  auto [created, cfh] = g.Create(dir, "log", 0644);
  g.Write(created, cfh, 0, "one\n");
  // Any bytes but '/' and NUL make a name, UTF-8 or not.
  std::string odd = "caf\xe9\x93";
  uint64_t odd_node = g.Mkdir(dir, odd, 0755);
  ASSERT_EQ(g.err, 0);
  std::string state = server->SaveState();

  // A fresh server (the restored sandbox's supervisor) answers the same ids
  // without a new INIT.
  auto restored = Server();
  ASSERT_TRUE(restored->LoadState(state)) << state;
  EXPECT_TRUE(restored->initialized());
  EXPECT_EQ(restored->node_count(), server->node_count());
  Guest r(*restored, false);
  EXPECT_EQ(r.Write(created, cfh, 4, "two\n"), 4u);
  EXPECT_EQ(r.err, 0);
  EXPECT_EQ(ReadHost(share_ / "dir/log"), "one\ntwo\n");
  EXPECT_EQ(r.Write(hello, fh, 0, "+"), 1u);  // O_APPEND kept
  EXPECT_EQ(ReadHost(share_ / "dir/hello.txt"), "hello world+");
  EXPECT_EQ(r.GetAttr(dir).mode & S_IFMT, static_cast<uint32_t>(S_IFDIR));
  EXPECT_EQ(r.Lookup(dir, "hello.txt"), hello);
  EXPECT_EQ(r.Lookup(dir, odd), odd_node);
  // New ids never collide with saved ones.
  auto [fresh, ffh] = r.Create(dir, "fresh", 0644);
  EXPECT_GT(fresh, created);
  EXPECT_GT(ffh, cfh);
  // A node whose file went away on the host answers ENOENT/ESTALE.
  std::filesystem::remove(share_ / "dir/hello.txt");
  r.GetAttr(hello);
  EXPECT_EQ(r.err, ENOENT);

  // Malformed states are refused and leave an empty table.
  for (
      std::string bad :
      {"", "[]", "{\"version\":2}",
       R"({"version":1,"initialized":true,"next_node":3,"next_fh":1,"nodes":[{"id":2,"parent":2,"name":"78","lookups":1}],"handles":[]})",
       R"({"version":1,"initialized":true,"next_node":3,"next_fh":1,"nodes":[{"id":2,"parent":1,"name":"2e2e","lookups":1}],"handles":[]})",
       R"({"version":1,"initialized":true,"next_node":3,"next_fh":1,"nodes":[{"id":2,"parent":1,"name":"zz","lookups":1}],"handles":[]})",
       R"({"version":1,"initialized":true,"next_node":3,"next_fh":2,"nodes":[],"handles":[{"fh":1,"node":9,"flags":0,"dir":false}]})"}) {
    auto again = Server();
    EXPECT_FALSE(again->LoadState(bad)) << bad;
    EXPECT_EQ(again->node_count(), 1u);
  }
}

}  // namespace
}  // namespace cella::share
