#include "host/sandbox/control.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include "base/io.h"
#include "base/log.h"

namespace cella::sandbox {
namespace {

constexpr size_t kMaxMessage = 64 * 1024;
using Clock = std::chrono::steady_clock;

Result<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path)
    return Fail("socket path too long (" + std::to_string(path.size()) + " bytes): " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

// Reads one '\n'-terminated line within the deadline; `wake_fd` (if not -1)
// becoming readable abandons the read, unless `give_up` is given and says
// false (it took the wake-up; the read goes on).
Result<std::string> ReadLine(int fd, Clock::time_point deadline, int wake_fd = -1,
                             const std::function<bool()>& give_up = {}) {
  std::string line;
  char buf[4096];
  for (;;) {
    pollfd pfds[2] = {{fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    int rc = ::poll(pfds, wake_fd < 0 ? 1 : 2, RemainingMs(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("poll control socket");
    if (rc == 0) return std::unexpected(Error{"control socket: no reply in time", ETIMEDOUT});
    if (wake_fd >= 0 && pfds[1].revents) {
      if (!give_up) return Fail("control socket: server stopping");
      if (give_up()) return std::unexpected(Error{"interrupted: gave up waiting", ECANCELED});
      if (!pfds[0].revents) continue;
    }
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("read control socket");
    if (n == 0) return Fail("control socket: peer closed before a full line");
    line.append(buf, static_cast<size_t>(n));
    if (auto nl = line.find('\n'); nl != std::string::npos) return line.substr(0, nl);
    if (line.size() > kMaxMessage) return Fail("control socket: message over 64 KiB");
  }
}

// A peer that went away is an error value here, never a SIGPIPE.
Status SendAll(int fd, std::string_view text) {
  for (size_t done = 0; done < text.size();) {
    ssize_t n = ::send(fd, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("write control socket");
    done += static_cast<size_t>(n);
  }
  return {};
}

}  // namespace

Result<UniqueFd> ConnectUnixSocket(const std::string& path) {
  sockaddr_un addr = CELLA_TRY(UnixAddress(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return FailErrno("socket");
  int rc;
  do {
    rc = ::connect(fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return FailErrno("connect " + path);
  return fd;
}

Result<UniqueFd> ListenUnixSocket(const std::string& path) {
  sockaddr_un addr = CELLA_TRY(UnixAddress(path));
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return FailErrno("unlink " + path);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return FailErrno("socket");
  // Only the owner may connect: the socket's mode is set before anyone can.
  mode_t old = ::umask(0177);
  int rc = ::bind(fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  if (rc != 0) return FailErrno("bind " + path);
  if (::listen(fd.Get(), 64) != 0) return FailErrno("listen " + path);
  return fd;
}

Result<std::unique_ptr<ControlServer>> ControlServer::Start(const std::string& path,
                                                            ControlHandler handler) {
  std::unique_ptr<ControlServer> server(new ControlServer());
  server->path_ = path;
  server->handler_ = std::move(handler);
  server->listen_fd_ = CELLA_TRY(ListenUnixSocket(path));
  server->wake_fd_ = CELLA_TRY(WakeFd::Create("control server"));
  server->thread_ = std::thread([s = server.get()] { s->Loop(); });
  return server;
}

ControlServer::~ControlServer() { Stop(); }

void ControlServer::Stop() {
  if (stopping_.exchange(true)) return;
  wake_fd_.Signal();
  if (thread_.joinable()) thread_.join();
  if (::unlink(path_.c_str()) != 0 && errno != ENOENT)
    log::Debug("control server: unlink failed", {{"path", path_}});
}

void ControlServer::Loop() {
  while (!stopping_.load()) {
    pollfd fds[2] = {{listen_fd_.Get(), POLLIN, 0}, {wake_fd_.Get(), POLLIN, 0}};
    int rc = ::poll(fds, 2, -1);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) {
      log::Warn("control server: poll failed", {{"error", std::strerror(errno)}});
      break;
    }
    if (fds[1].revents) break;
    UniqueFd conn(::accept4(listen_fd_.Get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) continue;
    ReapFinishedWorkers();
    if (auto peer = RequireTrustedPeer(conn.Get()); !peer) {
      log::Notice("control connection refused", {{"error", peer.error().message}});
      continue;
    }
    std::lock_guard lock(workers_mu_);
    if (workers_.size() >= kMaxConnections) {
      // Refused at once rather than queued: a crowd of silent clients must
      // not delay the next stop or kill beyond their own read time-outs.
      // "busy" tells ControlCall to come back shortly: a burst of callers
      // (twenty `allow-list add` at once) queues instead of failing.
      static const std::string busy =
          nlohmann::json{
              {"ok", false}, {"busy", true}, {"error", "control socket: too many connections"}}
              .dump() +
          "\n";
      if (::send(conn.Get(), busy.data(), busy.size(), MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        log::Debug("control busy reply not delivered", {{"error", std::strerror(errno)}});
      continue;
    }
    auto worker = std::make_unique<Worker>();
    Worker* raw = worker.get();
    worker->thread = std::thread([this, raw, fd = conn.Release()] {
      Serve(UniqueFd(fd));
      raw->done.store(true);
    });
    workers_.push_back(std::move(worker));
  }
  // Stop wakes every worker still reading (the eventfd stays readable);
  // handlers return once the supervisor has finished.
  std::lock_guard lock(workers_mu_);
  for (auto& w : workers_) w->thread.join();
  workers_.clear();
}

void ControlServer::ReapFinishedWorkers() {
  std::lock_guard lock(workers_mu_);
  for (auto it = workers_.begin(); it != workers_.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
}

void ControlServer::Serve(UniqueFd conn) {
  auto line = ReadLine(conn.Get(), Clock::now() + kRequestReadTimeout, wake_fd_.Get());
  nlohmann::json reply;
  if (!line) {
    reply = {{"ok", false}, {"error", line.error().message}};
  } else {
    nlohmann::json request = nlohmann::json::parse(*line, nullptr, false);
    if (request.is_discarded() || !request.is_object()) {
      reply = {{"ok", false}, {"error", "control request is not a JSON object"}};
    } else {
      // A field of the wrong type makes nlohmann::json throw; on this
      // thread that would end the supervisor (and its VM) by terminate.
      try {
        reply = handler_(request);
      } catch (const std::exception& e) {
        reply = {{"ok", false}, {"error", std::string("bad control request: ") + e.what()}};
      }
    }
  }
  // The caller may have given up waiting; its loss, not ours.
  if (auto st = SendAll(conn.Get(), reply.dump() + "\n"); !st)
    log::Debug("control reply not delivered", {{"error", st.error().message}});
}

Result<nlohmann::json> ControlCall(const std::string& path, const nlohmann::json& request,
                                   std::chrono::milliseconds timeout) {
  return ControlCall(path, request, timeout, -1, {});
}

namespace {

// Waits `pause` (cut short by the deadline); false when `give_up` says the
// caller no longer wants the answer.
Result<bool> PauseBeforeRetry(std::chrono::milliseconds pause, Clock::time_point deadline,
                              int wake_fd, const std::function<bool()>& give_up) {
  auto until = std::min(Clock::now() + pause, deadline);
  for (;;) {
    int left = RemainingMs(until);
    if (left == 0) return true;
    pollfd pfd{wake_fd, POLLIN, 0};
    int rc = ::poll(&pfd, wake_fd < 0 ? 0 : 1, left);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("poll while the control socket is busy");
    if (rc == 0) continue;
    if (!give_up) return Fail("control socket: server stopping");
    if (give_up()) return false;
  }
}

}  // namespace

Result<nlohmann::json> ControlCall(const std::string& path, const nlohmann::json& request,
                                   std::chrono::milliseconds timeout, int wake_fd,
                                   const std::function<bool()>& give_up) {
  auto deadline = Clock::now() + timeout;
  auto pause = std::chrono::milliseconds(5);
  // Why the server last turned us away: a retry that runs out of time
  // waiting for its reply is still that, not a server that went silent.
  std::optional<std::string> busy_error;
  for (;;) {
    UniqueFd fd = CELLA_TRY(ConnectUnixSocket(path));
    // A server that refuses us (busy, wrong user) may close before we have
    // written: that is an error value (MSG_NOSIGNAL), and its reply, if it
    // sent one, says why.
    Status sent = SendAll(fd.Get(), request.dump() + "\n");
    auto read = ReadLine(fd.Get(), deadline, wake_fd, give_up);
    if (!read && read.error().errno_value == ECANCELED) return std::unexpected(read.error());
    if (!read && busy_error && read.error().errno_value == ETIMEDOUT)
      return std::unexpected(Error{*busy_error + ", then no reply in time", ETIMEDOUT});
    if (!read) return std::unexpected(sent ? read.error() : sent.error());
    nlohmann::json reply = nlohmann::json::parse(*read, nullptr, false);
    if (reply.is_discarded() || !reply.is_object())
      return Fail("control socket " + path + ": reply is not a JSON object");
    if (reply.value("ok", false)) return reply;
    std::string error = reply.value("error", std::string("request failed"));
    // The server was at its connection cap and did not read the request:
    // asking again is safe, until the caller's own deadline.
    if (!reply.value("busy", false)) return Fail(error);
    busy_error = error;
    if (!CELLA_TRY(PauseBeforeRetry(pause, deadline, wake_fd, give_up)))
      return std::unexpected(Error{"interrupted: gave up waiting", ECANCELED});
    if (RemainingMs(deadline) == 0) return Fail(error);
    pause = std::min(pause * 2, std::chrono::milliseconds(100));
  }
}

}  // namespace cella::sandbox
