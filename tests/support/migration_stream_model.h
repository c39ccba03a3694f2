// A model of QEMU 7.2's migration stream for tests of vmm::ZeroPageFilter:
// a writer of synthetic streams and a loader that applies one to zeroed (or
// given) RAM
// as QEMU's ram_load_precopy does (the last named block for CONTINUE
// records; ZERO records fill, PAGE records copy), so a test can check that
// the filtered stream loads to exactly what the original loads to.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "host/vmm/migration_stream.h"

namespace cella::testing {

inline void PutBe(std::string& out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(char((v >> (8 * i)) & 0xff));
}

struct StreamWriter {
  std::string bytes;
  std::string last_block;  // what the loader's CONTINUE refers to

  void Header(bool configuration = true) {
    PutBe(bytes, 0x5145564d, 4);
    PutBe(bytes, 3, 4);
    if (configuration) {
      bytes.push_back(0x07);
      PutBe(bytes, 7, 4);
      bytes += "microvm";
    }
  }
  void SectionStart(uint32_t id, std::string_view name, uint32_t version = 4) {
    bytes.push_back(0x01);
    PutBe(bytes, id, 4);
    bytes.push_back(char(name.size()));
    bytes += name;
    PutBe(bytes, 0, 4);
    PutBe(bytes, version, 4);
  }
  void SectionPart(uint32_t id, bool end = false) {
    bytes.push_back(end ? 0x03 : 0x02);
    PutBe(bytes, id, 4);
  }
  void Footer(uint32_t id) {
    bytes.push_back(0x7e);
    PutBe(bytes, id, 4);
  }
  void MemSize(const std::vector<std::pair<std::string, uint64_t>>& blocks) {
    uint64_t total = 0;
    for (const auto& [name, size] : blocks) total += size;
    PutBe(bytes, total | 0x04, 8);
    for (const auto& [name, size] : blocks) {
      bytes.push_back(char(name.size()));
      bytes += name;
      PutBe(bytes, size, 8);
    }
  }
  void Eos() { PutBe(bytes, 0x10, 8); }
  // A page record as QEMU writes it: CONTINUE when the block is the last
  // named one (unless `force_name`).
  void Record(std::string_view block, uint64_t offset, bool zero, char fill,
              bool force_name = false) {
    bool cont = block == last_block && !force_name;
    PutBe(bytes, offset | (zero ? 0x02 : 0x08) | (cont ? 0x20 : 0), 8);
    if (!cont) {
      bytes.push_back(char(block.size()));
      bytes += block;
      last_block = std::string(block);
    }
    if (zero) {
      bytes.push_back(fill);
    } else {
      bytes.append(4096, fill);
    }
  }
};

// RAM after the load: block -> page offset -> contents (pages never written
// stay zero and are absent; a page written zero is absent too), and the
// bytes after the RAM sections.
struct LoadedMachine {
  std::map<std::string, std::map<uint64_t, std::string>> ram;
  std::string device_state;
  bool operator==(const LoadedMachine&) const = default;
};

inline uint64_t GetBe(std::string_view b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | uint8_t(b[at + i]);
  return v;
}

// nullopt where QEMU's loader would fail (or the model does not know the
// construct). `initial`: RAM before the load (a block mapped from a
// snapshot's memory file); zero when null.
inline std::optional<LoadedMachine> LoadModel(std::string_view b,
                                              const LoadedMachine* initial = nullptr) {
  LoadedMachine m;
  if (initial) m.ram = initial->ram;
  size_t p = 0;
  auto need = [&](size_t n) { return b.size() - p >= n; };
  if (!need(8) || GetBe(b, 0, 4) != 0x5145564d || GetBe(b, 4, 4) != 3) return std::nullopt;
  p = 8;
  if (need(1) && uint8_t(b[p]) == 0x07) {
    if (!need(5)) return std::nullopt;
    uint64_t len = GetBe(b, p + 1, 4);
    p += 5;
    if (!need(len)) return std::nullopt;
    p += len;
    if (need(1) && uint8_t(b[p]) == 0x05) return std::nullopt;
  }
  std::optional<uint32_t> ram_id;
  std::string block;
  bool ram_done = false;
  while (!ram_done) {
    if (!need(1)) return std::nullopt;
    uint8_t type = uint8_t(b[p]);
    uint32_t id;
    bool end = false;
    if (type == 0x01) {
      if (!need(6)) return std::nullopt;
      id = uint32_t(GetBe(b, p + 1, 4));
      size_t len = uint8_t(b[p + 5]);
      if (!need(6 + len + 8)) return std::nullopt;
      if (b.substr(p + 6, len) != "ram" || ram_id) break;
      ram_id = id;
      p += 6 + len + 8;
    } else if (type == 0x02 || type == 0x03) {
      if (!need(5)) return std::nullopt;
      id = uint32_t(GetBe(b, p + 1, 4));
      if (!ram_id || id != *ram_id) break;
      end = type == 0x03;
      p += 5;
    } else {
      break;
    }
    while (true) {
      if (!need(8)) return std::nullopt;
      uint64_t h = GetBe(b, p, 8);
      p += 8;
      uint64_t flags = h & 0xfff, addr = h & ~uint64_t{0xfff};
      if (flags == 0x10) break;
      if (flags == 0x04) {
        uint64_t total = addr;
        while (total) {
          if (!need(1)) return std::nullopt;
          size_t len = uint8_t(b[p]);
          if (!need(1 + len + 8)) return std::nullopt;
          uint64_t used = GetBe(b, p + 1 + len, 8);
          if (used > total || used == 0) return std::nullopt;
          total -= used;
          p += 1 + len + 8;
        }
        continue;
      }
      uint64_t kind = flags & ~uint64_t{0x20};
      if (kind != 0x02 && kind != 0x08) return std::nullopt;
      if (!(flags & 0x20)) {
        if (!need(1)) return std::nullopt;
        size_t len = uint8_t(b[p]);
        if (!need(1 + len) || len == 0) return std::nullopt;
        block = std::string(b.substr(p + 1, len));
        p += 1 + len;
      } else if (block.empty()) {
        return std::nullopt;
      }
      auto& pages = m.ram[block];
      if (kind == 0x02) {
        if (!need(1)) return std::nullopt;
        char fill = b[p++];
        if (fill == 0) {
          pages.erase(addr);
        } else {
          pages[addr] = std::string(4096, fill);
        }
      } else {
        if (!need(4096)) return std::nullopt;
        std::string page(b.substr(p, 4096));
        p += 4096;
        if (page == std::string(4096, '\0')) {
          pages.erase(addr);
        } else {
          pages[addr] = std::move(page);
        }
      }
    }
    if (need(1) && uint8_t(b[p]) == 0x7e) {
      if (!need(5) || GetBe(b, p + 1, 4) != *ram_id) return std::nullopt;
      p += 5;
    }
    if (end) ram_done = true;
  }
  std::erase_if(m.ram, [](const auto& entry) { return entry.second.empty(); });
  m.device_state = std::string(b.substr(p));
  return m;
}

// A vmm::RamBlockSink (a snapshot's memory file) keeping the extracted
// block's pages for LoadModel, and counting every call that breaks the
// sink's contract (a page before the size, outside it, or not one page).
struct PageMapSink : vmm::RamBlockSink {
  bool sized = false;
  uint64_t size = 0;
  uint64_t contract_breaches = 0;
  std::map<uint64_t, std::string> pages;

