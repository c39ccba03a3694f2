// What the TLS files of src/host/net share (tls.cc, tls_ca.cc,
// tls_stream.cc, client_hello.cc): OpenSSL handle owners, limits, error
// text and host-name normalisation. Internal to src/host/net.
#pragma once

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <chrono>
#include <expected>
#include <memory>
#include <string>
#include <string_view>

#include "base/result.h"
#include "host/net/tls.h"

namespace cella::net::tls_detail {

using KeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyFree>;
using CertPtr = std::unique_ptr<X509, X509Free>;
using CtxPtr = std::unique_ptr<SSL_CTX, SslCtxFree>;
struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;
struct BnFree {
  void operator()(BIGNUM* bn) const { BN_free(bn); }
};
struct GeneralNamesFree {
  void operator()(GENERAL_NAMES* names) const { GENERAL_NAMES_free(names); }
};
struct SslFree {
  void operator()(SSL* ssl) const { SSL_free(ssl); }
};
using SslPtr = std::unique_ptr<SSL, SslFree>;

inline constexpr int kCaValidityDays = 3650;
inline constexpr int kLeafValidityDays = 30;
inline constexpr long kClockSkewSeconds = 3600;
inline constexpr auto kLeafRenewBefore = std::chrono::hours(24 * 7);
// Names come from guest SNI (after policy); the bound keeps a long-lived
// supervisor's memory flat even if a policy allows a wildcard.
inline constexpr size_t kMaxCachedLeaves = 4096;
inline constexpr size_t kMaxPemBytes = 64 * 1024;
inline constexpr size_t kMaxTlsRecordPayload = 16384;

// Everything on this thread's OpenSSL error queue, oldest first; empties it.
std::string DrainOpenSslErrors();
std::unexpected<Error> FailOpenSsl(std::string_view what);

std::string ToLower(std::string_view text);

struct HostName {
  std::string text;
  HostKind kind;
};
// An IP literal in canonical text, or a DNS name (one trailing dot dropped,
// lower-cased) that follows protocol::IsValidHostName.
Result<HostName> NormaliseHostName(std::string_view name);

}  // namespace cella::net::tls_detail
