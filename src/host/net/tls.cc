#include "host/net/tls.h"

#include <arpa/inet.h>

#include "host/net/tls_internal.h"
#include "protocol/network.h"

namespace cella::net {

void SslCtxFree::operator()(ssl_ctx_st* ctx) const { SSL_CTX_free(ctx); }
void EvpPkeyFree::operator()(evp_pkey_st* key) const { EVP_PKEY_free(key); }
void X509Free::operator()(x509_st* cert) const { X509_free(cert); }

namespace tls_detail {

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

std::string ToLower(std::string_view text) {
  std::string out(text);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

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
  if (!protocol::IsValidHostName(text))
    return Fail("host name '" + std::string(name) +
                "' is neither an IP address nor a DNS name (letters, digits, '-', '_', labels of "
                "1-63 bytes not starting or ending with '-', 253 bytes at most)");
  return HostName{ToLower(text), HostKind::kDnsName};
}

}  // namespace tls_detail
}  // namespace cella::net
