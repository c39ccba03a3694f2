// One piece (~670 lines) on purpose: pull, import, the image index and gc
// all change the same store under the same lock and SQL; they are kept
// together so their invariants are checked in one file.
#include "host/registry/image_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "base/io.h"
#include "host/os/digest.h"
#include "host/os/paths.h"
#include "host/registry/archive_extract.h"
#include "host/rootfs/rootfs.h"

namespace cella::registry {
namespace {

using Json = nlohmann::json;

enum class LockKind { kShared, kExclusive };

Result<UniqueFd> LockFile(const std::string& path, LockKind kind) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd) return FailErrno("open " + path);
  int rc;
  do rc = ::flock(fd.Get(), kind == LockKind::kShared ? LOCK_SH : LOCK_EX);
  while (rc != 0 && errno == EINTR);
  if (rc != 0) return FailErrno("flock " + path);
  return fd;
}

Json DescriptorToJson(const Descriptor& d) {
  Json j = {{"mediaType", d.media_type}, {"digest", d.digest}, {"size", d.size}};
  return j;
}

Json RecordToJson(const ImageRecord& r) {
  Json layers = Json::array();
  for (const auto& l : r.layers) layers.push_back(DescriptorToJson(l));
  return Json{{"manifest_media_type", r.manifest_media_type},
              {"config", DescriptorToJson(r.config)},
              {"layers", layers},
              {"platform",
               {{"os", r.platform.os},
                {"architecture", r.platform.architecture},
                {"variant", r.platform.variant}}},
              {"size", r.size},
              {"created", r.created}};
}

Result<Descriptor> DescriptorFromJson(const Json& j) {
  Descriptor d;
  d.media_type = j.at("mediaType").get<std::string>();
  d.digest = j.at("digest").get<std::string>();
  d.size = j.at("size").get<int64_t>();
  CELLA_TRY(DigestHex(d.digest));
  return d;
}

Result<ImageRecord> RecordFromRow(std::string reference, std::string repository, std::string tag,
                                  std::string manifest_digest, std::string_view details,
                                  int64_t added_at) {
  ImageRecord r;
  r.reference = std::move(reference);
  r.repository = std::move(repository);
  r.tag = std::move(tag);
  r.manifest_digest = std::move(manifest_digest);
  r.added_at = added_at;
  const std::string where = "image index row \"" + r.reference + "\"";
  try {
    Json j = Json::parse(details);
    r.manifest_media_type = j.at("manifest_media_type").get<std::string>();
    r.config = CELLA_TRY_CTX(DescriptorFromJson(j.at("config")), where);
    for (const auto& l : j.at("layers"))
      r.layers.push_back(CELLA_TRY_CTX(DescriptorFromJson(l), where));
    r.platform.os = j.at("platform").at("os").get<std::string>();
    r.platform.architecture = j.at("platform").at("architecture").get<std::string>();
    r.platform.variant = j.at("platform").at("variant").get<std::string>();
    r.size = j.at("size").get<int64_t>();
    r.created = j.at("created").get<std::string>();
  } catch (const std::exception& e) {  // our own file, but a corrupt one must not throw
    return Fail(where + ": corrupt details: " + e.what());
  }
  CELLA_TRY_CTX(DigestHex(r.manifest_digest), where);
  return r;
}

// Owns one prepared statement; finalised exactly once.
struct Statement {
  sqlite3_stmt* stmt = nullptr;
  Statement() = default;
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  Statement(Statement&& other) noexcept : stmt(std::exchange(other.stmt, nullptr)) {}
  Statement& operator=(Statement&& other) noexcept {
    std::swap(stmt, other.stmt);
    return *this;
  }
  ~Statement() { sqlite3_finalize(stmt); }
};

Status RemoveTree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec) return Fail("remove " + path + ": " + ec.message());
  return {};
}

