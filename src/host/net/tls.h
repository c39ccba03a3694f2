// TLS for the egress proxy: the installation's interception CA, leaf
// certificates minted from it, TLS streams on both sides of the proxy
// (guest-facing server, upstream-facing verifying client) and a strict SNI
// reader for ClientHello bytes the proxy peeks before deciding anything.
//
// Threading:
// - CertificateAuthority is safe to share between threads (LeafFor locks).
// - A TLS stream (from AcceptTls/ConnectTls) follows ByteStream's rule: one
//   thread may Read while another Writes/ShutdownWrites. Internally every
//   OpenSSL call on the connection runs under one mutex, and that mutex is
//   never held across a blocking raw Read or Write, so a reader waiting for
//   the peer never stalls the writer (and the other way round).
// - Abort may be called from any thread at any time.
#pragma once

#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "base/byte_stream.h"
#include "base/result.h"

// OpenSSL's types, declared here so users of this header need not include
// OpenSSL's headers.
struct ssl_ctx_st;
struct evp_pkey_st;
struct x509_st;

namespace cella::net {

struct SslCtxFree {
  void operator()(ssl_ctx_st* ctx) const;
};
struct EvpPkeyFree {
  void operator()(evp_pkey_st* key) const;
};
struct X509Free {
  void operator()(x509_st* cert) const;
};

// What a host name given to LeafFor/AcceptTls/ConnectTls turned out to be.
enum class HostKind { kDnsName, kIpAddress };

// A minted leaf certificate, ready to serve: `server_context` already holds
// the certificate and its key; SSL_new() on it once per accepted connection.
// Immutable once made; shared by every connection for the same name.
struct LeafCert {
  std::string name;  // normalised: lower-case DNS name, or canonical IP text
  HostKind kind;
  std::string certificate_pem;
  std::chrono::system_clock::time_point not_after;
  std::unique_ptr<ssl_ctx_st, SslCtxFree> server_context;
};

class CertificateAuthority {
 public:
  // <dir>/ca.key (EC P-256, mode 0600) and <dir>/ca.crt (PEM), created once
  // per installation. <dir> is created (0700) if missing. Creation holds an
  // flock on <dir>/ca.lock and publishes each file by write-temp + rename, so
  // processes racing on a fresh dir all end up with the same CA. A key file
  // readable by group or others, a key that does not match the certificate,
  // or an expired CA is an error (never silently replaced); a half-created
  // pair (one file missing, after a crash) is recreated.
  static Result<std::shared_ptr<CertificateAuthority>> LoadOrCreate(const std::string& dir);

  ~CertificateAuthority();
  CertificateAuthority(const CertificateAuthority&) = delete;
  CertificateAuthority& operator=(const CertificateAuthority&) = delete;

  std::string CaCertificatePem() const { return ca_certificate_pem_; }
  const std::string& CaCertificatePath() const { return ca_certificate_path_; }

  // Leaf for a DNS name or an IP literal (subjectAltName DNS:/IP: to match),
  // valid 30 days from one hour ago (clock skew), never beyond the CA. Cached
  // in memory per normalised name; re-minted when within 7 days of expiry.
  // All leaves of one CA object share one in-memory EC key that never leaves
  // the process. Thread-safe.
  Result<std::shared_ptr<const LeafCert>> LeafFor(const std::string& name);

 private:
  CertificateAuthority() = default;
  Result<std::shared_ptr<const LeafCert>> Mint(const std::string& normalised_name, HostKind kind);

  std::unique_ptr<evp_pkey_st, EvpPkeyFree> ca_key_;
  std::unique_ptr<x509_st, X509Free> ca_certificate_;
  std::string ca_certificate_pem_;
  std::string ca_certificate_path_;
  std::unique_ptr<evp_pkey_st, EvpPkeyFree> leaf_key_;

  std::mutex leaves_mutex_;  // guards leaves_
  std::map<std::string, std::shared_ptr<const LeafCert>> leaves_;
};

// Server side of an intercepted connection: presents CA-minted leaf for
// `name` to the guest. `prefix` holds bytes already read from `raw` (the
// ClientHello the proxy peeked at); they are fed to TLS before anything else.
// Offers only HTTP/1.1 by ALPN (or no ALPN if the client offered none). The
// handshake completes before this returns; a hung peer is bounded by the
// caller (Abort from another thread, or socket timeouts).
Result<std::unique_ptr<ByteStream>> AcceptTls(std::unique_ptr<ByteStream> raw,
                                              std::string_view prefix, CertificateAuthority& ca,
                                              const std::string& name);

// Client side towards the real upstream: TLS 1.2+, SNI = name (DNS names
// only; none for IP literals), ALPN http/1.1, certificate chain verified
// against `ca_file` (PEM bundle) or, when empty, the host's default trust
// store, and the certificate must match `name` (DNS or IP SAN). Errors name
// `name` and OpenSSL's reason.
Result<std::unique_ptr<ByteStream>> ConnectTls(std::unique_ptr<ByteStream> raw,
                                               const std::string& name, const std::string& ca_file);

// Reading from either stream: 0 means the peer sent close_notify (clean end);
// the transport ending without close_notify is an error (a truncated stream
// must not look complete to the other side of the proxy).
// ShutdownWrite sends close_notify and then half-closes the transport.

// Once this many bytes were given, ParseClientHelloSni never asks for more.
inline constexpr size_t kMaxClientHelloBytes = 64 * 1024;

// SNI host_name (lower-cased) from bytes starting at the first TLS record of
// a connection. nullopt: the ClientHello is not complete yet (read more and
// call again with all bytes so far). Error: not TLS, malformed, not a
// ClientHello, larger than kMaxClientHelloBytes, or no server_name extension
// (the message says which). Bytes after the ClientHello are ignored.
Result<std::optional<std::string>> ParseClientHelloSni(std::span<const std::byte> bytes);

}  // namespace cella::net
