// TLS for the egress proxy: the interception CA on disk, minted leaves, the
// guest-facing and upstream-facing TLS streams (over socketpairs, in
// process), and the SNI reader on real ClientHellos.
//
// Every socket here has 30 s send/receive timeouts, so a bug that would hang
// ends as a failed read/write instead.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "base/io.h"
#include "host/net/tls.h"
#include "support/temp_dir.h"

namespace cella::net {
namespace {

using ::cella::testing::TempDir;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream out;
  out << in.rdbuf();
  return out.str();
}

std::span<const std::byte> AsBytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

// A connected pair whose blocking calls give up after 30 s.
std::pair<std::unique_ptr<FdStream>, std::unique_ptr<FdStream>> StreamPair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  timeval timeout{30, 0};
  for (int fd : fds) {
    if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)) != 0 ||
        ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout)) != 0)
      std::abort();
  }
  return {std::make_unique<FdStream>(UniqueFd(fds[0])),
          std::make_unique<FdStream>(UniqueFd(fds[1]))};
}

Result<std::string> ReadToEnd(ByteStream& stream) {
  std::string out;
  std::vector<std::byte> buffer(4096);
  for (;;) {
    size_t got = CELLA_TRY(stream.Read(buffer));
    if (got == 0) return out;
    out.append(reinterpret_cast<const char*>(buffer.data()), got);
  }
}

using CertPtr = std::unique_ptr<X509, decltype(&X509_free)>;

CertPtr ParsePem(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  return CertPtr(cert, X509_free);
}

enum class Expect { kDnsName, kIpAddress };

// Verifies `leaf_pem` as a TLS server certificate for `host` with only
// `ca_pem` trusted, the way a TLS client would. Returns the X509_V_* code.
int VerifyLeaf(const std::string& ca_pem, const std::string& leaf_pem, const std::string& host,
               Expect kind) {
  CertPtr ca = ParsePem(ca_pem);
  CertPtr leaf = ParsePem(leaf_pem);
  if (!ca || !leaf) return -1;
  X509_STORE* store = X509_STORE_new();
  X509_STORE_add_cert(store, ca.get());
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, leaf.get(), nullptr);
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx);
  X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_SSL_SERVER);
  X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_X509_STRICT);
  if (kind == Expect::kDnsName) {
    X509_VERIFY_PARAM_set1_host(param, host.c_str(), host.size());
  } else {
    X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str());
  }
  int result = X509_verify_cert(ctx) == 1 ? X509_V_OK : X509_STORE_CTX_get_error(ctx);
  X509_STORE_CTX_free(ctx);
  X509_STORE_free(store);
  return result;
}

std::shared_ptr<CertificateAuthority> MakeCa(const TempDir& dir) {
  auto ca = CertificateAuthority::LoadOrCreate(dir.path() + "/ca");
  if (!ca) {
    ADD_FAILURE() << ca.error().message;
    return nullptr;
  }
  return *ca;
}

