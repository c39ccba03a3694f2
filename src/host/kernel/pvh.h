// Booting the guest kernel through its PVH entry point.
//
// A bzImage carries the kernel compressed (Debian's cloud kernel: LZ4) and
// decompresses it inside the guest before the kernel proper starts. Under
// TCG that decompressor is translated guest code: ~0.45 s of an idle cold
// boot here (measured 2026-12-07, bare QEMU: 1990 ms with the bzImage,
// 1530 ms with its ELF). QEMU boots an uncompressed ELF kernel directly when
// the ELF names a PVH entry (a Xen PHYS32_ENTRY note; Linux has one with
// CONFIG_PVH), so cella decompresses the bzImage once on the host, keeps the
// ELF in a cache, and boots that.
//
// A restore never runs the kernel it is given, but the option ROM QEMU picks
// (pvh.bin or linuxboot_dma.bin) is part of the machine state: a guest
// booted through PVH restores only under a QEMU given a PVH ELF too.
// PvhRestoreStub is that ELF with nothing to load.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "base/result.h"

namespace cella::kernel {

// Xen's ELF note type for the 32-bit physical entry point (xen/elfnote.h).
inline constexpr uint32_t kXenElfNotePhys32Entry = 18;

// Bytes of a bzImage's real-mode part (boot sector and setup code): the
// protected-mode payload starts there. nullopt when `header` (the file's
// first 0x206 bytes or more) lacks the boot protocol's "HdrS" signature.
std::optional<size_t> BzImageSetupBytes(std::span<const std::byte> header);

// The kernel inside a bzImage, decompressed: the payload must be an LZ4
// stream in the legacy frame the kernel's build writes (magic 0x184C2102,
// blocks of at most 8 MiB, the decompressed size appended). nullopt when the
// file is no bzImage with a payload (boot protocol < 2.08) or the payload is
// compressed some other way; an error when it claims to be LZ4 and is
// broken. The result is at most `max_bytes`.
Result<std::optional<std::string>> DecompressBzImagePayload(std::span<const std::byte> bzimage,
                                                            size_t max_bytes);

// The PVH entry point named by an ELF64 x86-64 image's notes; nullopt when
// it is no such ELF or has no PHYS32_ENTRY note.
Result<std::optional<uint32_t>> PvhEntryPoint(std::span<const std::byte> elf);
// The same for a file, reading only its headers and note segments.
Result<std::optional<uint32_t>> PvhEntryPointOfFile(const std::string& path);

// An ELF64 that QEMU's PVH loader accepts for `entry`: the entry note and
// one empty loadable segment, so nothing is copied into guest RAM.
std::string PvhRestoreStub(uint32_t entry);

// The file QEMU should boot for the bzImage at `vmlinuz`: the PVH ELF
// decompressed from it, cached under <home>/cache/kernel/ by the bzImage's
// digest, or `vmlinuz` itself when it holds no PVH-capable ELF (or is an ELF
// already). CELLA_KERNEL_BOOT=bzimage keeps the bzImage (for A/B runs).
Result<std::string> EnsureBootKernel(const std::string& home, const std::string& vmlinuz);

}  // namespace cella::kernel