// Copies a file into the store through a BlobWriter (so it is verified).
Status IngestFile(const BlobStore& store, const std::string& path, const std::string& digest,
                  int64_t size) {
  auto writer = CELLA_TRY(BlobWriter::Open(store, digest, size, ResumeMode::kStartOver));
  if (writer.AlreadyStored()) return {};
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open " + path);
  std::string buf(1 << 20, '\0');
  while (true) {
    size_t n = CELLA_TRY_CTX(
        ReadSome(fd.Get(), std::as_writable_bytes(std::span(buf.data(), buf.size()))), path);
    if (n == 0) break;
    CELLA_TRY_CTX(writer.Write(std::string_view(buf.data(), n)), path);
  }
  CELLA_TRY_CTX(writer.Commit(), path);
  return {};
}

Result<int64_t> FileSize(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
  if (!S_ISREG(st.st_mode)) return Fail(path + ": not a regular file");
  return static_cast<int64_t>(st.st_size);
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::string DetectLayerMediaType(const std::string& path) {
  unsigned char magic[4] = {};
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd && ::read(fd.Get(), magic, sizeof magic) == 4) {
    if (magic[0] == 0x1f && magic[1] == 0x8b) return std::string(media::kDockerLayerGzip);
    if (magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd)
      return std::string(media::kOciLayerZstd);
  }
  return std::string(media::kDockerLayerTar);
}

}  // namespace

struct ImageStore::State {
  std::string home;
  std::string images_dir;
  BlobStore blobs{""};
  StoreOptions options;
  sqlite3* db = nullptr;
  std::unique_ptr<RegistryClient> client;

  ~State() {
    if (db != nullptr) sqlite3_close(db);
  }

  std::string LockPath() const { return images_dir + "/store.lock"; }
  std::string RootfsDir() const { return images_dir + "/rootfs"; }
  std::string TmpDir() const { return images_dir + "/tmp"; }

