// The QEMU backend: one QEMU child process per VM (`-M microvm`, KVM or TCG),
// the agent link over a virtio-serial port bound to a Unix socket, and QMP
// for pause/resume/power-off. QEMU is never daemonized (its serial file
// stays empty then) and dies with us (PR_SET_PDEATHSIG).
//
// Per-VM files live in VMConfig.StateDir: agent.sock, qmp.sock,
// console.log (kept after Close), qemu.log (QEMU's own stderr).
#pragma once

#include <cerrno>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"
#include "host/agent/client.h"
#include "host/vmm/accel.h"
#include "host/vmm/machine.h"

namespace cella::vmm {

struct QemuBackendOptions {
  std::string qemu_binary = "qemu-system-x86_64";
  AccelDecision accel;
  uint64_t tsc_khz = 0;  // 0: no tsc_early_khz (risky under TCG, see tsc.h)
  // Launch to agent Hello. Several VMs booting at once on 2 cores under TCG
  // take a few seconds each; 60 s leaves room for a loaded host.
  std::chrono::milliseconds boot_timeout{60'000};
  host::AgentClientOptions agent_options;
  // When set, the raw agent link (already saying Hello) is handed to this
  // function and the Machine's AgentClient connects to the descriptor it
  // returns instead: the supervisor puts its link router in between so
  // other processes can share the one virtio-serial link.
  std::function<Result<UniqueFd>(UniqueFd agent_link)> wrap_agent_link;
  // When set, a restore (IncomingMigration) calls it once QEMU has read the
  // state and before the guest runs (`cont`); an error fails the boot with
  // that error (tagged kStateNotRestoredErrno). A restore that failed
  // before calls it too, and reports its error instead of QEMU's when it
  // has one: the supervisor checks the snapshot's checksum here, while
  // QEMU reads it, and a corrupt file is said as such.
  std::function<Status()> before_cont;
  // When set, a template clone calls it once it is restored and running,
  // before its go line. The guest does nothing before that line (it does
  // not read a disk, and has no network address), so host work that only
  // the go line's guest needs can run beside QEMU's start-up and is joined
  // here: the supervisor writes the config disk and finishes the sealed
  // network (its ruleset, DNS server and proxy) while QEMU starts. An error
  // fails the boot with that error (not tagged: the template is not to
  // blame).
  std::function<Status()> before_go;
};

// errno_value of a boot error that came from restoring saved state (QEMU
// refused or failed the stream, or died reading it): the state itself is
// suspect. Any other boot failure (time-outs under load, memory) is not.
inline constexpr int kStateNotRestoredErrno = EBADMSG;

// The guest's own account of a failed boot: the last "cella-init: error: ..."
// line of a console log, without the prefix; empty when the init said none.
// Kernel noise around it is ignored.
std::string GuestBootError(std::string_view console);

// Probes the host: accelerator for `mode` (errors when kvm is forced but
// unusable) and the TSC frequency (0 with a warning when unknown).
Result<QemuBackendOptions> DetectQemuHost(AccelMode mode, const std::string& host_root = "/");

class QemuBackend final : public Backend {
 public:
  explicit QemuBackend(QemuBackendOptions options) : options_(std::move(options)) {}
  std::string_view Name() const override { return "qemu"; }
  Result<std::unique_ptr<Machine>> Create(const VMConfig& config) override;
  const QemuBackendOptions& Options() const { return options_; }

 private:
  QemuBackendOptions options_;
};

}  // namespace cella::vmm
