#include "host/net/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <vector>

#include "base/io.h"
#include "base/unique_fd.h"
#include "protocol/network.h"

namespace cella::net {

void SslCtxFree::operator()(ssl_ctx_st* ctx) const { SSL_CTX_free(ctx); }
void EvpPkeyFree::operator()(evp_pkey_st* key) const { EVP_PKEY_free(key); }
void X509Free::operator()(x509_st* cert) const { X509_free(cert); }

namespace {

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

constexpr int kCaValidityDays = 3650;
constexpr int kLeafValidityDays = 30;
constexpr long kClockSkewSeconds = 3600;
constexpr auto kLeafRenewBefore = std::chrono::hours(24 * 7);
// Names come from guest SNI (after policy); the bound keeps a long-lived
// supervisor's memory flat even if a policy allows a wildcard.
constexpr size_t kMaxCachedLeaves = 4096;
constexpr size_t kMaxPemBytes = 64 * 1024;
constexpr size_t kMaxTlsRecordPayload = 16384;

// Everything on this thread's OpenSSL error queue, oldest first; empties it.
std::string DrainOpenSslErrors() {
  std::string out;
  char buffer[256];
  while (unsigned long code = ERR_get_error()) {
    ERR_error_string_n(code, buffer, sizeof(buffer));
    if (!out.empty()) out += "; ";
    out += buffer;
  }
  return out.empty() ? "no OpenSSL error detail" : out;
}

std::unexpected<Error> FailOpenSsl(std::string_view what) {
  return Fail(std::string(what) + ": " + DrainOpenSslErrors());
}

// --- names -------------------------------------------------------------

// The project's one host-name rule.
using protocol::IsValidHostName;

std::string ToLower(std::string_view text) {
  std::string out(text);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

struct HostName {
  std::string text;
  HostKind kind;
};

Result<HostName> NormaliseHostName(std::string_view name) {
  std::string text(name);
  unsigned char address[16];
  char canonical[INET6_ADDRSTRLEN];
  for (int family : {AF_INET, AF_INET6}) {
    if (::inet_pton(family, text.c_str(), address) == 1) {
      if (::inet_ntop(family, address, canonical, sizeof(canonical)) == nullptr)
        return FailErrno("inet_ntop " + text);
      return HostName{canonical, HostKind::kIpAddress};
    }
  }
  if (!text.empty() && text.back() == '.') text.pop_back();
  if (!IsValidHostName(text))
    return Fail("host name '" + std::string(name) +
                "' is neither an IP address nor a DNS name (letters, digits, '-', '_', labels of "
                "1-63 bytes, 253 bytes at most)");
  return HostName{ToLower(text), HostKind::kDnsName};
}

// --- files -------------------------------------------------------------

Status MakeDirectories(const std::string& dir) {
  for (size_t slash = dir.find('/', 1);; slash = dir.find('/', slash + 1)) {
    std::string part = dir.substr(0, slash);
    if (!part.empty() && ::mkdir(part.c_str(), 0700) != 0 && errno != EEXIST)
      return FailErrno("mkdir " + part);
    if (slash == std::string::npos) break;
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return FailErrno("stat " + dir);
  if (!S_ISDIR(st.st_mode)) return Fail(dir + " is not a directory");
  return {};
}

Status FsyncDirectory(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + dir);
  if (::fsync(fd.Get()) != 0) return FailErrno("fsync " + dir);
  return {};
}

// Publishes `data` at dir/name with exactly `mode`, by temp file + rename, so
// a reader sees the old file or the whole new one. The caller holds the CA
// lock, which makes the pid-named temp file unique.
Status WriteFileAtomically(const std::string& dir, const std::string& name, std::string_view data,
                           mode_t mode) {
  std::string final_path = dir + "/" + name;
  std::string temp_path = dir + "/." + name + "." + std::to_string(::getpid()) + ".tmp";
  if (::unlink(temp_path.c_str()) != 0 && errno != ENOENT)  // left by a crash
    return FailErrno("unlink " + temp_path);
  UniqueFd fd(
      ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!fd) return FailErrno("create " + temp_path);
  // The umask may have taken bits away; the mode must be exactly `mode`.
  if (::fchmod(fd.Get(), mode) != 0) return FailErrno("fchmod " + temp_path);
  CELLA_TRY_CTX(WriteAll(fd.Get(), data), temp_path);
  if (::fsync(fd.Get()) != 0) return FailErrno("fsync " + temp_path);
  if (::close(fd.Release()) != 0) return FailErrno("close " + temp_path);
  if (::rename(temp_path.c_str(), final_path.c_str()) != 0)
    return FailErrno("rename " + temp_path + " to " + final_path);
  return FsyncDirectory(dir);
}

Result<bool> FileExists(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT) return false;
  return FailErrno("lstat " + path);
}

// --- certificates ----------------------------------------------------------

Result<KeyPtr> GenerateP256Key() {
  KeyPtr key(EVP_EC_gen("P-256"));
  if (!key) return FailOpenSsl("generating an EC P-256 key");
  return key;
}

Result<std::string> CertificateToPem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1)
    return FailOpenSsl("encoding a certificate as PEM");
  char* data = nullptr;
  long size = BIO_get_mem_data(bio.get(), &data);
  if (size <= 0 || data == nullptr) return Fail("encoding a certificate as PEM: empty output");
  return std::string(data, static_cast<size_t>(size));
}

