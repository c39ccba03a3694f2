// Registry input is untrusted: manifests, indexes, image configs, auth
// challenges, docker config files and references must never crash, throw or
// hang, whatever the bytes. The first byte picks the parser.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "host/registry/auth.h"
#include "host/registry/manifest.h"
#include "host/registry/reference.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  using namespace cella::registry;
  switch (data[0] % 6) {
    case 0: {
      auto m = ParseManifest(input, "");
      if (m && m->kind == ManifestKind::kIndex) (void)SelectPlatform(m->index, Platform{});
      break;
    }
    case 1:
      (void)ParseManifest(input, media::kDockerManifest);
      break;
    case 2: {
      auto c = ParseImageConfig(input);
      if (c) (void)c->IsSystemdInit();
      break;
    }
    case 3:
      (void)ParseWwwAuthenticate(input);
      break;
    case 4:
      (void)CredentialsFromDockerConfig(input, "127.0.0.1:5000");
      (void)Base64Decode(input);
      break;
    case 5:
      if (auto r = ParseReference(input)) (void)r->String();
      (void)ParsePlatform(input);
      break;
  }
  return 0;
}
