#include "host/registry/manifest.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "host/registry/reference.h"

namespace cella::registry {
namespace {

using Json = nlohmann::json;

constexpr size_t kMaxLayers = 1024;
constexpr size_t kMaxIndexEntries = 4096;
constexpr size_t kMaxListItems = 65536;

Result<Json> ParseJsonObject(std::string_view body, std::string_view what) {
  Json doc = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Fail(std::string(what) + ": not valid JSON");
  if (!doc.is_object()) return Fail(std::string(what) + ": top level is not a JSON object");
  return doc;
}

// Missing or null -> nullopt; wrong type -> error naming the field.
Result<std::optional<std::string>> OptString(const Json& obj, const char* key,
                                             std::string_view where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string())
    return Fail(std::string(where) + ": field \"" + key + "\" must be a string");
  return std::optional<std::string>(it->get<std::string>());
}

Result<std::vector<std::string>> OptStringList(const Json& obj, const char* key,
                                               std::string_view where) {
  std::vector<std::string> out;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return out;
  if (!it->is_array())
    return Fail(std::string(where) + ": field \"" + key + "\" must be an array of strings");
  if (it->size() > kMaxListItems)
    return Fail(std::string(where) + ": field \"" + key + "\" has too many entries");
  for (const Json& item : *it) {
    if (!item.is_string())
      return Fail(std::string(where) + ": field \"" + key + "\" must contain only strings");
    out.push_back(item.get<std::string>());
  }
  return out;
}

Result<std::map<std::string, std::string>> OptStringMap(const Json& obj, const char* key,
                                                        std::string_view where) {
  std::map<std::string, std::string> out;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return out;
  if (!it->is_object())
    return Fail(std::string(where) + ": field \"" + key + "\" must be an object of strings");
  if (it->size() > kMaxListItems)
    return Fail(std::string(where) + ": field \"" + key + "\" has too many entries");
  for (auto& [k, v] : it->items()) {
    if (!v.is_string())
      return Fail(std::string(where) + ": field \"" + key + "." + k + "\" must be a string");
    out.emplace(k, v.get<std::string>());
  }
  return out;
}

Result<Descriptor> ParseDescriptor(const Json& j, const std::string& where) {
  if (!j.is_object()) return Fail(where + ": descriptor is not an object");
  Descriptor d;
  auto media_type = CELLA_TRY(OptString(j, "mediaType", where));
  d.media_type = media_type.value_or("");
  auto digest = CELLA_TRY(OptString(j, "digest", where));
  if (!digest) return Fail(where + ": descriptor has no \"digest\"");
  CELLA_TRY_CTX(DigestHex(*digest), where);
  d.digest = *digest;
  auto size = j.find("size");
  if (size == j.end() || !size->is_number_integer())
    return Fail(where + ": descriptor \"size\" must be an integer");
  if (size->is_number_unsigned()) {
    uint64_t v = size->get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX))
      return Fail(where + ": descriptor \"size\" is too large");
    d.size = static_cast<int64_t>(v);
  } else {
    d.size = size->get<int64_t>();
  }
  if (d.size < 0) return Fail(where + ": descriptor \"size\" is negative");
  d.annotations = CELLA_TRY(OptStringMap(j, "annotations", where));
  auto platform = j.find("platform");
  if (platform != j.end() && !platform->is_null()) {
    if (!platform->is_object()) return Fail(where + ": \"platform\" must be an object");
    Platform p;
    p.os = CELLA_TRY(OptString(*platform, "os", where + ".platform")).value_or("");
    p.architecture =
        CELLA_TRY(OptString(*platform, "architecture", where + ".platform")).value_or("");
    p.variant = CELLA_TRY(OptString(*platform, "variant", where + ".platform")).value_or("");
    d.platform = p;
  }
  return d;
}

