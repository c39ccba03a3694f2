// One piece (~600 lines) on purpose: every agent message's strict decoder
// and its encoder sit side by side, so a field change is made in one place
// for both directions.
#include "protocol/messages.h"

#include <cerrno>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <type_traits>

namespace cella::protocol {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxListItems = size_t{64} * 1024;  // argv/env entries

std::unexpected<Error> Invalid(std::string message) {
  return std::unexpected(Error{std::move(message), EINVAL});
}

std::string Dump(const json& j) {
  // Guest file names need not be UTF-8; replace rather than throw.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<json> ParseObject(std::string_view text, std::string_view what) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Invalid(std::string(what) + ": invalid JSON");
  if (!j.is_object()) return Invalid(std::string(what) + ": expected a JSON object");
  return j;
}

enum class Need { kOptional, kRequired };

// Reads typed fields out of one JSON object; remembers the first problem and
// which keys were read so Finish() can reject unknown ones.
class ObjectReader {
 public:
  ObjectReader(const json& obj, std::string what) : obj_(obj), what_(std::move(what)) {}

  const json* Find(const char* key, Need need) {
    seen_.insert(key);
    auto it = obj_.find(key);
    if (it == obj_.end()) {
      if (need == Need::kRequired) Problem(std::string("missing field \"") + key + "\"");
      return nullptr;
    }
    return &*it;
  }

  bool Str(const char* key, std::string& out, Need need) {
    const json* v = Find(key, need);
    if (!v) return false;
    return StrValue(*v, key, out);
  }

  bool StrValue(const json& v, std::string_view key, std::string& out) {
    if (!v.is_string()) return Problem("field \"" + std::string(key) + "\" must be a string");
    const auto& s = v.get_ref<const std::string&>();
    if (s.size() > kMaxStringBytes)
      return Problem("field \"" + std::string(key) + "\" is longer than " +
                     std::to_string(kMaxStringBytes) + " bytes");
    if (s.find('\0') != std::string::npos)
      return Problem("field \"" + std::string(key) + "\" contains a NUL byte");
    out = s;
    return true;
  }

  bool Bool(const char* key, bool& out) {
    const json* v = Find(key, Need::kOptional);
    if (!v) return false;
    if (!v->is_boolean()) return Problem(std::string("field \"") + key + "\" must be a boolean");
    out = v->get<bool>();
    return true;
  }

  template <class Int>
  bool Integer(const char* key, Int& out, Need need) {
    const json* v = Find(key, need);
    if (!v) return false;
    return IntValue(*v, key, out);
  }

  template <class Int>
  bool IntValue(const json& v, std::string_view key, Int& out) {
    std::string name = "field \"" + std::string(key) + "\"";
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<Int>::max()))
        return Problem(name + " is out of range");
      out = static_cast<Int>(u);
      return true;
    }
    if (v.is_number_integer()) {
      int64_t s = v.get<int64_t>();
      if constexpr (std::is_unsigned_v<Int>) {
        if (s < 0) return Problem(name + " must not be negative");
        if (static_cast<uint64_t>(s) > static_cast<uint64_t>(std::numeric_limits<Int>::max()))
          return Problem(name + " is out of range");
      } else {
        if (s < static_cast<int64_t>(std::numeric_limits<Int>::min()) ||
            s > static_cast<int64_t>(std::numeric_limits<Int>::max()))
          return Problem(name + " is out of range");
      }
      out = static_cast<Int>(s);
      return true;
    }
    return Problem(name + " must be an integer");
  }

  bool StrList(const char* key, std::vector<std::string>& out, Need need) {
    const json* v = Find(key, need);
    if (!v) return false;
    if (!v->is_array()) return Problem(std::string("field \"") + key + "\" must be an array");
    if (v->size() > kMaxListItems)
      return Problem(std::string("field \"") + key + "\" has too many entries");
    out.clear();
    for (const auto& item : *v) {
      std::string s;
      if (!StrValue(item, key, s)) return false;
      out.push_back(std::move(s));
    }
    return true;
  }

  bool Problem(std::string message) {
    if (!error_) error_ = std::move(message);
    return false;
  }

  Status Finish() {
    if (!error_) {
      for (const auto& [key, value] : obj_.items()) {
        if (!seen_.contains(key)) {
          error_ = "unknown field \"" + key + "\"";
          break;
        }
      }
    }
    if (error_) return Invalid(what_ + ": " + *error_);
    return {};
  }

 private:
  const json& obj_;
  std::string what_;
  std::set<std::string, std::less<>> seen_;
  std::optional<std::string> error_;
};

