// The installation's CA (<home>/egress-ca) and the leaves it mints.
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
#include "host/net/tls.h"
#include "host/net/tls_internal.h"

namespace cella::net {
using namespace tls_detail;  // NOLINT: this file's half of the TLS code
namespace {

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

}  // namespace cella::net