// A deterministic byte stream per seed (xorshift), so a reader can check
// every byte's value and position without keeping a copy.
class Pattern {
 public:
  explicit Pattern(uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  std::byte Next() {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return static_cast<std::byte>(state_ >> 56);
  }

 private:
  uint64_t state_;
};

struct Direction {
  Status write_status;
  Result<size_t> read_result = size_t{0};
  bool content_matches = true;
};

// Writes `bytes` of pattern `seed` then half-closes.
void WritePattern(ByteStream& stream, uint64_t seed, size_t bytes, Status& status) {
  Pattern pattern(seed);
  std::vector<std::byte> chunk(32 * 1024);
  for (size_t sent = 0; sent < bytes;) {
    size_t n = std::min(chunk.size(), bytes - sent);
    for (size_t i = 0; i < n; ++i) chunk[i] = pattern.Next();
    status = stream.Write(std::span(chunk.data(), n));
    if (!status) return;
    sent += n;
  }
  status = stream.ShutdownWrite();
}

// Reads to EOF checking every byte against pattern `seed`.
void ReadPattern(ByteStream& stream, uint64_t seed, Result<size_t>& total, bool& matches) {
  Pattern pattern(seed);
  std::vector<std::byte> buffer(64 * 1024);
  size_t count = 0;
  for (;;) {
    auto got = stream.Read(buffer);
    if (!got) {
      total = std::unexpected(got.error());
      return;
    }
    if (*got == 0) break;
    for (size_t i = 0; i < *got; ++i)
      if (buffer[i] != pattern.Next()) matches = false;
    count += *got;
  }
  total = count;
}

struct DuplexOutcome {
  Direction a_to_b;
  Direction b_to_a;
  double seconds = 0;
};

// Both directions at once, each side reading on one thread and writing on
// another: the proxy's usage.
DuplexOutcome PumpBothWays(ByteStream& a, ByteStream& b, size_t bytes) {
  DuplexOutcome out;
  auto start = std::chrono::steady_clock::now();
  {
    std::jthread a_writes([&] { WritePattern(a, 1, bytes, out.a_to_b.write_status); });
    std::jthread b_writes([&] { WritePattern(b, 2, bytes, out.b_to_a.write_status); });
    std::jthread b_reads(
        [&] { ReadPattern(b, 1, out.a_to_b.read_result, out.a_to_b.content_matches); });
    std::jthread a_reads(
        [&] { ReadPattern(a, 2, out.b_to_a.read_result, out.b_to_a.content_matches); });
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

void ExpectDelivered(const Direction& direction, size_t bytes, const char* label) {
  EXPECT_TRUE(direction.write_status.has_value())
      << label << " write: " << direction.write_status.error().message;
  ASSERT_TRUE(direction.read_result.has_value())
      << label << " read: " << direction.read_result.error().message;
  EXPECT_EQ(*direction.read_result, bytes) << label;
  EXPECT_TRUE(direction.content_matches) << label << ": bytes differ from what was sent";
}

// Bulk copy both ways at once with a fixed buffer: measures the transport,
// not the pattern generator. Returns seconds; byte counts are checked.
double TimeBulkCopy(ByteStream& a, ByteStream& b, size_t bytes) {
  auto start = std::chrono::steady_clock::now();
  auto write = [bytes](ByteStream& stream) {
    std::vector<std::byte> chunk(64 * 1024, std::byte{0x5a});
    for (size_t sent = 0; sent < bytes; sent += chunk.size()) {
      auto status = stream.Write(std::span(chunk.data(), std::min(chunk.size(), bytes - sent)));
      EXPECT_TRUE(status.has_value()) << status.error().message;
      if (!status) return;
    }
    auto closed = stream.ShutdownWrite();
    EXPECT_TRUE(closed.has_value()) << closed.error().message;
  };
  auto count = [bytes](ByteStream& stream) {
    std::vector<std::byte> buffer(64 * 1024);
    size_t total = 0;
    for (;;) {
      auto got = stream.Read(buffer);
      ASSERT_TRUE(got.has_value()) << got.error().message;
      if (*got == 0) break;
      total += *got;
    }
    EXPECT_EQ(total, bytes);
  };
  {
    std::jthread a_writes([&] { write(a); });
    std::jthread b_writes([&] { write(b); });
    std::jthread a_reads([&] { count(a); });
    std::jthread b_reads([&] { count(b); });
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct TlsPair {
  std::unique_ptr<ByteStream> server;  // guest-facing side (AcceptTls)
  std::unique_ptr<ByteStream> client;  // upstream-facing side (ConnectTls)
};

// Handshakes AcceptTls(server_name) against ConnectTls(client_name, ca_file).
std::pair<Result<std::unique_ptr<ByteStream>>, Result<std::unique_ptr<ByteStream>>> Handshake(
    CertificateAuthority& ca, const std::string& server_name, const std::string& client_name,
    const std::string& ca_file) {
  auto [left, right] = StreamPair();
  Result<std::unique_ptr<ByteStream>> server = Fail("not run");
  {
    std::jthread accept([&, raw = std::move(left)]() mutable {
      server = AcceptTls(std::move(raw), "", ca, server_name);
    });
    auto client = ConnectTls(std::move(right), client_name, ca_file);
    // A failed client closed its socket above, which ends the server's wait.
    accept.join();
    return {std::move(server), std::move(client)};
  }
}

TlsPair ConnectedPair(CertificateAuthority& ca, const std::string& name) {
  auto [server, client] = Handshake(ca, name, name, ca.CaCertificatePath());
  EXPECT_TRUE(server.has_value()) << server.error().message;
  EXPECT_TRUE(client.has_value()) << client.error().message;
  if (!server || !client) return {};
  return {std::move(*server), std::move(*client)};
}

// --- CA ----------------------------------------------------------------------

TEST(NetTlsCa, CreatesKeyWithMode0600AndReloadsTheSameCa) {
  TempDir dir;
  std::string ca_dir = dir.path() + "/data/ca";  // parents are created too
  auto first = CertificateAuthority::LoadOrCreate(ca_dir);
  ASSERT_TRUE(first.has_value()) << first.error().message;

  struct stat key_stat {};
  ASSERT_EQ(::stat((ca_dir + "/ca.key").c_str(), &key_stat), 0);
  EXPECT_EQ(key_stat.st_mode & 07777, 0600u);
  std::string key_before = ReadFile(ca_dir + "/ca.key");
  EXPECT_NE(key_before.find("PRIVATE KEY"), std::string::npos);
  EXPECT_EQ(ReadFile(ca_dir + "/ca.crt"), (*first)->CaCertificatePem());
  EXPECT_EQ((*first)->CaCertificatePath(), ca_dir + "/ca.crt");

  CertPtr cert = ParsePem((*first)->CaCertificatePem());
  ASSERT_TRUE(cert);
  char subject[256];
  X509_NAME_get_text_by_NID(X509_get_subject_name(cert.get()), NID_commonName, subject,
                            sizeof(subject));
  EXPECT_STREQ(subject, "cella egress CA");
  EXPECT_EQ(X509_check_ca(cert.get()), 1);
  EXPECT_TRUE(X509_get_key_usage(cert.get()) & KU_KEY_CERT_SIGN);
  // About ten years of validity.
  time_t in_nine_years = std::time(nullptr) + 9 * 365 * 24 * 3600;
  EXPECT_GT(X509_cmp_time(X509_get0_notAfter(cert.get()), &in_nine_years), 0);

  auto second = CertificateAuthority::LoadOrCreate(ca_dir);
  ASSERT_TRUE(second.has_value()) << second.error().message;
  EXPECT_EQ((*second)->CaCertificatePem(), (*first)->CaCertificatePem());
  EXPECT_EQ(ReadFile(ca_dir + "/ca.key"), key_before);
  // The reloaded key is the same key: its leaves chain to the first CA.
  auto leaf = (*second)->LeafFor("api.test");
  ASSERT_TRUE(leaf.has_value()) << leaf.error().message;
  EXPECT_EQ(VerifyLeaf((*first)->CaCertificatePem(), (*leaf)->certificate_pem, "api.test",
                       Expect::kDnsName),
            X509_V_OK);
}

TEST(NetTlsCa, RefusesKeyReadableByOthers) {
  TempDir dir;
  std::string ca_dir = dir.path() + "/ca";
  ASSERT_TRUE(CertificateAuthority::LoadOrCreate(ca_dir).has_value());
  ASSERT_EQ(::chmod((ca_dir + "/ca.key").c_str(), 0644), 0);
  auto again = CertificateAuthority::LoadOrCreate(ca_dir);
  ASSERT_FALSE(again.has_value());
  EXPECT_NE(again.error().message.find("mode 0644"), std::string::npos) << again.error().message;
}

TEST(NetTlsCa, RecreatesHalfWrittenPair) {
  TempDir dir;
  std::string ca_dir = dir.path() + "/ca";
  ASSERT_TRUE(CertificateAuthority::LoadOrCreate(ca_dir).has_value());
  ASSERT_EQ(::unlink((ca_dir + "/ca.crt").c_str()), 0);  // crash between the two renames
  auto again = CertificateAuthority::LoadOrCreate(ca_dir);
  ASSERT_TRUE(again.has_value()) << again.error().message;
  EXPECT_EQ(ReadFile(ca_dir + "/ca.crt"), (*again)->CaCertificatePem());
}

TEST(NetTlsCa, ConcurrentFirstUseFromProcessesEndsWithOneCa) {
  TempDir dir;
  std::string ca_dir = dir.path() + "/ca";
  constexpr int kProcesses = 4;
  int go[2];
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  std::vector<pid_t> children;
  for (int i = 0; i < kProcesses; ++i) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::alarm(60);  // bounds the child whatever happens
      ::close(go[1]);
      char byte;
      while (::read(go[0], &byte, 1) < 0 && errno == EINTR) {
      }
      auto ca = CertificateAuthority::LoadOrCreate(ca_dir);
      if (!ca) ::_exit(2);
      std::string out = dir.path() + "/seen." + std::to_string(i);
      if (!WriteStringToFile(out, (*ca)->CaCertificatePem(), 0600)) ::_exit(3);
      ::_exit(0);
    }
    children.push_back(pid);
  }
  ::close(go[0]);
  ::close(go[1]);  // every child starts now
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  }
  std::string on_disk = ReadFile(ca_dir + "/ca.crt");
  ASSERT_FALSE(on_disk.empty());
  for (int i = 0; i < kProcesses; ++i)
    EXPECT_EQ(ReadFile(dir.path() + "/seen." + std::to_string(i)), on_disk) << "process " << i;
  auto reloaded = CertificateAuthority::LoadOrCreate(ca_dir);
  ASSERT_TRUE(reloaded.has_value()) << reloaded.error().message;
  EXPECT_EQ((*reloaded)->CaCertificatePem(), on_disk);
}

// --- leaves --------------------------------------------------------------------

TEST(NetTlsLeaf, DnsLeafVerifiesForItsNameOnly) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  auto leaf = ca->LeafFor("api.test");
  ASSERT_TRUE(leaf.has_value()) << leaf.error().message;
  EXPECT_EQ((*leaf)->name, "api.test");
  EXPECT_EQ(
      VerifyLeaf(ca->CaCertificatePem(), (*leaf)->certificate_pem, "api.test", Expect::kDnsName),
      X509_V_OK);
  EXPECT_EQ(
      VerifyLeaf(ca->CaCertificatePem(), (*leaf)->certificate_pem, "other.test", Expect::kDnsName),
      X509_V_ERR_HOSTNAME_MISMATCH);

  // The SAN holds exactly that DNS name.
  CertPtr cert = ParsePem((*leaf)->certificate_pem);
  ASSERT_TRUE(cert);
  auto* names = static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert.get(), NID_subject_alt_name, nullptr, nullptr));
  ASSERT_NE(names, nullptr);
  ASSERT_EQ(sk_GENERAL_NAME_num(names), 1);
  GENERAL_NAME* name = sk_GENERAL_NAME_value(names, 0);
  ASSERT_EQ(name->type, GEN_DNS);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(name->d.dNSName)),
                        ASN1_STRING_length(name->d.dNSName)),
            "api.test");
  GENERAL_NAMES_free(names);
  EXPECT_EQ(X509_check_ca(cert.get()), 0);
  // Short-lived: at most 30 days (plus the hour of skew allowance).
  time_t in_31_days = std::time(nullptr) + 31 * 24 * 3600;
  EXPECT_LT(X509_cmp_time(X509_get0_notAfter(cert.get()), &in_31_days), 0);

  // Cached per normalised name.
  auto again = ca->LeafFor("API.Test.");
  ASSERT_TRUE(again.has_value()) << again.error().message;
  EXPECT_EQ(again->get(), leaf->get());
}