  Status Exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : sqlite3_errmsg(db);
      sqlite3_free(err);
      return Fail(images_dir + "/images.db: " + msg);
    }
    return {};
  }

  Result<Statement> Prepare(const char* sql) {
    Statement s;
    if (sqlite3_prepare_v2(db, sql, -1, &s.stmt, nullptr) != SQLITE_OK)
      return Fail(images_dir + "/images.db: prepare: " + sqlite3_errmsg(db));
    return s;
  }

  Status Bind(Statement& s, int index, const std::string& value) {
    if (sqlite3_bind_text(s.stmt, index, value.c_str(), static_cast<int>(value.size()),
                          SQLITE_TRANSIENT) != SQLITE_OK)
      return Fail(images_dir + "/images.db: bind: " + sqlite3_errmsg(db));
    return {};
  }

  Result<std::vector<ImageRecord>> Query(const char* sql, const std::vector<std::string>& params) {
    Statement s = CELLA_TRY(Prepare(sql));
    for (size_t i = 0; i < params.size(); ++i)
      CELLA_TRY(Bind(s, static_cast<int>(i + 1), params[i]));
    std::vector<ImageRecord> out;
    while (true) {
      int rc = sqlite3_step(s.stmt);
      if (rc == SQLITE_DONE) break;
      if (rc != SQLITE_ROW) return Fail(images_dir + "/images.db: query: " + sqlite3_errmsg(db));
      auto text = [&](int col) {
        const unsigned char* t = sqlite3_column_text(s.stmt, col);
        return std::string(t ? reinterpret_cast<const char*>(t) : "");
      };
      out.push_back(CELLA_TRY(RecordFromRow(text(0), text(1), text(2), text(3), text(4),
                                            sqlite3_column_int64(s.stmt, 5))));
    }
    return out;
  }

  Status Upsert(const ImageRecord& r) {
    Statement s =
        CELLA_TRY(Prepare("INSERT OR REPLACE INTO images(reference, repository, tag, "
                          "manifest_digest, details, added_at) "
                          "VALUES(?1, ?2, ?3, ?4, ?5, ?6)"));
    CELLA_TRY(Bind(s, 1, r.reference));
    CELLA_TRY(Bind(s, 2, r.repository));
    CELLA_TRY(Bind(s, 3, r.tag));
    CELLA_TRY(Bind(s, 4, r.manifest_digest));
    CELLA_TRY(Bind(s, 5, RecordToJson(r).dump()));
    if (sqlite3_bind_int64(s.stmt, 6, r.added_at) != SQLITE_OK)
      return Fail(images_dir + "/images.db: bind: " + sqlite3_errmsg(db));
    if (sqlite3_step(s.stmt) != SQLITE_DONE)
      return Fail(images_dir + "/images.db: insert " + r.reference + ": " + sqlite3_errmsg(db));
    return {};
  }

  // Builds and stores the record for a manifest whose blobs are all stored.
  Result<ImageRecord> Record(const Reference& ref, const std::string& manifest_digest,
                             const ImageManifest& manifest) {
    ImageRecord r;
    r.reference = ref.String();
    r.repository = ref.Name();
    r.tag = ref.digest.empty() ? ref.tag : "";
    r.manifest_digest = manifest_digest;
    r.manifest_media_type = manifest.media_type;
    r.config = manifest.config;
    r.layers = manifest.layers;
    r.size = manifest.config.size;
    for (const auto& l : manifest.layers) r.size += l.size;
    std::string config_text =
        CELLA_TRY(ReadFileToString(blobs.PathFor(manifest.config.digest), kMaxConfigBytes));
    ImageConfig config = CELLA_TRY_CTX(ParseImageConfig(config_text), r.reference);
    r.platform = Platform{config.os, config.architecture, config.variant};
    r.created = config.created;
    r.added_at = static_cast<int64_t>(::time(nullptr));
    CELLA_TRY(Upsert(r));
    return r;
  }

  Result<ImageManifest> ParseImage(std::string_view body, std::string_view content_type,
                                   const std::string& what) {
    ParsedManifest m = CELLA_TRY_CTX(ParseManifest(body, content_type), what);
    if (m.kind != ManifestKind::kImage)
      return Fail(what + ": expected an image manifest, got an index");
    return m.image;
  }

  Result<ImageRecord> ImportOciLayout(const std::string& dir, std::optional<Reference> ref,
                                      const Platform& platform,
                                      const std::optional<Reference>& fallback) {
    auto blob_path = [&](const std::string& digest) -> Result<std::string> {
      std::string hex = CELLA_TRY(DigestHex(digest));
      return ResolveInside(dir, "blobs/sha256/" + hex);
    };
    auto read_verified = [&](const Descriptor& d, size_t max) -> Result<std::string> {
      std::string path = CELLA_TRY(blob_path(d.digest));
      std::string body = CELLA_TRY(ReadFileToString(path, max));
      if (static_cast<int64_t>(body.size()) != d.size)
        return Fail(path + ": size mismatch: descriptor says " + std::to_string(d.size) +
                    ", file has " + std::to_string(body.size()));
      if ("sha256:" + host::Sha256Hex(body) != d.digest) return Fail(path + ": digest mismatch");
      return body;
    };
    std::string index_path = CELLA_TRY(ResolveInside(dir, "index.json"));
    std::string index_text = CELLA_TRY(ReadFileToString(index_path, kMaxManifestBytes));
    ParsedManifest index =
        CELLA_TRY_CTX(ParseManifest(index_text, media::kOciIndex), dir + "/index.json");
    if (index.kind != ManifestKind::kIndex) return Fail(dir + "/index.json: not an image index");
    if (index.index.manifests.empty()) return Fail(dir + "/index.json: lists no image");
    // Choose the entry: the one named like the wanted tag, else the only one.
    const Descriptor* chosen = nullptr;
    std::optional<Reference> named;
    for (const auto& d : index.index.manifests) {
      std::string full, tag_only;
      if (auto it = d.annotations.find("io.containerd.image.name"); it != d.annotations.end())
        full = it->second;
      if (auto it = d.annotations.find("org.opencontainers.image.ref.name");
          it != d.annotations.end())
        tag_only = it->second;
      if (ref && (tag_only == ref->tag || full == ref->String())) {
        chosen = &d;
        break;
      }
      if (!chosen) {
        chosen = &d;
        if (!full.empty()) {
          if (auto p = ParseReference(full)) named = *p;
        } else if (!tag_only.empty()) {
          if (auto p = ParseReference(tag_only); p && tag_only.find(':') != std::string::npos)
            named = *p;
        }
      }
    }
    if (index.index.manifests.size() > 1 && !ref)
      return Fail(dir + ": the layout holds " + std::to_string(index.index.manifests.size()) +
                  " images; name the one to import");
    if (!ref) ref = named ? named : fallback;
    if (!ref)
      return Fail(dir + ": the archive records no image name; give a reference to tag it with");
    Descriptor target = *chosen;
    for (int depth = 0;
         target.media_type == media::kOciIndex || target.media_type == media::kDockerManifestList;
         ++depth) {
      if (depth > 4) return Fail(dir + ": indexes nested too deeply");
      std::string body = CELLA_TRY(read_verified(target, kMaxManifestBytes));
      ParsedManifest nested =
          CELLA_TRY_CTX(ParseManifest(body, target.media_type), dir + ": " + target.digest);
      if (nested.kind != ManifestKind::kIndex)
        return Fail(dir + ": " + target.digest + " is not an index");
      target = CELLA_TRY(SelectPlatform(nested.index, platform));
    }
    std::string manifest_body = CELLA_TRY(read_verified(target, kMaxManifestBytes));
    ImageManifest manifest =
        CELLA_TRY(ParseImage(manifest_body, target.media_type, dir + ": " + target.digest));
    std::vector<Descriptor> all = manifest.layers;
    all.push_back(manifest.config);
    for (const auto& d : all) {
      std::string path = CELLA_TRY(blob_path(d.digest));
      CELLA_TRY(IngestFile(blobs, path, d.digest, d.size));
    }
    CELLA_TRY(blobs.PutBytes(target.digest, manifest_body));
    return Record(*ref, target.digest, manifest);
  }

  Result<ImageRecord> ImportDockerSave(const std::string& dir, std::optional<Reference> ref) {
    std::string manifest_path = CELLA_TRY(ResolveInside(dir, "manifest.json"));
    std::string text = CELLA_TRY(ReadFileToString(manifest_path, kMaxManifestBytes));
    Json doc = Json::parse(text, nullptr, false);
    const std::string where = dir + "/manifest.json";
    if (doc.is_discarded() || !doc.is_array() || doc.empty())
      return Fail(where + ": expected a non-empty JSON array");
    const Json& entry = doc[0];
    if (doc.size() > 1 && !ref)
      return Fail(where + ": the archive holds several images; name the one to import");
    if (!entry.is_object() || !entry.contains("Config") || !entry["Config"].is_string() ||
        !entry.contains("Layers") || !entry["Layers"].is_array())
      return Fail(where + ": entry needs \"Config\" (string) and \"Layers\" (array)");
    if (!ref) {
      auto tags = entry.find("RepoTags");
      if (tags != entry.end() && tags->is_array() && !tags->empty() && (*tags)[0].is_string())
        ref = CELLA_TRY_CTX(ParseReference((*tags)[0].get<std::string>()), where + ": RepoTags[0]");
    }
    if (!ref)
      return Fail(where + ": the archive records no image name; give a reference to tag it with");
    auto ingest = [&](const std::string& rel, std::string media_type) -> Result<Descriptor> {
      std::string path = CELLA_TRY(ResolveInside(dir, rel));
      Descriptor d;
      d.media_type = media_type.empty() ? DetectLayerMediaType(path) : media_type;
      d.size = CELLA_TRY(FileSize(path));
      d.digest = "sha256:" + CELLA_TRY(host::Sha256OfFile(path));
      // Names like blobs/sha256/<hex> or <hex>.json promise a digest: hold them to it.
      std::string base = rel.substr(rel.rfind('/') + 1);
      if (base.ends_with(".json")) base.resize(base.size() - 5);
      if (base.size() == 64 && DigestHex("sha256:" + base) && "sha256:" + base != d.digest)
        return Fail(path + ": digest mismatch: named " + base + ", content hashes to " + d.digest);
      CELLA_TRY(IngestFile(blobs, path, d.digest, d.size));
      return d;
    };
    ImageManifest manifest;
    manifest.media_type = media::kDockerManifest;
    manifest.config =
        CELLA_TRY(ingest(entry["Config"].get<std::string>(), std::string(media::kDockerConfig)));
    for (const auto& layer : entry["Layers"]) {
      if (!layer.is_string()) return Fail(where + ": Layers must hold strings");
      manifest.layers.push_back(CELLA_TRY(ingest(layer.get<std::string>(), "")));
    }
    std::string config_text =
        CELLA_TRY(ReadFileToString(blobs.PathFor(manifest.config.digest), kMaxConfigBytes));
    ImageConfig config = CELLA_TRY_CTX(ParseImageConfig(config_text), where);
    if (config.diff_ids.size() != manifest.layers.size())
      return Fail(where + ": config lists " + std::to_string(config.diff_ids.size()) +
                  " diff_ids for " + std::to_string(manifest.layers.size()) + " layers");
    for (size_t i = 0; i < manifest.layers.size(); ++i) {
      // An uncompressed layer's digest is its diff_id.
      if (manifest.layers[i].media_type == media::kDockerLayerTar &&
          manifest.layers[i].digest != config.diff_ids[i])
        return Fail(where + ": layer " + std::to_string(i) + " hashes to " +
                    manifest.layers[i].digest + " but the config's diff_id is " +
                    config.diff_ids[i]);
    }
    Json layers = Json::array();
    for (const auto& l : manifest.layers) layers.push_back(DescriptorToJson(l));
    Json m = {{"schemaVersion", 2},
              {"mediaType", media::kDockerManifest},
              {"config", DescriptorToJson(manifest.config)},
              {"layers", layers}};
    std::string body = m.dump();
    std::string digest = "sha256:" + host::Sha256Hex(body);
    CELLA_TRY(blobs.PutBytes(digest, body));
    return Record(*ref, digest, manifest);
  }

  Result<ImageRecord> ImportDir(const std::string& dir, const std::optional<Reference>& ref,
                                const Platform& platform) {
    // Docker >= 25 writes both formats; the OCI side carries real manifest
    // digests, manifest.json the familiar name.
    std::optional<Reference> saved_name;
    if (Exists(dir + "/manifest.json")) {
      auto manifest_path = ResolveInside(dir, "manifest.json");
      auto text = manifest_path ? ReadFileToString(*manifest_path, kMaxManifestBytes)
                                : Result<std::string>(std::unexpected(manifest_path.error()));
      if (text) {
        Json doc = Json::parse(*text, nullptr, false);
        if (!doc.is_discarded() && doc.is_array() && doc.size() == 1 && doc[0].is_object()) {
          auto tags = doc[0].find("RepoTags");
          if (tags != doc[0].end() && tags->is_array() && !tags->empty() &&
              (*tags)[0].is_string()) {
            if (auto p = ParseReference((*tags)[0].get<std::string>())) saved_name = *p;
          }
        }
      }
    }
    if (Exists(dir + "/oci-layout") && Exists(dir + "/index.json"))
      return ImportOciLayout(dir, ref, platform, saved_name);
    if (Exists(dir + "/manifest.json")) return ImportDockerSave(dir, ref);
    return Fail(dir +
                ": neither an OCI layout (oci-layout, index.json) nor a docker save archive "
                "(manifest.json)");
  }
};

