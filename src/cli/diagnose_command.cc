// `cella diagnose` and `cella version`: what this host offers, what cella
// chose, and why — the first thing to run when a sandbox will not start.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/commands.h"
#include "host/kernel/kernel.h"
#include "host/os/paths.h"
#include "host/os/process.h"
#include "host/vmm/accel.h"
#include "host/vmm/tsc.h"

namespace cella::cli {
namespace {

std::string FirstLine(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

int DiagnoseCommand(bool json) {
  nlohmann::ordered_json report;
  auto home = host::CellaHome();
  report["home"] = home ? *home : "error: " + home.error().message;

  auto auto_choice = vmm::ChooseAccel(vmm::AccelMode::kAuto);
  auto kvm_choice = vmm::ChooseAccel(vmm::AccelMode::kKvm);
  report["accel"] = auto_choice ? std::string(vmm::ToString(auto_choice->chosen)) : "error";
  report["accel_reason"] = auto_choice ? auto_choice->reason : auto_choice.error().message;
  report["kvm_usable"] = kvm_choice.has_value();
  if (!kvm_choice) report["kvm_unusable_reason"] = kvm_choice.error().message;

  auto tsc = vmm::HostTscKhz();
  report["tsc_khz"] = tsc ? std::to_string(*tsc) : "unknown (" + tsc.error().message + ")";

  auto qemu = host::RunCommand({"qemu-system-x86_64", "--version"}, std::chrono::seconds(10));
  report["qemu"] = qemu && qemu->exit_code == 0 ? FirstLine(qemu->output)
                                                : "not found (run scripts/install-deps.sh)";
  if (home) {
    auto kernel = kernel::FindKernel(*home);
    report["kernel"] = kernel
                           ? kernel->package + " " + kernel->version + " (" + kernel->vmlinuz + ")"
                           : "missing: " + kernel.error().message;
  }

  if (json) {
    std::printf("%s\n", report.dump(2).c_str());
    return 0;
  }
  std::printf("home:        %s\n", report["home"].get<std::string>().c_str());
  std::printf("accel:       %s (%s)\n", report["accel"].get<std::string>().c_str(),
              report["accel_reason"].get<std::string>().c_str());
  std::printf("kvm usable:  %s", kvm_choice ? "yes\n" : "no");
  if (!kvm_choice) std::printf(" (%s)\n", kvm_choice.error().message.c_str());
  std::printf("tsc khz:     %s\n", report["tsc_khz"].get<std::string>().c_str());
  std::printf("qemu:        %s\n", report["qemu"].get<std::string>().c_str());
  if (report.contains("kernel"))
    std::printf("kernel:      %s\n", report["kernel"].get<std::string>().c_str());
  return 0;
}

int VersionCommand() {
  std::printf("cella %s\n", CELLA_VERSION);
  return 0;
}

}  // namespace cella::cli