TEST(NetTlsLeaf, IpLiteralLeafCarriesAnIpSan) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  auto v4 = ca->LeafFor("127.0.0.1");
  ASSERT_TRUE(v4.has_value()) << v4.error().message;
  EXPECT_EQ((*v4)->kind, HostKind::kIpAddress);
  EXPECT_EQ(
      VerifyLeaf(ca->CaCertificatePem(), (*v4)->certificate_pem, "127.0.0.1", Expect::kIpAddress),
      X509_V_OK);
  EXPECT_EQ(
      VerifyLeaf(ca->CaCertificatePem(), (*v4)->certificate_pem, "127.0.0.2", Expect::kIpAddress),
      X509_V_ERR_IP_ADDRESS_MISMATCH);
  EXPECT_EQ(
      VerifyLeaf(ca->CaCertificatePem(), (*v4)->certificate_pem, "api.test", Expect::kDnsName),
      X509_V_ERR_HOSTNAME_MISMATCH);

  auto v6 = ca->LeafFor("0:0::1");
  ASSERT_TRUE(v6.has_value()) << v6.error().message;
  EXPECT_EQ((*v6)->name, "::1");
  EXPECT_EQ(VerifyLeaf(ca->CaCertificatePem(), (*v6)->certificate_pem, "::1", Expect::kIpAddress),
            X509_V_OK);
}