ImageStore::ImageStore(std::unique_ptr<State> state) : state_(std::move(state)) {}
ImageStore::ImageStore(ImageStore&&) noexcept = default;
ImageStore& ImageStore::operator=(ImageStore&&) noexcept = default;
ImageStore::~ImageStore() = default;

const BlobStore& ImageStore::blobs() const { return state_->blobs; }
const std::string& ImageStore::images_dir() const { return state_->images_dir; }

Result<ImageStore> ImageStore::Open(const std::string& home, StoreOptions options) {
  auto state = std::make_unique<State>();
  state->home = home;
  state->images_dir = home + "/images";
  state->blobs = BlobStore(state->images_dir + "/blobs");
  CELLA_TRY(host::MakeDirs(state->images_dir + "/blobs/sha256", 0755));
  CELLA_TRY(host::MakeDirs(state->RootfsDir(), 0755));
  CELLA_TRY(host::MakeDirs(state->TmpDir(), 0700));
  if (!options.client.credentials) {
    options.client.credentials = [home](std::string_view host) {
      return LookupCredentials(home, host);
    };
  }
  state->options = options;
  std::string db_path = state->images_dir + "/images.db";
  if (sqlite3_open_v2(db_path.c_str(), &state->db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                      nullptr) != SQLITE_OK) {
    std::string msg = state->db ? sqlite3_errmsg(state->db) : "out of memory";
    return Fail(db_path + ": open: " + msg);
  }
  if (sqlite3_busy_timeout(state->db, 10000) != SQLITE_OK)
    return Fail(db_path + ": busy_timeout: " + sqlite3_errmsg(state->db));
  CELLA_TRY(state->Exec("PRAGMA journal_mode=WAL"));
  CELLA_TRY(state->Exec("PRAGMA synchronous=NORMAL"));
  CELLA_TRY(
      state->Exec("CREATE TABLE IF NOT EXISTS images("
                  " reference TEXT PRIMARY KEY,"
                  " repository TEXT NOT NULL,"
                  " tag TEXT NOT NULL,"
                  " manifest_digest TEXT NOT NULL,"
                  " details TEXT NOT NULL,"
                  " added_at INTEGER NOT NULL)"));
  state->client = std::make_unique<RegistryClient>(state->options.client);
  return ImageStore(std::move(state));
}

