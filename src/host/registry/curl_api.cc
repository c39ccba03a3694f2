#include "host/registry/curl_api.h"

#include <dlfcn.h>

#include <mutex>
#include <string>
#include <type_traits>

namespace cella::registry {
namespace {

Result<const CurlApi*> Load() {
  // RTLD_LOCAL: its symbols serve only this table. Never closed: libcurl
  // keeps global state (and its TLS library's) for the process's life.
  void* lib = ::dlopen("libcurl.so.4", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = ::dlerror();
    return Fail(std::string("load libcurl (libcurl.so.4; Debian package libcurl4): ") +
                (why != nullptr ? why : "dlopen failed"));
  }
  static CurlApi api;
  Status missing;
  auto bind = [&](auto& slot, const char* name) {
    void* sym = ::dlsym(lib, name);
    if (sym == nullptr && missing) missing = Fail(std::string("libcurl has no ") + name);
    slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(sym);
  };
  bind(api.global_init, "curl_global_init");
  bind(api.easy_init, "curl_easy_init");
  bind(api.easy_cleanup, "curl_easy_cleanup");
  bind(api.easy_reset, "curl_easy_reset");
  bind(api.easy_setopt, "curl_easy_setopt");
  bind(api.easy_perform, "curl_easy_perform");
  bind(api.easy_getinfo, "curl_easy_getinfo");
  bind(api.easy_strerror, "curl_easy_strerror");
  bind(api.easy_escape, "curl_easy_escape");
  bind(api.easy_header, "curl_easy_header");
  bind(api.slist_append, "curl_slist_append");
  bind(api.slist_free_all, "curl_slist_free_all");
  bind(api.free, "curl_free");
  bind(api.url, "curl_url");
  bind(api.url_cleanup, "curl_url_cleanup");
  bind(api.url_set, "curl_url_set");
  bind(api.url_get, "curl_url_get");
  if (!missing)
    return std::unexpected(std::move(missing.error()).WithContext("libcurl.so.4 is too old"));
  if (CURLcode rc = api.global_init(CURL_GLOBAL_DEFAULT); rc != CURLE_OK)
    return Fail(std::string("curl_global_init: ") + api.easy_strerror(rc));
  return &api;
}

}  // namespace

Result<const CurlApi*> LoadCurl() {
  static std::once_flag once;
  static Result<const CurlApi*> loaded = Fail("libcurl not loaded");
  std::call_once(once, [] { loaded = Load(); });
  return loaded;
}

}  // namespace cella::registry
