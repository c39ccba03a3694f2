// One piece (~900 lines) on purpose: the JSON-RPC dispatch, its ordering
// rules (create/close/cancel and notifications in arrival order, the rest
// concurrent) and the in-flight table they share belong to one reader.
#include "host/rpc/server.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <deque>

#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"
#include "host/rpc/base64.h"

namespace cella::rpc {

using nlohmann::json;

struct Server::Call {
  json id;
  std::string key;  // id.dump(): the in-flight map's key
  std::atomic<bool> answered{false};
  std::mutex mu;
  bool cancelled = false;           // guarded by mu
  std::function<void()> on_cancel;  // guarded by mu; kills what the call started
  // exec_pipe / exec_tty: the client's stdin and resize notifications, in
  // arrival order, for PumpInput. Accepted once the process started
  // (input_open) until it ended or stalled.
  struct Input {
    enum class Kind { kData, kEof, kResize } kind = Kind::kData;
    std::string bytes;
    uint16_t rows = 0, cols = 0;
  };
  bool input_open = false;           // guarded by mu
  std::deque<Input> input;           // guarded by mu
  size_t input_bytes = 0;            // guarded by mu
  uint64_t input_taken = 0;          // guarded by mu; items the guest took
  std::condition_variable input_cv;  // input added or taken, or input_open cleared
};

namespace {

// A request's params failed validation: answered −32602.
struct ParamError {
  std::string message;
};

const json& RequireObject(const json& params) {
  if (!params.is_object()) throw ParamError{"params: want an object"};
  return params;
}

std::string RequireString(const json& params, const char* key) {
  auto it = RequireObject(params).find(key);
  if (it == params.end() || !it->is_string())
    throw ParamError{std::string(key) + ": want a string"};
  return it->get<std::string>();
}

std::string OptionalString(const json& params, const char* key) {
  auto it = RequireObject(params).find(key);
  if (it == params.end() || it->is_null()) return {};
  if (!it->is_string()) throw ParamError{std::string(key) + ": want a string"};
  return it->get<std::string>();
}

int64_t UnixNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// A TCP port from params: an integer in [min, 65535].
uint16_t RequirePort(const json& object, const char* key, int min,
                     const char* where = "forwards[].") {
  auto it = object.find(key);
  if (it == object.end() || !it->is_number_integer() || it->get<int64_t>() < min ||
      it->get<int64_t>() > 65535)
    throw ParamError{std::string(where) + key + ": want a port number (" + std::to_string(min) +
                     "-65535)"};
  return static_cast<uint16_t>(it->get<int64_t>());
}

int64_t MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                               start)
      .count();
}

}  // namespace

Server::Server(SandboxFactory factory, int in_fd, int out_fd, ServerOptions options,
               SandboxAttacher attacher)
    : factory_(std::move(factory)),
      attacher_(std::move(attacher)),
      in_fd_(in_fd),
      out_fd_(out_fd),
      options_(options) {}

Server::~Server() { Teardown(); }

Status Server::Serve() {
  std::string buffer;
  size_t scanned = 0;       // bytes of buffer known to hold no '\n'
  bool discarding = false;  // inside an oversized line: drop up to its '\n'
  std::vector<std::byte> chunk(64 << 10);
  Status outcome;
  while (!closed_) {
    ReapFinished();
    // No time-out: the client decides when to send; its EOF ends the server.
    auto got = ReadSome(in_fd_, chunk);
    if (!got) {
      outcome = std::unexpected(got.error());
      break;
    }
    if (*got == 0) {
      if (!discarding && !buffer.empty()) HandleLine(buffer);  // a last line without '\n'
      break;
    }
    buffer.append(reinterpret_cast<const char*>(chunk.data()), *got);
    for (;;) {
      size_t nl = buffer.find('\n', scanned);
      if (nl == std::string::npos) {
        scanned = buffer.size();
        break;
      }
      if (discarding) {
        // the tail of an oversized line, answered already
      } else if (nl > options_.max_line_bytes) {
        SendError(nullptr, kInvalidRequest,
                  "Invalid Request: line longer than " + std::to_string(options_.max_line_bytes) +
                      " bytes");
      } else {
        HandleLine(std::string_view(buffer).substr(0, nl));
      }
      discarding = false;
      buffer.erase(0, nl + 1);
      scanned = 0;
      if (closed_) break;
    }
    if (buffer.size() > options_.max_line_bytes) {
      if (!discarding)
        SendError(nullptr, kInvalidRequest,
                  "Invalid Request: line longer than " + std::to_string(options_.max_line_bytes) +
                      " bytes");
      discarding = true;
      buffer.clear();
      scanned = 0;
    }
  }
  Teardown();
  return outcome;
}