  Status SetSize(uint64_t bytes) override {
    sized = true;
    size = bytes;
    return {};
  }
  Status WritePage(uint64_t offset, std::span<const uint8_t> page) override {
    Check(offset, page.size());
    Put(offset, std::string(reinterpret_cast<const char*>(page.data()), page.size()));
    return {};
  }
  Status FillPage(uint64_t offset, uint8_t byte) override {
    Check(offset, 4096);
    Put(offset, std::string(4096, char(byte)));
    return {};
  }
  // The loader's RAM before the load: `block` holds these pages.
  LoadedMachine AsRam(const std::string& block = vmm::kGuestRamBlock) const {
    LoadedMachine m;
    if (!pages.empty()) m.ram[block] = pages;
    return m;
  }

 private:
  void Check(uint64_t offset, size_t length) {
    if (!sized || offset % 4096 != 0 || length != 4096 || offset >= size || size - offset < length)
      ++contract_breaches;
  }
  // A page that is all zero is what the model leaves absent.
  void Put(uint64_t offset, std::string bytes) {
    if (bytes == std::string(bytes.size(), '\0')) {
      pages.erase(offset);
    } else {
      pages[offset] = std::move(bytes);
    }
  }
};

// What QEMU writes for a small guest: RAM "mem" (4 pages) and "pc.bios"
// (1 page), a setup section, two iterations, the end, then device state.
inline std::string TypicalMigrationStream() {
  StreamWriter w;
  w.Header();
  w.SectionStart(2, "ram");
  w.MemSize({{"mem", 4 * 4096}, {"pc.bios", 4096}});
  w.Eos();
  w.Footer(2);
  w.SectionPart(2);
  w.Record("mem", 0, /*zero=*/true, 0);  // names "mem", left out
  w.Record("mem", 4096, false, 'a');     // CONTINUE: must name "mem" now
  w.Record("mem", 8192, true, 0);        // left out
  w.Record("pc.bios", 0, true, 0);       // another block's zero page: kept
  w.Record("mem", 12288, false, 'b');
  w.Eos();
  w.Footer(2);
  w.SectionPart(2, /*end=*/true);
  w.Record("mem", 8192, false, 'c');
  w.Record("mem", 4096, true, 0);  // zeroed since it was sent: kept
  w.Eos();
  w.Footer(2);
  w.bytes += "\x04";  // SECTION_FULL of a device, then QEMU_VM_EOF: copied
  w.bytes += std::string(
      "\x00\x00\x00\x03\x05timer\x00\x00\x00\x00\x00\x00\x00\x01\x7e\x00\x00\x00\x03\x08", 24);
  return w.bytes;
}

}  // namespace cella::testing