TEST(NetTlsLeaf, ConcurrentCallersShareOneLeafPerName) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  constexpr int kThreads = 4;
  std::vector<const LeafCert*> shared(kThreads, nullptr);
  std::vector<std::string> own_names(kThreads);
  {
    std::vector<std::jthread> threads;
    for (int i = 0; i < kThreads; ++i) {
      threads.emplace_back([&, i] {
        auto common = ca->LeafFor("api.test");
        auto own = ca->LeafFor("n" + std::to_string(i) + ".test");
        if (common) shared[i] = common->get();
        if (own) own_names[i] = (*own)->name;
      });
    }
  }
  auto after = ca->LeafFor("api.test");
  ASSERT_TRUE(after.has_value()) << after.error().message;
  for (int i = 0; i < kThreads; ++i) {
    EXPECT_EQ(shared[i], after->get()) << "thread " << i << " got a different leaf";
    EXPECT_EQ(own_names[i], "n" + std::to_string(i) + ".test");
  }
}

TEST(NetTlsLeaf, RefusesNamesThatAreNeitherDnsNorIp) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  for (std::string bad :
       {std::string(), std::string("a b.test"), std::string("evil/x.test"), std::string("a..test"),
        std::string("x,DNS:bank.test"), std::string(300, 'a'), std::string(64, 'a') + ".test"}) {
    auto leaf = ca->LeafFor(bad);
    EXPECT_FALSE(leaf.has_value()) << "accepted '" << bad << "'";
  }
}