Result<ImageRecord> ImageStore::Pull(const Reference& ref, const Platform& platform,
                                     ProgressSink* progress) {
  State& s = *state_;
  UniqueFd lock = CELLA_TRY(LockFile(s.LockPath(), LockKind::kShared));
  const std::string what = "pull " + ref.String();
  FetchedManifest top = CELLA_TRY_CTX(s.client->GetManifest(ref, ref.ManifestSelector()), what);
  ParsedManifest parsed = CELLA_TRY_CTX(ParseManifest(top.body, top.media_type), what);
  FetchedManifest image_manifest = top;
  if (parsed.kind == ManifestKind::kIndex) {
    Descriptor chosen = CELLA_TRY_CTX(SelectPlatform(parsed.index, platform), what);
    image_manifest = CELLA_TRY_CTX(s.client->GetManifest(ref, chosen.digest), what);
    if (static_cast<int64_t>(image_manifest.body.size()) != chosen.size)
      return Fail(what + ": manifest " + chosen.digest + " size differs from the index entry");
    parsed = CELLA_TRY_CTX(ParseManifest(image_manifest.body, image_manifest.media_type), what);
    if (parsed.kind != ManifestKind::kImage)
      return Fail(what + ": index entry " + chosen.digest + " is an index");
  }
  const ImageManifest& manifest = parsed.image;
  std::vector<Descriptor> blobs_needed;
  blobs_needed.push_back(manifest.config);
  blobs_needed.insert(blobs_needed.end(), manifest.layers.begin(), manifest.layers.end());
  for (const Descriptor& d : blobs_needed) {
    BlobWriter writer =
        CELLA_TRY_CTX(BlobWriter::Open(s.blobs, d.digest, d.size, ResumeMode::kResume), what);
    if (writer.AlreadyStored()) {
      if (progress) progress->BlobFinished(d.digest, BlobOutcome::kAlreadyPresent);
      continue;
    }
    CELLA_TRY_CTX(s.client->FetchBlob(ref, d, writer, progress), what);
  }
  CELLA_TRY_CTX(s.blobs.PutBytes(image_manifest.digest, image_manifest.body), what);
  return CELLA_TRY_CTX(s.Record(ref, image_manifest.digest, manifest), what);
}

