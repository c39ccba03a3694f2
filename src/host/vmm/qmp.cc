#include "host/vmm/qmp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <thread>

namespace cella::vmm {

namespace {

using Clock = std::chrono::steady_clock;

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

std::string DescribeQmpError(const nlohmann::json& error) {
  std::string cls = "GenericError";
  std::string desc = "(no description)";
  if (error.is_object()) {
    if (auto it = error.find("class"); it != error.end() && it->is_string()) {
      cls = it->get<std::string>();
    }
    if (auto it = error.find("desc"); it != error.end() && it->is_string()) {
      desc = it->get<std::string>();
    }
  }
  return cls + ": " + desc;
}

}  // namespace

Result<nlohmann::json> QmpClient::ReadMessage(Clock::time_point deadline) {
  while (true) {
    size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (line.empty() || line == "\r") continue;
      nlohmann::json msg = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (msg.is_discarded() || !msg.is_object()) {
        return Fail("QMP: malformed message: " + line.substr(0, 200));
      }
      return msg;
    }
    if (buffer_.size() > kMaxQmpLine) {
      return Fail("QMP: message longer than " + std::to_string(kMaxQmpLine) + " bytes");
    }
    pollfd pfd{fd_.Get(), POLLIN, 0};
    int rc = ::poll(&pfd, 1, RemainingMs(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return FailErrno("QMP: poll");
    if (rc == 0) return std::unexpected(Error{"QMP: no reply before the deadline", ETIMEDOUT});
    char buf[16384];
    ssize_t n = ::read(fd_.Get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FailErrno("QMP: read");
    if (n == 0) return std::unexpected(Error{"QMP: QEMU closed the connection", ECONNRESET});
    buffer_.append(buf, static_cast<size_t>(n));
  }
}

Status QmpClient::Send(const nlohmann::json& message, int fd) {
  std::string text = message.dump() + "\n";
  size_t sent = 0;
  if (fd >= 0) {
    // The descriptor rides on the message's first bytes; QEMU takes it for
    // the command those bytes belong to.
    iovec iov{text.data(), text.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* header = CMSG_FIRSTHDR(&msg);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &fd, sizeof(int));
    ssize_t n;
    do {
      n = ::sendmsg(fd_.Get(), &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
      return std::unexpected(Error{"QMP: QEMU closed the connection", ECONNRESET});
    if (n < 0) return FailErrno("QMP: send a descriptor");
    sent = static_cast<size_t>(n);
  }
  while (sent < text.size()) {
    // MSG_NOSIGNAL: a QEMU that went away is an error value, not a SIGPIPE.
    ssize_t n = ::send(fd_.Get(), text.data() + sent, text.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) {
      return std::unexpected(Error{"QMP: QEMU closed the connection", ECONNRESET});
    }
    if (n < 0) return FailErrno("QMP: send");
    sent += static_cast<size_t>(n);
  }
  return {};
}

Result<QmpClient> QmpClient::Handshake(UniqueFd fd, Duration timeout) {
  QmpClient client(std::move(fd));
  auto deadline = Clock::now() + timeout;
  nlohmann::json greeting = CELLA_TRY_CTX(client.ReadMessage(deadline), "QMP greeting");
  if (!greeting.contains("QMP")) {
    return Fail("QMP: expected a greeting, got " + greeting.dump().substr(0, 200));
  }
  CELLA_TRY(client.Execute("qmp_capabilities", nullptr,
                           std::chrono::duration_cast<Duration>(deadline - Clock::now())));
  return client;
}

Result<QmpClient> QmpClient::Connect(const std::string& socket_path, Duration timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof(addr.sun_path)) {
    return Fail("QMP socket path too long: " + socket_path);
  }
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  auto deadline = Clock::now() + timeout;
  while (true) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return FailErrno("socket for QMP");
    if (::connect(fd.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      return Handshake(std::move(fd), std::chrono::duration_cast<Duration>(
                                          std::max(deadline - Clock::now(), Clock::duration(0))));
    }
    int err = errno;
    bool not_yet = err == ENOENT || err == ECONNREFUSED;
    if (!not_yet || Clock::now() >= deadline) {
      return FailErrno("connect to QMP socket " + socket_path, err);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

Result<nlohmann::json> QmpClient::Execute(std::string_view command, const nlohmann::json& arguments,
                                          Duration timeout) {
  uint64_t id = next_id_++;
  nlohmann::json request = {{"execute", std::string(command)}, {"id", id}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  CELLA_TRY(Send(request));
  return AwaitReply(command, id, timeout);
}

Status QmpClient::SendFd(std::string_view name, int fd, Duration timeout) {
  uint64_t id = next_id_++;
  nlohmann::json request = {
      {"execute", "getfd"}, {"id", id}, {"arguments", {{"fdname", std::string(name)}}}};
  CELLA_TRY(Send(request, fd));
  CELLA_TRY(AwaitReply("getfd", id, timeout));
  return {};
}

Result<nlohmann::json> QmpClient::AwaitReply(std::string_view command, uint64_t id,
                                             Duration timeout) {
  auto deadline = Clock::now() + timeout;
  while (true) {
    nlohmann::json msg = CELLA_TRY_CTX(ReadMessage(deadline), "QMP " + std::string(command));
    if (msg.contains("event")) {
      if (events_.size() == kMaxEvents) events_.pop_front();
      events_.push_back(std::move(msg));
      continue;
    }
    auto id_it = msg.find("id");
    if (id_it == msg.end() || !id_it->is_number_unsigned() || id_it->get<uint64_t>() != id) {
      continue;  // a reply to an earlier, abandoned command
    }
    if (auto err = msg.find("error"); err != msg.end()) {
      return Fail("QMP " + std::string(command) + ": " + DescribeQmpError(*err));
    }
    if (auto ret = msg.find("return"); ret != msg.end()) return *ret;
    return Fail("QMP " + std::string(command) + ": reply has neither return nor error");
  }
}

Result<std::string> QmpClient::QueryStatus() {
  nlohmann::json ret = CELLA_TRY(Execute("query-status"));
  auto it = ret.find("status");
  if (!ret.is_object() || it == ret.end() || !it->is_string()) {
    return Fail("QMP query-status: reply has no status string");
  }
  return it->get<std::string>();
}

Status QmpClient::Stop() {
  CELLA_TRY(Execute("stop"));
  return {};
}
Status QmpClient::Cont() {
  CELLA_TRY(Execute("cont"));
  return {};
}
Status QmpClient::SystemPowerdown() {
  CELLA_TRY(Execute("system_powerdown"));
  return {};
}

Status QmpClient::AwaitMigration(Duration timeout) {
  const auto started = Clock::now();
  auto deadline = started + timeout;
  auto pause = std::chrono::milliseconds(1);
  while (true) {
    nlohmann::json info = CELLA_TRY(Execute("query-migrate"));
    std::string status = info.is_object() ? info.value("status", std::string()) : std::string();
    if (status == "completed") return {};
    if (status == "failed" || status == "cancelled") {
      std::string why = info.value("error-desc", std::string("no reason given"));
      return Fail("migration " + status + ": " + why);
    }
    if (Clock::now() >= deadline)
      return std::unexpected(Error{"migration not completed within " +
                                       std::to_string(timeout.count()) + " ms (status " +
                                       (status.empty() ? "none" : status) + ")",
                                   ETIMEDOUT});
    std::this_thread::sleep_for(pause);
    // A template clone's state (~50-70 KB) loads in 2-40 ms, on the warm
    // run's critical path: every millisecond for the first 20 ms (a poll
    // that doubled from 2 ms saw a 3 ms restore at 6 ms, an 8 ms one at
    // 14 ms), then backing off to 10 ms, which keeps a long save's or
    // restore's polls cheap (one small QMP round trip each).
    if (Clock::now() - started >= std::chrono::milliseconds(20))
      pause = std::min(pause * 2, std::chrono::milliseconds(10));
  }
}

Status QmpClient::Quit() {
  auto r = Execute("quit");
  if (r) return {};
  if (r.error().errno_value == ECONNRESET) return {};
  return std::unexpected(std::move(r.error()));
}

}  // namespace cella::vmm