Status AddExtension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX context;
  X509V3_set_ctx_nodb(&context);
  X509V3_set_ctx(&context, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* extension = X509V3_EXT_conf_nid(nullptr, &context, nid, value);
  if (extension == nullptr)
    return FailOpenSsl(std::string("making certificate extension ") + OBJ_nid2sn(nid) + "=" +
                       value);
  int added = X509_add_ext(cert, extension, -1);
  X509_EXTENSION_free(extension);
  if (added != 1)
    return FailOpenSsl(std::string("adding certificate extension ") + OBJ_nid2sn(nid));
  return {};
}

// Version 3, random positive 127-bit serial, validity [now - skew, now + days].
Result<CertPtr> NewCertificate(EVP_PKEY* subject_key, std::string_view common_name, int days) {
  CertPtr cert(X509_new());
  if (!cert) return FailOpenSsl("X509_new");
  if (X509_set_version(cert.get(), X509_VERSION_3) != 1) return FailOpenSsl("X509_set_version");
  std::unique_ptr<BIGNUM, BnFree> serial(BN_new());
  if (!serial || BN_rand(serial.get(), 127, BN_RAND_TOP_ONE, BN_RAND_BOTTOM_ANY) != 1 ||
      BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get())) == nullptr)
    return FailOpenSsl("making a certificate serial number");
  if (X509_gmtime_adj(X509_getm_notBefore(cert.get()), -kClockSkewSeconds) == nullptr ||
      X509_time_adj_ex(X509_getm_notAfter(cert.get()), days, 0, nullptr) == nullptr)
    return FailOpenSsl("setting certificate validity");
  if (X509_set_pubkey(cert.get(), subject_key) != 1) return FailOpenSsl("X509_set_pubkey");
  X509_NAME* subject = X509_get_subject_name(cert.get());
  // A CN is limited to 64 bytes; longer names live in the SAN only.
  if (common_name.size() <= 64 &&
      X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(common_name.data()),
                                 static_cast<int>(common_name.size()), -1, 0) != 1)
    return FailOpenSsl("setting certificate subject");
  return cert;
}