Result<ImageRecord> ImageStore::Import(const std::string& path, const std::optional<Reference>& ref,
                                       const Platform& platform) {
  State& s = *state_;
  UniqueFd lock = CELLA_TRY(LockFile(s.LockPath(), LockKind::kShared));
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return FailErrno("import " + path);
  if (S_ISDIR(st.st_mode)) return CELLA_TRY_CTX(s.ImportDir(path, ref, platform), "import " + path);
  if (!S_ISREG(st.st_mode)) return Fail("import " + path + ": not a file or directory");
  std::string tmpl = s.TmpDir() + "/import-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) return FailErrno("mkdtemp " + tmpl);
  auto result = [&]() -> Result<ImageRecord> {
    CELLA_TRY(ExtractImageArchive(path, tmpl));
    return s.ImportDir(tmpl, ref, platform);
  }();
  Status cleanup = RemoveTree(tmpl);
  if (!result) return std::unexpected(std::move(result.error()).WithContext("import " + path));
  if (!cleanup) return std::unexpected(std::move(cleanup.error()));
  return result;
}

Result<std::vector<ImageRecord>> ImageStore::List() {
  return state_->Query(
      "SELECT reference, repository, tag, manifest_digest, details, added_at FROM images "
      "ORDER BY repository, tag, reference",
      {});
}

