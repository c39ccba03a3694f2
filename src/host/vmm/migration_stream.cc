#include "host/vmm/migration_stream.h"

#include <cstring>

namespace cella::vmm {
namespace {

// savevm.c
constexpr uint32_t kFileMagic = 0x5145564d;  // "QEVM"
constexpr uint32_t kFileVersion = 3;
constexpr uint8_t kSectionStart = 0x01;
constexpr uint8_t kSectionPart = 0x02;
constexpr uint8_t kSectionEnd = 0x03;
constexpr uint8_t kSubsection = 0x05;
constexpr uint8_t kConfiguration = 0x07;
constexpr uint8_t kSectionFooter = 0x7e;
constexpr uint32_t kRamVersion = 4;
// ram.c (x86: 4 KiB target pages; the flags live in the offset's low bits)
constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kFlagMask = kPageSize - 1;
constexpr uint64_t kFlagZero = 0x02;
constexpr uint64_t kFlagMemSize = 0x04;
constexpr uint64_t kFlagPage = 0x08;
constexpr uint64_t kFlagEos = 0x10;
constexpr uint64_t kFlagContinue = 0x20;
// 1 TiB of guest RAM: a 32 MiB page bitmap.
constexpr uint64_t kMaxFilteredBlockBytes = uint64_t{1} << 40;
constexpr size_t kMaxBlockListBytes = size_t{64} * 1024;

uint32_t Be32(std::string_view b, size_t at) {
  uint32_t v = 0;
  for (size_t i = 0; i < 4; ++i) v = (v << 8) | uint8_t(b[at + i]);
  return v;
}

uint64_t Be64(std::string_view b, size_t at) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v = (v << 8) | uint8_t(b[at + i]);
  return v;
}

void PutBe64(std::string& out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(char((v >> shift) & 0xff));
}

}  // namespace

Status ZeroPageFilter::Feed(std::span<const uint8_t> in, std::string& out) {
  std::string_view bytes(reinterpret_cast<const char*>(in.data()), in.size());
  if (mode_ == Mode::kCopyRest || mode_ == Mode::kPassThrough) {
    out.append(bytes);
    return {};
  }
  pending_.append(bytes);
  while (true) {
    if (mode_ == Mode::kCopyRest || mode_ == Mode::kPassThrough) {
      out.append(pending_, pos_);
      pending_.clear();
      pos_ = 0;
      return {};
    }
    if (!CELLA_TRY(Step(out))) break;
  }
  pending_.erase(0, pos_);
  pos_ = 0;
  return {};
}

Status ZeroPageFilter::Finish() const {
  if (mode_ == Mode::kCopyRest || mode_ == Mode::kPassThrough) return {};
  return Fail("QEMU's migration stream ended before its device state (truncated)");
}

Status ZeroPageFilter::CopyRest(std::string_view why) {
  if (dropped_pages_ + extracted_pages_ > 0 && !ram_ended_ && !SameLoaderBlock())
    return Fail("QEMU's migration stream: " + std::string(why) +
                " where zero pages were already left out; cannot copy the rest as it is");
  mode_ = Mode::kCopyRest;
  return {};
}

Status ZeroPageFilter::GiveUp(std::string_view why) {
  if (dropped_pages_ + extracted_pages_ > 0 && !SameLoaderBlock())
    return Fail("QEMU's migration stream: " + std::string(why) + " after zero pages were left out");
  mode_ = Mode::kPassThrough;
  return {};
}

Result<bool> ZeroPageFilter::Step(std::string& out) {
  switch (mode_) {
    case Mode::kHeader:
      return StepHeader(out);
    case Mode::kSection:
      return StepSection(out);
    case Mode::kRam:
      return StepRam(out);
    case Mode::kFooter:
      return StepFooter(out);
    case Mode::kCopyRest:
    case Mode::kPassThrough:
      return false;
  }
  return false;
}

