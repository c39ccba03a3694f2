#include "guest/init/network.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"
#include "guest/init/console.h"
#include "guest/init/format.h"
#include "guest/init/fs_util.h"
#include "protocol/config.h"
#include "protocol/network.h"

namespace cella::init {
namespace {

Result<ifreq> Request(const std::string& interface) {
  if (interface.size() >= IFNAMSIZ) return Fail("interface name too long: " + interface);
  ifreq req{};
  std::memcpy(req.ifr_name, interface.c_str(), interface.size() + 1);
  return req;
}

Result<sockaddr> Ipv4Sockaddr(const std::string& text, uint32_t network_order = 0) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  if (text.empty()) {
    addr.sin_addr.s_addr = network_order;
  } else if (inet_pton(AF_INET, text.c_str(), &addr.sin_addr) != 1) {
    return Fail("\"" + text + "\" is not an IPv4 address");
  }
  sockaddr out{};
  static_assert(sizeof(addr) <= sizeof(out));
  std::memcpy(&out, &addr, sizeof(addr));
  return out;
}

// cella's guest network is IPv4 only (address, gateway and DNS come from
// the host's side, and egress is IPv4); IPv6 on the NIC would only give it
// a link-local address, at a cost under TCG: duplicate address detection,
// router solicitation and MLD on every link-up, and an unsolicited
// neighbour advertisement after every restore (QEMU asks the guest to
// announce itself). lo keeps ::1. Done once, before the link first goes
// up; a template's clones inherit it (and this flag) from its memory.
Status TurnOffIpv6On(const std::string& interface) {
  static std::string turned_off_on;
  if (turned_off_on == interface) return {};
  const std::string path = "/proc/sys/net/ipv6/conf/" + interface + "/disable_ipv6";
  if (auto st = WriteExisting(path, "1\n"); !st) {
    // A kernel without IPv6 has nothing to turn off.
    if (st.error().errno_value != ENOENT) return st;
  }
  turned_off_on = interface;
  return {};
}

Status SetUp(int sock, const std::string& interface) {
  ifreq req = CELLA_TRY(Request(interface));
  if (::ioctl(sock, SIOCGIFFLAGS, &req) != 0) return FailErrno("SIOCGIFFLAGS " + interface);
  if ((req.ifr_flags & IFF_UP) != 0) return {};  // brought up at the template point
  req.ifr_flags = static_cast<short>(req.ifr_flags | IFF_UP | IFF_RUNNING);
  if (::ioctl(sock, SIOCSIFFLAGS, &req) != 0) return FailErrno("SIOCSIFFLAGS " + interface);
  return {};
}

Status SetDown(int sock, const std::string& interface) {
  ifreq req = CELLA_TRY(Request(interface));
  if (::ioctl(sock, SIOCGIFFLAGS, &req) != 0) return FailErrno("SIOCGIFFLAGS " + interface);
  if ((req.ifr_flags & IFF_UP) == 0) return {};
  req.ifr_flags = static_cast<short>(req.ifr_flags & ~IFF_UP);
  if (::ioctl(sock, SIOCSIFFLAGS, &req) != 0) return FailErrno("SIOCSIFFLAGS " + interface);
  return {};
}

// The NIC's address, from the host: a warm clone's NIC was probed (and is
// up) with its template's. virtio_net takes a new address while up; true
// when the link had to go down for it (which drops the routes through it).
Result<bool> SetMac(int sock, const std::string& interface, const std::string& text) {
  auto mac = protocol::ParseMac(text);
  if (!mac) return Fail("guest_mac \"" + text + "\" is not a unicast MAC address");
  ifreq req = CELLA_TRY(Request(interface));
  req.ifr_hwaddr.sa_family = ARPHRD_ETHER;
  std::memcpy(req.ifr_hwaddr.sa_data, mac->data(), mac->size());
  if (::ioctl(sock, SIOCSIFHWADDR, &req) == 0) return false;
  if (errno != EBUSY) return FailErrno("SIOCSIFHWADDR " + interface + " " + text);
  // A driver without live address changes: down, change, and up again.
  CELLA_TRY(SetDown(sock, interface));
  if (::ioctl(sock, SIOCSIFHWADDR, &req) != 0)
    return FailErrno("SIOCSIFHWADDR " + interface + " " + text);
  CELLA_TRY(SetUp(sock, interface));
  return true;
}

Result<std::vector<std::string>> Interfaces() {
  std::vector<std::string> names;
  DIR* dir = ::opendir("/sys/class/net");
  if (dir == nullptr) return FailErrno("opendir /sys/class/net");
  errno = 0;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name == "." || name == ".." || name == "lo") continue;
    names.push_back(name);
  }
  int err = errno;
  ::closedir(dir);
  if (err != 0) return FailErrno("readdir /sys/class/net", err);
  std::sort(names.begin(), names.end());
  return names;
}

