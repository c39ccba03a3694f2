// One piece (~600 lines) on purpose: the sealed network is built by a
// forked helper that may not allocate, so the plan it reads, the steps it
// runs and the parent that collects its report share one set of types.
#include "host/net/netns.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/netfilter_ipv4.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

namespace cella::net {

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kBuildTimeout{20'000};
constexpr std::chrono::milliseconds kChildExitWait{5'000};

// Each step the child takes; the parent turns a failed one into a message.
enum class Step : int32_t {
  kDone = 0,
  kDeathSignal,
  kUnshare,
  kDumpable,
  kDenySetgroups,
  kUidMap,
  kGidMap,
  kIoctlSocket,
  kLoopbackUp,
  kOpenTun,
  kCreateTap,
  kTapAddress,
  kTapNetmask,
  kDnsAddress,
  kDnsNetmask,
  kTapMtu,
  kTapMac,
  kTapUp,
  kNftPipes,
  kNftFork,
  kNftWrite,
  kNftWait,
  kNftFailed,
  kOpenNetns,
  kProxySocket,
  kProxyBind,
  kProxyListen,
  kDnsSocket,
  kDnsBind,
  kSendFds,
  kTapReady,  // not a failure: the first of the child's two messages (the TAP)
};

std::string_view StepName(Step step) {
  switch (step) {
    case Step::kDone:
      return "done";
    case Step::kDeathSignal:
      return "prctl(PR_SET_PDEATHSIG)";
    case Step::kUnshare:
      return "unshare network namespace";
    case Step::kDumpable:
      return "prctl(PR_SET_DUMPABLE)";
    case Step::kDenySetgroups:
      return "write /proc/self/setgroups";
    case Step::kUidMap:
      return "write /proc/self/uid_map";
    case Step::kGidMap:
      return "write /proc/self/gid_map";
    case Step::kIoctlSocket:
      return "socket for interface ioctls";
    case Step::kLoopbackUp:
      return "bring lo up";
    case Step::kOpenTun:
      return "open /dev/net/tun";
    case Step::kCreateTap:
      return "create TAP cella0 (TUNSETIFF)";
    case Step::kTapAddress:
      return "set cella0 address (the gateway)";
    case Step::kTapNetmask:
      return "set cella0 netmask";
    case Step::kDnsAddress:
      return "add the DNS address (cella0:1)";
    case Step::kDnsNetmask:
      return "set cella0:1 netmask";
    case Step::kTapMtu:
      return "set cella0 MTU";
    case Step::kTapMac:
      return "set cella0 MAC address";
    case Step::kTapUp:
      return "bring cella0 up";
    case Step::kNftPipes:
      return "pipes for nft";
    case Step::kNftFork:
      return "fork nft";
    case Step::kNftWrite:
      return "write the ruleset to nft";
    case Step::kNftWait:
      return "wait for nft";
    case Step::kNftFailed:
      return "nft -f - refused the ruleset";
    case Step::kOpenNetns:
      return "open /proc/self/ns/net";
    case Step::kProxySocket:
      return "proxy listener socket";
    case Step::kProxyBind:
      return "bind proxy listener";
    case Step::kProxyListen:
      return "listen on proxy listener";
    case Step::kDnsSocket:
      return "DNS socket";
    case Step::kDnsBind:
      return "bind DNS socket to the DNS address, port 53";
    case Step::kSendFds:
      return "send descriptors to the parent";
    case Step::kTapReady:
      return "the TAP is ready";
  }
  return "unknown step";
}

// What the child sends back: on success, with the descriptors attached.
struct ChildReport {
  Step step = Step::kDone;
  int32_t err = 0;          // errno of the failed step
  int32_t exit_status = 0;  // nft's wait status (kNftFailed)
  uint32_t detail_size = 0;
  std::array<char, 2048> detail{};  // nft's output (kNftFailed)
};

// The child's two messages: the TAP as soon as it is up (QEMU can start
// with it while the ruleset loads: the namespace has no route out, and no
// socket exists yet for a guest packet to reach), then the rest.
constexpr int kTapFdCount = 1;  // tap
constexpr int kFdCount = 3;     // proxy listener, DNS socket, netns

// The one message of the child: its report, with the descriptors attached
// as SCM_RIGHTS on success. The same layout is sent and received; it lives
// on the stack (the child must not allocate).
struct ReportMessage {
  iovec iov{};
  msghdr message{};
  // Last: cmsghdr ends in a flexible array member.
  union {
    char buffer[CMSG_SPACE(sizeof(int) * kFdCount)];
    cmsghdr align;
  } control{};

  explicit ReportMessage(ChildReport* report) : iov{report, sizeof(*report)} {
    message.msg_iov = &iov;
    message.msg_iovlen = 1;
    message.msg_control = control.buffer;
    message.msg_controllen = sizeof(control.buffer);
  }
  ReportMessage(const ReportMessage&) = delete;
  ReportMessage& operator=(const ReportMessage&) = delete;
};

// Everything the child needs, prepared before fork(): the child of a
// multi-threaded process must not allocate, so it only reads this.
struct ChildPlan {
  bool own_user_namespace = false;
  std::string uid_map;
  std::string gid_map;
  std::string ruleset;
  const char* nft_path = nullptr;
  std::array<const char*, 4> nft_argv{};
  std::array<const char*, 2> nft_envp{};
  ifreq loopback{};
  ifreq tap{};
  ifreq tap_alias{};
  sockaddr_in gateway{};
  sockaddr_in dns{};
  sockaddr_in netmask{};
  sockaddr_in proxy{};
  int mtu = 1500;
  pid_t parent = -1;
  int report_fd = -1;
};

sockaddr_in Ipv4(const char* address, uint16_t port) {
  sockaddr_in out{};
  out.sin_family = AF_INET;
  out.sin_port = htons(port);
  ::inet_pton(AF_INET, address, &out.sin_addr);
  return out;
}

void SetName(ifreq& request, std::string_view name) {
  std::memcpy(request.ifr_name, name.data(), std::min(name.size(), size_t{IFNAMSIZ - 1}));
}

// ---- the child: async-signal-safe calls only from here to _exit ----

[[noreturn]] void Report(const ChildPlan& plan, ChildReport& report, Step step, int err) {
  report.step = step;
  report.err = err;
  // Nothing more can be done if the parent is gone.
  ssize_t ignored = ::send(plan.report_fd, &report, sizeof(report), MSG_NOSIGNAL);
  (void)ignored;
  ::_exit(1);
}

bool WriteWholeFile(const char* path, std::string_view content) {
  int fd = ::open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n = ::write(fd, content.data(), content.size());
  int err = errno;
  ::close(fd);
  errno = err;
  return n == static_cast<ssize_t>(content.size());
}

bool SetAddress(int ioctl_fd, const ifreq& base, const sockaddr_in& address, unsigned long op) {
  ifreq request = base;
  std::memcpy(&request.ifr_addr, &address, sizeof(address));
  return ::ioctl(ioctl_fd, op, &request) == 0;
}

bool BringUp(int ioctl_fd, const ifreq& base) {
  ifreq request = base;
  if (::ioctl(ioctl_fd, SIOCGIFFLAGS, &request) != 0) return false;
  request.ifr_flags = static_cast<short>(request.ifr_flags | IFF_UP);
  return ::ioctl(ioctl_fd, SIOCSIFFLAGS, &request) == 0;
}

// One message to the parent: `report` marked `step`, with `count` (at most
// kFdCount) descriptors attached.
void SendFds(const ChildPlan& plan, ChildReport& report, Step step, const int* fds, int count) {
  ReportMessage out(&report);
  msghdr& message = out.message;
  message.msg_controllen = CMSG_SPACE(sizeof(int) * static_cast<size_t>(count));
  cmsghdr* header = CMSG_FIRSTHDR(&message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof(int) * static_cast<size_t>(count));
  std::memcpy(CMSG_DATA(header), fds, sizeof(int) * static_cast<size_t>(count));
  report.step = step;
  while (::sendmsg(plan.report_fd, &message, MSG_NOSIGNAL) < 0) {
    if (errno != EINTR) Report(plan, report, Step::kSendFds, errno);
  }
}

// Runs `nft -f -` in the namespace with the ruleset on stdin; its output
// goes into report.detail.
void LoadRuleset(const ChildPlan& plan, ChildReport& report) {
  int in[2];
  int out[2];
  if (::pipe2(in, O_CLOEXEC) != 0) Report(plan, report, Step::kNftPipes, errno);
  if (::pipe2(out, O_CLOEXEC) != 0) Report(plan, report, Step::kNftPipes, errno);
  pid_t self = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) Report(plan, report, Step::kNftFork, errno);
  if (pid == 0) {
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != self) ::_exit(126);
    if (::dup2(in[0], STDIN_FILENO) < 0 || ::dup2(out[1], STDOUT_FILENO) < 0 ||
        ::dup2(out[1], STDERR_FILENO) < 0) {
      ::_exit(126);
    }
    ::execve(plan.nft_path, const_cast<char* const*>(plan.nft_argv.data()),
             const_cast<char* const*>(plan.nft_envp.data()));
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  // The ruleset is far smaller than a pipe's buffer, so writing it all
  // before reading nft's output cannot deadlock.
  size_t done = 0;
  while (done < plan.ruleset.size()) {
    ssize_t n = ::write(in[1], plan.ruleset.data() + done, plan.ruleset.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      Report(plan, report, Step::kNftWrite, err);
    }
    done += static_cast<size_t>(n);
  }
  ::close(in[1]);
  while (true) {
    size_t room = report.detail.size() - report.detail_size;
    char discard[256];
    char* target = room > 0 ? report.detail.data() + report.detail_size : discard;
    ssize_t n = ::read(out[0], target, room > 0 ? room : sizeof(discard));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (room > 0) report.detail_size += static_cast<uint32_t>(n);
  }
  ::close(out[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) Report(plan, report, Step::kNftWait, errno);
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    report.exit_status = status;
    Report(plan, report, Step::kNftFailed, 0);
  }
  report.detail_size = 0;
}

[[noreturn]] void BuildInChild(const ChildPlan& plan) {
  ChildReport report;
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) Report(plan, report, Step::kDeathSignal, errno);
  if (::getppid() != plan.parent) ::_exit(1);

  int flags = CLONE_NEWNET | (plan.own_user_namespace ? CLONE_NEWUSER : 0);
  if (::unshare(flags) != 0) Report(plan, report, Step::kUnshare, errno);
  if (plan.own_user_namespace) {
    // A process that changed uid (a daemon that dropped root) is not
    // dumpable, which leaves its /proc/self files owned by root and the maps
    // below unwritable. This helper holds nothing worth hiding from its own
    // uid for its few milliseconds of life.
    if (::prctl(PR_SET_DUMPABLE, 1) != 0) Report(plan, report, Step::kDumpable, errno);
    // Without "deny" an unprivileged process may not write gid_map.
    if (!WriteWholeFile("/proc/self/setgroups", "deny"))
      Report(plan, report, Step::kDenySetgroups, errno);
    if (!WriteWholeFile("/proc/self/uid_map", plan.uid_map))
      Report(plan, report, Step::kUidMap, errno);
    if (!WriteWholeFile("/proc/self/gid_map", plan.gid_map))
      Report(plan, report, Step::kGidMap, errno);
  }

  int ioctl_fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (ioctl_fd < 0) Report(plan, report, Step::kIoctlSocket, errno);
  if (!BringUp(ioctl_fd, plan.loopback)) Report(plan, report, Step::kLoopbackUp, errno);

  // Opened after unshare: a TAP lives in the namespace of the process that
  // opened /dev/net/tun.
  int tap_fd = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (tap_fd < 0) Report(plan, report, Step::kOpenTun, errno);
  ifreq tap_request = plan.tap;
  tap_request.ifr_flags = IFF_TAP | IFF_NO_PI;
  if (::ioctl(tap_fd, TUNSETIFF, &tap_request) != 0) Report(plan, report, Step::kCreateTap, errno);
  if (!SetAddress(ioctl_fd, plan.tap, plan.gateway, SIOCSIFADDR))
    Report(plan, report, Step::kTapAddress, errno);
  if (!SetAddress(ioctl_fd, plan.tap, plan.netmask, SIOCSIFNETMASK))
    Report(plan, report, Step::kTapNetmask, errno);
  // A labelled alias is the ioctl way to a second address on one device.
  if (!SetAddress(ioctl_fd, plan.tap_alias, plan.dns, SIOCSIFADDR))
    Report(plan, report, Step::kDnsAddress, errno);
  if (!SetAddress(ioctl_fd, plan.tap_alias, plan.netmask, SIOCSIFNETMASK))
    Report(plan, report, Step::kDnsNetmask, errno);
  ifreq mtu_request = plan.tap;
  mtu_request.ifr_mtu = plan.mtu;
  if (::ioctl(ioctl_fd, SIOCSIFMTU, &mtu_request) != 0) Report(plan, report, Step::kTapMtu, errno);
  // The same gateway MAC in every namespace: a guest restored from a
  // snapshot keeps its ARP entry for 10.0.2.2, and a new random MAC would
  // leave it talking to nobody until that entry expires. Locally
  // administered, and private to the namespace.
  ifreq mac_request = plan.tap;
  mac_request.ifr_hwaddr.sa_family = ARPHRD_ETHER;
  const unsigned char kGatewayMac[6] = {0x02, 0x63, 0x65, 0x6c, 0x6c, 0x61};
  std::memcpy(mac_request.ifr_hwaddr.sa_data, kGatewayMac, sizeof kGatewayMac);
  if (::ioctl(ioctl_fd, SIOCSIFHWADDR, &mac_request) != 0)
    Report(plan, report, Step::kTapMac, errno);
  if (!BringUp(ioctl_fd, plan.tap)) Report(plan, report, Step::kTapUp, errno);
  ::close(ioctl_fd);
  SendFds(plan, report, Step::kTapReady, &tap_fd, kTapFdCount);
  ::close(tap_fd);

  // Before the sockets exist: no guest packet can reach them unfiltered.
  LoadRuleset(plan, report);

  int netns_fd = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (netns_fd < 0) Report(plan, report, Step::kOpenNetns, errno);

  int proxy_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (proxy_fd < 0) Report(plan, report, Step::kProxySocket, errno);
  int one = 1;
  if (::setsockopt(proxy_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0)
    Report(plan, report, Step::kProxySocket, errno);
  if (::bind(proxy_fd, reinterpret_cast<const sockaddr*>(&plan.proxy), sizeof(plan.proxy)) != 0)
    Report(plan, report, Step::kProxyBind, errno);
  if (::listen(proxy_fd, SOMAXCONN) != 0) Report(plan, report, Step::kProxyListen, errno);

  int dns_fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (dns_fd < 0) Report(plan, report, Step::kDnsSocket, errno);
  sockaddr_in dns = plan.dns;
  dns.sin_port = htons(kDnsPort);
  if (::bind(dns_fd, reinterpret_cast<const sockaddr*>(&dns), sizeof(dns)) != 0)
    Report(plan, report, Step::kDnsBind, errno);

  int fds[kFdCount] = {proxy_fd, dns_fd, netns_fd};
  SendFds(plan, report, Step::kDone, fds, kFdCount);
  ::_exit(0);
}

// ---- the parent ----

Result<std::string> FindNft() {
  for (const char* candidate : {"/usr/sbin/nft", "/sbin/nft"}) {
    if (::access(candidate, X_OK) == 0) return std::string(candidate);
  }
  const char* path = std::getenv("PATH");
  std::string_view dirs = path ? path : "";
  while (!dirs.empty()) {
    size_t colon = dirs.find(':');
    std::string dir(dirs.substr(0, colon));
    dirs = colon == std::string_view::npos ? std::string_view() : dirs.substr(colon + 1);
    if (dir.empty()) continue;
    std::string candidate = dir + "/nft";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return Fail("nft (nftables) not found in /usr/sbin, /sbin or PATH; install the nftables package");
}

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

// Waits (bounded) for the child to end, killing it at the deadline.
void ReapChild(pid_t pid, int report_fd, Clock::time_point deadline) {
  // The child's end of the socketpair closes when it exits.
  while (true) {
    pollfd pfd{report_fd, POLLIN, 0};
    int rc = ::poll(&pfd, 1, RemainingMs(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc <= 0) break;
    char drain[64];
    ssize_t n = ::recv(report_fd, drain, sizeof(drain), MSG_DONTWAIT);
    if (n <= 0) break;
  }
  // Harmless when it already exited (it is a zombie until reaped).
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
}

Error ChildError(const ChildReport& report) {
  std::string message = "create isolated network: " + std::string(StepName(report.step));
  if (report.step == Step::kNftFailed) {
    int status = report.exit_status;
    message += WIFEXITED(status) ? " (exit code " + std::to_string(WEXITSTATUS(status)) + ")"
                                 : " (killed by signal " + std::to_string(WTERMSIG(status)) + ")";
    std::string detail(report.detail.data(),
                       std::min<size_t>(report.detail_size, report.detail.size()));
    while (!detail.empty() && detail.back() == '\n') detail.pop_back();
    if (!detail.empty()) message += ": " + detail;
    return Error::Msg(std::move(message));
  }
  return Error::FromErrno(message, report.err);
}

}  // namespace

std::string IsolatedNetworkRuleset(const IsolatedNetworkOptions& options) {
  std::string tap = kTapName;
  std::string port = std::to_string(options.proxy_port);
  // inet: one table sees IPv4 and IPv6; IPv6 from the guest meets the drop
  // policy. dnat to an explicit address (rather than `redirect`) does not
  // depend on which TAP address the kernel considers primary.
  return "table inet cella {\n"
         "  chain guest_nat {\n"
         "    type nat hook prerouting priority dstnat; policy accept;\n"
         "    iifname \"" +
         tap + "\" meta nfproto ipv4 meta l4proto tcp dnat ip to " + kGatewayAddress + ":" + port +
         "\n"
         "  }\n"
         "  chain guest_input {\n"
         "    type filter hook input priority filter; policy drop;\n"
         "    iif \"lo\" accept\n"
         "    iifname \"" +
         tap + "\" ip daddr " + kGatewayAddress + " tcp dport " + port +
         " ct status dnat accept\n"
         "    iifname \"" +
         tap + "\" ip daddr " + kDnsAddress + " udp dport " + std::to_string(kDnsPort) +
         " accept\n"
         "    limit rate 10/second burst 20 packets log prefix \"cella-drop \"\n"
         "  }\n"
         "  chain guest_forward {\n"
         "    type filter hook forward priority filter; policy drop;\n"
         "  }\n"
         "}\n";
}

namespace {

// Receives one of the child's messages: its report and up to `max_fds`
// descriptors (more are closed). Kills and reaps the child on a failure to
// receive (the deadline included); `received` is 0 when the child ended
// without sending.
struct Received {
  ChildReport report;
  ssize_t bytes = -1;
  bool truncated = false;
  std::array<UniqueFd, kFdCount> fds;
  int fd_count = 0;
};

Result<Received> ReceiveFromChild(pid_t pid, int parent_end, Clock::time_point deadline,
                                  int max_fds) {
  Received out;
  while (true) {
    pollfd pfd{parent_end, POLLIN, 0};
    int rc = ::poll(&pfd, 1, RemainingMs(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) {
      Error err = Error::FromErrno("create isolated network: poll");
      ReapChild(pid, parent_end, Clock::now());
      return std::unexpected(std::move(err));
    }
    if (rc == 0) {
      ReapChild(pid, parent_end, Clock::now());
      return std::unexpected(Error{"create isolated network: the helper did not finish within " +
                                       std::to_string(kBuildTimeout.count()) + " ms; killed",
                                   ETIMEDOUT});
    }
    ReportMessage in(&out.report);
    msghdr& message = in.message;
    out.bytes = ::recvmsg(parent_end, &message, MSG_CMSG_CLOEXEC);
    if (out.bytes < 0 && errno == EINTR) continue;
    if (out.bytes < 0) {
      Error err = Error::FromErrno("create isolated network: recvmsg");
      ReapChild(pid, parent_end, Clock::now() + kChildExitWait);
      return std::unexpected(std::move(err));
    }
    out.truncated = (message.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0;
    for (cmsghdr* h = CMSG_FIRSTHDR(&message); h != nullptr; h = CMSG_NXTHDR(&message, h)) {
      if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
        if (out.fd_count < max_fds) {
          out.fds[static_cast<size_t>(out.fd_count++)].Reset(fd);
        } else {
          ::close(fd);
        }
      }
    }
    return out;
  }
}

// The checks every message gets: a whole report, the step expected, and
// as many descriptors as that step carries.
Status CheckReceived(const Received& got, Step expected, int fds) {
  if (got.bytes == 0) return Fail("create isolated network: the helper exited without a report");
  if (got.bytes != static_cast<ssize_t>(sizeof(ChildReport)) || got.truncated) {
    return Fail("create isolated network: malformed report from the helper (" +
                std::to_string(got.bytes) + " bytes)");
  }
  if (got.report.step != expected) {
    if (got.report.step == Step::kDone || got.report.step == Step::kTapReady)
      return Fail("create isolated network: the helper's messages came out of order");
    return std::unexpected(ChildError(got.report));
  }
  if (got.fd_count != fds) {
    return Fail("create isolated network: the helper passed " + std::to_string(got.fd_count) +
                " descriptors, expected " + std::to_string(fds));
  }
  return {};
}

}  // namespace

PendingIsolatedNetwork::PendingIsolatedNetwork(PendingIsolatedNetwork&& other) noexcept
    : tap_(std::move(other.tap_)),
      parent_end_(std::move(other.parent_end_)),
      pid_(std::exchange(other.pid_, -1)),
      deadline_(other.deadline_),
      owner_(other.owner_),
      proxy_port_(other.proxy_port_) {}

PendingIsolatedNetwork& PendingIsolatedNetwork::operator=(PendingIsolatedNetwork&& other) noexcept {
  if (this != &other) {
    Abandon();
    tap_ = std::move(other.tap_);
    parent_end_ = std::move(other.parent_end_);
    pid_ = std::exchange(other.pid_, -1);
    deadline_ = other.deadline_;
    owner_ = other.owner_;
    proxy_port_ = other.proxy_port_;
  }
  return *this;
}

PendingIsolatedNetwork::~PendingIsolatedNetwork() { Abandon(); }

void PendingIsolatedNetwork::Abandon() {
  if (pid_ > 0) ReapChild(pid_, parent_end_.Get(), Clock::now());
  pid_ = -1;
}

Result<IsolatedNetwork> PendingIsolatedNetwork::Finish() {
  if (pid_ <= 0) return Fail("create isolated network: finished already");
  const pid_t pid = std::exchange(pid_, -1);
  Received got = CELLA_TRY(ReceiveFromChild(pid, parent_end_.Get(), deadline_, kFdCount));
  ReapChild(pid, parent_end_.Get(), Clock::now() + kChildExitWait);
  CELLA_TRY(CheckReceived(got, Step::kDone, kFdCount));
  IsolatedNetwork network;
  network.tap = std::move(tap_);
  network.proxy_listener = std::move(got.fds[0]);
  network.dns_socket = std::move(got.fds[1]);
  network.netns = std::move(got.fds[2]);
  network.owner = owner_;
  network.proxy_port = proxy_port_;
  return network;
}

Result<PendingIsolatedNetwork> StartIsolatedNetwork(const IsolatedNetworkOptions& options) {
  if (options.proxy_port == 0) return Fail("IsolatedNetworkOptions.proxy_port: must not be 0");
  if (options.proxy_port == kDnsPort) {
    return Fail("IsolatedNetworkOptions.proxy_port: 53 is the DNS port");
  }
  if (options.mtu < 576 || options.mtu > 65535) {
    return Fail("IsolatedNetworkOptions.mtu: " + std::to_string(options.mtu) +
                " is outside [576, 65535]");
  }
  std::string nft = CELLA_TRY(FindNft());

  ChildPlan plan;
  plan.own_user_namespace = ::geteuid() != 0;
  plan.uid_map = "0 " + std::to_string(::geteuid()) + " 1\n";
  plan.gid_map = "0 " + std::to_string(::getegid()) + " 1\n";
  plan.ruleset = IsolatedNetworkRuleset(options);
  plan.nft_path = nft.c_str();
  plan.nft_argv = {nft.c_str(), "-f", "-", nullptr};
  plan.nft_envp = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", nullptr};
  SetName(plan.loopback, "lo");
  SetName(plan.tap, kTapName);
  SetName(plan.tap_alias, std::string(kTapName) + ":1");
  plan.gateway = Ipv4(kGatewayAddress, 0);
  plan.dns = Ipv4(kDnsAddress, 0);
  plan.netmask = Ipv4(protocol::kGuestNetmask, 0);
  plan.proxy = Ipv4(kGatewayAddress, options.proxy_port);
  plan.mtu = options.mtu;
  plan.parent = ::getpid();

  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    return FailErrno("create isolated network: socketpair");
  }
  UniqueFd parent_end(pair[0]);
  UniqueFd child_end(pair[1]);
  plan.report_fd = child_end.Get();

  pid_t pid = ::fork();
  if (pid < 0) return FailErrno("create isolated network: fork");
  if (pid == 0) BuildInChild(plan);
  child_end.Reset();
  const auto deadline = Clock::now() + kBuildTimeout;

  Received got = CELLA_TRY(ReceiveFromChild(pid, parent_end.Get(), deadline, kTapFdCount));
  if (Status ok = CheckReceived(got, Step::kTapReady, kTapFdCount); !ok) {
    ReapChild(pid, parent_end.Get(), Clock::now() + kChildExitWait);
    return std::unexpected(std::move(ok.error()));
  }
  PendingIsolatedNetwork pending;
  pending.tap_ = std::move(got.fds[0]);
  pending.parent_end_ = std::move(parent_end);
  pending.pid_ = pid;
  pending.deadline_ = deadline;
  pending.owner_ =
      plan.own_user_namespace ? NamespaceOwner::kOwnUserNamespace : NamespaceOwner::kHost;
  pending.proxy_port_ = options.proxy_port;
  return pending;
}

Result<IsolatedNetwork> CreateIsolatedNetwork(const IsolatedNetworkOptions& options) {
  PendingIsolatedNetwork pending = CELLA_TRY(StartIsolatedNetwork(options));
  return pending.Finish();
}

Result<sockaddr_in> OriginalDestination(int accepted_fd) {
  sockaddr_in destination{};
  socklen_t size = sizeof(destination);
  if (::getsockopt(accepted_fd, SOL_IP, SO_ORIGINAL_DST, &destination, &size) != 0) {
    return FailErrno("getsockopt(SO_ORIGINAL_DST) on fd " + std::to_string(accepted_fd));
  }
  if (size != sizeof(destination) || destination.sin_family != AF_INET) {
    return Fail("getsockopt(SO_ORIGINAL_DST) on fd " + std::to_string(accepted_fd) +
                ": not an IPv4 address");
  }
  return destination;
}

}  // namespace cella::net