Result<ImageRecord> ImageStore::Find(const Reference& ref) {
  auto rows = CELLA_TRY(state_->Query(
      "SELECT reference, repository, tag, manifest_digest, details, added_at FROM images "
      "WHERE reference = ?1",
      {ref.String()}));
  if (rows.empty() && !ref.digest.empty()) {
    rows = CELLA_TRY(state_->Query(
        "SELECT reference, repository, tag, manifest_digest, details, added_at FROM images "
        "WHERE repository = ?1 AND manifest_digest = ?2 ORDER BY reference",
        {ref.Name(), ref.digest}));
  }
  if (rows.empty()) {
    Error e = Error::Msg("image " + ref.String() + " is not in the local store; pull it first");
    e.errno_value = ENOENT;
    return std::unexpected(std::move(e));
  }
  return rows.front();
}

Status ImageStore::Remove(const Reference& ref) {
  State& s = *state_;
  Statement st =
      CELLA_TRY(s.Prepare(ref.digest.empty() ? "DELETE FROM images WHERE reference = ?1"
                                             : "DELETE FROM images WHERE reference = ?1 OR "
                                               "(repository = ?2 AND manifest_digest = ?3)"));
  CELLA_TRY(s.Bind(st, 1, ref.String()));
  if (!ref.digest.empty()) {
    CELLA_TRY(s.Bind(st, 2, ref.Name()));
    CELLA_TRY(s.Bind(st, 3, ref.digest));
  }
  if (sqlite3_step(st.stmt) != SQLITE_DONE)
    return Fail(s.images_dir + "/images.db: delete " + ref.String() + ": " + sqlite3_errmsg(s.db));
  if (sqlite3_changes(s.db) == 0) {
    Error e = Error::Msg("no such image: " + ref.String());
    e.errno_value = ENOENT;
    return std::unexpected(std::move(e));
  }
  return {};
}