Result<std::string> WaitForInterface(Deadline deadline) {
  for (;;) {
    auto names = CELLA_TRY(Interfaces());
    if (!names.empty()) return names.front();
    if (std::chrono::steady_clock::now() >= deadline)
      return Fail("no network interface appeared (is virtio_net loaded and a NIC attached?)");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// The NIC's IPv4 set-up as the template point made it: in init's memory,
// so every clone of the template knows what it inherited. (After a
// clone's restore QEMU has it announce itself: one gratuitous ARP for
// this address from the template's MAC before SetMac runs; the host's
// side learns the clone's own MAC from its first packet.)
struct NicSetUp {
  std::string interface;
  std::string ip;
  int cidr = 0;
  std::string gw;
};

std::optional<NicSetUp>& TemplateNic() {
  static std::optional<NicSetUp> nic;
  return nic;
}

Status SetAddress(int sock, const std::string& interface, const std::string& ip, int cidr) {
  {
    ifreq req = CELLA_TRY(Request(interface));
    req.ifr_addr = CELLA_TRY_CTX(Ipv4Sockaddr(ip), "guest_ip");
    if (::ioctl(sock, SIOCSIFADDR, &req) != 0) return FailErrno("SIOCSIFADDR " + ip);
  }
  uint32_t mask = CELLA_TRY_CTX(NetmaskFromCidr(cidr), "guest_cidr");
  ifreq req = CELLA_TRY(Request(interface));
  req.ifr_netmask = CELLA_TRY(Ipv4Sockaddr("", mask));
  if (::ioctl(sock, SIOCSIFNETMASK, &req) != 0)
    return FailErrno("SIOCSIFNETMASK /" + std::to_string(cidr));
  return {};
}

// SIOCADDRT (an existing route is fine) or SIOCDELRT (a missing one is).
Status ChangeDefaultRoute(int sock, unsigned long request, const std::string& interface,
                          const std::string& gw) {
  rtentry route{};
  route.rt_dst = CELLA_TRY(Ipv4Sockaddr("", 0));
  route.rt_genmask = CELLA_TRY(Ipv4Sockaddr("", 0));
  route.rt_gateway = CELLA_TRY_CTX(Ipv4Sockaddr(gw), "guest_gw");
  route.rt_flags = RTF_UP | RTF_GATEWAY;
  std::string dev = interface;
  route.rt_dev = dev.data();
  if (::ioctl(sock, request, &route) == 0) return {};
  if (request == SIOCADDRT && errno == EEXIST) return {};
  if (request == SIOCDELRT && errno == ESRCH) return {};
  return FailErrno(std::string(request == SIOCADDRT ? "SIOCADDRT" : "SIOCDELRT") + " default via " +
                   gw);
}

}  // namespace

Status ConfigureNetwork(const protocol::Config& config, Deadline deadline) {
  UniqueFd sock(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!sock) return FailErrno("socket(AF_INET)");
  CELLA_TRY(SetUp(sock.Get(), "lo"));
  if (config.no_network || !config.network_enabled) {
    // As a cold boot leaves it: no address (0.0.0.0 removes the template
    // point's, and the routes through it), the link down.
    if (const auto& made = TemplateNic()) {
      const std::string where = "network " + made->interface;
      CELLA_TRY_CTX(ChangeDefaultRoute(sock.Get(), SIOCDELRT, made->interface, made->gw), where);
      ifreq req = CELLA_TRY(Request(made->interface));
      req.ifr_addr = CELLA_TRY(Ipv4Sockaddr("", 0));
      if (::ioctl(sock.Get(), SIOCSIFADDR, &req) != 0)
        return FailErrno(where + ": SIOCSIFADDR 0.0.0.0");
    }
    for (const std::string& interface : CELLA_TRY(Interfaces()))
      CELLA_TRY_CTX(SetDown(sock.Get(), interface), "network " + interface);
    Debug("network disabled: only lo is up");
    return {};
  }
  const std::optional<NicSetUp>& made = TemplateNic();
  std::string interface = made ? made->interface : CELLA_TRY(WaitForInterface(deadline));
  std::string where = "network " + interface;

  CELLA_TRY_CTX(TurnOffIpv6On(interface), where);
  bool link_cycled = false;
  if (!config.guest_mac.empty())
    link_cycled = CELLA_TRY_CTX(SetMac(sock.Get(), interface, config.guest_mac), where);
  if (config.mtu > 0) {
    ifreq req = CELLA_TRY(Request(interface));
    req.ifr_mtu = config.mtu;
    if (::ioctl(sock.Get(), SIOCSIFMTU, &req) != 0)
      return FailErrno(where + ": SIOCSIFMTU " + std::to_string(config.mtu));
  }
  const std::string summary = config.guest_ip + "/" + std::to_string(config.guest_cidr) +
                              (config.guest_gw.empty() ? "" : " via " + config.guest_gw);
  if (made && !link_cycled && made->ip == config.guest_ip && made->cidr == config.guest_cidr &&
      made->gw == config.guest_gw) {
    Debug(where + ": " + summary + " (as made at the template point)");
    return {};
  }
  // Another address than the template point's: its default route goes
  // first (SIOCSIFADDR replaces the address, not the routes through it).
  if (made && !made->gw.empty())
    CELLA_TRY_CTX(ChangeDefaultRoute(sock.Get(), SIOCDELRT, interface, made->gw), where);
  CELLA_TRY_CTX(SetAddress(sock.Get(), interface, config.guest_ip, config.guest_cidr), where);
  CELLA_TRY_CTX(SetUp(sock.Get(), interface), where);
  if (!config.guest_gw.empty())
    CELLA_TRY_CTX(ChangeDefaultRoute(sock.Get(), SIOCADDRT, interface, config.guest_gw), where);
  Debug(where + ": " + summary);
  return {};
}

Status BringLinksUpForClones() {
  UniqueFd sock(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!sock) return FailErrno("socket(AF_INET)");
  CELLA_TRY(SetUp(sock.Get(), "lo"));
  auto names = CELLA_TRY(Interfaces());
  if (names.empty()) return {};
  const std::string& interface = names.front();
  const std::string where = "network " + interface;
  CELLA_TRY_CTX(TurnOffIpv6On(interface), where);
  CELLA_TRY_CTX(SetUp(sock.Get(), interface), where);
  // Every sandbox's NIC has the same IPv4 set-up (protocol/network.h); the
  // clones that ask for it (all, today) find it made.
  NicSetUp nic{interface, protocol::kGuestIp, protocol::kGuestPrefixLength, protocol::kHostGateway};
  CELLA_TRY_CTX(SetAddress(sock.Get(), interface, nic.ip, nic.cidr), where);
  CELLA_TRY_CTX(ChangeDefaultRoute(sock.Get(), SIOCADDRT, interface, nic.gw), where);
  TemplateNic() = std::move(nic);
  return {};
}

Status WriteIdentityFiles(const protocol::Config& config) {
  if (!config.hostname.empty()) {
    if (::sethostname(config.hostname.data(), config.hostname.size()) != 0)
      return FailErrno("sethostname " + config.hostname);
    CELLA_TRY(ReplaceFile("/etc/hostname", config.hostname + "\n", 0644));
  }
  CELLA_TRY(ReplaceFile("/etc/hosts", HostsFileContent(config), 0644));
  auto servers = EffectiveDnsServers(config);
  if (!servers.empty())
    CELLA_TRY(ReplaceFile("/etc/resolv.conf", ResolvConfContent(servers), 0644));
  return {};
}

Status InstallTrustedCertificates(const protocol::Config& config) {
  if (config.ca_certificates.empty()) return {};
  std::string pem = config.ca_certificates;
  if (pem.back() != '\n') pem += '\n';
  CELLA_TRY(MkdirAll("/etc/ssl/certs", 0755));
  CELLA_TRY(ReplaceFile(protocol::kEgressCaFile, pem, 0644));
  // The Fedora/RHEL bundle is only touched when the image has it.
  for (const char* bundle : protocol::kTrustBundles) {
    std::string existing;
    if (::access(bundle, F_OK) == 0) {
      existing = CELLA_TRY_CTX(ReadFileToString(bundle, size_t{32} << 20), bundle);
    } else if (std::string_view(bundle).starts_with("/etc/pki")) {
      continue;
    }
    if (existing.find(pem) != std::string::npos) continue;
    if (!existing.empty() && existing.back() != '\n') existing += '\n';
    CELLA_TRY(ReplaceFile(bundle, existing + pem, 0644));
  }
  return {};
}

Status TurnOffBpfJit() {
  if (auto st = WriteExisting("/proc/sys/net/core/bpf_jit_enable", "0\n"); !st) {
    // No JIT in this kernel (ENOENT), or one that is always on (EINVAL):
    // nothing to turn off.
    if (st.error().errno_value != ENOENT && st.error().errno_value != EINVAL) return st;
  }
  return {};
}

}  // namespace cella::init
