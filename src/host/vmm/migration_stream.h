// QEMU 7.2's migration stream (migration/savevm.c, migration/ram.c), read
// just far enough to leave out the zero pages of guest RAM.
//
// Why: QEMU sends every page of guest RAM that is zero as a 9-byte record
// (RAM_SAVE_FLAG_ZERO), and its loader handles each one by reading the
// destination page (buffer_is_zero) and clearing it when it is not zero.
// On fresh anonymous memory that read is a page fault per page, and page
// faults are slow on this PVM host: a 1 GiB guest with 130 MiB in use took
// ~3.4 s longer to restore with its ~228,000 zero records than without
// them (docs/performance.md). A restoring QEMU's RAM that is fresh zeroed
// memory needs none of them.
//
// What is understood (everything else passes through untouched, or fails):
//   "QEVM" magic, version 3; the configuration section (machine name, no
//   subsections: a stream whose configuration has subsections, e.g. the
//   capability list x-ignore-shared brings, is passed through whole);
//   SECTION_START/PART/END of the iterable "ram" section: the RAM block
//   list (MEM_SIZE), ZERO and PAGE records (with CONTINUE and block names),
//   EOS, and the optional section footer. The first section that is not
//   "ram" (device state, QEMU_VM_EOF, ...) and everything after it is
//   copied as is.
//
// A zero record is left out only for a page that no earlier kept record of
// the stream gave content (so it is still zero at the loader).
//
// A dropped record may be the one that named its block (the loader keeps
// the last named block for CONTINUE records): the next record kept is then
// rewritten to name its block itself, so the loader sees every kept record
// against the same block as in the original stream.
//
// Contract for the caller: only a stream whose loader's RAM blocks named in
// `zero_blocks` are zero-filled when the load starts may be filtered (QEMU
// started with -incoming and memory-backend-ram or a fresh memfd: never a
// template clone, whose RAM maps the template's file).
//
// Extraction: given a RamBlockSink for one block, every record of that block
// leaves the stream and its page goes to the sink instead (a snapshot's
// memory file, which the restoring QEMU maps privately as that block's RAM:
// nothing of it is loaded, pages fault in from the page cache as the guest
// touches them). The output then loads, onto RAM whose extracted block holds
// the sink's content and whose other `zero_blocks` are zero, to what the
// input loads onto zeroed RAM.
//
// Not thread-safe; one filter per stream.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::vmm {

// The RAMBlock id of guest RAM as cella starts QEMU (memory backend id=mem).
inline constexpr const char* kGuestRamBlock = "mem";

// Where the pages of an extracted RAM block go (see above). Offsets are
// page-aligned and below the size given first.
class RamBlockSink {
 public:
  virtual ~RamBlockSink() = default;
  // The block's length, from the stream's block list, before any page.
  virtual Status SetSize(uint64_t bytes) = 0;
  // One page's content (4096 bytes).
  virtual Status WritePage(uint64_t offset, std::span<const uint8_t> page) = 0;
  // A page every byte of which is `byte` (a ZERO record, or a page the
  // stream gave content before and now zero again).
  virtual Status FillPage(uint64_t offset, uint8_t byte) = 0;
};

class ZeroPageFilter {
 public:
  explicit ZeroPageFilter(std::set<std::string, std::less<>> zero_blocks)
      : zero_blocks_(std::move(zero_blocks)) {}
  // Also extracts block `extract_block` (which must be one of `zero_blocks`)
  // into `sink` (not owned; outlives the filter).
  ZeroPageFilter(std::set<std::string, std::less<>> zero_blocks, std::string extract_block,
                 RamBlockSink* sink)
      : zero_blocks_(std::move(zero_blocks)),
        extract_block_(std::move(extract_block)),
        sink_(sink) {}

  // Consumes the next bytes of the stream and appends to `out` what the
  // filtered stream has by now (a record cut by the end of `in` is held
  // until the rest arrives). Fails when the stream is malformed after a
  // record was already left out (the output can no longer be the input).
  Status Feed(std::span<const uint8_t> in, std::string& out);
  // The stream ended: fails unless it ended after the RAM sections (in the
  // device state, which is copied) or was being passed through whole.
  Status Finish() const;

  uint64_t DroppedPages() const { return dropped_pages_; }
  // Records of the extracted block that went to the sink.
  uint64_t ExtractedPages() const { return extracted_pages_; }
  // True when the stream was not understood and is passed through whole.
  bool PassingThrough() const { return mode_ == Mode::kPassThrough; }

 private:
  enum class Mode { kHeader, kSection, kRam, kFooter, kCopyRest, kPassThrough };
  // Parses one unit (header, section header, record, footer) from pending_
  // at pos_, appending what it keeps to `out`; false when it needs more
  // bytes (nothing consumed then).
  Result<bool> Step(std::string& out);
  Result<bool> StepHeader(std::string& out);
  Result<bool> StepSection(std::string& out);
  Result<bool> StepRam(std::string& out);
  Result<bool> StepFooter(std::string& out);
  // The rest of the stream is copied: fine before anything was left out,
  // after the RAM sections, or while the loader's current block is the same
  // for the output as for the input; an error otherwise.
  Status CopyRest(std::string_view why);
  // Something not understood: passed through from here, when that is
  // still the same stream for the loader (see CopyRest).
  Status GiveUp(std::string_view why);
  bool SameLoaderBlock() const { return in_block_ == out_block_; }

  std::set<std::string, std::less<>> zero_blocks_;
  Mode mode_ = Mode::kHeader;
  std::string pending_;  // bytes not yet parsed
  size_t pos_ = 0;       // parse position in pending_
  uint32_t ram_section_id_ = 0;
  bool ram_section_seen_ = false;
  bool in_ram_end_ = false;  // the RAM section being read is its END
  bool ram_ended_ = false;   // the RAM's END section is over
  // The block the loader's last named record set, for the input and for
  // the output ("" before any).
  std::string in_block_;
  std::string out_block_;
  // Per block of zero_blocks_ (sized from the block list): the pages the
  // output has given non-zero content. A zero record for one of them must
  // stay (a page sent twice: QEMU does not with a stopped VM, but nothing
  // here relies on it); a block or page not known keeps its records.
  std::map<std::string, std::vector<bool>, std::less<>> written_;
  uint64_t dropped_pages_ = 0;
  std::string extract_block_;
  RamBlockSink* sink_ = nullptr;
  uint64_t extracted_pages_ = 0;
};

}  // namespace cella::vmm