// --- streams --------------------------------------------------------------------

TEST(NetTlsStream, FullDuplexFiveMegabytesEachWay) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  constexpr size_t kBytes = 5 * 1024 * 1024;

  TlsPair tls = ConnectedPair(*ca, "api.test");
  ASSERT_TRUE(tls.server && tls.client);
  DuplexOutcome over_tls = PumpBothWays(*tls.client, *tls.server, kBytes);
  ExpectDelivered(over_tls.a_to_b, kBytes, "client->server");
  ExpectDelivered(over_tls.b_to_a, kBytes, "server->client");
}

// Informative only (no threshold): TLS against the bare socketpair, same pump.
TEST(NetTlsStream, ThroughputAgainstPlainSocketpair) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  constexpr size_t kBytes = 32 * 1024 * 1024;
  TlsPair tls = ConnectedPair(*ca, "api.test");
  ASSERT_TRUE(tls.server && tls.client);
  double tls_seconds = TimeBulkCopy(*tls.client, *tls.server, kBytes);
  auto [left, right] = StreamPair();
  double plain_seconds = TimeBulkCopy(*left, *right, kBytes);
  double mib = static_cast<double>(kBytes) / (1024 * 1024);
  std::printf(
      "[ MEASURED ] full duplex, %.0f MiB each way: TLS %.3f s (%.0f MiB/s per direction), plain "
      "socketpair %.3f s (%.0f MiB/s per direction), TLS takes %.1fx the plain time\n",
      mib, tls_seconds, mib / tls_seconds, plain_seconds, mib / plain_seconds,
      tls_seconds / plain_seconds);
  RecordProperty("tls_seconds", std::to_string(tls_seconds));
  RecordProperty("plain_seconds", std::to_string(plain_seconds));
}