void Server::HandleLine(std::string_view line) {
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t'))
    line.remove_suffix(1);
  if (line.empty()) return;
  json message;
  try {
    message = json::parse(line);
  } catch (const json::exception& e) {
    SendError(nullptr, kParseError, std::string("Parse error: ") + e.what());
    return;
  }
  if (!message.is_object()) {
    SendError(nullptr, kInvalidRequest, "Invalid Request: want a JSON object");
    return;
  }
  json id = nullptr;
  bool has_id = false;
  if (auto it = message.find("id"); it != message.end()) {
    if (!it->is_number_integer() && !it->is_number_unsigned() && !it->is_string()) {
      SendError(nullptr, kInvalidRequest, "Invalid Request: id must be an integer or a string");
      return;
    }
    id = *it;
    has_id = true;
  }
  auto version = message.find("jsonrpc");
  if (version == message.end() || *version != "2.0") {
    SendError(id, kInvalidRequest, "Invalid Request: jsonrpc must be \"2.0\"");
    return;
  }
  auto method = message.find("method");
  if (method == message.end() || !method->is_string()) {
    SendError(id, kInvalidRequest, "Invalid Request: method must be a string");
    return;
  }
  json params = json::object();
  if (auto it = message.find("params"); it != message.end() && !it->is_null()) params = *it;
  if (!has_id) {
    // A notification: never answered, handled here in arrival order.
    HandleExecInput(method->get<std::string>(), params);
    return;
  }
  HandleRequest(std::move(id), method->get<std::string>(), std::move(params));
}

void Server::HandleRequest(json id, const std::string& method, json params) {
  auto call = std::make_shared<Call>();
  call->id = id;
  call->key = id.dump();
  try {
    if (method == "create") {
      WaitIdle(options_.drain_timeout);
      Answer(*call, DoCreate(*call, params));
      return;
    }
    if (method == "cella.attach") {
      WaitIdle(options_.drain_timeout);
      Answer(*call, DoAttach(*call, params));
      return;
    }
    if (method == "close") {
      Answer(*call, DoClose(*call, params));
      return;
    }
    if (method == "cancel") {
      DoCancel(*call, params);
      return;
    }
  } catch (const ParamError& e) {
    AnswerError(*call, kInvalidParams, "Invalid params: " + e.message);
    return;
  } catch (const std::exception& e) {
    AnswerError(*call, kInternalError, std::string("Internal error: ") + e.what());
    return;
  }
  if (method != "exec" && method != "exec_stream" && method != "exec_pipe" &&
      method != "exec_tty" && method != "write_file" && method != "read_file" &&
      method != "list_files" && method != "allow_list_add" && method != "allow_list_delete" &&
      method != "log" && method != "log_stream" && method != "port_forward" &&
      method != "cella.port_forward_close" && method != "cella.fork") {
    AnswerError(*call, kMethodNotFound, "Method not found: " + method);
    return;
  }
  std::lock_guard lock(mu_);
  if (in_flight_.size() >= options_.max_in_flight) {
    AnswerError(*call, kInternalError,
                "Internal error: too many requests in flight (" +
                    std::to_string(options_.max_in_flight) + ")");
    return;
  }
  if (in_flight_.contains(call->key)) {
    AnswerError(*call, kInvalidRequest,
                "Invalid Request: id " + call->key + " is already in flight");
    return;
  }
  in_flight_[call->key] = call;
  uint64_t serial = next_worker_++;
  try {
    workers_[serial] = std::thread([this, call, method, params = std::move(params), serial] {
      RunWorker(call, method, params);
      std::lock_guard done_lock(mu_);
      if (auto it = in_flight_.find(call->key); it != in_flight_.end() && it->second == call)
        in_flight_.erase(it);
      finished_.push_back(serial);
      idle_cv_.notify_all();
    });
  } catch (const std::system_error& e) {
    in_flight_.erase(call->key);
    AnswerError(*call, kInternalError, std::string("Internal error: no thread: ") + e.what());
  }
}

void Server::RunWorker(std::shared_ptr<Call> call, const std::string& method, json params) {
  try {
    if (method == "exec") {
      DoExec(*call, params, ExecMode::kCollect);
    } else if (method == "exec_stream") {
      DoExec(*call, params, ExecMode::kStream);
    } else if (method == "exec_pipe") {
      DoExec(*call, params, ExecMode::kPipe);
    } else if (method == "exec_tty") {
      DoExec(*call, params, ExecMode::kTty);
    } else if (method == "write_file") {
      DoWriteFile(*call, params);
    } else if (method == "read_file") {
      DoReadFile(*call, params);
    } else if (method == "list_files") {
      DoListFiles(*call, params);
    } else if (method == "allow_list_add") {
      DoAllowList(*call, params, /*add=*/true);
    } else if (method == "allow_list_delete") {
      DoAllowList(*call, params, /*add=*/false);
    } else if (method == "log") {
      DoLog(*call, /*follow=*/false);
    } else if (method == "log_stream") {
      DoLog(*call, /*follow=*/true);
    } else if (method == "port_forward") {
      DoPortForward(*call, params);
    } else if (method == "cella.port_forward_close") {
      DoPortForwardClose(*call, params);
    } else if (method == "cella.fork") {
      DoFork(*call, params);
    }
  } catch (const ParamError& e) {
    AnswerError(*call, kInvalidParams, "Invalid params: " + e.message);
  } catch (const std::exception& e) {
    AnswerError(*call, kInternalError, std::string("Internal error: ") + e.what());
  }
}

