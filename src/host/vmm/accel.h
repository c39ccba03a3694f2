// Which accelerator QEMU uses, and why (for `cella diagnose`).
//
// KVM is used only when /dev/kvm opens read-write AND a normal KVM module
// (kvm_intel or kvm_amd) is loaded. A host with only kvm_pvm (a PVM
// hypervisor) has a /dev/kvm that hangs normal guest kernels: auto picks TCG
// there, and forcing kvm is an error rather than a hang.
// Pure given the filesystem root; thread-safe.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"

namespace cella::vmm {

enum class AccelMode { kAuto, kKvm, kTcg };
enum class Accel { kKvm, kTcg };

std::string_view ToString(AccelMode mode);
std::string_view ToString(Accel accel);
// "auto" | "kvm" | "tcg"
Result<AccelMode> ParseAccelMode(std::string_view text);

struct AccelDecision {
  Accel chosen = Accel::kTcg;
  std::string reason;  // one sentence, shown by `cella diagnose`
  // Set when auto had to fall back in a way a user would not expect (a
  // /dev/kvm that exists but cannot be used); print it once as a notice.
  std::string notice;
};

// host_root: "/" normally; tests pass a fake tree with dev/kvm and sys/module/*.
Result<AccelDecision> ChooseAccel(AccelMode mode, const std::string& host_root = "/");

}  // namespace cella::vmm
