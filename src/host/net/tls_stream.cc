// TLS streams over a raw ByteStream: the guest-facing side (AcceptTls) and
// the verified upstream side (ConnectTls).
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
}  // namespace cella::net
