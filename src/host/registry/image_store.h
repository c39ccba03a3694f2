// The local image store under <home>/images:
//   blobs/sha256/<hex>        content-addressed blobs (manifests, configs, layers as fetched)
//   images.db                 SQLite index: normalised reference -> manifest, config, layers,
//   platform rootfs/<hex>.erofs        read-only root image per manifest digest (built on demand)
//   tmp/                      import extraction and rootfs spool space
//
// Why SQLite for the index: several cella processes (pull, run, rmi, gc) touch
// it at once; SQLite (WAL, busy timeout) gives atomic multi-row updates and
// concurrent readers without our own file-locking protocol, and the rest of
// cella's host state lives in SQLite too.
//
// Locking: <home>/images/store.lock is held shared by Pull/Import/EnsureRootfs
// (they add blobs before the index row names them) and exclusive by Gc, so gc
// never deletes a blob an in-flight pull has just stored. A Pull therefore
// delays a concurrent Gc until it finishes.
//
// Thread rules: an ImageStore owns one SQLite connection and one registry
// client: use it from one thread at a time (open one per thread).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/registry/blob_store.h"
#include "host/registry/client.h"
#include "host/registry/manifest.h"
#include "host/registry/progress.h"
#include "host/registry/reference.h"

namespace cella::registry {

struct ImageRecord {
  std::string reference;   // normalised: "docker.io/library/alpine:latest" or "...@sha256:..."
  std::string repository;  // "docker.io/library/alpine"
  std::string tag;         // empty for digest references
  std::string manifest_digest;
  std::string manifest_media_type;
  Descriptor config;
  std::vector<Descriptor> layers;  // lowest first
  Platform platform;               // from the image config
  int64_t size = 0;                // config + layers, as stored (compressed)
  std::string created;             // image config "created" (RFC 3339), may be empty
  int64_t added_at = 0;            // unix seconds when pulled/imported
};

struct GcStats {
  size_t blobs_removed = 0;
  size_t rootfs_removed = 0;
  int64_t bytes_freed = 0;
};

struct StoreOptions {
  // Registry client settings. When client.credentials is unset, credentials
  // come from LookupCredentials(home, host).
  ClientOptions client;
};

class ImageStore {
 public:
  // Creates <home>/images (and its database) when missing.
  static Result<ImageStore> Open(const std::string& home, StoreOptions options = {});
  ImageStore(ImageStore&&) noexcept;
  ImageStore& operator=(ImageStore&&) noexcept;
  ~ImageStore();

  // Fetches manifest (selecting `platform` from an index), config and layers
  // (skipping blobs already stored, resuming partial ones), then records ref.
  Result<ImageRecord> Pull(const Reference& ref, const Platform& platform = {},
                           ProgressSink* progress = nullptr);
  // Imports a `docker save` tarball or an OCI layout (directory or tarball).
  // ref overrides the name recorded in the archive.
  Result<ImageRecord> Import(const std::string& path, const std::optional<Reference>& ref,
                             const Platform& platform = {});
  Result<std::vector<ImageRecord>> List();
  // The record for ref (a digest reference also matches a tagged record
  // of the same repository and manifest). errno_value ENOENT when absent.
  Result<ImageRecord> Find(const Reference& ref);
  // Removes the reference (not the blobs: see Gc). ENOENT when absent.
  Status Remove(const Reference& ref);
  // Deletes blobs and rootfs images no record references. Root images named
  // in `in_use` ("<hex>.erofs": what sandboxes boot from, whether or not an
  // image still names them) are kept too.
  Result<GcStats> Gc(const std::set<std::string>& in_use = {});
  Result<ImageConfig> Config(const ImageRecord& image);
  // <home>/images/rootfs/<manifest hex>.erofs, built from the layers on first use.
  Result<std::string> EnsureRootfs(const ImageRecord& image);

  const BlobStore& blobs() const;
  const std::string& images_dir() const;

  struct State;

 private:
  explicit ImageStore(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

// Free-function spelling of ImageStore::EnsureRootfs, for callers that only
// hold a record.
Result<std::string> EnsureImageRootfs(ImageStore& store, const ImageRecord& image);

}  // namespace cella::registry