Result<FileType> ParseFileType(std::string_view name) {
  if (name == "file") return FileType::kFile;
  if (name == "dir") return FileType::kDir;
  if (name == "symlink") return FileType::kSymlink;
  if (name == "other") return FileType::kOther;
  return Invalid("unknown file type \"" + std::string(name) + "\"");
}

json FileInfoJson(const FileInfo& info) {
  json j = {{"name", info.name},
            {"size", info.size},
            {"mode", info.mode},
            {"mtime", info.mtime},
            {"type", std::string(FileTypeName(info.type))},
            {"uid", info.uid},
            {"gid", info.gid}};
  if (info.link_target) j["link_target"] = *info.link_target;
  return j;
}

// Agents before the owner fields left them out of list entries; stat has
// always carried them.
enum class Owner { kRequired, kOptional };

Result<FileInfo> FileInfoFromJson(const json& j, std::string_view what, Owner owner) {
  if (!j.is_object()) return Invalid(std::string(what) + ": expected a JSON object");
  ObjectReader r(j, std::string(what));
  FileInfo info;
  std::string type;
  r.Str("name", info.name, Need::kRequired);
  r.Integer("size", info.size, Need::kRequired);
  r.Integer("mode", info.mode, Need::kRequired);
  r.Integer("mtime", info.mtime, Need::kRequired);
  r.Str("type", type, Need::kRequired);
  Need need_owner = owner == Owner::kRequired ? Need::kRequired : Need::kOptional;
  r.Integer("uid", info.uid, need_owner);
  r.Integer("gid", info.gid, need_owner);
  std::string target;
  if (r.Str("link_target", target, Need::kOptional)) info.link_target = std::move(target);
  CELLA_TRY(r.Finish());
  if (info.mode > 07777) return Invalid(std::string(what) + ": mode has bits beyond 07777");
  info.type = CELLA_TRY_CTX(ParseFileType(type), what);
  if (info.link_target) {
    if (info.type != FileType::kSymlink)
      return Invalid(std::string(what) + ": link_target on a non-symlink");
    if (info.link_target->empty() || info.link_target->size() > kMaxLinkTarget)
      return Invalid(std::string(what) + ": link_target must be 1.." +
                     std::to_string(kMaxLinkTarget) + " bytes");
  }
  return info;
}

template <class Body, class Fn>
Result<Body> DecodeWith(std::string_view text, std::string_view what, Fn&& fn) {
  // nlohmann may throw on paths we did not foresee; nothing escapes here.
  try {
    json j = CELLA_TRY(ParseObject(text, what));
    return fn(j);
  } catch (const std::exception& e) {
    return Invalid(std::string(what) + ": " + e.what());
  }
}

}  // namespace

std::string_view FileTypeName(FileType type) {
  switch (type) {
    case FileType::kFile:
      return "file";
    case FileType::kDir:
      return "dir";
    case FileType::kSymlink:
      return "symlink";
    case FileType::kOther:
      return "other";
  }
  return "other";
}

std::string EncodeHello(const Hello& hello) {
  return Dump({{"version", hello.version}, {"role", hello.role == Role::kHost ? "host" : "agent"}});
}

Result<Hello> DecodeHello(std::string_view text) {
  return DecodeWith<Hello>(text, "hello", [](const json& j) -> Result<Hello> {
    ObjectReader r(j, "hello");
    Hello hello;
    std::string role;
    r.Integer("version", hello.version, Need::kRequired);
    r.Str("role", role, Need::kRequired);
    CELLA_TRY(r.Finish());
    if (role == "host") {
      hello.role = Role::kHost;
    } else if (role == "agent") {
      hello.role = Role::kAgent;
    } else {
      return Invalid("hello: unknown role \"" + role + "\"");
    }
    return hello;
  });
}

