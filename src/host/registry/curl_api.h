// libcurl, loaded when first used rather than at every process start.
//
// libcurl and the libraries it pulls in (TLS, Kerberos, LDAP, SSH, IDN...)
// are about 25 of the 45 shared objects a linked `cella` would load: ~4 ms
// of the dynamic loader's time in every process, the supervisor of every
// sandbox included, which never speaks HTTP. Only the registry client does,
// so it reaches libcurl through this table, filled once by dlopen/dlsym.
//
// Threading: LoadCurl may be called from any thread (loaded once); the
// functions behind it follow libcurl's own rules.
#pragma once

#include <curl/curl.h>

#include "base/result.h"

namespace cella::registry {

struct CurlApi {
  decltype(&::curl_global_init) global_init;
  decltype(&::curl_easy_init) easy_init;
  decltype(&::curl_easy_cleanup) easy_cleanup;
  decltype(&::curl_easy_reset) easy_reset;
  // Variadic as libcurl's own: called with the option's one argument.
  decltype(&::curl_easy_setopt) easy_setopt;
  decltype(&::curl_easy_perform) easy_perform;
  decltype(&::curl_easy_getinfo) easy_getinfo;
  decltype(&::curl_easy_strerror) easy_strerror;
  decltype(&::curl_easy_escape) easy_escape;
  decltype(&::curl_easy_header) easy_header;
  decltype(&::curl_slist_append) slist_append;
  decltype(&::curl_slist_free_all) slist_free_all;
  decltype(&::curl_free) free;
  decltype(&::curl_url) url;
  decltype(&::curl_url_cleanup) url_cleanup;
  decltype(&::curl_url_set) url_set;
  decltype(&::curl_url_get) url_get;
};

// libcurl (libcurl.so.4) loaded and curl_global_init done, once per
// process; the same error on every call when it could not be.
Result<const CurlApi*> LoadCurl();

}  // namespace cella::registry
