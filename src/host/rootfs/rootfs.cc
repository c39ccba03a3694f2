#include "host/rootfs/rootfs.h"

namespace cella::rootfs {

Result<RootfsStats> BuildRootfsImage(const std::vector<std::string>& layer_paths,
                                     const std::string& out_path, const std::string& work_dir,
                                     const Limits& limits, const WriteOptions& options) {
  Tree tree = CELLA_TRY(Tree::Create(work_dir));
  RootfsStats stats;
  for (const std::string& path : layer_paths) {
    stats.layers.push_back(CELLA_TRY(ApplyLayerFile(tree, path, limits)));
  }
  stats.image = CELLA_TRY_CTX(WriteErofs(tree, out_path, options), "writing " + out_path);
  return stats;
}

}  // namespace cella::rootfs