TEST(NetTlsStream, HalfCloseLetsTheOtherSideStillAnswer) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  TlsPair tls = ConnectedPair(*ca, "api.test");
  ASSERT_TRUE(tls.server && tls.client);

  ASSERT_TRUE(tls.client->Write("GET / HTTP/1.1\r\n\r\n").has_value());
  ASSERT_TRUE(tls.client->ShutdownWrite().has_value());
  auto request = ReadToEnd(*tls.server);
  ASSERT_TRUE(request.has_value()) << request.error().message;
  EXPECT_EQ(*request, "GET / HTTP/1.1\r\n\r\n");

  ASSERT_TRUE(tls.server->Write("HTTP/1.1 200 OK\r\n\r\nhello").has_value());
  ASSERT_TRUE(tls.server->ShutdownWrite().has_value());
  auto response = ReadToEnd(*tls.client);
  ASSERT_TRUE(response.has_value()) << response.error().message;
  EXPECT_EQ(*response, "HTTP/1.1 200 OK\r\n\r\nhello");
  EXPECT_FALSE(tls.client->Write("late").has_value());  // after our own close_notify
}

TEST(NetTlsStream, TransportEndingWithoutCloseNotifyIsAnError) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  TlsPair tls = ConnectedPair(*ca, "api.test");
  ASSERT_TRUE(tls.server && tls.client);
  ASSERT_TRUE(tls.server->Write("partial").has_value());
  tls.server->Abort();  // the TCP connection ends, no close_notify
  std::vector<std::byte> buffer(64);
  auto got = tls.client->Read(buffer);
  ASSERT_TRUE(got.has_value()) << got.error().message;
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(buffer.data()), *got), "partial");
  auto truncated = tls.client->Read(buffer);
  ASSERT_FALSE(truncated.has_value()) << "truncation looked like a clean end";
  EXPECT_NE(truncated.error().message.find("close_notify"), std::string::npos)
      << truncated.error().message;
}

TEST(NetTlsStream, AbortWakesAReaderOnAnotherThread) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  TlsPair tls = ConnectedPair(*ca, "api.test");
  ASSERT_TRUE(tls.server && tls.client);
  std::atomic<bool> reading{false};
  Result<size_t> result = size_t{0};
  std::jthread reader([&] {
    std::vector<std::byte> buffer(64);
    reading = true;
    result = tls.client->Read(buffer);
  });
  while (!reading) std::this_thread::yield();
  tls.client->Abort();
  reader.join();
  ASSERT_FALSE(result.has_value());
  // Woken by Abort, not by the 30 s socket timeout.
  EXPECT_NE(result.error().errno_value, EAGAIN) << result.error().message;
}

// --- verification of upstreams ------------------------------------------------

TEST(NetTlsConnect, RefusesCertificateForAnotherName) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  auto [server, client] = Handshake(*ca, "other.test", "api.test", ca->CaCertificatePath());
  ASSERT_FALSE(client.has_value());
  EXPECT_NE(client.error().message.find("api.test"), std::string::npos) << client.error().message;
  EXPECT_NE(client.error().message.find("hostname mismatch"), std::string::npos)
      << client.error().message;
  EXPECT_FALSE(server.has_value());
}

