// One call from OCI layer files to a read-only erofs root image.
#pragma once

#include <string>
#include <vector>

#include "base/result.h"
#include "host/rootfs/erofs_writer.h"
#include "host/rootfs/layer.h"
#include "host/rootfs/tree.h"

namespace cella::rootfs {

struct RootfsStats {
  std::vector<LayerStats> layers;  // in application order
  ImageStats image;
};

// Applies layer_paths in order (lowest first) and writes the merged tree to
// out_path (temp file + rename). Spooled file contents live in work_dir (an
// unnamed file, gone when this returns); nothing else is written anywhere.
Result<RootfsStats> BuildRootfsImage(const std::vector<std::string>& layer_paths,
                                     const std::string& out_path, const std::string& work_dir,
                                     const Limits& limits = {}, const WriteOptions& options = {});

}  // namespace cella::rootfs