Result<GcStats> ImageStore::Gc(const std::set<std::string>& in_use) {
  State& s = *state_;
  UniqueFd lock = CELLA_TRY(LockFile(s.LockPath(), LockKind::kExclusive));
  std::set<std::string> keep_blobs;            // hex
  std::set<std::string> keep_rootfs = in_use;  // "<hex>.erofs"
  for (const ImageRecord& r : CELLA_TRY(List())) {
    std::string hex = r.manifest_digest.substr(7);
    keep_blobs.insert(hex);
    keep_rootfs.insert(hex + ".erofs");
    keep_blobs.insert(r.config.digest.substr(7));
    for (const auto& l : r.layers) keep_blobs.insert(l.digest.substr(7));
  }
  GcStats stats;
  // With the exclusive store lock held no pull or build is running, so
  // partial downloads, blob locks and temp files are all unreferenced.
  auto sweep = [&](const std::string& dir, auto keep, size_t& counter) -> Status {
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) return FailErrno("opendir " + dir);
    struct CloseDir {
      DIR* d;
      ~CloseDir() { ::closedir(d); }
    } close_dir{d};
    std::vector<std::string> doomed;
    errno = 0;
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      if (!keep(name)) doomed.push_back(name);
    }
    if (errno != 0) return FailErrno("readdir " + dir);
    for (const auto& name : doomed) {
      std::string path = dir + "/" + name;
      struct stat st {};
      if (::lstat(path.c_str(), &st) != 0) return FailErrno("stat " + path);
      if (::unlink(path.c_str()) != 0) return FailErrno("unlink " + path);
      bool counts = name.find('.') == std::string::npos || name.ends_with(".erofs");
      if (counts) ++counter;
      stats.bytes_freed += st.st_size;
    }
    return {};
  };
  CELLA_TRY(sweep(
      s.blobs.Dir(), [&](const std::string& n) { return keep_blobs.contains(n); },
      stats.blobs_removed));
  CELLA_TRY(sweep(
      s.RootfsDir(), [&](const std::string& n) { return keep_rootfs.contains(n); },
      stats.rootfs_removed));
  return stats;
}

Result<ImageConfig> ImageStore::Config(const ImageRecord& image) {
  std::string text =
      CELLA_TRY(ReadFileToString(state_->blobs.PathFor(image.config.digest), kMaxConfigBytes));
  return CELLA_TRY_CTX(ParseImageConfig(text), image.reference);
}

Result<std::string> ImageStore::EnsureRootfs(const ImageRecord& image) {
  State& s = *state_;
  UniqueFd store_lock = CELLA_TRY(LockFile(s.LockPath(), LockKind::kShared));
  std::string hex = CELLA_TRY(DigestHex(image.manifest_digest));
  std::string out = s.RootfsDir() + "/" + hex + ".erofs";
  UniqueFd build_lock =
      CELLA_TRY(LockFile(s.RootfsDir() + "/" + hex + ".lock", LockKind::kExclusive));
  if (Exists(out)) return out;
  std::vector<std::string> layer_paths;
  for (const auto& l : image.layers) {
    bool present = CELLA_TRY(s.blobs.Has(l.digest, l.size));
    if (!present)
      return Fail(image.reference + ": layer " + l.digest +
                  " is missing from the store; pull the image again");
    layer_paths.push_back(s.blobs.PathFor(l.digest));
  }
  CELLA_TRY_CTX(rootfs::BuildRootfsImage(layer_paths, out, s.TmpDir()),
                "build rootfs for " + image.reference);
  return out;
}

Result<std::string> EnsureImageRootfs(ImageStore& store, const ImageRecord& image) {
  return store.EnsureRootfs(image);
}

}  // namespace cella::registry