TEST(NetTlsConnect, SystemTrustStoreDoesNotTrustTheCellaCa) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  auto [server, client] = Handshake(*ca, "api.test", "api.test", "");
  ASSERT_FALSE(client.has_value());
  EXPECT_NE(client.error().message.find("api.test"), std::string::npos) << client.error().message;
  EXPECT_NE(client.error().message.find("certificate verification failed"), std::string::npos)
      << client.error().message;
}

TEST(NetTlsConnect, MissingCaFileIsNamed) {
  TempDir dir;
  auto [left, right] = StreamPair();
  auto client = ConnectTls(std::move(right), "api.test", dir.path() + "/absent.pem");
  ASSERT_FALSE(client.has_value());
  EXPECT_NE(client.error().message.find("absent.pem"), std::string::npos) << client.error().message;
}

// --- ClientHello ------------------------------------------------------------------

// Starts ConnectTls(name) on a socketpair and returns the raw bytes it sent
// until ParseClientHelloSni had an answer, plus that answer. The client keeps
// waiting for the server's reply on `peer`.
struct CapturedHello {
  std::string bytes;
  Result<std::optional<std::string>> parsed = std::nullopt;
};

CapturedHello CaptureClientHello(FdStream& server_side) {
  CapturedHello out;
  std::vector<std::byte> buffer(4096);
  for (;;) {
    auto got = server_side.Read(buffer);
    if (!got || *got == 0) {
      out.parsed = Fail("client sent no complete ClientHello");
      return out;
    }
    out.bytes.append(reinterpret_cast<const char*>(buffer.data()), *got);
    out.parsed = ParseClientHelloSni(AsBytes(out.bytes));
    if (!out.parsed || out.parsed->has_value()) return out;
  }
}

TEST(NetTlsClientHello, SniFromARealClientHelloThenHandshakeWithItAsPrefix) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  auto [left, right] = StreamPair();
  Result<std::string> client_saw = Fail("not run");
  std::jthread client([&, raw = std::move(right)]() mutable {
    auto tls = ConnectTls(std::move(raw), "api.test", ca->CaCertificatePath());
    if (!tls) {
      client_saw = std::unexpected(tls.error());
      return;
    }
    if (auto sent = (*tls)->Write("ping"); !sent) {
      client_saw = std::unexpected(sent.error());
      return;
    }
    client_saw = ReadToEnd(**tls);
  });

  CapturedHello hello = CaptureClientHello(*left);
  ASSERT_TRUE(hello.parsed.has_value()) << hello.parsed.error().message;
  ASSERT_TRUE(hello.parsed->has_value());
  EXPECT_EQ(**hello.parsed, "api.test");

  // Every strict prefix is "need more", never a wrong answer or an error.
  for (size_t length = 0; length < hello.bytes.size(); ++length) {
    auto partial = ParseClientHelloSni(AsBytes(std::string_view(hello.bytes).substr(0, length)));
    ASSERT_TRUE(partial.has_value()) << length << ": " << partial.error().message;
    EXPECT_FALSE(partial->has_value()) << "answer from " << length << " bytes";
  }

  // The same hello split over two handshake records still yields the name.
  std::string record =
      hello.bytes.substr(0, 5 + ((uint8_t(hello.bytes[3]) << 8) | uint8_t(hello.bytes[4])));
  std::string handshake = record.substr(5);
  size_t split = 40;
  auto header = [&](size_t length) {
    std::string h = record.substr(0, 3);
    h += static_cast<char>(length >> 8);
    h += static_cast<char>(length & 0xff);
    return h;
  };
  std::string fragmented = header(split) + handshake.substr(0, split) +
                           header(handshake.size() - split) + handshake.substr(split);
  auto reassembled = ParseClientHelloSni(AsBytes(fragmented));
  ASSERT_TRUE(reassembled.has_value()) << reassembled.error().message;
  ASSERT_TRUE(reassembled->has_value());
  EXPECT_EQ(**reassembled, "api.test");
  auto mid_second_header = ParseClientHelloSni(AsBytes(fragmented.substr(0, 5 + split + 3)));
  ASSERT_TRUE(mid_second_header.has_value()) << mid_second_header.error().message;
  EXPECT_FALSE(mid_second_header->has_value());

  // The proxy already consumed the hello: AcceptTls replays it.
  auto server = AcceptTls(std::move(left), hello.bytes, *ca, **hello.parsed);
  ASSERT_TRUE(server.has_value()) << server.error().message;
  std::vector<std::byte> buffer(16);
  std::string got;
  while (got.size() < 4) {
    auto n = (*server)->Read(buffer);
    ASSERT_TRUE(n.has_value()) << n.error().message;
    ASSERT_GT(*n, 0u);
    got.append(reinterpret_cast<const char*>(buffer.data()), *n);
  }
  EXPECT_EQ(got, "ping");
  ASSERT_TRUE((*server)->Write("pong").has_value());
  ASSERT_TRUE((*server)->ShutdownWrite().has_value());
  client.join();
  ASSERT_TRUE(client_saw.has_value()) << client_saw.error().message;
  EXPECT_EQ(*client_saw, "pong");
}

