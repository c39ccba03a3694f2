// The sandbox's DNS service ("fake IP" DNS). The guest's only resolver is
// 10.0.2.3:53, answered here: an allowed name gets a virtual IPv4 address
// from 198.18.0.0/15, one per name and stable for the sandbox's life, so the
// transparent proxy can map any TCP flow back to the name the guest asked
// for and decide by policy. A name the policy does not allow is REFUSED
// before any lookup on the host, so a blocked name leaks nothing (not even a
// query to the host's resolver).
//
// Before answering an allowed, non-pinned name, the host resolves it; if
// every address is private/special and the policy does not open those, the
// answer is REFUSED (DNS rebinding guard). The usable addresses are kept in
// the FakeIpTable for the proxy's upstream connection.
#pragma once

#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <expected>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "base/wake_fd.h"
#include "host/net/policy.h"

namespace cella::net {

// Host-side name resolution. An empty vector means "no such name"; an error
// means the lookup itself failed. Injected so tests never touch the real
// resolver.
using HostResolver = std::function<Result<std::vector<IpAddress>>(const std::string& name)>;
// getaddrinfo(3) on the host, TCP, both families.
Result<std::vector<IpAddress>> SystemResolve(const std::string& name);

// Name <-> virtual address table shared by the DNS server (writer) and the
// proxy (reader). Thread-safe.
class FakeIpTable {
 public:
  // 198.18.0.1 .. 198.19.255.254.
  static bool IsVirtual(in_addr address);
  static bool IsVirtual(const IpAddress& address);

  // The name's address, allocating the next free one on first use. Fails
  // when the /15 is exhausted (131070 distinct names).
  Result<in_addr> AddressFor(const std::string& name);
  std::optional<std::string> NameFor(in_addr address) const;

  // The name <-> address pairs as text, to outlive a standby or be handed to
  // a fork's copies (the guest keeps using the addresses it was answered):
  // "cella-fake-ips 1\n" then "OFFSET NAME\n" per name. Resolved host
  // addresses are not kept (they age; the proxy resolves again).
  std::string Export() const;
  // Loads an Export() into this table, which must be empty. Strict: the
  // header, every offset inside the block and used once, every name 1..255
  // printable non-space bytes and used once, at most the block's size, the
  // text at most kMaxExportBytes; any fault fails it and leaves it empty.
  // Later names get addresses after the highest one loaded.
  static constexpr size_t kMaxExportBytes = size_t{40} << 20;
  Status Import(std::string_view text);

  // Host addresses an allowed name resolved to (already filtered by policy).
  void SetResolved(const std::string& name, std::vector<IpAddress> addresses);
  // nullopt if never resolved or resolved longer than `max_age` ago.
  std::optional<std::vector<IpAddress>> Resolved(
      const std::string& name, std::chrono::steady_clock::duration max_age =
                                   std::chrono::steady_clock::duration::max()) const;

 private:
  mutable std::mutex mutex_;
  uint32_t next_offset_ = 1;                 // guarded by mutex_
  std::map<std::string, uint32_t> by_name_;  // guarded by mutex_
  std::map<uint32_t, std::string> by_offset_;
  struct ResolvedEntry {
    std::vector<IpAddress> addresses;
    std::chrono::steady_clock::time_point when;
  };
  std::map<std::string, ResolvedEntry> resolved_;  // guarded by mutex_
};

// --- Wire format (exposed for tests and the fuzzer) ---

enum class DnsType : uint16_t { kA = 1, kAaaa = 28 };
enum class DnsRcode : uint8_t {
  kNoError = 0,
  kFormErr = 1,
  kServFail = 2,
  kNxDomain = 3,
  kNotImp = 4,
  kRefused = 5,
};

struct DnsQuery {
  uint16_t id = 0;
  uint16_t flags = 0;
  std::string name;  // lower-case, no trailing dot ("" = the root)
  uint16_t qtype = 0;
  uint16_t qclass = 0;
  // The raw question (name + type + class) as sent, echoed in the answer.
  std::vector<std::byte> question;
};

// Strict: a standard query (QR=0, OPCODE=0) with exactly one question, no
// answer/authority records, labels <= 63 bytes, name <= 255 bytes, no
// compression pointers in the question. Additional records (EDNS OPT) are
// tolerated and ignored. Errors name the defect.
Result<DnsQuery> ParseDnsQuery(std::span<const std::byte> packet);
// A response to `query`: its question echoed, plus one A record when
// `address` is given (TTL in seconds).
std::vector<std::byte> BuildDnsResponse(const DnsQuery& query, DnsRcode rcode,
                                        std::optional<in_addr> address, uint32_t ttl = 60);
// A header-only reply (no question) carrying `rcode`, for a packet too
// broken to echo its question; empty if not even a header is there (then
// nothing is sent).
std::vector<std::byte> BuildHeaderOnlyReply(std::span<const std::byte> packet, DnsRcode rcode);

// --- Server ---

struct DnsServerOptions {
  std::shared_ptr<Policy> policy;
  std::shared_ptr<FakeIpTable> table;
  HostResolver resolver = SystemResolve;
  // Host lookups are redone at most this often per name.
  std::chrono::seconds resolve_cache{30};
};

// Serves one UDP socket (bound by the caller: 10.0.2.3:53 inside the
// sandbox's namespace, 127.0.0.1:0 in tests) on one thread.
// Lifetime: Stop() (or the destructor) ends and joins the thread; the
// socket is closed with the server.
class DnsServer {
 public:
  static Result<std::unique_ptr<DnsServer>> Start(UniqueFd udp_socket, DnsServerOptions options);
  ~DnsServer();
  DnsServer(const DnsServer&) = delete;
  DnsServer& operator=(const DnsServer&) = delete;

  void Stop();
  std::optional<std::string> NameForVirtualAddress(in_addr address) const {
    return options_.table->NameFor(address);
  }
  // The answer to one query packet (empty: send nothing). Called by the
  // serving thread; public for tests.
  std::vector<std::byte> Answer(std::span<const std::byte> packet);

 private:
  DnsServer(UniqueFd socket, WakeFd wake, DnsServerOptions options)
      : socket_(std::move(socket)), wake_(std::move(wake)), options_(std::move(options)) {}
  void Serve();
  // Addresses the host resolved for `name`, filtered; the rcode to send when
  // the name cannot be answered.
  std::expected<std::vector<IpAddress>, DnsRcode> ResolveOnHost(const std::string& name);

  UniqueFd socket_;
  WakeFd wake_;  // Stop() wakes the poll
  DnsServerOptions options_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
};

}  // namespace cella::net