void Server::DoFork(Call& call, const json& params) {
  if (!options_.fork) {
    AnswerError(call, kMethodNotFound, "Method not found: cella.fork");
    return;
  }
  std::string ref = OptionalString(params, "id");
  if (ref.empty()) {
    auto sandbox = CurrentSandbox();
    if (!sandbox) throw ParamError{"id: want a string (no sandbox was created or attached)"};
    ref = sandbox->id();
  }
  int count = 1;
  if (auto it = params.find("count"); it != params.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 1 || it->get<int64_t>() > 1000)
      throw ParamError{"count: want a positive integer"};
    count = static_cast<int>(it->get<int64_t>());
  }
  auto ids = options_.fork(ref, count, OptionalString(params, "name"));
  if (!ids) {
    AnswerError(call, kVmFailed, ids.error().message);
    return;
  }
  Answer(call, {{"ids", *ids}});
}

void Server::Answer(Call& call, json result) {
  if (call.answered.exchange(true)) return;
  Send({{"jsonrpc", "2.0"}, {"id", call.id}, {"result", std::move(result)}});
}

void Server::AnswerError(Call& call, int code, const std::string& message) {
  if (call.answered.exchange(true)) return;
  SendError(call.id, code, message);
}

void Server::SendError(const json& id, int code, const std::string& message) {
  Send({{"jsonrpc", "2.0"}, {"id", id}, {"error", {{"code", code}, {"message", message}}}});
}

void Server::Send(const json& message) {
  // Guest output and error text may hold any bytes: never throw on them.
  std::string text = message.dump(-1, ' ', false, json::error_handler_t::replace);
  text += '\n';
  std::lock_guard lock(out_mu_);
  if (out_broken_) return;
  if (auto st = WriteAll(out_fd_, text); !st) {
    // The client is gone; its stdin's EOF will end the server.
    log::Debug("rpc: cannot write to the client", {{"error", st.error().message}});
    out_broken_ = true;
  }
}

std::shared_ptr<Sandbox> Server::CurrentSandbox() {
  std::lock_guard lock(mu_);
  return sandbox_;
}

json Server::DoCreate(Call& call, const json& params) {
  if (CurrentSandbox()) {
    AnswerError(call, kVmFailed, "VM already created: one sandbox per rpc process");
    return nullptr;
  }
  auto parsed = ParseCreateParams(params);
  if (!parsed) {
    AnswerError(call, kInvalidParams, "Invalid params: " + parsed.error().message);
    return nullptr;
  }
  auto made = factory_(*parsed);
  if (!made) {
    AnswerError(call, kVmFailed, made.error().message);
    return nullptr;
  }
  std::shared_ptr<Sandbox> sandbox(std::move(*made));
  {
    std::lock_guard lock(mu_);
    sandbox_ = sandbox;
  }
  StartEvents(sandbox, /*from_start=*/true);  // everything since boot is this client's
  return {{"id", sandbox->id()}};
}

json Server::DoAttach(Call& call, const json& params) {
  std::string ref = RequireString(params, "id");
  if (!attacher_) {
    AnswerError(call, kMethodNotFound, "Method not found: cella.attach");
    return nullptr;
  }
  if (CurrentSandbox()) {
    AnswerError(call, kVmFailed, "VM already created: one sandbox per rpc process");
    return nullptr;
  }
  auto attached = attacher_(ref);
  if (!attached) {
    AnswerError(call, kVmFailed, attached.error().message);
    return nullptr;
  }
  std::shared_ptr<Sandbox> sandbox(std::move(*attached));
  {
    std::lock_guard lock(mu_);
    sandbox_ = sandbox;
  }
  StartEvents(sandbox, /*from_start=*/false);  // what happened before is not ours
  return {{"id", sandbox->id()}};
}

json Server::DoClose(Call& call, const json& params) {
  closed_ = true;  // matchlock's rule: nothing is read after close
  std::chrono::milliseconds grace = options_.close_grace;
  if (params.is_object()) {
    if (auto it = params.find("timeout_seconds"); it != params.end() && !it->is_null()) {
      if (!it->is_number() || !std::isfinite(it->get<double>()) || it->get<double>() < 0) {
        AnswerError(call, kInvalidParams, "Invalid params: timeout_seconds: want a number >= 0");
        closed_ = false;
        return nullptr;
      }
      double seconds = std::min(it->get<double>(), 300.0);
      if (seconds > 0) grace = std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    }
  }
  // In-flight requests get the grace to finish, then are cancelled.
  WaitIdle(grace);
  CancelAll();
  WaitIdle(options_.drain_timeout);
  std::shared_ptr<Sandbox> sandbox;
  {
    std::lock_guard lock(mu_);
    sandbox = std::move(sandbox_);
  }
  if (sandbox) {
    auto st = sandbox->Close(grace);
    StopEvents();  // after Close: a poll waiting on the supervisor ends with it
    if (!st) {
      AnswerError(call, kVmFailed, "close: " + st.error().message);
      return nullptr;
    }
  }
  return json::object();
}

