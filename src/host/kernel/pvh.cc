#include "host/kernel/pvh.h"

#include <elf.h>
#include <fcntl.h>
#include <lz4.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string_view>

#include "base/io.h"
#include "base/log.h"
#include "base/unique_fd.h"
#include "host/os/digest.h"
#include "host/os/paths.h"

namespace cella::kernel {
namespace {

// Linux boot protocol (Documentation/arch/x86/boot.rst).
constexpr size_t kSetupSectsOffset = 0x1f1;
constexpr size_t kSignatureOffset = 0x202;
constexpr size_t kVersionOffset = 0x206;
constexpr size_t kPayloadOffsetOffset = 0x248;
constexpr size_t kPayloadLengthOffset = 0x24c;
constexpr size_t kHeaderEnd = 0x250;
constexpr uint16_t kFirstVersionWithPayload = 0x208;
constexpr size_t kSectorBytes = 512;

// lib/decompress_unlz4.c: the legacy frame `lz4 -l` writes.
constexpr uint32_t kLz4LegacyMagic = 0x184C2102;
constexpr size_t kLz4LegacyBlockBytes = size_t{8} << 20;

// Bounds for what is read of a kernel file's headers.
constexpr size_t kMaxProgramHeaders = 64;
constexpr size_t kMaxNoteSegmentBytes = size_t{64} * 1024;
constexpr size_t kMaxBzImageBytes = size_t{256} << 20;
constexpr size_t kMaxKernelBytes = size_t{1} << 30;

uint32_t Le32(std::span<const std::byte> bytes, size_t at) {
  uint32_t v = 0;
  for (size_t i = 0; i < 4; ++i) v |= static_cast<uint32_t>(bytes[at + i]) << (8 * i);
  return v;
}

uint16_t Le16(std::span<const std::byte> bytes, size_t at) {
  return static_cast<uint16_t>(static_cast<unsigned>(bytes[at]) |
                               static_cast<unsigned>(bytes[at + 1]) << 8);
}

// Reads `len` bytes at `offset` of the image; fewer at its end.
using ReadAt = std::function<Result<std::string>(uint64_t offset, size_t len)>;

std::span<const std::byte> Bytes(const std::string& s) { return std::as_bytes(std::span(s)); }

Result<std::optional<uint32_t>> EntryFromNotes(std::span<const std::byte> notes) {
  size_t at = 0;
  while (notes.size() - at >= sizeof(Elf64_Nhdr)) {
    Elf64_Nhdr note{};
    std::memcpy(&note, notes.data() + at, sizeof(note));
    at += sizeof(note);
    const size_t name_bytes = (size_t{note.n_namesz} + 3) & ~size_t{3};
    const size_t desc_bytes = (size_t{note.n_descsz} + 3) & ~size_t{3};
    if (name_bytes > notes.size() - at || desc_bytes > notes.size() - at - name_bytes)
      return Fail("ELF note runs past its segment");
    std::string_view name(reinterpret_cast<const char*>(notes.data() + at), note.n_namesz);
    std::span<const std::byte> desc = notes.subspan(at + name_bytes, note.n_descsz);
    at += name_bytes + desc_bytes;
    if (note.n_type != kXenElfNotePhys32Entry || name != std::string_view("Xen\0", 4)) continue;
    if (desc.size() != 4 && desc.size() != 8)
      return Fail("PVH entry note of " + std::to_string(desc.size()) + " bytes");
    // A 64-bit field (as Linux writes it) still holds a 32-bit address.
    if (desc.size() == 8 && Le32(desc, 4) != 0) return Fail("PVH entry point above 4 GiB");
    return Le32(desc, 0);
  }
  return std::nullopt;
}

Result<std::optional<uint32_t>> PvhEntryPointWith(const ReadAt& read) {
  std::string header = CELLA_TRY(read(0, sizeof(Elf64_Ehdr)));
  if (header.size() < sizeof(Elf64_Ehdr) || std::memcmp(header.data(), ELFMAG, SELFMAG) != 0)
    return std::nullopt;
  Elf64_Ehdr ehdr{};
  std::memcpy(&ehdr, header.data(), sizeof(ehdr));
  if (ehdr.e_ident[EI_CLASS] != ELFCLASS64 || ehdr.e_ident[EI_DATA] != ELFDATA2LSB ||
      ehdr.e_machine != EM_X86_64)
    return std::nullopt;
  if (ehdr.e_phentsize != sizeof(Elf64_Phdr) || ehdr.e_phnum > kMaxProgramHeaders)
    return Fail("ELF program headers: " + std::to_string(ehdr.e_phnum) + " of " +
                std::to_string(ehdr.e_phentsize) + " bytes");
  const size_t table_bytes = size_t{ehdr.e_phnum} * sizeof(Elf64_Phdr);
  std::string table = CELLA_TRY(read(ehdr.e_phoff, table_bytes));
  if (table.size() != table_bytes) return Fail("ELF program headers run past the end");
  for (size_t i = 0; i < ehdr.e_phnum; ++i) {
    Elf64_Phdr phdr{};
    std::memcpy(&phdr, table.data() + i * sizeof(Elf64_Phdr), sizeof(phdr));
    if (phdr.p_type != PT_NOTE) continue;
    if (phdr.p_filesz > kMaxNoteSegmentBytes)
      return Fail("ELF note segment of " + std::to_string(phdr.p_filesz) + " bytes");
    std::string notes = CELLA_TRY(read(phdr.p_offset, phdr.p_filesz));
    if (notes.size() != phdr.p_filesz) return Fail("ELF note segment runs past the end");
    if (auto entry = CELLA_TRY(EntryFromNotes(Bytes(notes)))) return entry;
  }
  return std::nullopt;
}

std::string Hex32(uint32_t v) {
  char text[16];
  (void)std::snprintf(text, sizeof(text), "%#x", v);
  return text;
}

}  // namespace

std::optional<size_t> BzImageSetupBytes(std::span<const std::byte> header) {
  if (header.size() < kSignatureOffset + 4 ||
      std::memcmp(header.data() + kSignatureOffset, "HdrS", 4) != 0)
    return std::nullopt;
  // 0 means 4, as for every boot loader since the protocol began.
  size_t setup_sects = static_cast<size_t>(header[kSetupSectsOffset]);
  if (setup_sects == 0) setup_sects = 4;
  return (setup_sects + 1) * kSectorBytes;
}

Result<std::optional<std::string>> DecompressBzImagePayload(std::span<const std::byte> bzimage,
                                                            size_t max_bytes) {
  const std::optional<size_t> setup_bytes = BzImageSetupBytes(bzimage);
  if (!setup_bytes || bzimage.size() < kHeaderEnd ||
      Le16(bzimage, kVersionOffset) < kFirstVersionWithPayload)
    return std::nullopt;
  const size_t start = *setup_bytes + Le32(bzimage, kPayloadOffsetOffset);
  const size_t length = Le32(bzimage, kPayloadLengthOffset);
  if (start > bzimage.size() || length > bzimage.size() - start)
    return Fail("bzImage payload (" + std::to_string(length) + " bytes at " +
                std::to_string(start) + ") runs past the file's " + std::to_string(bzimage.size()) +
                " bytes");
  std::span<const std::byte> payload = bzimage.subspan(start, length);
  if (payload.size() < 8 || Le32(payload, 0) != kLz4LegacyMagic) return std::nullopt;
  // The build appends the decompressed size to the compressed stream.
  const size_t expected = Le32(payload, payload.size() - 4);
  if (expected > max_bytes)
    return Fail("bzImage payload claims " + std::to_string(expected) + " bytes, more than " +
                std::to_string(max_bytes));
  std::span<const std::byte> stream = payload.first(payload.size() - 4);
  std::string out(expected, '\0');
  size_t written = 0;
  size_t at = 4;
  while (at < stream.size()) {
    if (stream.size() - at < 4) return Fail("LZ4 stream: truncated block size");
    const uint32_t block = Le32(stream, at);
    at += 4;
    if (block == kLz4LegacyMagic) continue;  // frames may be concatenated
    if (block > stream.size() - at ||
        block > static_cast<uint32_t>(LZ4_compressBound(kLz4LegacyBlockBytes)))
      return Fail("LZ4 stream: block of " + std::to_string(block) + " bytes at offset " +
                  std::to_string(at - 4) + " runs past the payload");
    const size_t room = std::min(kLz4LegacyBlockBytes, expected - written);
    const int n =
        LZ4_decompress_safe(reinterpret_cast<const char*>(stream.data() + at), out.data() + written,
                            static_cast<int>(block), static_cast<int>(room));
    if (n < 0)
      return Fail("LZ4 stream: corrupt block at offset " + std::to_string(at - 4) +
                  " (or larger than the size the image states)");
    written += static_cast<size_t>(n);
    at += block;
  }
  if (written != expected)
    return Fail("LZ4 stream: " + std::to_string(written) + " bytes, the image states " +
                std::to_string(expected));
  return out;
}

Result<std::optional<uint32_t>> PvhEntryPoint(std::span<const std::byte> elf) {
  return PvhEntryPointWith([elf](uint64_t offset, size_t len) -> Result<std::string> {
    if (offset >= elf.size()) return std::string();
    std::span<const std::byte> part =
        elf.subspan(offset, std::min<uint64_t>(len, elf.size() - offset));
    return std::string(reinterpret_cast<const char*>(part.data()), part.size());
  });
}

Result<std::optional<uint32_t>> PvhEntryPointOfFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return FailErrno("open kernel " + path);
  auto entry = PvhEntryPointWith([&](uint64_t offset, size_t len) -> Result<std::string> {
    std::string buf(len, '\0');
    size_t got = 0;
    while (got < len) {
      ssize_t n = ::pread(fd.Get(), buf.data() + got, len - got, static_cast<off_t>(offset + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return FailErrno("read kernel " + path);
      if (n == 0) break;
      got += static_cast<size_t>(n);
    }
    buf.resize(got);
    return buf;
  });
  if (!entry) return std::unexpected(std::move(entry.error()).WithContext("kernel " + path));
  return entry;
}

std::string PvhRestoreStub(uint32_t entry) {
  // Layout: ELF header, two program headers (an empty PT_LOAD, the PT_NOTE),
  // then the note: "Xen" and a 64-bit entry, as Linux writes it.
  constexpr size_t kNoteAt = sizeof(Elf64_Ehdr) + 2 * sizeof(Elf64_Phdr);
  constexpr size_t kNoteBytes = sizeof(Elf64_Nhdr) + 4 + 8;
  std::string out(kNoteAt + kNoteBytes, '\0');
  Elf64_Ehdr ehdr{};
  std::memcpy(ehdr.e_ident, ELFMAG, SELFMAG);
  ehdr.e_ident[EI_CLASS] = ELFCLASS64;
  ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
  ehdr.e_ident[EI_VERSION] = EV_CURRENT;
  ehdr.e_type = ET_EXEC;
  ehdr.e_machine = EM_X86_64;
  ehdr.e_version = EV_CURRENT;
  ehdr.e_entry = entry;
  ehdr.e_phoff = sizeof(Elf64_Ehdr);
  ehdr.e_ehsize = sizeof(Elf64_Ehdr);
  ehdr.e_phentsize = sizeof(Elf64_Phdr);
  ehdr.e_phnum = 2;
  std::memcpy(out.data(), &ehdr, sizeof(ehdr));
  // QEMU creates no ROM for an empty segment, so a restore's RAM is never
  // written by the loader (it skips ROMs during an incoming migration too).
  Elf64_Phdr load{};
  load.p_type = PT_LOAD;
  load.p_flags = PF_R | PF_X;
  load.p_offset = 0;
  load.p_vaddr = entry;
  load.p_paddr = entry;
  load.p_align = 4;
  Elf64_Phdr note{};
  note.p_type = PT_NOTE;
  note.p_flags = PF_R;
  note.p_offset = kNoteAt;
  note.p_vaddr = 0;
  note.p_paddr = 0;
  note.p_filesz = kNoteBytes;
  note.p_memsz = kNoteBytes;
  note.p_align = 4;
  std::memcpy(out.data() + sizeof(Elf64_Ehdr), &load, sizeof(load));
  std::memcpy(out.data() + sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr), &note, sizeof(note));
  Elf64_Nhdr nhdr{};
  nhdr.n_namesz = 4;
  nhdr.n_descsz = 8;
  nhdr.n_type = kXenElfNotePhys32Entry;
  std::memcpy(out.data() + kNoteAt, &nhdr, sizeof(nhdr));
  std::memcpy(out.data() + kNoteAt + sizeof(nhdr), "Xen", 4);
  const uint64_t desc = entry;  // little-endian host (x86-64 only)
  std::memcpy(out.data() + kNoteAt + sizeof(nhdr) + 4, &desc, sizeof(desc));
  return out;
}

Result<std::string> EnsureBootKernel(const std::string& home, const std::string& vmlinuz) {
  if (const char* mode = std::getenv("CELLA_KERNEL_BOOT"); mode != nullptr && *mode != '\0') {
    if (std::string_view(mode) == "bzimage") return vmlinuz;
    if (std::string_view(mode) != "pvh")
      return Fail("CELLA_KERNEL_BOOT=" + std::string(mode) + ": want pvh or bzimage");
  }
  {
    UniqueFd fd(::open(vmlinuz.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return FailErrno("open kernel " + vmlinuz);
    std::string magic(SELFMAG, '\0');
    auto got = CELLA_TRY_CTX(ReadExact(fd.Get(), std::as_writable_bytes(std::span(magic))),
                             "read kernel " + vmlinuz);
    // An ELF already (`--kernel vmlinux`): QEMU boots it as it is.
    if (got && std::memcmp(magic.data(), ELFMAG, SELFMAG) == 0) return vmlinuz;
  }
  const std::string digest =
      CELLA_TRY(host::CachedSha256OfFile(vmlinuz, host::DigestCacheDir(home)));
  const std::string dir = home + "/cache/kernel";
  const std::string elf_path = dir + "/" + digest + ".pvh.elf";
  // Remembers a kernel that has no PVH ELF inside, so it is not read whole
  // on every run.
  const std::string none_path = dir + "/" + digest + ".bzimage-only";
  struct stat st {};
  if (::stat(elf_path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) return elf_path;
  if (::access(none_path.c_str(), F_OK) == 0) return vmlinuz;

  std::string image = CELLA_TRY_CTX(ReadFileToString(vmlinuz, kMaxBzImageBytes), "kernel");
  auto elf =
      CELLA_TRY_CTX(DecompressBzImagePayload(Bytes(image), kMaxKernelBytes), "kernel " + vmlinuz);
  std::optional<uint32_t> entry;
  if (elf) entry = CELLA_TRY_CTX(PvhEntryPoint(Bytes(*elf)), "kernel " + vmlinuz + " (inside)");
  CELLA_TRY(host::MakeDirs(dir, 0755));
  if (!elf || !entry) {
    log::Debug("the kernel boots as a bzImage (no LZ4 payload with a PVH entry)",
               {{"kernel", vmlinuz}});
    CELLA_TRY_CTX(WriteFileAtomically(none_path, "", 0644), "kernel cache");
    return vmlinuz;
  }
  log::Debug("kernel decompressed once for PVH boot",
             {{"kernel", vmlinuz}, {"elf", elf_path}, {"entry", Hex32(*entry)}});
  CELLA_TRY_CTX(WriteFileAtomically(elf_path, *elf, 0644), "kernel cache");
  return elf_path;
}

}  // namespace cella::kernel