Result<bool> ZeroPageFilter::StepHeader(std::string& out) {
  std::string_view b = std::string_view(pending_).substr(pos_);
  if (b.size() < 9) return false;
  if (Be32(b, 0) != kFileMagic || Be32(b, 4) != kFileVersion) {
    CELLA_TRY(GiveUp("not a QEVM v3 stream"));
    return true;
  }
  size_t length = 8;
  if (uint8_t(b[8]) == kConfiguration) {
    if (b.size() < 13) return false;
    uint32_t name_len = Be32(b, 9);
    if (name_len > 255) {
      CELLA_TRY(GiveUp("a configuration name of " + std::to_string(name_len) + " bytes"));
      return true;
    }
    // The byte after the name says whether subsections follow.
    if (b.size() < 13 + name_len + 1) return false;
    length = 13 + name_len;
    if (uint8_t(b[length]) == kSubsection) {
      CELLA_TRY(GiveUp("configuration subsections"));
      return true;
    }
  }
  out.append(b.substr(0, length));
  pos_ += length;
  mode_ = Mode::kSection;
  return true;
}

Result<bool> ZeroPageFilter::StepSection(std::string& out) {
  std::string_view b = std::string_view(pending_).substr(pos_);
  if (b.empty()) return false;
  const uint8_t type = uint8_t(b[0]);
  size_t length = 0;
  bool ram = false;
  if (type == kSectionStart) {
    if (b.size() < 6) return false;
    const size_t name_len = uint8_t(b[5]);
    if (b.size() < 6 + name_len + 8) return false;
    length = 6 + name_len + 8;
    if (b.substr(6, name_len) == "ram" && !ram_section_seen_) {
      if (Be32(b, 6 + name_len + 4) != kRamVersion) {
        CELLA_TRY(GiveUp("ram section version " + std::to_string(Be32(b, 6 + name_len + 4))));
        return true;
      }
      ram = true;
      ram_section_seen_ = true;
      ram_section_id_ = Be32(b, 1);
    }
  } else if (type == kSectionPart || type == kSectionEnd) {
    if (b.size() < 5) return false;
    length = 5;
    ram = ram_section_seen_ && !ram_ended_ && Be32(b, 1) == ram_section_id_;
  }
  if (!ram) {
    // Device state (SECTION_FULL), QEMU_VM_EOF, the JSON description, or
    // another iterable's section: all copied.
    CELLA_TRY(CopyRest("section type " + std::to_string(type)));
    return true;
  }
  in_ram_end_ = type == kSectionEnd;
  out.append(b.substr(0, length));
  pos_ += length;
  mode_ = Mode::kRam;
  return true;
}