void Server::DoCancel(Call& call, const json& params) {
  auto it = RequireObject(params).find("id");
  if (it == params.end() ||
      !(it->is_number_integer() || it->is_number_unsigned() || it->is_string()))
    throw ParamError{"id: want the id of a request in flight"};
  std::shared_ptr<Call> target;
  {
    std::lock_guard lock(mu_);
    if (auto found = in_flight_.find(it->dump()); found != in_flight_.end()) target = found->second;
  }
  bool cancelled = false;
  if (target) {
    std::function<void()> hook;
    {
      std::lock_guard lock(target->mu);
      target->cancelled = true;
      hook = target->on_cancel;
    }
    cancelled = !target->answered.load();
    AnswerError(*target, kCancelled, "request cancelled");
    if (hook) hook();
  }
  Answer(call, {{"cancelled", cancelled}});
}

void Server::DoExec(Call& call, const json& params, ExecMode mode) {
  std::string command = RequireString(params, "command");
  std::string working_dir = OptionalString(params, "working_dir");
  const bool stream = mode != ExecMode::kCollect;
  const char* prefix = mode == ExecMode::kStream ? "exec_stream"
                       : mode == ExecMode::kPipe ? "exec_pipe"
                                                 : "exec_tty";
  uint16_t rows = 24, cols = 80;
  if (mode == ExecMode::kTty) {
    for (auto [key, into] : {std::pair{"rows", &rows}, std::pair{"cols", &cols}}) {
      auto it = params.find(key);
      if (it == params.end() || it->is_null()) continue;
      if (!it->is_number_unsigned() || it->get<uint64_t>() == 0 || it->get<uint64_t>() > 4096)
        throw ParamError{std::string(key) + ": want 1..4096"};
      *into = static_cast<uint16_t>(it->get<uint64_t>());
    }
  }
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  host::ExecRequest request = sandbox->ExecDefaults();
  // matchlock's exec takes one shell command line.
  request.argv = {"/bin/sh", "-c", command};
  if (!working_dir.empty()) request.workdir = working_dir;
  request.stdin_open = mode == ExecMode::kPipe || mode == ExecMode::kTty;
  if (mode == ExecMode::kTty) {
    request.tty = true;
    request.rows = rows;
    request.cols = cols;
  }

  struct Collected {
    std::mutex mu;
    std::string out, err;  // guarded by mu
    bool truncated = false;
  };
  auto collected = std::make_shared<Collected>();
  const size_t cap = options_.max_exec_output;
  auto sink = [this, &call, collected, cap, stream, prefix](bool is_stdout) {
    return [this, &call, collected, cap, stream, prefix, is_stdout](std::string_view bytes) {
      if (call.answered.load()) return;  // cancelled: the client stopped listening
      if (stream) {
        Send({{"jsonrpc", "2.0"},
              {"method", std::string(prefix) + (is_stdout ? ".stdout" : ".stderr")},
              {"params", {{"id", call.id}, {"data", Base64Encode(bytes)}}}});
        return;
      }
      std::lock_guard lock(collected->mu);
      std::string& into = is_stdout ? collected->out : collected->err;
      size_t room = cap - std::min(cap, collected->out.size() + collected->err.size());
      if (bytes.size() > room) collected->truncated = true;
      into.append(bytes.substr(0, room));
    };
  };
  auto start = std::chrono::steady_clock::now();
  auto started = sandbox->agent().StartExec(request, {sink(true), sink(false)});
  if (!started) return AnswerError(call, kExecFailed, started.error().message);
  std::shared_ptr<host::ExecSession> session(std::move(*started));
  auto kill = [session] {
    // Best effort: the process may have exited already.
    (void)session->Signal(SIGKILL);
  };
  std::thread input_pump;
  {
    std::lock_guard lock(call.mu);
    if (call.cancelled) {
      kill();
    } else {
      call.on_cancel = kill;
      if (request.stdin_open) {
        call.input_open = true;
        try {
          input_pump = std::thread([&call, session] { PumpInput(call, *session); });
        } catch (const std::system_error& e) {
          call.input_open = false;
          kill();
          log::Warn("rpc: no thread for the exec's input", {{"error", e.what()}});
        }
      }
    }
  }
  // The client may send stdin from now on (matchlock's order: no stdin
  // before ready).
  if (request.stdin_open)
    Send({{"jsonrpc", "2.0"},
          {"method", std::string(prefix) + ".ready"},
          {"params", {{"id", call.id}}}});
  auto status = session->Wait();
  {
    std::lock_guard lock(call.mu);
    call.on_cancel = nullptr;
    call.input_open = false;
    call.input.clear();
    call.input_bytes = 0;
  }
  call.input_cv.notify_all();
  // The stream has ended, so a write waiting on credit has returned.
  if (input_pump.joinable()) input_pump.join();
  if (!status) return AnswerError(call, kExecFailed, status.error().message);
  // Before the answer, so a client holding the result has seen its event.
  SendEvent({{"type", "exec"},
             {"timestamp", UnixNanos()},
             {"exec", {{"command", command}, {"exit_code", status->ShellCode()}}}});
  json result = {{"exit_code", status->ShellCode()}, {"duration_ms", MillisSince(start)}};
  if (!stream) {
    std::lock_guard lock(collected->mu);
    if (collected->truncated)
      log::Notice("rpc: exec output truncated", {{"cap_bytes", static_cast<int64_t>(cap)}});
    result["stdout"] = Base64Encode(collected->out);
    result["stderr"] = Base64Encode(collected->err);
  }
  Answer(call, std::move(result));
}