Result<CertPtr> MakeCaCertificate(EVP_PKEY* key) {
  auto cert = CELLA_TRY(NewCertificate(key, "cella egress CA", kCaValidityDays));
  X509_NAME* subject = X509_get_subject_name(cert.get());
  if (X509_NAME_add_entry_by_txt(subject, "O", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>("cella"), -1, -1, 0) != 1 ||
      X509_set_issuer_name(cert.get(), subject) != 1)
    return FailOpenSsl("setting CA subject");
  CELLA_TRY(
      AddExtension(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE,pathlen:0"));
  CELLA_TRY(AddExtension(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign"));
  CELLA_TRY(AddExtension(cert.get(), cert.get(), NID_subject_key_identifier, "hash"));
  if (X509_sign(cert.get(), key, EVP_sha256()) <= 0)
    return FailOpenSsl("signing the CA certificate");
  return cert;
}

Status AddSubjectAltName(X509* cert, const HostName& host) {
  std::unique_ptr<GENERAL_NAMES, GeneralNamesFree> names(sk_GENERAL_NAME_new_null());
  GENERAL_NAME* entry = GENERAL_NAME_new();
  if (!names || entry == nullptr) return FailOpenSsl("allocating subjectAltName");
  if (sk_GENERAL_NAME_push(names.get(), entry) <= 0) {
    GENERAL_NAME_free(entry);
    return FailOpenSsl("allocating subjectAltName");
  }
  if (host.kind == HostKind::kIpAddress) {
    ASN1_OCTET_STRING* ip = a2i_IPADDRESS(host.text.c_str());
    if (ip == nullptr) return FailOpenSsl("encoding IP address " + host.text);
    GENERAL_NAME_set0_value(entry, GEN_IPADD, ip);
  } else {
    ASN1_IA5STRING* dns = ASN1_IA5STRING_new();
    if (dns == nullptr ||
        ASN1_STRING_set(dns, host.text.data(), static_cast<int>(host.text.size())) != 1) {
      ASN1_IA5STRING_free(dns);
      return FailOpenSsl("encoding DNS name " + host.text);
    }
    GENERAL_NAME_set0_value(entry, GEN_DNS, dns);
  }
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT) != 1)
    return FailOpenSsl("adding subjectAltName for " + host.text);
  return {};
}

std::chrono::system_clock::time_point ToTimePoint(const ASN1_TIME* time) {
  struct tm parts {};
  if (ASN1_TIME_to_tm(time, &parts) != 1) return std::chrono::system_clock::time_point::min();
  return std::chrono::system_clock::from_time_t(::timegm(&parts));
}

// Offers HTTP/1.1 only: the proxy speaks HTTP/1.1 on intercepted flows. A
// client that offered no HTTP/1.1 gets no ALPN answer and may fall back.
int SelectHttp11(SSL*, const unsigned char** out, unsigned char* out_length,
                 const unsigned char* offered, unsigned int offered_length, void*) {
  static constexpr std::string_view kHttp11 = "http/1.1";
  for (unsigned int at = 0; at < offered_length;) {
    unsigned int length = offered[at];
    if (length == 0 || at + 1 + length > offered_length) break;
    if (std::string_view(reinterpret_cast<const char*>(offered + at + 1), length) == kHttp11) {
      *out = offered + at + 1;
      *out_length = static_cast<unsigned char>(length);
      return SSL_TLSEXT_ERR_OK;
    }
    at += 1 + length;
  }
  return SSL_TLSEXT_ERR_NOACK;
}

Result<CtxPtr> MakeServerContext(X509* cert, EVP_PKEY* key) {
  CtxPtr ctx(SSL_CTX_new(TLS_server_method()));
  if (!ctx) return FailOpenSsl("SSL_CTX_new (server)");
  if (SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1)
    return FailOpenSsl("setting minimum TLS version");
  // No resumption: every connection gets a full handshake against the
  // current leaf, and no ticket key lives in the process to be reused.
  SSL_CTX_set_options(ctx.get(),
                      SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  if (SSL_CTX_set_num_tickets(ctx.get(), 0) != 1) return FailOpenSsl("SSL_CTX_set_num_tickets");
  if (SSL_CTX_use_certificate(ctx.get(), cert) != 1 ||
      SSL_CTX_use_PrivateKey(ctx.get(), key) != 1 || SSL_CTX_check_private_key(ctx.get()) != 1)
    return FailOpenSsl("loading the leaf certificate into a server context");
  SSL_CTX_set_alpn_select_cb(ctx.get(), SelectHttp11, nullptr);
  return ctx;
}

// Refuses to answer an encrypted-key passphrase prompt on a terminal.
int NoPassphrase(char*, int, int, void*) { return 0; }

}  // namespace

// --- CertificateAuthority ---------------------------------------------------

CertificateAuthority::~CertificateAuthority() = default;

Result<std::shared_ptr<CertificateAuthority>> CertificateAuthority::LoadOrCreate(
    const std::string& dir) {
  if (dir.empty()) return Fail("CA directory: empty path");
  CELLA_TRY_CTX(MakeDirectories(dir), "CA directory");
  std::string key_path = dir + "/ca.key";
  std::string cert_path = dir + "/ca.crt";
  std::string lock_path = dir + "/ca.lock";

  UniqueFd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!lock) return FailErrno("open " + lock_path);
  // Held while loading too: a reader must not see the key of a pair whose
  // certificate another process is still writing.
  while (::flock(lock.Get(), LOCK_EX) != 0) {
    if (errno != EINTR) return FailErrno("flock " + lock_path);
  }

  bool have_key = CELLA_TRY(FileExists(key_path));
  bool have_cert = CELLA_TRY(FileExists(cert_path));
  if (!have_key || !have_cert) {
    // First use, or a crash between the two renames: (re)create the pair.
    auto key = CELLA_TRY_CTX(GenerateP256Key(), "creating CA in " + dir);
    auto cert = CELLA_TRY_CTX(MakeCaCertificate(key.get()), "creating CA in " + dir);
    BioPtr bio(BIO_new(BIO_s_mem()));
    if (!bio ||
        PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
      return FailOpenSsl("encoding the CA key");
    char* key_pem = nullptr;
    long key_pem_size = BIO_get_mem_data(bio.get(), &key_pem);
    if (key_pem_size <= 0 || key_pem == nullptr) return Fail("encoding the CA key: empty output");
    Status key_written = WriteFileAtomically(
        dir, "ca.key", std::string_view(key_pem, static_cast<size_t>(key_pem_size)), 0600);
    OPENSSL_cleanse(key_pem, static_cast<size_t>(key_pem_size));
    CELLA_TRY(std::move(key_written));
    auto cert_pem = CELLA_TRY(CertificateToPem(cert.get()));
    CELLA_TRY(WriteFileAtomically(dir, "ca.crt", cert_pem, 0644));
  }

  struct stat key_stat {};
  if (::lstat(key_path.c_str(), &key_stat) != 0) return FailErrno("lstat " + key_path);
  if (!S_ISREG(key_stat.st_mode)) return Fail(key_path + " is not a regular file");
  if ((key_stat.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(key_stat.st_mode & 07777));
    return Fail(key_path + " has mode " + mode +
                ": the CA key must not be readable by group or others (chmod 600 it, or remove "
                "ca.key and ca.crt to make a new CA)");
  }
  if (key_stat.st_uid != ::geteuid())
    return Fail(key_path + " is owned by uid " + std::to_string(key_stat.st_uid) +
                ", not by the user running cella (uid " + std::to_string(::geteuid()) + ")");

  auto ca = std::shared_ptr<CertificateAuthority>(new CertificateAuthority());
  {
    auto key_pem = CELLA_TRY(ReadFileToString(key_path, kMaxPemBytes));
    BioPtr bio(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
    if (bio) ca->ca_key_.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
    OPENSSL_cleanse(key_pem.data(), key_pem.size());
    if (!ca->ca_key_) return FailOpenSsl("reading the CA key " + key_path);
  }
  ca->ca_certificate_pem_ = CELLA_TRY(ReadFileToString(cert_path, kMaxPemBytes));
  {
    BioPtr bio(BIO_new_mem_buf(ca->ca_certificate_pem_.data(),
                               static_cast<int>(ca->ca_certificate_pem_.size())));
    if (bio)
      ca->ca_certificate_.reset(PEM_read_bio_X509(bio.get(), nullptr, NoPassphrase, nullptr));
    if (!ca->ca_certificate_) return FailOpenSsl("reading the CA certificate " + cert_path);
  }
  if (X509_check_private_key(ca->ca_certificate_.get(), ca->ca_key_.get()) != 1)
    return FailOpenSsl(key_path + " does not match " + cert_path);
  if (X509_check_ca(ca->ca_certificate_.get()) < 1)
    return Fail(cert_path + " is not a CA certificate (basicConstraints CA:TRUE missing)");
  if (X509_cmp_current_time(X509_get0_notAfter(ca->ca_certificate_.get())) <= 0)
    return Fail(cert_path + " has expired; remove ca.key and ca.crt in " + dir +
                " to create a new CA (guests trusting the old one need the new certificate)");
  ca->ca_certificate_path_ = cert_path;
  ca->leaf_key_ = CELLA_TRY_CTX(GenerateP256Key(), "leaf key");
  return ca;
}

Result<std::shared_ptr<const LeafCert>> CertificateAuthority::LeafFor(const std::string& name) {
  auto host = CELLA_TRY_CTX(NormaliseHostName(name), "leaf certificate");
  auto now = std::chrono::system_clock::now();
  {
    std::lock_guard lock(leaves_mutex_);
    auto found = leaves_.find(host.text);
    if (found != leaves_.end() && found->second->not_after - now > kLeafRenewBefore)
      return found->second;
  }
  // Minted without the lock: signing takes a while and other names need not
  // wait. Two threads racing on one name both mint; the first stored wins.
  auto minted = CELLA_TRY(Mint(host.text, host.kind));
  std::lock_guard lock(leaves_mutex_);
  auto found = leaves_.find(host.text);
  if (found != leaves_.end() && found->second->not_after - now > kLeafRenewBefore)
    return found->second;
  if (found == leaves_.end() && leaves_.size() >= kMaxCachedLeaves) leaves_.clear();
  leaves_[host.text] = minted;
  return minted;
}

Result<std::shared_ptr<const LeafCert>> CertificateAuthority::Mint(const std::string& name,
                                                                   HostKind kind) {
  std::string context = "minting a leaf certificate for " + name;
  auto cert = CELLA_TRY_CTX(NewCertificate(leaf_key_.get(), name, kLeafValidityDays), context);
  X509* ca = ca_certificate_.get();
  if (ASN1_TIME_compare(X509_get0_notAfter(cert.get()), X509_get0_notAfter(ca)) > 0 &&
      X509_set1_notAfter(cert.get(), X509_get0_notAfter(ca)) != 1)
    return FailOpenSsl(context + ": capping validity at the CA's");
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(ca)) != 1)
    return FailOpenSsl(context + ": setting issuer");
  CELLA_TRY_CTX(AddExtension(cert.get(), ca, NID_basic_constraints, "critical,CA:FALSE"), context);
  CELLA_TRY_CTX(AddExtension(cert.get(), ca, NID_key_usage, "critical,digitalSignature"), context);
  CELLA_TRY_CTX(AddExtension(cert.get(), ca, NID_ext_key_usage, "serverAuth"), context);
  CELLA_TRY_CTX(AddExtension(cert.get(), ca, NID_subject_key_identifier, "hash"), context);
  CELLA_TRY_CTX(AddExtension(cert.get(), ca, NID_authority_key_identifier, "keyid:always"),
                context);
  CELLA_TRY_CTX(AddSubjectAltName(cert.get(), HostName{name, kind}), context);
  if (X509_sign(cert.get(), ca_key_.get(), EVP_sha256()) <= 0)
    return FailOpenSsl(context + ": signing");

  auto leaf = std::make_shared<LeafCert>();
  leaf->name = name;
  leaf->kind = kind;
  leaf->certificate_pem = CELLA_TRY_CTX(CertificateToPem(cert.get()), context);
  leaf->not_after = ToTimePoint(X509_get0_notAfter(cert.get()));
  leaf->server_context = CELLA_TRY_CTX(MakeServerContext(cert.get(), leaf_key_.get()), context);
  return std::shared_ptr<const LeafCert>(std::move(leaf));
}

// --- TLS streams -------------------------------------------------------------

namespace {

// TLS over a raw ByteStream through memory BIOs: OpenSSL never touches the
// transport, so no OpenSSL call blocks and the lock around them is never held
// across raw I/O.
//
// Ciphertext OpenSSL produced (application data, handshake flights, alerts,
// close_notify) waits in the write BIO. One thread at a time is the
// "flusher": it moves those bytes to the transport in order, dropping the lock
// while it writes, and before giving up the role it re-checks the BIO under
// the lock, so bytes queued meanwhile by another thread are never stranded.
class TlsStream final : public ByteStream {
 public:
  TlsStream(std::unique_ptr<ByteStream> raw, SslPtr ssl, BIO* read_bio, BIO* write_bio,
            std::string peer)
      : raw_(std::move(raw)),
        ssl_(std::move(ssl)),
        read_bio_(read_bio),
        write_bio_(write_bio),
        peer_(std::move(peer)),
        read_buffer_(kMaxTlsRecordPayload + 2048) {}

  // Runs before the stream is shared with other threads.
  Status Handshake(std::string_view prefix);

  Result<size_t> Read(std::span<std::byte> buffer) override;
  Status Write(std::span<const std::byte> bytes) override;
  using ByteStream::Write;
  Status ShutdownWrite() override;
  void Abort() override { raw_->Abort(); }

 private:
  enum class FlushMode {
    // The writer waits: its bytes are on the wire (or failed) when it returns,
    // which bounds what one Write can queue.
    kUntilSent,
    // The reader must not stall behind a writer blocked on the transport; the
    // current flusher sends what the reader queued.
    kLeaveToCurrentFlusher,
  };
  Status Flush(FlushMode mode);
  // Reads once from the transport (lock NOT held) and feeds the read BIO.
  Status FeedFromTransport(std::string_view during);
  std::string Describe(std::string_view during, int ssl_error);

  const std::unique_ptr<ByteStream> raw_;

  std::mutex mutex_;  // guards everything below it and every call on ssl_
  std::condition_variable flusher_done_;
  SslPtr ssl_;
  BIO* read_bio_;   // owned by ssl_
  BIO* write_bio_;  // owned by ssl_
  const std::string peer_;
  bool flushing_ = false;
  bool transport_eof_ = false;
  bool close_notify_sent_ = false;
  std::optional<Error> write_error_;

  std::vector<std::byte> read_buffer_;  // reader thread only
};

std::string TlsStream::Describe(std::string_view during, int ssl_error) {
  std::string message = "TLS " + std::string(during) + " with " + peer_ + " failed";
  long verify = SSL_get_verify_result(ssl_.get());
  if (verify != X509_V_OK)
    message +=
        ": certificate verification failed: " + std::string(X509_verify_cert_error_string(verify));
  if (transport_eof_) message += ": connection closed by peer without TLS close_notify";
  if (ssl_error == SSL_ERROR_SSL || ERR_peek_error() != 0) {
    message += ": " + DrainOpenSslErrors();
  } else if (ssl_error == SSL_ERROR_SYSCALL) {
    message += ": transport error";
  } else {
    message += ": unexpected SSL error " + std::to_string(ssl_error);
  }
  return message;
}

Status TlsStream::FeedFromTransport(std::string_view during) {
  auto got = raw_->Read(read_buffer_);
  std::lock_guard lock(mutex_);
  if (!got)
    return std::unexpected(
        std::move(got.error()).WithContext("TLS " + std::string(during) + " with " + peer_));
  if (*got == 0) {
    transport_eof_ = true;
    // From now on an empty read BIO reads as end of file, not "try again".
    BIO_set_mem_eof_return(read_bio_, 0);
    return {};
  }
  if (BIO_write(read_bio_, read_buffer_.data(), static_cast<int>(*got)) != static_cast<int>(*got))
    return FailOpenSsl("TLS with " + peer_ + ": buffering received bytes");
  return {};
}

Status TlsStream::Flush(FlushMode mode) {
  std::unique_lock lock(mutex_);
  if (flushing_) {
    if (mode == FlushMode::kLeaveToCurrentFlusher) return {};
    // The flusher drains the BIO, our bytes included, before it lets go.
    flusher_done_.wait(lock, [this] { return !flushing_; });
    if (write_error_) return std::unexpected(*write_error_);
  }
  flushing_ = true;
  std::vector<std::byte> chunk;
  while (!write_error_) {
    size_t pending = BIO_ctrl_pending(write_bio_);
    if (pending == 0) break;
    chunk.resize(pending);
    int taken = BIO_read(write_bio_, chunk.data(), static_cast<int>(pending));
    if (taken != static_cast<int>(pending)) {
      write_error_ =
          Error::Msg("TLS with " + peer_ + ": draining the write buffer: " + DrainOpenSslErrors());
      break;
    }
    lock.unlock();
    Status sent = raw_->Write(chunk);
    lock.lock();
    if (!sent) write_error_ = std::move(sent.error()).WithContext("TLS send to " + peer_);
  }
  flushing_ = false;
  flusher_done_.notify_all();
  if (write_error_) return std::unexpected(*write_error_);
  return {};
}

Status TlsStream::Handshake(std::string_view prefix) {
  if (!prefix.empty()) {
    std::lock_guard lock(mutex_);
    if (BIO_write(read_bio_, prefix.data(), static_cast<int>(prefix.size())) !=
        static_cast<int>(prefix.size()))
      return FailOpenSsl("TLS handshake with " + peer_ + ": buffering the ClientHello");
  }
  for (;;) {
    int ssl_error = SSL_ERROR_NONE;
    std::string failure;
    bool transport_eof = false;
    {
      std::lock_guard lock(mutex_);
      transport_eof = transport_eof_;
      ERR_clear_error();
      int rc = SSL_do_handshake(ssl_.get());
      if (rc != 1) ssl_error = SSL_get_error(ssl_.get(), rc);
      if (ssl_error != SSL_ERROR_NONE && ssl_error != SSL_ERROR_WANT_READ)
        failure = Describe("handshake", ssl_error);
    }
    // Sends our flight, or on failure the alert that tells the peer why.
    Status flushed = Flush(FlushMode::kUntilSent);
    if (!failure.empty()) return Fail(std::move(failure));
    CELLA_TRY_CTX(std::move(flushed), "TLS handshake with " + peer_);
    if (ssl_error == SSL_ERROR_NONE) return {};
    if (transport_eof)
      return Fail("TLS handshake with " + peer_ + " failed: connection closed during handshake");
    CELLA_TRY(FeedFromTransport("handshake"));
  }
}

Result<size_t> TlsStream::Read(std::span<std::byte> buffer) {
  if (buffer.empty()) return 0;
  for (;;) {
    size_t got = 0;
    int ssl_error = SSL_ERROR_NONE;
    bool output_queued = false;
    {
      std::lock_guard lock(mutex_);
      ERR_clear_error();
      int rc = SSL_read_ex(ssl_.get(), buffer.data(), buffer.size(), &got);
      if (rc != 1) ssl_error = SSL_get_error(ssl_.get(), rc);
      if (ssl_error != SSL_ERROR_NONE && ssl_error != SSL_ERROR_WANT_READ &&
          ssl_error != SSL_ERROR_ZERO_RETURN)
        return Fail(Describe("read", ssl_error));
      if (ssl_error == SSL_ERROR_WANT_READ && transport_eof_)
        return Fail("TLS read from " + peer_ +
                    " failed: connection closed by peer without TLS close_notify");
      // Reading can queue output (e.g. a KeyUpdate answer).
      output_queued = BIO_ctrl_pending(write_bio_) > 0;
    }
    // A failed send is kept in write_error_ and reported by the next
    // Write/ShutdownWrite: the reading direction is still intact.
    if (output_queued) (void)Flush(FlushMode::kLeaveToCurrentFlusher);
    if (ssl_error == SSL_ERROR_NONE) return got;
    if (ssl_error == SSL_ERROR_ZERO_RETURN) return 0;
    CELLA_TRY(FeedFromTransport("read"));
  }
}

Status TlsStream::Write(std::span<const std::byte> bytes) {
  // Bounds the ciphertext one call queues before it is sent.
  constexpr size_t kChunk = 64 * 1024;
  while (!bytes.empty()) {
    {
      std::lock_guard lock(mutex_);
      if (write_error_) return std::unexpected(*write_error_);
      if (close_notify_sent_) return Fail("TLS write to " + peer_ + ": after ShutdownWrite");
      size_t chunk = std::min(bytes.size(), kChunk);
      size_t written = 0;
      ERR_clear_error();
      int rc = SSL_write_ex(ssl_.get(), bytes.data(), chunk, &written);
      if (rc != 1) return Fail(Describe("write", SSL_get_error(ssl_.get(), rc)));
      bytes = bytes.subspan(written);
    }
    CELLA_TRY(Flush(FlushMode::kUntilSent));
  }
  return {};
}

Status TlsStream::ShutdownWrite() {
  {
    std::lock_guard lock(mutex_);
    if (write_error_) return std::unexpected(*write_error_);
    if (!close_notify_sent_) {
      ERR_clear_error();
      // Only queues our close_notify (0) or also notes the peer's (1); it
      // does not wait for the peer, so reading goes on.
      int rc = SSL_shutdown(ssl_.get());
      if (rc < 0) return Fail(Describe("shutdown", SSL_get_error(ssl_.get(), rc)));
      close_notify_sent_ = true;
    }
  }
  CELLA_TRY(Flush(FlushMode::kUntilSent));
  return raw_->ShutdownWrite();
}

// Takes an SSL already configured for its role; the stream owns it.
Result<std::unique_ptr<TlsStream>> NewTlsStream(std::unique_ptr<ByteStream> raw, SslPtr ssl,
                                                const std::string& peer) {
  BIO* read_bio = BIO_new(BIO_s_mem());
  BIO* write_bio = BIO_new(BIO_s_mem());
  if (read_bio == nullptr || write_bio == nullptr) {
    BIO_free(read_bio);
    BIO_free(write_bio);
    return FailOpenSsl("BIO_new for " + peer);
  }
  SSL_set_bio(ssl.get(), read_bio, write_bio);  // ssl owns both now
  return std::make_unique<TlsStream>(std::move(raw), std::move(ssl), read_bio, write_bio, peer);
}

// One client context per CA file (empty: default trust store), built once:
// loading a trust bundle costs milliseconds, connections are frequent.
// Contexts live until exit; the file is read when first used.
Result<SSL_CTX*> ClientContext(const std::string& ca_file) {
  static std::mutex mutex;
  static std::map<std::string, CtxPtr> contexts;
  std::lock_guard lock(mutex);
  if (auto found = contexts.find(ca_file); found != contexts.end()) return found->second.get();
  CtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx) return FailOpenSsl("SSL_CTX_new (client)");
  if (SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1)
    return FailOpenSsl("setting minimum TLS version");
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (ca_file.empty()) {
    if (SSL_CTX_set_default_verify_paths(ctx.get()) != 1)
      return FailOpenSsl("loading the system trust store");
  } else if (SSL_CTX_load_verify_locations(ctx.get(), ca_file.c_str(), nullptr) != 1) {
    return FailOpenSsl("loading trusted CA certificates from " + ca_file);
  }
  static constexpr unsigned char kAlpnHttp11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  if (SSL_CTX_set_alpn_protos(ctx.get(), kAlpnHttp11, sizeof(kAlpnHttp11)) != 0)  // 0 = success
    return FailOpenSsl("setting ALPN");
  SSL_CTX* raw = ctx.get();
  contexts.emplace(ca_file, std::move(ctx));
  return raw;
}

}  // namespace