std::string_view RequestOpName(const Request& request) {
  struct Visitor {
    std::string_view operator()(const ExecRequest&) { return "exec"; }
    std::string_view operator()(const WriteFileRequest&) { return "write_file"; }
    std::string_view operator()(const ReadFileRequest&) { return "read_file"; }
    std::string_view operator()(const ListRequest&) { return "list"; }
    std::string_view operator()(const StatRequest&) { return "stat"; }
    std::string_view operator()(const MkdirRequest&) { return "mkdir"; }
    std::string_view operator()(const RemoveRequest&) { return "remove"; }
    std::string_view operator()(const PortForwardRequest&) { return "port_forward"; }
    std::string_view operator()(const AttachMainRequest&) { return "attach_main"; }
    std::string_view operator()(const ShutdownRequest&) { return "shutdown"; }
    std::string_view operator()(const SymlinkRequest&) { return "symlink"; }
    std::string_view operator()(const SetAttrRequest&) { return "set_attr"; }
    std::string_view operator()(const ResumedRequest&) { return "resumed"; }
    std::string_view operator()(const ServeShareRequest&) { return "serve_share"; }
    std::string_view operator()(const SharesMountedRequest&) { return "shares_mounted"; }
    std::string_view operator()(const ReleaseRequest&) { return "release"; }
  };
  return std::visit(Visitor{}, request);
}

std::string EncodeRequest(const Request& request) {
  json j = {{"op", std::string(RequestOpName(request))}};
  if (auto* e = std::get_if<ExecRequest>(&request)) {
    j["argv"] = e->argv;
    j["env"] = e->env;
    if (!e->workdir.empty()) j["workdir"] = e->workdir;
    if (!e->user.empty()) j["user"] = e->user;
    j["tty"] = e->tty;
    j["rows"] = e->rows;
    j["cols"] = e->cols;
    j["stdin"] = e->stdin_open;
    j["timeout_ms"] = e->timeout_ms;
    j["kill_grace_ms"] = e->kill_grace_ms;
    if (e->privileged) j["privileged"] = true;
    if (e->detach) j["detach"] = true;
  } else if (auto* w = std::get_if<WriteFileRequest>(&request)) {
    j["path"] = w->path;
    j["mode"] = w->mode;
    if (w->uid) j["uid"] = *w->uid;
    if (w->gid) j["gid"] = *w->gid;
    j["mkdirs"] = w->mkdirs;
    if (w->mtime) j["mtime"] = *w->mtime;
  } else if (auto* rf = std::get_if<ReadFileRequest>(&request)) {
    j["path"] = rf->path;
  } else if (auto* l = std::get_if<ListRequest>(&request)) {
    j["path"] = l->path;
  } else if (auto* s = std::get_if<StatRequest>(&request)) {
    j["path"] = s->path;
  } else if (auto* m = std::get_if<MkdirRequest>(&request)) {
    j["path"] = m->path;
    j["mode"] = m->mode;
    if (m->uid) j["uid"] = *m->uid;
    if (m->gid) j["gid"] = *m->gid;
  } else if (auto* rm = std::get_if<RemoveRequest>(&request)) {
    j["path"] = rm->path;
    j["recursive"] = rm->recursive;
  } else if (auto* p = std::get_if<PortForwardRequest>(&request)) {
    j["port"] = p->port;
  } else if (auto* ss = std::get_if<ServeShareRequest>(&request)) {
    j["index"] = ss->index;
  } else if (auto* sd = std::get_if<ShutdownRequest>(&request)) {
    // Omitted at 0 so an agent that predates the field still accepts it.
    if (sd->grace_ms != 0) j["grace_ms"] = sd->grace_ms;
  } else if (auto* rs = std::get_if<ResumedRequest>(&request)) {
    j["realtime_ns"] = rs->realtime_ns;
    if (!rs->rng_seed.empty()) {
      static constexpr char kHex[] = "0123456789abcdef";
      std::string hex;
      hex.reserve(rs->rng_seed.size() * 2);
      for (uint8_t b : rs->rng_seed) {
        hex += kHex[b >> 4];
        hex += kHex[b & 15];
      }
      j["rng_seed"] = hex;
    }
  } else if (auto* ln = std::get_if<SymlinkRequest>(&request)) {
    j["path"] = ln->path;
    j["target"] = ln->target;
    if (ln->uid) j["uid"] = *ln->uid;
    if (ln->gid) j["gid"] = *ln->gid;
    if (ln->mtime) j["mtime"] = *ln->mtime;
  } else if (auto* sa = std::get_if<SetAttrRequest>(&request)) {
    j["path"] = sa->path;
    if (sa->mode) j["mode"] = *sa->mode;
    if (sa->uid) j["uid"] = *sa->uid;
    if (sa->gid) j["gid"] = *sa->gid;
    if (sa->mtime) j["mtime"] = *sa->mtime;
  }
  return Dump(j);
}

