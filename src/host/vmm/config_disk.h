// The config disk: a small ext4 image holding /config.json, attached with
// serial cella-config; the guest init mounts it first thing at boot.
// Built with `mkfs.ext4 -d` (no root, no loop mount). Thread-safe.
#pragma once

#include <string>

#include "base/result.h"

namespace cella::vmm {

// Writes an ext4 image at out_path containing /config.json = json (mode
// 0644). Returns out_path. The image is sized to fit (min 1 MiB).
Result<std::string> WriteConfigDisk(const std::string& json, const std::string& out_path);

}  // namespace cella::vmm
