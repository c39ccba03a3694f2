// Typed request/reply bodies for the agent protocol (src/protocol/README.md)
// and their JSON encoding. Decoding is strict: wrong types, missing required
// fields, unknown fields and out-of-range numbers are errors (errno EINVAL),
// and no decode function throws — the host feeds it untrusted guest JSON.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/result.h"
#include "protocol/wire.h"

namespace cella::protocol {

enum class Role { kHost, kAgent };

struct Hello {
  uint32_t version = 0;
  Role role = Role::kHost;
};

// exec / attach_main. `env` is passed to the child exactly as given (no
// inheritance from the agent); the agent adds HOME from the user's passwd
// entry when env has none, and resolves a bare argv[0] with env's PATH, or
// the usual default PATH when env has none.
struct ExecRequest {
  std::vector<std::string> argv;
  std::vector<std::string> env;
  std::string workdir;  // empty: "/"
  std::string user;     // empty: the agent's own identity
  bool tty = false;
  uint16_t rows = 24;
  uint16_t cols = 80;
  bool stdin_open = false;  // JSON "stdin": false gives the child /dev/null
  uint32_t timeout_ms = 0;  // 0: none
  uint32_t kill_grace_ms = 2000;
  // Skips the agent's hardening (no_new_privs, capability drop, seccomp).
  bool privileged = false;
  // `exec -d`: the child gets /dev/null for stdin, stdout and stderr and is
  // not tracked; the agent answers Opened {pid} then Result {exit_code 0}
  // at once and reaps it silently later. Not with tty or stdin.
  bool detach = false;
};

struct WriteFileRequest {
  std::string path;
  uint32_t mode = 0644;
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
  bool mkdirs = false;
  std::optional<int64_t> mtime;  // seconds since the epoch; absent: the time of writing
};

struct ReadFileRequest {
  std::string path;
};
struct ListRequest {
  std::string path;
};
struct StatRequest {
  std::string path;
};
struct MkdirRequest {
  std::string path;
  uint32_t mode = 0755;
  // Owner of the final component, applied only when this request created
  // it (parents and an existing directory are left as they are).
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
};
struct RemoveRequest {
  std::string path;
  bool recursive = false;
};
struct PortForwardRequest {
  uint16_t port = 0;
};
struct AttachMainRequest {};
// Host share `index` (config.json host_shares[index], transport "fuse"): the
// agent mounts FUSE at the share's path (once per boot; a later link
// re-attaches to the same mount) and relays raw /dev/fuse messages on the
// stream: requests guest -> host on stdout, replies host -> guest on stdin,
// each a whole FUSE message (its header carries its length). Opened once
// mounted; the stream never ends by itself.
inline constexpr uint32_t kMaxShares = 64;
struct ServeShareRequest {
  uint32_t index = 0;
};
// Result {} once every FUSE share is in place in the guest, with whatever
// is mounted beneath or over it (overlay layers, volumes, tmpfs, nested
// shares): those mounts look names up through the shares, so they are made
// while the host serves them. Error (with what failed) if one could not be
// made. Answered at once when there is nothing to wait for.
struct SharesMountedRequest {};

// Longest grace a shutdown may ask for; larger values are refused.
inline constexpr uint32_t kMaxShutdownGraceMs = 10 * 60 * 1000;
struct ShutdownRequest {
  // How long the guest's processes get between SIGTERM and SIGKILL before
  // power-off. 0: the guest's default (1 s).
  uint32_t grace_ms = 0;
};

// The host woke the VM from a snapshot (cella resume / snapshot restore):
// the guest's wall clock stood still while it slept, so the agent sets
// CLOCK_REALTIME to realtime_ns (the host's, nanoseconds since the epoch)
// and counts the resume (/run/cella/resume-count). Result:
// {"resume_count":N}. With `rng_seed` (fresh host random bytes, sent as
// lowercase hex, kMinRngSeed..kMaxRngSeed bytes) the agent also mixes them
// into the kernel's RNG and forces a reseed, so copies of one snapshot do
// not go on with the same random state. Absent = no reseed (an older host).
inline constexpr size_t kMinRngSeed = 16;
inline constexpr size_t kMaxRngSeed = 512;
struct ResumedRequest {
  int64_t realtime_ns = 0;
  std::vector<uint8_t> rng_seed;
};

// The host is about to save the VM (snapshot, standby, fork). The agent
// answers {} and then ends this link as if the host had closed it (sessions
// abandoned, the main process detached): it reads nothing more from the
// link. On a virtio port it then opens the port anew and sends the Result
// from there; elsewhere the Result goes out last on the link. So the VM may
// be stopped as soon as the host has the Result, and a restored copy meets
// an agent that waits for its own host, which speaks first.
struct ReleaseRequest {};

// Longest symlink target (PATH_MAX including the NUL).
inline constexpr size_t kMaxLinkTarget = 4095;

// Creates a symlink at path pointing to target, replacing an existing
// non-directory atomically. uid/gid: lchown; mtime: the link's own mtime.
struct SymlinkRequest {
  std::string path;
  std::string target;
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
  std::optional<int64_t> mtime;
};

// Changes attributes of path without following a final symlink. At least
// one field is set. Applied as chown, chmod, then mtime (chown clears
// setuid/setgid; chmod after it restores them). A symlink has no mode of
// its own: mode on a symlink fails with EOPNOTSUPP.
struct SetAttrRequest {
  std::string path;
  std::optional<uint32_t> mode;
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
  std::optional<int64_t> mtime;
};

using Request =
    std::variant<ExecRequest, WriteFileRequest, ReadFileRequest, ListRequest, StatRequest,
                 MkdirRequest, RemoveRequest, PortForwardRequest, AttachMainRequest,
                 ShutdownRequest, SymlinkRequest, SetAttrRequest, ResumedRequest, ServeShareRequest,
                 SharesMountedRequest, ReleaseRequest>;

enum class FileType { kFile, kDir, kSymlink, kOther };
std::string_view FileTypeName(FileType type);

struct FileInfo {
  std::string name;
  uint64_t size = 0;
  uint32_t mode = 0;  // permission bits (07777)
  int64_t mtime = 0;  // seconds since the epoch
  FileType type = FileType::kOther;
  uint32_t uid = 0;  // a list from an agent older than this field reports 0
  uint32_t gid = 0;
  // Symlinks only (stat and list): where the link points, never followed.
  // Absent when the agent could not read it.
  std::optional<std::string> link_target;
};

struct ExecOutcome {
  // Exactly one of exit_code / signal is set.
  std::optional<int> exit_code;
  std::optional<int> signal;
  bool timed_out = false;
};

struct ReadFileOpened {
  uint64_t size = 0;
  uint32_t mode = 0;
};

struct ErrorBody {
  int errno_value = 0;
  std::string message;
};

// Upper bounds the decoders enforce on untrusted input.
inline constexpr size_t kMaxStringBytes = size_t{64} * 1024;
inline constexpr size_t kMaxListEntries = 1u << 20;

std::string EncodeHello(const Hello& hello);
Result<Hello> DecodeHello(std::string_view json);

std::string EncodeRequest(const Request& request);
Result<Request> DecodeRequest(std::string_view json);
std::string_view RequestOpName(const Request& request);

std::string EncodeExecOutcome(const ExecOutcome& outcome);
Result<ExecOutcome> DecodeExecOutcome(std::string_view json);

// Opened bodies: {"pid":N} for exec, {"size","mode"} for read_file, {} else.
std::string EncodePid(int64_t pid);
Result<int64_t> DecodePid(std::string_view json);
std::string EncodeReadFileOpened(const ReadFileOpened& opened);
Result<ReadFileOpened> DecodeReadFileOpened(std::string_view json);

// {"size":N}: write_file and read_file results.
std::string EncodeSize(uint64_t size);
Result<uint64_t> DecodeSize(std::string_view json);

std::string EncodeFileInfo(const FileInfo& info);  // stat result
Result<FileInfo> DecodeFileInfo(std::string_view json);
std::string EncodeList(const std::vector<FileInfo>& entries);
Result<std::vector<FileInfo>> DecodeList(std::string_view json);

// "{}" — results of mkdir/remove/port_forward/shutdown/symlink/set_attr.
// Anything else fails.
std::string EncodeEmpty();
Status DecodeEmpty(std::string_view json);

std::string EncodeError(const ErrorBody& error);
Result<ErrorBody> DecodeError(std::string_view json);
// Turns a received Error body into an Error keeping its errno.
Error ErrorFromBody(const ErrorBody& body);

// The host's check of the agent's first frame on a link: a Hello from an
// agent speaking our version. Errors: the agent's own (an Error frame, with
// its errno), EPROTONOSUPPORT for another version, EPROTO for anything else.
Status CheckAgentHello(const Frame& first);

}  // namespace cella::protocol