Result<ParsedManifest> ParseManifestImpl(std::string_view body, std::string_view content_type) {
  if (body.size() > kMaxManifestBytes) return Fail("manifest: larger than 4 MiB");
  Json doc = CELLA_TRY(ParseJsonObject(body, "manifest"));
  auto schema = doc.find("schemaVersion");
  if (schema == doc.end() || !schema->is_number_integer() || schema->get<int64_t>() != 2) {
    return Fail("manifest: unsupported schemaVersion (only schema 2 manifests are supported)");
  }
  std::string media_type = CELLA_TRY(OptString(doc, "mediaType", "manifest")).value_or("");
  std::string ct(content_type.substr(0, content_type.find(';')));
  while (!ct.empty() && ct.back() == ' ') ct.pop_back();
  if (media_type.empty()) {
    media_type = ct;
    if (media_type.empty() || media_type == "application/json") {
      // OCI allows omitting mediaType: tell them apart by shape.
      media_type = doc.contains("manifests") ? media::kOciIndex : media::kOciManifest;
    }
  } else if (!ct.empty() && ct != "application/json" && ct != "application/octet-stream" &&
             ct != media_type) {
    return Fail("manifest: Content-Type \"" + ct + "\" contradicts mediaType \"" + media_type +
                "\"");
  }
  ParsedManifest out;
  if (media_type == media::kOciIndex || media_type == media::kDockerManifestList) {
    out.kind = ManifestKind::kIndex;
    out.index.media_type = media_type;
    auto list = doc.find("manifests");
    if (list == doc.end() || !list->is_array())
      return Fail("manifest index: \"manifests\" must be an array");
    if (list->size() > kMaxIndexEntries) return Fail("manifest index: too many entries");
    for (size_t i = 0; i < list->size(); ++i) {
      out.index.manifests.push_back(CELLA_TRY(
          ParseDescriptor((*list)[i], "manifest index: manifests[" + std::to_string(i) + "]")));
    }
    return out;
  }
  if (media_type != media::kOciManifest && media_type != media::kDockerManifest) {
    return Fail("manifest: unsupported media type \"" + media_type + "\"");
  }
  out.kind = ManifestKind::kImage;
  out.image.media_type = media_type;
  auto config = doc.find("config");
  if (config == doc.end()) return Fail("manifest: missing \"config\"");
  out.image.config = CELLA_TRY(ParseDescriptor(*config, "manifest: config"));
  auto layers = doc.find("layers");
  if (layers == doc.end() || !layers->is_array())
    return Fail("manifest: \"layers\" must be an array");
  if (layers->size() > kMaxLayers) return Fail("manifest: more than 1024 layers");
  for (size_t i = 0; i < layers->size(); ++i) {
    std::string where = "manifest: layers[" + std::to_string(i) + "]";
    Descriptor d = CELLA_TRY(ParseDescriptor((*layers)[i], where));
    if (!IsKnownLayerMediaType(d.media_type))
      return Fail(where + ": unsupported layer media type \"" + d.media_type + "\"");
    out.image.layers.push_back(std::move(d));
  }
  return out;
}

std::string Normalize(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

bool VariantMatches(const Platform& wanted, const Platform& have) {
  if (wanted.variant.empty()) return true;
  std::string w = wanted.variant, h = have.variant;
  // arm64 images often leave out the only variant there is.
  if (have.architecture == "arm64") {
    if (w.empty()) w = "v8";
    if (h.empty()) h = "v8";
  }
  return w == h;
}

Result<ImageConfig> ParseImageConfigImpl(std::string_view body) {
  if (body.size() > kMaxConfigBytes) return Fail("image config: larger than 8 MiB");
  Json doc = CELLA_TRY(ParseJsonObject(body, "image config"));
  ImageConfig c;
  c.os = CELLA_TRY(OptString(doc, "os", "image config")).value_or("");
  c.architecture = CELLA_TRY(OptString(doc, "architecture", "image config")).value_or("");
  c.variant = CELLA_TRY(OptString(doc, "variant", "image config")).value_or("");
  c.created = CELLA_TRY(OptString(doc, "created", "image config")).value_or("");
  auto config = doc.find("config");
  if (config != doc.end() && !config->is_null()) {
    if (!config->is_object()) return Fail("image config: \"config\" must be an object");
    const std::string where = "image config: config";
    c.entrypoint = CELLA_TRY(OptStringList(*config, "Entrypoint", where));
    c.cmd = CELLA_TRY(OptStringList(*config, "Cmd", where));
    c.env = CELLA_TRY(OptStringList(*config, "Env", where));
    c.working_dir = CELLA_TRY(OptString(*config, "WorkingDir", where)).value_or("");
    c.user = CELLA_TRY(OptString(*config, "User", where)).value_or("");
    c.labels = CELLA_TRY(OptStringMap(*config, "Labels", where));
    auto ports = config->find("ExposedPorts");
    if (ports != config->end() && !ports->is_null()) {
      if (!ports->is_object()) return Fail(where + ": \"ExposedPorts\" must be an object");
      for (auto& [port, unused] : ports->items()) c.exposed_ports.push_back(port);
    }
  }
  auto rootfs = doc.find("rootfs");
  if (rootfs != doc.end() && !rootfs->is_null()) {
    if (!rootfs->is_object()) return Fail("image config: \"rootfs\" must be an object");
    c.diff_ids = CELLA_TRY(OptStringList(*rootfs, "diff_ids", "image config: rootfs"));
    for (const auto& id : c.diff_ids) CELLA_TRY_CTX(DigestHex(id), "image config: rootfs.diff_ids");
  }
  return c;
}

}  // namespace