void Server::HandleExecInput(const std::string& method, const json& params) {
  const bool pipe = method.starts_with("exec_pipe.");
  const bool tty = method.starts_with("exec_tty.");
  if (!pipe && !tty) {
    log::Debug("rpc: notification ignored", {{"method", method}});
    return;
  }
  // Notifications get no answer, not even an error: a bad one is dropped.
  if (!params.is_object()) return;
  auto id = params.find("id");
  if (id == params.end()) return;
  std::shared_ptr<Call> call;
  {
    std::lock_guard lock(mu_);
    if (auto found = in_flight_.find(id->dump()); found != in_flight_.end()) call = found->second;
  }
  if (!call) return;
  const std::string what = method.substr(method.find('.') + 1);
  Call::Input input;
  if (what == "stdin") {
    auto data = params.find("data");
    if (data == params.end() || !data->is_string()) return;
    auto bytes = Base64Decode(data->get<std::string>());
    if (!bytes) return;
    input.bytes = std::move(*bytes);
  } else if (what == "stdin_eof") {
    input.kind = Call::Input::Kind::kEof;
  } else if (what == "resize" && tty) {
    auto rows = params.find("rows");
    auto cols = params.find("cols");
    if (rows == params.end() || cols == params.end() || !rows->is_number_unsigned() ||
        !cols->is_number_unsigned() || rows->get<uint64_t>() == 0 || rows->get<uint64_t>() > 4096 ||
        cols->get<uint64_t>() == 0 || cols->get<uint64_t>() > 4096)
      return;
    input.kind = Call::Input::Kind::kResize;
    input.rows = static_cast<uint16_t>(rows->get<uint64_t>());
    input.cols = static_cast<uint16_t>(cols->get<uint64_t>());
  } else {
    return;
  }
  const size_t size = input.bytes.size();
  std::unique_lock lock(call->mu);
  // Not ready yet, or over: dropped, as matchlock does.
  if (!call->input_open) return;
  // Queued input keeps its order and the reader keeps serving; only a full
  // queue makes it wait, and only while the guest keeps taking input: a
  // stall_ms without progress ends the exec.
  // Items count too (an empty write or a resize carries no bytes), so a
  // client cannot queue them without bound either.
  constexpr size_t kMaxQueuedItems = 4096;
  auto fits = [&] {
    if (!call->input_open || call->input.empty()) return true;
    if (call->input.size() >= kMaxQueuedItems) return false;
    return size == 0 || call->input_bytes + size <= options_.max_stdin_queue;
  };
  bool room = true;
  while (room && !fits()) {
    uint64_t taken = call->input_taken;
    room = call->input_cv.wait_for(lock, options_.stdin_stall,
                                   [&] { return fits() || call->input_taken != taken; });
  }
  if (!call->input_open) return;
  if (!room) {
    call->input_open = false;
    call->input.clear();
    call->input_bytes = 0;
    std::function<void()> kill = call->on_cancel;
    lock.unlock();
    call->input_cv.notify_all();
    log::Notice("rpc: an exec did not take its input; ending it",
                {{"queued_bytes", static_cast<int64_t>(options_.max_stdin_queue)}});
    // Answered first, then ended: the answer claims the call's id, so the
    // Result of the process the kill ends is not sent in its place.
    AnswerError(*call, kExecFailed,
                "stdin: the process took none of its queued input for " +
                    std::to_string(options_.stdin_stall.count()) +
                    " ms (is it reading?); the exec was ended");
    if (kill) kill();
    return;
  }
  call->input_bytes += size;
  call->input.push_back(std::move(input));
  lock.unlock();
  call->input_cv.notify_all();
}