Result<Request> DecodeRequest(std::string_view text) {
  return DecodeWith<Request>(text, "request", [](const json& j) -> Result<Request> {
    ObjectReader r(j, "request");
    std::string op;
    if (!r.Str("op", op, Need::kRequired)) CELLA_TRY(r.Finish());
    Request request;
    auto need_path = [&](std::string& path) {
      if (r.Str("path", path, Need::kRequired) && path.empty()) r.Problem("\"path\" is empty");
    };
    auto check_mode = [&](uint32_t mode) {
      if (mode > 07777) r.Problem("\"mode\" has bits beyond 07777");
    };
    // uid/gid -1 means "leave unchanged" to chown(2): refuse it as an id.
    auto owner = [&](const char* key, std::optional<uint32_t>& out) {
      uint32_t id = 0;
      if (!r.Integer(key, id, Need::kOptional)) return;
      if (id == std::numeric_limits<uint32_t>::max())
        r.Problem(std::string("\"") + key + "\" is 4294967295, which is not an id");
      out = id;
    };
    auto mtime = [&](std::optional<int64_t>& out) {
      int64_t seconds = 0;
      if (r.Integer("mtime", seconds, Need::kOptional)) out = seconds;
    };
    if (op == "exec") {
      ExecRequest e;
      if (r.StrList("argv", e.argv, Need::kRequired) && e.argv.empty())
        r.Problem("\"argv\" is empty");
      if (r.StrList("env", e.env, Need::kOptional)) {
        for (const auto& kv : e.env)
          if (kv.find('=') == std::string::npos || kv.front() == '=')
            r.Problem("env entry \"" + kv + "\" is not NAME=VALUE");
      }
      r.Str("workdir", e.workdir, Need::kOptional);
      r.Str("user", e.user, Need::kOptional);
      r.Bool("tty", e.tty);
      r.Integer("rows", e.rows, Need::kOptional);
      r.Integer("cols", e.cols, Need::kOptional);
      r.Bool("stdin", e.stdin_open);
      r.Integer("timeout_ms", e.timeout_ms, Need::kOptional);
      r.Integer("kill_grace_ms", e.kill_grace_ms, Need::kOptional);
      r.Bool("privileged", e.privileged);
      r.Bool("detach", e.detach);
      if (e.detach && (e.tty || e.stdin_open)) r.Problem("detach goes with neither tty nor stdin");
      request = std::move(e);
    } else if (op == "write_file") {
      WriteFileRequest w;
      need_path(w.path);
      r.Integer("mode", w.mode, Need::kOptional);
      check_mode(w.mode);
      owner("uid", w.uid);
      owner("gid", w.gid);
      r.Bool("mkdirs", w.mkdirs);
      mtime(w.mtime);
      request = std::move(w);
    } else if (op == "read_file") {
      ReadFileRequest rf;
      need_path(rf.path);
      request = std::move(rf);
    } else if (op == "list") {
      ListRequest l;
      need_path(l.path);
      request = std::move(l);
    } else if (op == "stat") {
      StatRequest s;
      need_path(s.path);
      request = std::move(s);
    } else if (op == "mkdir") {
      MkdirRequest m;
      need_path(m.path);
      r.Integer("mode", m.mode, Need::kOptional);
      check_mode(m.mode);
      owner("uid", m.uid);
      owner("gid", m.gid);
      request = std::move(m);
    } else if (op == "remove") {
      RemoveRequest rm;
      need_path(rm.path);
      r.Bool("recursive", rm.recursive);
      request = std::move(rm);
    } else if (op == "port_forward") {
      PortForwardRequest p;
      if (r.Integer("port", p.port, Need::kRequired) && p.port == 0) r.Problem("\"port\" is 0");
      request = p;
    } else if (op == "attach_main") {
      request = AttachMainRequest{};
    } else if (op == "serve_share") {
      ServeShareRequest ss;
      if (r.Integer("index", ss.index, Need::kRequired) && ss.index >= kMaxShares)
        r.Problem("\"index\" is not below " + std::to_string(kMaxShares));
      request = ss;
    } else if (op == "shares_mounted") {
      request = SharesMountedRequest{};
    } else if (op == "release") {
      request = ReleaseRequest{};
    } else if (op == "shutdown") {
      ShutdownRequest sd;
      if (r.Integer("grace_ms", sd.grace_ms, Need::kOptional) && sd.grace_ms > kMaxShutdownGraceMs)
        r.Problem("\"grace_ms\" is above " + std::to_string(kMaxShutdownGraceMs));
      request = sd;
    } else if (op == "resumed") {
      ResumedRequest rs;
      if (r.Integer("realtime_ns", rs.realtime_ns, Need::kRequired) && rs.realtime_ns <= 0)
        r.Problem("\"realtime_ns\" must be positive");
      std::string hex;
      if (r.Str("rng_seed", hex, Need::kOptional)) {
        auto nibble = [](char c) -> int {
          if (c >= '0' && c <= '9') return c - '0';
          if (c >= 'a' && c <= 'f') return c - 'a' + 10;
          return -1;
        };
        bool ok =
            hex.size() % 2 == 0 && hex.size() / 2 >= kMinRngSeed && hex.size() / 2 <= kMaxRngSeed;
        for (size_t i = 0; ok && i < hex.size(); i += 2) {
          int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
          if (hi < 0 || lo < 0)
            ok = false;
          else
            rs.rng_seed.push_back(static_cast<uint8_t>(hi << 4 | lo));
        }
        if (!ok)
          r.Problem("\"rng_seed\" must be " + std::to_string(kMinRngSeed) + ".." +
                    std::to_string(kMaxRngSeed) + " bytes in lowercase hex");
      }
      request = rs;
    } else if (op == "symlink") {
      SymlinkRequest ln;
      need_path(ln.path);
      if (r.Str("target", ln.target, Need::kRequired) &&
          (ln.target.empty() || ln.target.size() > kMaxLinkTarget))
        r.Problem("\"target\" must be 1.." + std::to_string(kMaxLinkTarget) + " bytes");
      owner("uid", ln.uid);
      owner("gid", ln.gid);
      mtime(ln.mtime);
      request = std::move(ln);
    } else if (op == "set_attr") {
      SetAttrRequest sa;
      need_path(sa.path);
      uint32_t mode = 0;
      if (r.Integer("mode", mode, Need::kOptional)) {
        check_mode(mode);
        sa.mode = mode;
      }
      owner("uid", sa.uid);
      owner("gid", sa.gid);
      mtime(sa.mtime);
      if (!sa.mode && !sa.uid && !sa.gid && !sa.mtime)
        r.Problem("set_attr needs at least one of mode, uid, gid, mtime");
      request = std::move(sa);
    } else {
      return Invalid("request: unknown op \"" + op + "\"");
    }
    CELLA_TRY(r.Finish());
    return request;
  });
}