std::string Platform::String() const {
  std::string s = os + "/" + architecture;
  if (!variant.empty()) s += "/" + variant;
  return s;
}

Result<Platform> ParsePlatform(std::string_view text) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t slash = text.find('/', start);
    parts.push_back(Normalize(text.substr(start, slash == text.npos ? text.npos : slash - start)));
    if (slash == text.npos) break;
    start = slash + 1;
  }
  if (parts.size() < 2 || parts.size() > 3 ||
      std::any_of(parts.begin(), parts.end(), [](const std::string& p) { return p.empty(); }))
    return Fail("invalid platform \"" + std::string(text) + "\": expected os/arch[/variant]");
  Platform p{parts[0], parts[1], parts.size() == 3 ? parts[2] : ""};
  return p;
}

bool IsKnownLayerMediaType(std::string_view t) {
  return t == media::kDockerLayerGzip || t == media::kDockerLayerTar || t == media::kOciLayerTar ||
         t == media::kOciLayerGzip || t == media::kOciLayerZstd ||
         t == "application/vnd.oci.image.layer.nondistributable.v1.tar" ||
         t == "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" ||
         t == "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" ||
         t == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
}

Result<ParsedManifest> ParseManifest(std::string_view body, std::string_view content_type) {
  try {
    return ParseManifestImpl(body, content_type);
  } catch (const std::exception& e) {  // nlohmann boundary: never let it escape
    return Fail(std::string("manifest: malformed JSON: ") + e.what());
  }
}

Result<ImageConfig> ParseImageConfig(std::string_view body) {
  try {
    return ParseImageConfigImpl(body);
  } catch (const std::exception& e) {
    return Fail(std::string("image config: malformed JSON: ") + e.what());
  }
}

Result<Descriptor> SelectPlatform(const ManifestIndex& index, const Platform& wanted) {
  std::vector<std::string> available;
  for (const Descriptor& d : index.manifests) {
    if (!d.platform) continue;
    const Platform& have = *d.platform;
    if (Normalize(have.os) == Normalize(wanted.os) &&
        Normalize(have.architecture) == Normalize(wanted.architecture) &&
        VariantMatches(wanted, have)) {
      if (d.media_type != media::kOciManifest && d.media_type != media::kDockerManifest &&
          !d.media_type.empty())
        continue;
      return d;
    }
    if (have.os != "unknown") available.push_back(have.String());
  }
  std::string list;
  for (const auto& a : available) list += (list.empty() ? "" : ", ") + a;
  return Fail("no image for platform " + wanted.String() +
              " in the index; available: " + (list.empty() ? "(none)" : list));
}

std::vector<std::string> ImageConfig::EffectiveCommand() const {
  std::vector<std::string> out = entrypoint;
  out.insert(out.end(), cmd.begin(), cmd.end());
  return out;
}

bool ImageConfig::IsSystemdInit() const {
  std::vector<std::string> command = EffectiveCommand();
  if (command.empty()) return false;
  const std::string& first = command.front();
  return first == "/sbin/init" || first == "/lib/systemd/systemd" ||
         first == "/usr/lib/systemd/systemd";
}

}  // namespace cella::registry