Result<bool> ZeroPageFilter::StepRam(std::string& out) {
  std::string_view b = std::string_view(pending_).substr(pos_);
  if (b.size() < 8) return false;
  const uint64_t header = Be64(b, 0);
  const uint64_t flags = header & kFlagMask;
  if (flags == kFlagMemSize) {
    // The RAM block list: (name length, name, used length)... summing to
    // the total in the header.
    uint64_t total = header & ~kFlagMask;
    size_t at = 8;
    while (total > 0) {
      // QEMU lists a handful of blocks; a list that runs on (a stream
      // claiming a huge total in tiny blocks) would only grow pending_.
      if (at > kMaxBlockListBytes) {
        CELLA_TRY(GiveUp("a RAM block list longer than " + std::to_string(kMaxBlockListBytes) +
                         " bytes"));
        return true;
      }
      if (b.size() < at + 1) return false;
      const size_t name_len = uint8_t(b[at]);
      if (b.size() < at + 1 + name_len + 8) return false;
      const uint64_t used = Be64(b, at + 1 + name_len);
      if (used > total || used == 0) {
        CELLA_TRY(GiveUp("a RAM block list that does not add up"));
        return true;
      }
      total -= used;
      std::string name(b.substr(at + 1, name_len));
      // One bit per page of a filtered block: bounded by the largest guest
      // RAM cella starts, not by what the stream claims.
      if (zero_blocks_.contains(name) && used > kMaxFilteredBlockBytes) {
        CELLA_TRY(GiveUp("a RAM block of " + std::to_string(used) + " bytes"));
        return true;
      }
      if (zero_blocks_.contains(name)) {
        const size_t pages = (used + kPageSize - 1) / kPageSize;
        auto known = written_.find(name);
        if (known == written_.end()) {
          written_[name].assign(pages, false);
          if (sink_ && name == extract_block_) CELLA_TRY(sink_->SetSize(used));
        } else if (known->second.size() != pages) {
          // Listed again (QEMU lists its blocks once) with another size:
          // what the stream gave the block so far is not forgotten.
          CELLA_TRY(GiveUp("RAM block " + name + " listed twice with two sizes"));
          return true;
        }
      }
      at += 1 + name_len + 8;
    }
    out.append(b.substr(0, at));
    pos_ += at;
    return true;
  }
  if (flags == kFlagEos) {
    out.append(b.substr(0, 8));
    pos_ += 8;
    mode_ = Mode::kFooter;
    return true;
  }
  const uint64_t kind = flags & ~kFlagContinue;
  if (kind != kFlagZero && kind != kFlagPage) {
    CELLA_TRY(GiveUp("RAM record flags " + std::to_string(flags)));
    return true;
  }
  const bool cont = (flags & kFlagContinue) != 0;
  size_t at = 8;
  std::string_view block;
  if (cont) {
    if (in_block_.empty()) {
      CELLA_TRY(GiveUp("a RAM record continuing no block"));
      return true;
    }
    block = in_block_;
  } else {
    if (b.size() < 9) return false;
    const size_t name_len = uint8_t(b[8]);
    if (b.size() < 9 + name_len) return false;
    block = b.substr(9, name_len);
    at = 9 + name_len;
    if (block.empty()) {
      CELLA_TRY(GiveUp("a RAM record naming no block"));
      return true;
    }
  }
  const size_t body = kind == kFlagZero ? 1 : kPageSize;
  if (b.size() < at + body) return false;
  std::string_view record = b.substr(0, at + body);
  if (!cont) in_block_ = std::string(block);
  pos_ += record.size();
  const bool zero_page = kind == kFlagZero && record.back() == 0;
  auto pages = written_.find(in_block_);
  const uint64_t page = (header & ~kFlagMask) / kPageSize;
  const bool tracked = pages != written_.end() && page < pages->second.size();
  if (zero_page && tracked && !pages->second[page]) {
    ++dropped_pages_;
    return true;
  }
  if (sink_ && tracked && in_block_ == extract_block_) {
    // The loader maps the sink's content as this block: the page goes
    // there, not to the loader.
    const uint64_t offset = page * kPageSize;
    if (kind == kFlagZero) {
      const auto fill = uint8_t(record.back());
      CELLA_TRY(sink_->FillPage(offset, fill));
      pages->second[page] = fill != 0;
    } else {
      const std::string_view content = record.substr(at);
      CELLA_TRY(sink_->WritePage(
          offset, std::span(reinterpret_cast<const uint8_t*>(content.data()), content.size())));
      pages->second[page] = true;
    }
    ++extracted_pages_;
    return true;
  }
  // Kept: the loader's page is zero after a zero record, has content after
  // anything else.
  if (tracked) pages->second[page] = !zero_page;
  if (cont && out_block_ != in_block_) {
    // The record that named this block for the loader was left out.
    PutBe64(out, header & ~kFlagContinue);
    out.push_back(char(in_block_.size()));
    out.append(in_block_);
    out.append(record.substr(8));
  } else {
    out.append(record);
  }
  out_block_ = in_block_;
  return true;
}

Result<bool> ZeroPageFilter::StepFooter(std::string& out) {
  std::string_view b = std::string_view(pending_).substr(pos_);
  if (b.empty()) return false;
  if (uint8_t(b[0]) == kSectionFooter) {
    if (b.size() < 5) return false;
    if (Be32(b, 1) != ram_section_id_) {
      CELLA_TRY(GiveUp("a section footer for section " + std::to_string(Be32(b, 1))));
      return true;
    }
    out.append(b.substr(0, 5));
    pos_ += 5;
  }
  if (in_ram_end_) ram_ended_ = true;
  mode_ = Mode::kSection;
  return true;
}

}  // namespace cella::vmm
