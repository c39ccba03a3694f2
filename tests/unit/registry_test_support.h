// Test support for registry_*_test.cc: builds small images (layer tarballs,
// configs, manifests) in memory and writes them as OCI layouts.
#pragma once

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "base/io.h"
#include "host/os/digest.h"
#include "host/os/paths.h"
#include "host/registry/manifest.h"
#include "rootfs_test_layers.h"

namespace cella::registry::testing {

using rootfs::testing::TarBuilder;
using rootfs::testing::TempDir;

inline std::string Sha(const std::string& bytes) { return "sha256:" + host::Sha256Hex(bytes); }

inline std::string ReadAll(const std::string& path) {
  auto s = ReadFileToString(path, 64 << 20);
  EXPECT_TRUE(s.has_value()) << path << ": " << (s ? "" : s.error().message);
  return s ? *s : std::string();
}

// An uncompressed layer tarball holding one file.
inline std::string LayerWithFile(const TempDir& dir, const std::string& name,
                                 const std::string& content) {
  std::string path = dir / ("layer-" + host::Sha256Hex(name + content).substr(0, 12) + ".tar");
  TarBuilder(path).File(name, content).Close();
  return ReadAll(path);
}

struct TestImage {
  std::string config;
  std::vector<std::string> layers;
  std::string manifest;  // OCI image manifest JSON
  std::string manifest_digest() const { return Sha(manifest); }
  std::map<std::string, std::string> Blobs() const {
    std::map<std::string, std::string> out{{Sha(config), config}, {Sha(manifest), manifest}};
    for (const auto& l : layers) out[Sha(l)] = l;
    return out;
  }
};

inline std::string DescriptorJson(std::string_view media_type, const std::string& bytes) {
  return std::string(R"({"mediaType":")") + std::string(media_type) + R"(","digest":")" +
         Sha(bytes) + R"(","size":)" + std::to_string(bytes.size()) + "}";
}

inline TestImage MakeImage(std::vector<std::string> layers, const std::string& arch = "amd64",
                           const std::string& cmd = "/bin/sh") {
  TestImage img;
  img.layers = std::move(layers);
  std::string diff_ids;
  for (const auto& l : img.layers) diff_ids += (diff_ids.empty() ? "\"" : ",\"") + Sha(l) + "\"";
  img.config = R"({"architecture":")" + arch +
               R"(","os":"linux","created":"2024-05-06T07:08:09Z",)"
               R"("config":{"Cmd":[")" +
               cmd +
               R"("],"Env":["PATH=/bin"]},)"
               R"("rootfs":{"type":"layers","diff_ids":[)" +
               diff_ids + "]}}";
  std::string layer_list;
  for (const auto& l : img.layers)
    layer_list += (layer_list.empty() ? "" : ",") + DescriptorJson(media::kOciLayerTar, l);
  img.manifest =
      R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":)" +
      DescriptorJson(media::kOciConfig, img.config) + R"(,"layers":[)" + layer_list + "]}";
  return img;
}

// Writes an OCI layout directory holding `img`, named by `ref_name` (the
// org.opencontainers.image.ref.name annotation) when not empty.
inline void WriteOciLayout(const std::string& dir, const TestImage& img,
                           const std::string& ref_name) {
  ASSERT_TRUE(host::MakeDirs(dir + "/blobs/sha256", 0755));
  ASSERT_TRUE(WriteStringToFile(dir + "/oci-layout", R"({"imageLayoutVersion":"1.0.0"})", 0644));
  for (const auto& [digest, bytes] : img.Blobs())
    ASSERT_TRUE(WriteStringToFile(dir + "/blobs/sha256/" + digest.substr(7), bytes, 0644));
  std::string annotations =
      ref_name.empty()
          ? ""
          : R"(,"annotations":{"org.opencontainers.image.ref.name":")" + ref_name + "\"}";
  std::string entry = DescriptorJson(media::kOciManifest, img.manifest);
  entry.pop_back();
  entry += annotations + "}";
  ASSERT_TRUE(WriteStringToFile(
      dir + "/index.json",
      R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[)" +
          entry + "]}",
      0644));
}

}  // namespace cella::registry::testing