void Server::PumpInput(Call& call, host::ExecSession& session) {
  for (;;) {
    Call::Input input;
    {
      std::unique_lock lock(call.mu);
      call.input_cv.wait(lock, [&] { return !call.input_open || !call.input.empty(); });
      if (!call.input_open) return;
      input = std::move(call.input.front());
      call.input.pop_front();
    }
    // Waits on the guest's credit here, off the reader thread. The bytes
    // leave the queue's count only once the guest has taken them, so the
    // queue bounds what is held for this exec.
    Status st;
    switch (input.kind) {
      case Call::Input::Kind::kData:
        st = session.WriteStdin(input.bytes);
        break;
      case Call::Input::Kind::kEof:
        st = session.CloseStdin();
        break;
      case Call::Input::Kind::kResize:
        st = session.Resize(input.rows, input.cols);
        break;
    }
    {
      std::lock_guard lock(call.mu);
      call.input_bytes -= std::min(call.input_bytes, input.bytes.size());
      ++call.input_taken;
      if (!st) {
        // The process is gone (or the link): what is queued can go nowhere.
        call.input_open = false;
        call.input.clear();
        call.input_bytes = 0;
      }
    }
    call.input_cv.notify_all();
    if (!st) {
      log::Debug("rpc: exec input failed", {{"error", st.error().message}});
      return;
    }
  }
}

void Server::DoWriteFile(Call& call, const json& params) {
  std::string path = RequireString(params, "path");
  std::string encoded = OptionalString(params, "content");
  uint32_t mode = 0644;
  if (auto it = params.find("mode"); it != params.end() && !it->is_null()) {
    if (!it->is_number_unsigned() && !it->is_number_integer())
      throw ParamError{"mode: want a whole number"};
    int64_t m = it->get<int64_t>();
    if (m < 0 || m > 07777) throw ParamError{"mode: want permission bits (0..07777)"};
    if (m != 0) mode = static_cast<uint32_t>(m);
  }
  auto bytes = Base64Decode(encoded);
  if (!bytes)
    return AnswerError(call, kInvalidParams, "Invalid params: content: " + bytes.error().message);
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  host::WriteFileOptions options;
  options.mode = mode;
  options.parents = host::WriteFileOptions::Parents::kCreate;
  if (auto st = sandbox->agent().WriteFile(path, *bytes, options); !st)
    return AnswerError(call, kFileFailed, st.error().message);
  Answer(call, json::object());
}

void Server::DoReadFile(Call& call, const json& params) {
  std::string path = RequireString(params, "path");
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  auto bytes = sandbox->agent().ReadFile(path);
  if (!bytes) return AnswerError(call, kFileFailed, bytes.error().message);
  Answer(call, {{"content", Base64Encode(*bytes)}});
}

void Server::DoListFiles(Call& call, const json& params) {
  std::string path = RequireString(params, "path");
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  auto entries = sandbox->agent().ListFiles(path);
  if (!entries) return AnswerError(call, kFileFailed, entries.error().message);
  json files = json::array();
  for (const auto& e : *entries) {
    const bool is_dir = e.type == protocol::FileType::kDir;
    // Go's os.FileMode, which matchlock reports: ModeDir is 1<<31,
    // ModeSymlink 1<<27 (so a client can tell a link from its target).
    uint32_t mode = e.mode | (is_dir ? 0x80000000u : 0u) |
                    (e.type == protocol::FileType::kSymlink ? 0x8000000u : 0u);
    files.push_back({{"name", e.name}, {"size", e.size}, {"mode", mode}, {"is_dir", is_dir}});
  }
  Answer(call, {{"files", std::move(files)}});
}

void Server::DoAllowList(Call& call, const json& params, bool add) {
  auto it = RequireObject(params).find("hosts");
  if (it == params.end() || !it->is_array() || it->empty())
    throw ParamError{"hosts: want a non-empty array of host names"};
  std::vector<std::string> hosts;
  for (const auto& h : *it) {
    if (!h.is_string() || h.get<std::string>().empty())
      throw ParamError{"hosts: want a non-empty array of host names"};
    hosts.push_back(h.get<std::string>());
  }
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  auto changed = add ? sandbox->EditAllowList(hosts, {}) : sandbox->EditAllowList({}, hosts);
  if (!changed) return AnswerError(call, kVmFailed, changed.error().message);
  auto minus = [](const std::vector<std::string>& a, const std::vector<std::string>& b) {
    json out = json::array();
    for (const auto& x : a)
      if (std::find(b.begin(), b.end(), x) == b.end()) out.push_back(x);
    return out;
  };
  json result = {{"allowed_hosts", changed->after}};
  if (add) {
    result["added"] = minus(changed->after, changed->before);
  } else {
    result["removed"] = minus(changed->before, changed->after);
  }
  Answer(call, std::move(result));
}