TEST(NetTlsClientHello, IpLiteralClientSendsNoSniAndVerifiesTheIpSan) {
  TempDir dir;
  auto ca = MakeCa(dir);
  ASSERT_TRUE(ca);
  auto [left, right] = StreamPair();
  Status client_status = Fail("not run");
  std::jthread client([&, raw = std::move(right)]() mutable {
    auto tls = ConnectTls(std::move(raw), "127.0.0.1", ca->CaCertificatePath());
    if (!tls) {
      client_status = std::unexpected(tls.error());
      return;
    }
    client_status = (*tls)->ShutdownWrite();
  });
  CapturedHello hello = CaptureClientHello(*left);
  ASSERT_FALSE(hello.parsed.has_value());
  EXPECT_NE(hello.parsed.error().message.find("server_name (SNI)"), std::string::npos)
      << hello.parsed.error().message;
  // The proxy would then decide by the original destination address.
  auto server = AcceptTls(std::move(left), hello.bytes, *ca, "127.0.0.1");
  ASSERT_TRUE(server.has_value()) << server.error().message;
  auto rest = ReadToEnd(**server);
  client.join();
  EXPECT_TRUE(client_status.has_value()) << client_status.error().message;
  ASSERT_TRUE(rest.has_value()) << rest.error().message;
  EXPECT_EQ(*rest, "");
}

TEST(NetTlsClientHello, RefusesWhatIsNotAClientHelloAtOnce) {
  auto expect_error = [](std::string_view bytes, std::string_view says) {
    auto parsed = ParseClientHelloSni(AsBytes(bytes));
    ASSERT_FALSE(parsed.has_value()) << "accepted " << bytes.size() << " bytes";
    EXPECT_NE(parsed.error().message.find(says), std::string::npos) << parsed.error().message;
  };
  expect_error("GET / HTTP/1.1\r\nHost: api.test\r\n\r\n", "content type 71");
  expect_error("G", "content type 71");                                     // one byte is enough
  expect_error(std::string("\x16\x07", 2), "version major 7");              // not TLS
  expect_error(std::string("\x16\x03\x01\x00\x00", 5), "empty handshake");  // zero-length record
  expect_error(std::string("\x16\x03\x01\x4f\xff", 5), "exceeds 16384");
  expect_error(std::string("\x16\x03\x01\x00\x04\x02\x00\x00\x00", 9), "message type 2");
  expect_error(std::string("\x16\x03\x01\x00\x04\x01\xff\xff\xff", 9), "exceeds the limit");
  expect_error(std::string("\x80\x2e\x01\x03\x01", 5), "SSLv2");
  // A ClientHello body that ends inside its own fields.
  expect_error(std::string("\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03", 11), "random");
}

}  // namespace
}  // namespace cella::net
