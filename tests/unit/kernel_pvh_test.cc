#include <elf.h>
#include <gtest/gtest.h>
#include <lz4.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "base/io.h"
#include "host/kernel/pvh.h"
#include "host/vmm/restore_kernel.h"
#include "support/temp_dir.h"

namespace cella::kernel {
namespace {

std::span<const std::byte> Bytes(const std::string& s) { return std::as_bytes(std::span(s)); }

void PutLe32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// The kernel build's legacy LZ4 frame: magic, then [size][block]..., with
// the decompressed size appended; each piece is one block.
std::string Lz4Legacy(const std::vector<std::string>& pieces) {
  std::string out;
  PutLe32(out, 0x184C2102);
  size_t total = 0;
  for (const std::string& piece : pieces) {
    std::string block(static_cast<size_t>(LZ4_compressBound(static_cast<int>(piece.size()))), '\0');
    int n = LZ4_compress_default(piece.data(), block.data(), static_cast<int>(piece.size()),
                                 static_cast<int>(block.size()));
    EXPECT_GT(n, 0);
    PutLe32(out, static_cast<uint32_t>(n));
    out.append(block.data(), static_cast<size_t>(n));
    total += piece.size();
  }
  PutLe32(out, static_cast<uint32_t>(total));
  return out;
}

// A bzImage-shaped file: boot-protocol header (setup_sects 3, version
// 2.15), the setup sectors, then `payload` at payload_offset 0x40.
std::string FakeBzImage(const std::string& payload, uint16_t version = 0x20f) {
  constexpr size_t kSetupSects = 3;
  constexpr size_t kPayloadOffset = 0x40;
  std::string image((kSetupSects + 1) * 512 + kPayloadOffset, 'x');
  image[0x1f1] = static_cast<char>(kSetupSects);
  image.replace(0x202, 4, "HdrS");
  image[0x206] = static_cast<char>(version & 0xff);
  image[0x207] = static_cast<char>(version >> 8);
  std::string fields;
  PutLe32(fields, kPayloadOffset);
  PutLe32(fields, static_cast<uint32_t>(payload.size()));
  image.replace(0x248, 8, fields);
  return image + payload + "trailing-setup-data";
}

std::string Pattern(size_t n, char seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + (i * 7 + i / 97) % 31);
  return s;
}

TEST(PvhKernel, DecompressesTheLz4PayloadOfABzImage) {
  std::string a = Pattern(100000, 'a');
  std::string b = Pattern(5000, 'k');
  auto out = DecompressBzImagePayload(Bytes(FakeBzImage(Lz4Legacy({a, b}))), 1 << 20);
  ASSERT_TRUE(out.has_value()) << out.error().message;
  ASSERT_TRUE(out->has_value());
  EXPECT_EQ(**out, a + b);
}

TEST(PvhKernel, SetupBytesFollowTheBootProtocol) {
  std::string image = FakeBzImage(Lz4Legacy({"x"}));
  EXPECT_EQ(BzImageSetupBytes(Bytes(image)), size_t{(3 + 1) * 512});
  image[0x1f1] = 0;  // 0 means 4 setup sectors
  EXPECT_EQ(BzImageSetupBytes(Bytes(image)), size_t{(4 + 1) * 512});
  image[0x202] = 'h';
  EXPECT_EQ(BzImageSetupBytes(Bytes(image)), std::nullopt);
  EXPECT_EQ(BzImageSetupBytes(Bytes(std::string(0x205, 'z'))), std::nullopt);
}

TEST(PvhKernel, OtherImagesAreNotDecompressed) {
  // gzip-compressed payload, an old boot protocol, no boot header at all.
  std::string gzip = "\x1f\x8b\x08\x00payload-of-some-length";
  auto other = DecompressBzImagePayload(Bytes(FakeBzImage(gzip)), 1 << 20);
  ASSERT_TRUE(other.has_value());
  EXPECT_FALSE(other->has_value());
  auto old = DecompressBzImagePayload(Bytes(FakeBzImage(Lz4Legacy({"x"}), 0x207)), 1 << 20);
  ASSERT_TRUE(old.has_value());
  EXPECT_FALSE(old->has_value());
  auto none = DecompressBzImagePayload(Bytes(std::string(4096, 'z')), 1 << 20);
  ASSERT_TRUE(none.has_value());
  EXPECT_FALSE(none->has_value());
}

TEST(PvhKernel, BrokenLz4PayloadsAreErrors) {
  std::string good = Lz4Legacy({Pattern(20000, 'c')});
  // The stated size is too large, too small, or above the caller's bound.
  std::string larger = good;
  larger.replace(larger.size() - 4, 4, std::string("\x21\x4e\x00\x00", 4));  // 20001
  EXPECT_FALSE(DecompressBzImagePayload(Bytes(FakeBzImage(larger)), 1 << 20).has_value());
  std::string smaller = good;
  smaller.replace(smaller.size() - 4, 4, std::string("\x1f\x4e\x00\x00", 4));  // 19999
  EXPECT_FALSE(DecompressBzImagePayload(Bytes(FakeBzImage(smaller)), 1 << 20).has_value());
  EXPECT_FALSE(DecompressBzImagePayload(Bytes(FakeBzImage(good)), 19999).has_value());
  // A block size that runs past the payload.
  std::string past = good;
  past.replace(4, 4, std::string("\xff\xff\x00\x00", 4));
  EXPECT_FALSE(DecompressBzImagePayload(Bytes(FakeBzImage(past)), 1 << 20).has_value());
  // Corrupt block bytes.
  std::string corrupt = good;
  for (size_t i = 8; i < corrupt.size() - 4; i += 3) corrupt[i] = static_cast<char>(0xff);
  EXPECT_FALSE(DecompressBzImagePayload(Bytes(FakeBzImage(corrupt)), 1 << 20).has_value());
  // A payload length beyond the file.
  std::string image = FakeBzImage(good);
  image.resize(image.size() - 30);
  EXPECT_FALSE(DecompressBzImagePayload(Bytes(image), 1 << 20).has_value());
}

TEST(PvhKernel, TheRestoreStubNamesTheEntryAndLoadsNothing) {
  std::string stub = PvhRestoreStub(0x1000850);
  auto entry = PvhEntryPoint(Bytes(stub));
  ASSERT_TRUE(entry.has_value()) << entry.error().message;
  ASSERT_TRUE(entry->has_value());
  EXPECT_EQ(**entry, 0x1000850u);
  Elf64_Ehdr ehdr{};
  std::memcpy(&ehdr, stub.data(), sizeof(ehdr));
  size_t loads = 0;
  for (size_t i = 0; i < ehdr.e_phnum; ++i) {
    Elf64_Phdr phdr{};
    std::memcpy(&phdr, stub.data() + ehdr.e_phoff + i * sizeof(phdr), sizeof(phdr));
    if (phdr.p_type != PT_LOAD) continue;
    ++loads;
    EXPECT_EQ(phdr.p_filesz, 0u);
    EXPECT_EQ(phdr.p_memsz, 0u);
  }
  EXPECT_EQ(loads, 1u);
}

TEST(PvhKernel, ElvesWithoutTheNoteOrBrokenNotes) {
  std::string stub = PvhRestoreStub(0x1000000);
  const size_t note_at = sizeof(Elf64_Ehdr) + 2 * sizeof(Elf64_Phdr);
  // Another note type: no PVH entry.
  std::string other = stub;
  other[note_at + 8] = 17;
  auto none = PvhEntryPoint(Bytes(other));
  ASSERT_TRUE(none.has_value());
  EXPECT_FALSE(none->has_value());
  // A note whose name runs past its segment.
  std::string broken = stub;
  broken[note_at] = 100;
  EXPECT_FALSE(PvhEntryPoint(Bytes(broken)).has_value());
  // An entry above 4 GiB cannot be a 32-bit entry.
  std::string high = stub;
  high[note_at + sizeof(Elf64_Nhdr) + 4 + 4] = 1;
  EXPECT_FALSE(PvhEntryPoint(Bytes(high)).has_value());
  // Not an ELF, or a truncated one.
  auto text = PvhEntryPoint(Bytes(std::string("#!/bin/sh\n")));
  ASSERT_TRUE(text.has_value());
  EXPECT_FALSE(text->has_value());
  EXPECT_FALSE(PvhEntryPoint(Bytes(stub.substr(0, note_at + 4))).has_value());
}

class BootKernel : public ::testing::Test {
 protected:
  void SetUp() override { ::unsetenv("CELLA_KERNEL_BOOT"); }
  void TearDown() override { ::unsetenv("CELLA_KERNEL_BOOT"); }
  std::string Write(const std::string& name, const std::string& content) {
    std::string path = dir / name;
    EXPECT_TRUE(WriteStringToFile(path, content, 0644).has_value());
    return path;
  }
  cella::testing::TempDir dir;
};

TEST_F(BootKernel, ABzImageWithAPvhElfBootsTheCachedElf) {
  std::string elf = PvhRestoreStub(0x1000850) + Pattern(3000, 'e');
  std::string vmlinuz = Write("vmlinuz", FakeBzImage(Lz4Legacy({elf})));
  std::string home = dir / "home";
  auto boot = EnsureBootKernel(home, vmlinuz);
  ASSERT_TRUE(boot.has_value()) << boot.error().message;
  EXPECT_NE(*boot, vmlinuz);
  EXPECT_TRUE(boot->starts_with(home + "/cache/kernel/"));
  EXPECT_EQ(ReadFileToString(*boot, 1 << 20).value_or(""), elf);
  // Found again from the cache.
  EXPECT_EQ(EnsureBootKernel(home, vmlinuz).value_or(""), *boot);
  // And its restore stub names the same entry.
  std::string stub = dir / "restore";
  ASSERT_TRUE(vmm::WriteRestoreKernel(*boot, stub).value_or(false));
  auto entry = PvhEntryPointOfFile(stub);
  ASSERT_TRUE(entry.has_value() && entry->has_value());
  EXPECT_EQ(**entry, 0x1000850u);
  // CELLA_KERNEL_BOOT=bzimage keeps the bzImage; anything unknown is refused.
  ::setenv("CELLA_KERNEL_BOOT", "bzimage", 1);
  EXPECT_EQ(EnsureBootKernel(home, vmlinuz).value_or(""), vmlinuz);
  ::setenv("CELLA_KERNEL_BOOT", "elf", 1);
  EXPECT_FALSE(EnsureBootKernel(home, vmlinuz).has_value());
}

TEST_F(BootKernel, KernelsWithoutAPvhElfBootAsTheyAre) {
  std::string home = dir / "home";
  // An LZ4 payload that is no PVH ELF, and an ELF given directly.
  std::string plain = Write("vmlinuz", FakeBzImage(Lz4Legacy({Pattern(4000, 'p')})));
  EXPECT_EQ(EnsureBootKernel(home, plain).value_or(""), plain);
  EXPECT_EQ(EnsureBootKernel(home, plain).value_or(""), plain);  // from its marker
  std::string elf = Write("vmlinux", PvhRestoreStub(0x1000000));
  EXPECT_EQ(EnsureBootKernel(home, elf).value_or(""), elf);
  // A broken LZ4 payload is an error, not a silent bzImage boot.
  std::string good = Lz4Legacy({Pattern(4000, 'q')});
  good.replace(4, 4, std::string("\xff\xff\x00\x00", 4));
  std::string broken = Write("broken", FakeBzImage(good));
  EXPECT_FALSE(EnsureBootKernel(home, broken).has_value());
}

}  // namespace
}  // namespace cella::kernel