std::string EncodeExecOutcome(const ExecOutcome& outcome) {
  json j = json::object();
  if (outcome.exit_code) j["exit_code"] = *outcome.exit_code;
  if (outcome.signal) j["signal"] = *outcome.signal;
  if (outcome.timed_out) j["timed_out"] = true;
  return Dump(j);
}

Result<ExecOutcome> DecodeExecOutcome(std::string_view text) {
  return DecodeWith<ExecOutcome>(text, "exec result", [](const json& j) -> Result<ExecOutcome> {
    ObjectReader r(j, "exec result");
    ExecOutcome out;
    int value = 0;
    if (r.Integer("exit_code", value, Need::kOptional)) out.exit_code = value;
    if (r.Integer("signal", value, Need::kOptional)) out.signal = value;
    r.Bool("timed_out", out.timed_out);
    CELLA_TRY(r.Finish());
    if (out.exit_code.has_value() == out.signal.has_value())
      return Invalid("exec result: needs exactly one of \"exit_code\" and \"signal\"");
    if (out.exit_code && (*out.exit_code < 0 || *out.exit_code > 255))
      return Invalid("exec result: exit_code out of range");
    if (out.signal && (*out.signal <= 0 || *out.signal >= 128))
      return Invalid("exec result: signal out of range");
    return out;
  });
}

std::string EncodePid(int64_t pid) { return Dump({{"pid", pid}}); }

Result<int64_t> DecodePid(std::string_view text) {
  return DecodeWith<int64_t>(text, "exec opened", [](const json& j) -> Result<int64_t> {
    ObjectReader r(j, "exec opened");
    int64_t pid = 0;
    r.Integer("pid", pid, Need::kRequired);
    CELLA_TRY(r.Finish());
    if (pid <= 0) return Invalid("exec opened: pid must be positive");
    return pid;
  });
}

std::string EncodeReadFileOpened(const ReadFileOpened& opened) {
  return Dump({{"size", opened.size}, {"mode", opened.mode}});
}