void Server::DoLog(Call& call, bool follow) {
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  const std::string path = sandbox->ConsoleLogPath();
  if (path.empty()) return AnswerError(call, kVmFailed, "this sandbox has no log");
  std::vector<std::byte> chunk(64 << 10);
  // `log`: PATH.1 then PATH, keeping at most the last max_exec_output bytes.
  // `log_stream`: each block goes out as it is read.
  std::string collected;
  auto emit = [&](std::string_view bytes) {
    if (follow) {
      Send({{"jsonrpc", "2.0"},
            {"method", "log_stream.data"},
            {"params", {{"id", call.id}, {"data", Base64Encode(bytes)}}}});
      return;
    }
    collected.append(bytes);
    // Trimmed once it holds twice the cap, so each byte is moved at most once.
    if (collected.size() > 2 * options_.max_exec_output)
      collected.erase(0, collected.size() - options_.max_exec_output);
  };
  // Reads fd to its current end; returns the bytes read.
  auto drain = [&](int fd) -> Result<off_t> {
    off_t total = 0;
    for (;;) {
      if (call.answered.load()) return total;
      size_t got = CELLA_TRY(ReadSome(fd, chunk));
      if (got == 0) return total;
      emit(std::string_view(reinterpret_cast<const char*>(chunk.data()), got));
      total += static_cast<off_t>(got);
    }
  };
  auto open_log = [](const std::string& p) {
    return UniqueFd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
  };
  if (UniqueFd older = open_log(path + ".1"); older) {
    if (auto st = drain(older.Get()); !st) return AnswerError(call, kVmFailed, st.error().message);
  }
  UniqueFd fd = open_log(path);
  off_t at = 0;
  if (fd) {
    auto got = drain(fd.Get());
    if (!got) return AnswerError(call, kVmFailed, got.error().message);
    at = *got;
  }
  if (!follow) {
    if (collected.size() > options_.max_exec_output)
      collected.erase(0, collected.size() - options_.max_exec_output);
    return Answer(call, {{"content", Base64Encode(collected)}});
  }
  // Follow until cancelled (`cancel`, `close`, the end of input answer the
  // call): poll the file, reopening it when it was rotated or truncated.
  while (!call.answered.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!fd) {
      fd = open_log(path);
      at = 0;
      if (!fd) continue;
    }
    auto got = drain(fd.Get());
    if (!got) return AnswerError(call, kVmFailed, got.error().message);
    at += *got;
    if (*got > 0) continue;
    struct stat ours {};
    struct stat now {};
    if (::fstat(fd.Get(), &ours) != 0) return AnswerError(call, kVmFailed, "stat " + path);
    if (::stat(path.c_str(), &now) == 0 && now.st_ino != ours.st_ino) {
      fd = open_log(path);  // rotated: go on with the new file
      at = 0;
    } else if (ours.st_size < at) {
      if (::lseek(fd.Get(), 0, SEEK_SET) < 0) return AnswerError(call, kVmFailed, "seek " + path);
      at = 0;  // truncated in place: the writer starts again from the top
    }
  }
}

void Server::DoPortForward(Call& call, const json& params) {
  RequireObject(params);
  auto forwards = params.find("forwards");
  if (forwards == params.end() || !forwards->is_array() || forwards->empty())
    throw ParamError{"forwards: want a non-empty array of {local_port, remote_port}"};
  if (forwards->size() > 64) throw ParamError{"forwards: at most 64 at once"};
  std::vector<std::pair<uint16_t, uint16_t>> wanted;
  for (const json& f : *forwards) {
    if (!f.is_object()) throw ParamError{"forwards[]: want an object"};
    wanted.emplace_back(RequirePort(f, "local_port", 0), RequirePort(f, "remote_port", 1));
  }
  std::vector<std::string> addresses;
  if (auto a = params.find("addresses"); a != params.end() && !a->is_null()) {
    if (!a->is_array() || a->size() > 8) throw ParamError{"addresses: want up to 8 strings"};
    for (const json& item : *a) {
      if (!item.is_string()) throw ParamError{"addresses[]: want a string"};
      addresses.push_back(item.get<std::string>());
    }
  }
  if (addresses.empty()) addresses.push_back("127.0.0.1");  // matchlock's default
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  json bindings = json::array();
  for (const std::string& address : addresses) {
    for (auto [local, remote] : wanted) {
      auto bound = sandbox->ForwardPort(address, local, remote);
      if (!bound) {
        // All or nothing: what this call made is stopped again, so a
        // failed call leaves no listener behind.
        std::string left;
        for (const json& b : bindings) {
          const std::string where = b["address"].get<std::string>();
          const int port = b["local_port"].get<int>();
          if (auto stopped = sandbox->StopForward(where, static_cast<uint16_t>(port)); !stopped)
            left += (left.empty() ? "" : ", ") + where + ":" + std::to_string(port);
        }
        return AnswerError(call, kVmFailed,
                           "port_forward " + address + ":" + std::to_string(local) + " -> " +
                               std::to_string(remote) + ": " + bound.error().message +
                               (left.empty() ? "" : " (could not stop again: " + left + ")"));
      }
      bindings.push_back({{"address", bound->address},
                          {"local_port", bound->local_port},
                          {"remote_port", bound->remote_port}});
    }
  }
  Answer(call, {{"bindings", std::move(bindings)}});
}

