#include "host/vmm/accel.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace cella::vmm {

namespace {

std::string Join(const std::string& root, std::string_view rel) {
  if (root.empty() || root == "/") return "/" + std::string(rel);
  return (root.back() == '/' ? root : root + "/") + std::string(rel);
}

bool DirExists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

struct KvmProbe {
  bool device_usable = false;
  std::string device_problem;  // why not, when !device_usable
  bool vendor_module = false;  // kvm_intel or kvm_amd
  bool pvm_module = false;
};

KvmProbe Probe(const std::string& root) {
  KvmProbe p;
  std::string dev = Join(root, "dev/kvm");
  int fd = ::open(dev.c_str(), O_RDWR | O_CLOEXEC);
  if (fd >= 0) {
    p.device_usable = true;
    ::close(fd);
  } else {
    p.device_problem = dev + ": " + std::strerror(errno);
  }
  p.vendor_module =
      DirExists(Join(root, "sys/module/kvm_intel")) || DirExists(Join(root, "sys/module/kvm_amd"));
  p.pvm_module = DirExists(Join(root, "sys/module/kvm_pvm"));
  return p;
}

}  // namespace

std::string_view ToString(AccelMode mode) {
  switch (mode) {
    case AccelMode::kAuto:
      return "auto";
    case AccelMode::kKvm:
      return "kvm";
    case AccelMode::kTcg:
      return "tcg";
  }
  return "?";
}

std::string_view ToString(Accel accel) { return accel == Accel::kKvm ? "kvm" : "tcg"; }

Result<AccelMode> ParseAccelMode(std::string_view text) {
  if (text == "auto") return AccelMode::kAuto;
  if (text == "kvm") return AccelMode::kKvm;
  if (text == "tcg") return AccelMode::kTcg;
  return Fail("--accel: unknown accelerator \"" + std::string(text) + "\" (want auto, kvm or tcg)");
}

Result<AccelDecision> ChooseAccel(AccelMode mode, const std::string& host_root) {
  if (mode == AccelMode::kTcg) {
    return AccelDecision{Accel::kTcg, "tcg requested (--accel tcg): software emulation", ""};
  }
  KvmProbe p = Probe(host_root);
  if (p.device_usable && p.vendor_module) {
    return AccelDecision{Accel::kKvm, "KVM available (/dev/kvm opens, kvm_intel/kvm_amd loaded)",
                         ""};
  }
  std::string why;
  std::string notice;
  if (p.pvm_module && !p.vendor_module) {
    why =
        "this host's KVM is PVM (kvm_pvm loaded, no kvm_intel/kvm_amd): it runs only "
        "PVM-built guest kernels and hangs a normal one";
    notice = "KVM here is PVM, which cannot run cella's guest kernel; using TCG (slower)";
  } else if (!p.device_usable) {
    why = "KVM unusable (" + p.device_problem + ")";
  } else {
    why = "KVM unusable (/dev/kvm opens but neither kvm_intel nor kvm_amd is loaded)";
    notice = "/dev/kvm exists but no kvm_intel/kvm_amd module is loaded; using TCG (slower)";
  }
  if (mode == AccelMode::kKvm) {
    return Fail("--accel kvm: " + why + "; use --accel tcg (or auto)");
  }
  return AccelDecision{Accel::kTcg, why + "; using TCG software emulation", notice};
}

}  // namespace cella::vmm