Result<ReadFileOpened> DecodeReadFileOpened(std::string_view text) {
  return DecodeWith<ReadFileOpened>(
      text, "read_file opened", [](const json& j) -> Result<ReadFileOpened> {
        ObjectReader r(j, "read_file opened");
        ReadFileOpened out;
        r.Integer("size", out.size, Need::kRequired);
        r.Integer("mode", out.mode, Need::kRequired);
        CELLA_TRY(r.Finish());
        if (out.mode > 07777) return Invalid("read_file opened: mode has bits beyond 07777");
        return out;
      });
}

std::string EncodeSize(uint64_t size) { return Dump({{"size", size}}); }

Result<uint64_t> DecodeSize(std::string_view text) {
  return DecodeWith<uint64_t>(text, "size result", [](const json& j) -> Result<uint64_t> {
    ObjectReader r(j, "size result");
    uint64_t size = 0;
    r.Integer("size", size, Need::kRequired);
    CELLA_TRY(r.Finish());
    return size;
  });
}

std::string EncodeFileInfo(const FileInfo& info) { return Dump(FileInfoJson(info)); }

Result<FileInfo> DecodeFileInfo(std::string_view text) {
  return DecodeWith<FileInfo>(text, "stat result", [](const json& j) -> Result<FileInfo> {
    return FileInfoFromJson(j, "stat result", Owner::kRequired);
  });
}

std::string EncodeList(const std::vector<FileInfo>& entries) {
  json list = json::array();
  for (const auto& e : entries) list.push_back(FileInfoJson(e));
  return Dump({{"entries", std::move(list)}});
}

Result<std::vector<FileInfo>> DecodeList(std::string_view text) {
  return DecodeWith<std::vector<FileInfo>>(
      text, "list result", [](const json& j) -> Result<std::vector<FileInfo>> {
        ObjectReader r(j, "list result");
        const json* entries = r.Find("entries", Need::kRequired);
        CELLA_TRY(r.Finish());
        if (!entries->is_array()) return Invalid("list result: \"entries\" must be an array");
        if (entries->size() > kMaxListEntries) return Invalid("list result: too many entries");
        std::vector<FileInfo> out;
        out.reserve(entries->size());
        for (const auto& e : *entries)
          out.push_back(CELLA_TRY(FileInfoFromJson(e, "list result entry", Owner::kOptional)));
        return out;
      });
}

std::string EncodeEmpty() { return "{}"; }

Status DecodeEmpty(std::string_view text) {
  auto r = DecodeWith<bool>(text, "result", [](const json& j) -> Result<bool> {
    if (!j.empty()) return Invalid("result: expected {}");
    return true;
  });
  if (!r) return std::unexpected(r.error());
  return {};
}

std::string EncodeError(const ErrorBody& error) {
  return Dump({{"errno", error.errno_value}, {"message", error.message}});
}

Result<ErrorBody> DecodeError(std::string_view text) {
  return DecodeWith<ErrorBody>(text, "error", [](const json& j) -> Result<ErrorBody> {
    ObjectReader r(j, "error");
    ErrorBody out;
    r.Integer("errno", out.errno_value, Need::kRequired);
    r.Str("message", out.message, Need::kRequired);
    CELLA_TRY(r.Finish());
    if (out.errno_value < 0 || out.errno_value > 4095) return Invalid("error: errno out of range");
    return out;
  });
}

Error ErrorFromBody(const ErrorBody& body) {
  return Error{"agent: " + body.message, body.errno_value};
}

Status CheckAgentHello(const Frame& first) {
  auto violation = [](std::string message) {
    return std::unexpected(Error{std::move(message), EPROTO});
  };
  if (first.stream_id == 0 && first.type == FrameType::kError) {
    auto body = DecodeError(first.PayloadText());
    if (!body) return violation("malformed Error during the handshake");
    return std::unexpected(ErrorFromBody(*body));
  }
  if (first.stream_id != 0 || first.type != FrameType::kHello)
    return violation("the first frame from the agent is not Hello");
  auto hello = DecodeHello(first.PayloadText());
  if (!hello) return violation(hello.error().message);
  if (hello->role != Role::kAgent) return violation("peer is not an agent");
  if (hello->version != kProtocolVersion)
    return std::unexpected(Error{"agent speaks protocol version " + std::to_string(hello->version) +
                                     ", host speaks " + std::to_string(kProtocolVersion),
                                 EPROTONOSUPPORT});
  return {};
}

}  // namespace cella::protocol