Result<std::unique_ptr<ByteStream>> AcceptTls(std::unique_ptr<ByteStream> raw,
                                              std::string_view prefix, CertificateAuthority& ca,
                                              const std::string& name) {
  auto leaf = CELLA_TRY_CTX(ca.LeafFor(name), "TLS accept for " + name);
  SslPtr ssl(SSL_new(leaf->server_context.get()));  // holds its own reference to the context
  if (!ssl) return FailOpenSsl("SSL_new for " + name);
  SSL_set_accept_state(ssl.get());
  auto stream = CELLA_TRY(NewTlsStream(std::move(raw), std::move(ssl), "guest client of " + name));
  CELLA_TRY(stream->Handshake(prefix));
  return std::unique_ptr<ByteStream>(std::move(stream));
}

Result<std::unique_ptr<ByteStream>> ConnectTls(std::unique_ptr<ByteStream> raw,
                                               const std::string& name,
                                               const std::string& ca_file) {
  auto host = CELLA_TRY_CTX(NormaliseHostName(name), "TLS connect");
  SSL_CTX* ctx = CELLA_TRY_CTX(ClientContext(ca_file), "TLS connect to " + host.text);
  SslPtr ssl(SSL_new(ctx));
  if (!ssl) return FailOpenSsl("SSL_new for " + host.text);
  SSL_set_connect_state(ssl.get());
  X509_VERIFY_PARAM* verify = SSL_get0_param(ssl.get());
  X509_VERIFY_PARAM_set_hostflags(verify, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  if (host.kind == HostKind::kIpAddress) {
    // RFC 6066: no IP literals in SNI; the certificate must carry the IP.
    if (X509_VERIFY_PARAM_set1_ip_asc(verify, host.text.c_str()) != 1)
      return FailOpenSsl("TLS connect to " + host.text + ": setting the expected IP");
  } else if (SSL_set_tlsext_host_name(ssl.get(), host.text.c_str()) != 1 ||
             X509_VERIFY_PARAM_set1_host(verify, host.text.c_str(), host.text.size()) != 1) {
    return FailOpenSsl("TLS connect to " + host.text + ": setting SNI and expected name");
  }
  auto stream = CELLA_TRY(NewTlsStream(std::move(raw), std::move(ssl), host.text));
  CELLA_TRY(stream->Handshake(""));
  return std::unique_ptr<ByteStream>(std::move(stream));
}

// --- ClientHello -----------------------------------------------------------

namespace {

// Bounds-checked big-endian reader over one buffer.
class Cursor {
 public:
  explicit Cursor(std::span<const uint8_t> data) : data_(data) {}
  size_t left() const { return data_.size() - at_; }
  bool Number(size_t width, size_t& out) {
    if (left() < width) return false;
    out = 0;
    for (size_t i = 0; i < width; ++i) out = (out << 8) | data_[at_++];
    return true;
  }
  bool Take(size_t count, std::span<const uint8_t>& out) {
    if (left() < count) return false;
    out = data_.subspan(at_, count);
    at_ += count;
    return true;
  }

 private:
  std::span<const uint8_t> data_;
  size_t at_ = 0;
};

constexpr uint8_t kContentHandshake = 22;
constexpr uint8_t kHandshakeClientHello = 1;
constexpr size_t kRecordHeader = 5;
constexpr size_t kHandshakeHeader = 4;
constexpr uint16_t kExtensionServerName = 0;
constexpr uint8_t kServerNameHostName = 0;

std::unexpected<Error> Malformed(std::string_view what) {
  return Fail("malformed TLS ClientHello: " + std::string(what));
}

Result<std::string> ParseServerName(std::span<const uint8_t> extension) {
  Cursor cursor(extension);
  size_t list_length = 0;
  if (!cursor.Number(2, list_length) || list_length != cursor.left() || list_length == 0)
    return Malformed("server_name list length does not match the extension");
  std::optional<std::string> host;
  while (cursor.left() > 0) {
    size_t type = 0, length = 0;
    std::span<const uint8_t> value;
    if (!cursor.Number(1, type) || !cursor.Number(2, length) || !cursor.Take(length, value))
      return Malformed("server_name entry runs past its list");
    if (type != kServerNameHostName) continue;  // other name types: not ours to judge
    if (host) return Malformed("more than one host_name in server_name");
    std::string_view text(reinterpret_cast<const char*>(value.data()), value.size());
    if (!IsValidHostName(text))
      return Malformed(
          "server_name host_name is not a DNS name (letters, digits, '-', '_', "
          "labels of 1-63 bytes, 253 bytes at most, no trailing dot)");
    host = ToLower(text);
  }
  if (!host) return Malformed("server_name extension without a host_name");
  return *host;
}

Result<std::string> ParseClientHelloBody(std::span<const uint8_t> body) {
  Cursor cursor(body);
  size_t version = 0, length = 0;
  std::span<const uint8_t> skipped;
  if (!cursor.Number(2, version) || (version >> 8) != 3)
    return Malformed("legacy_version is not 3.x");
  if (!cursor.Take(32, skipped)) return Malformed("too short for its random");
  if (!cursor.Number(1, length) || length > 32 || !cursor.Take(length, skipped))
    return Malformed("bad session_id");
  if (!cursor.Number(2, length) || length < 2 || length % 2 != 0 || !cursor.Take(length, skipped))
    return Malformed("bad cipher_suites");
  if (!cursor.Number(1, length) || length < 1 || !cursor.Take(length, skipped))
    return Malformed("bad compression_methods");
  if (cursor.left() == 0) return Fail("TLS ClientHello has no extensions, so no server_name (SNI)");
  if (!cursor.Number(2, length) || length != cursor.left())
    return Malformed("extensions length does not match the rest of the ClientHello");
  std::vector<bool> seen(65536, false);
  std::optional<std::string> host;
  while (cursor.left() > 0) {
    size_t type = 0;
    std::span<const uint8_t> data;
    if (!cursor.Number(2, type) || !cursor.Number(2, length) || !cursor.Take(length, data))
      return Malformed("extension runs past the ClientHello");
    if (seen[type]) return Malformed("extension " + std::to_string(type) + " appears twice");
    seen[type] = true;
    if (type == kExtensionServerName) host = CELLA_TRY(ParseServerName(data));
  }
  if (!host) return Fail("TLS ClientHello has no server_name (SNI) extension");
  return *host;
}

}  // namespace

Result<std::optional<std::string>> ParseClientHelloSni(std::span<const std::byte> input) {
  std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(input.data()), input.size());
  auto need_more = [&]() -> Result<std::optional<std::string>> {
    if (bytes.size() >= kMaxClientHelloBytes)
      return Fail("no complete TLS ClientHello within the first " +
                  std::to_string(kMaxClientHelloBytes) + " bytes");
    return std::nullopt;
  };
  // A ClientHello may span several handshake records; they are joined here.
  std::vector<uint8_t> handshake;
  std::optional<size_t> message_size;  // header included, once known
  size_t at = 0;
  while (!message_size || handshake.size() < *message_size) {
    size_t available = bytes.size() - at;
    if (available == 0) return need_more();
    // Checked byte by byte, so non-TLS traffic is refused at once instead of
    // being waited on.
    if (bytes[at] != kContentHandshake) {
      if (at == 0 && (bytes[0] & 0x80) != 0)
        return Fail("not a TLS ClientHello: SSLv2-format hello (no extensions, no SNI)");
      return Fail("not a TLS ClientHello: record content type " + std::to_string(bytes[at]) +
                  " at offset " + std::to_string(at) + " is not handshake (22)");
    }
    if (available >= 2 && bytes[at + 1] != 3)
      return Fail("not a TLS ClientHello: record version major " + std::to_string(bytes[at + 1]) +
                  " at offset " + std::to_string(at + 1) + " is not 3");
    if (available >= 3 && bytes[at + 2] > 4)
      return Fail("not a TLS ClientHello: record version 3." + std::to_string(bytes[at + 2]) +
                  " is unknown");
    if (available < kRecordHeader) return need_more();
    size_t record_length = (size_t{bytes[at + 3]} << 8) | bytes[at + 4];
    if (record_length == 0) return Malformed("empty handshake record");
    if (record_length > kMaxTlsRecordPayload)
      return Malformed("record of " + std::to_string(record_length) + " bytes exceeds 16384");
    size_t present = std::min(record_length, available - kRecordHeader);
    auto fragment = bytes.subspan(at + kRecordHeader, present);
    handshake.insert(handshake.end(), fragment.begin(), fragment.end());
    if (!handshake.empty() && handshake[0] != kHandshakeClientHello)
      return Fail("not a TLS ClientHello: handshake message type " + std::to_string(handshake[0]));
    if (!message_size && handshake.size() >= kHandshakeHeader) {
      size_t body = (size_t{handshake[1]} << 16) | (size_t{handshake[2]} << 8) | handshake[3];
      if (body + kHandshakeHeader + kRecordHeader > kMaxClientHelloBytes)
        return Fail("TLS ClientHello of " + std::to_string(body) + " bytes exceeds the limit of " +
                    std::to_string(kMaxClientHelloBytes));
      message_size = body + kHandshakeHeader;
    }
    if (message_size && handshake.size() >= *message_size) break;
    if (present < record_length) return need_more();
    at += kRecordHeader + record_length;
  }
  auto body = std::span<const uint8_t>(handshake).subspan(kHandshakeHeader,
                                                          *message_size - kHandshakeHeader);
  return CELLA_TRY(ParseClientHelloBody(body));
}

}  // namespace cella::net