void Server::DoPortForwardClose(Call& call, const json& params) {
  RequireObject(params);
  const uint16_t port = RequirePort(params, "local_port", 1, "");
  const std::string address = OptionalString(params, "address");
  auto sandbox = CurrentSandbox();
  if (!sandbox) return AnswerError(call, kVmFailed, "VM not created");
  auto stopped = sandbox->StopForward(address, port);
  if (!stopped) {
    if (stopped.error().errno_value == ENOENT)
      return AnswerError(call, kInvalidParams, "Invalid params: " + stopped.error().message);
    return AnswerError(call, kVmFailed, stopped.error().message);
  }
  json closed = json::array();
  for (const auto& b : *stopped)
    closed.push_back(
        {{"address", b.address}, {"local_port", b.local_port}, {"remote_port", b.remote_port}});
  Answer(call, {{"closed", std::move(closed)}});
}

void Server::SendEvent(json event) {
  Send({{"jsonrpc", "2.0"}, {"method", "event"}, {"params", std::move(event)}});
}

void Server::StartEvents(std::shared_ptr<Sandbox> sandbox, bool from_start) {
  StopEvents();
  {
    std::lock_guard lock(events_mu_);
    events_stop_ = false;
  }
  auto run = [this, sandbox = std::move(sandbox), from_start] {
    std::optional<uint64_t> next;
    if (from_start) next = 0;
    auto stopping = [&](std::chrono::milliseconds pause) {
      std::unique_lock lock(events_mu_);
      return events_cv_.wait_for(lock, pause, [&] { return events_stop_; });
    };
    while (!stopping(std::chrono::milliseconds(0))) {
      // A long poll: the supervisor answers as soon as there is news, or
      // after a second with none; one poll at a time keeps it bounded.
      auto batch = sandbox->PollEvents(next, std::chrono::milliseconds(1000));
      if (!batch) {
        // The supervisor may be going (close) or briefly busy: try again
        // after a pause, unless told to stop.
        if (stopping(std::chrono::milliseconds(500))) return;
        continue;
      }
      if (batch->dropped > 0) {
        log::Notice("rpc: events dropped (the client fell behind)",
                    {{"dropped", static_cast<int64_t>(batch->dropped)}});
        Send({{"jsonrpc", "2.0"},
              {"method", "cella.events_dropped"},
              {"params", {{"dropped", batch->dropped}}}});
      }
      for (json& event : batch->events) SendEvent(std::move(event));
      next = batch->next;
    }
  };
  try {
    events_thread_ = std::thread(std::move(run));
  } catch (const std::system_error& e) {
    log::Warn("rpc: no event thread; events will not be sent", {{"error", e.what()}});
  }
}

void Server::StopEvents() {
  {
    std::lock_guard lock(events_mu_);
    events_stop_ = true;
  }
  events_cv_.notify_all();
  if (events_thread_.joinable()) events_thread_.join();
}

void Server::CancelAll() {
  std::vector<std::shared_ptr<Call>> calls;
  {
    std::lock_guard lock(mu_);
    for (auto& [key, call] : in_flight_) calls.push_back(call);
  }
  for (auto& call : calls) {
    std::function<void()> hook;
    {
      std::lock_guard lock(call->mu);
      call->cancelled = true;
      hook = call->on_cancel;
    }
    AnswerError(*call, kCancelled, "request cancelled");
    if (hook) hook();
  }
}

void Server::WaitIdle(std::chrono::milliseconds timeout) {
  {
    std::unique_lock lock(mu_);
    idle_cv_.wait_for(lock, timeout, [&] { return in_flight_.empty(); });
  }
  ReapFinished();
}

void Server::ReapFinished() {
  std::vector<std::thread> done;
  {
    std::lock_guard lock(mu_);
    for (uint64_t serial : finished_) {
      if (auto it = workers_.find(serial); it != workers_.end()) {
        done.push_back(std::move(it->second));
        workers_.erase(it);
      }
    }
    finished_.clear();
  }
  for (auto& t : done) t.join();
}

void Server::Teardown() {
  // With a sandbox, work still running belongs to a client that is gone:
  // cancel it. Without one every request is answered at once: let them be.
  if (CurrentSandbox()) CancelAll();
  WaitIdle(options_.drain_timeout);
  std::shared_ptr<Sandbox> sandbox;
  {
    std::lock_guard lock(mu_);
    sandbox = std::move(sandbox_);
  }
  if (sandbox) {
    if (auto st = sandbox->Close(options_.close_grace); !st)
      log::Warn("rpc: could not close the sandbox", {{"error", st.error().message}});
  }
  StopEvents();
  // Closing the sandbox failed any call still waiting on the guest; their
  // threads end now.
  std::map<uint64_t, std::thread> rest;
  {
    std::lock_guard lock(mu_);
    rest.swap(workers_);
    finished_.clear();
  }
  for (auto& [serial, t] : rest) t.join();
}

}  // namespace cella::rpc
