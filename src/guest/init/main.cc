// cella-init: PID 1 of every cella guest. Mounts what the guest needs, reads
// the host's config.json, assembles the root, sets up network and limits,
// then runs the workload (directly, through the embedded agent, or by handing
// over to the image's systemd). Any failure: one "cella-init: error:" line on
// the console, sync, power off. PID 1 never exits.
#include <sys/reboot.h>
#include <unistd.h>

#include <chrono>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "base/io.h"
#include "guest/init/cgroup.h"
#include "guest/init/console.h"
#include "guest/init/devices.h"
#include "guest/init/format.h"
#include "guest/init/fs_util.h"
#include "guest/init/network.h"
#include "guest/init/rootfs.h"
#include "guest/init/serve_agent.h"
#include "guest/init/template_point.h"
#include "guest/init/workload.h"
#include "protocol/config.h"
#include "protocol/warm.h"

namespace cella::init {
namespace {

// Bound for each wait on hardware (disks, NIC, agent port) to show up.
constexpr auto kDeviceWait = std::chrono::seconds(5);

Deadline DeviceDeadline() { return std::chrono::steady_clock::now() + kDeviceWait; }

Status Boot() {
  CELLA_TRY_CTX(MountEarly(), "early mounts");
  CELLA_TRY_CTX(EnsureConsoleStdio(), "console");
  auto cmdline = ReadFileToString("/proc/cmdline", size_t{64} * 1024);
  if (!cmdline) return std::unexpected(std::move(cmdline.error()));
  if (KernelCmdlineWantsDebug(*cmdline)) SetVerbosity(Verbosity::kDebug);
  // Ctrl-Alt-Del becomes SIGINT to PID 1 (forwarded) instead of a hard reboot.
  if (::reboot(RB_DISABLE_CAD) != 0) return FailErrno("reboot(RB_DISABLE_CAD)");
  CELLA_TRY_CTX(TurnOffBpfJit(), "bpf");

  // A template boot stops at the template point below (nothing of the
  // sandbox read yet); its clones continue from there with their own disks,
  // clock and RNG, so it loads every module any clone may need. A cold boot
  // leaves the optional groups (network, shares) until the config says
  // whether it needs them: each module costs tens of ms under TCG.
  const bool warm = protocol::CmdlineWantsTemplate(*cmdline);
  std::vector<ModuleGroup> module_groups =
      CELLA_TRY_CTX(ReadModuleOrder(kModuleOrderPath), "modules");
  int loaded = 0;
  for (const ModuleGroup& group : module_groups) {
    if (warm || !ModuleGroupDeferrable(group.name)) loaded += LoadModuleGroup(group);
  }
  Debug("loaded " + std::to_string(loaded) + " modules");
  std::optional<std::string> go_config;
  if (warm) {
    go_config =
        CELLA_TRY_CTX(AwaitWarmStart(DeviceDeadline(), protocol::CmdlineWantsSeededUpper(*cmdline)),
                      "template point");
  } else if (protocol::CmdlineWantsColdGo(*cmdline)) {
    go_config = CELLA_TRY_CTX(AwaitColdGo(DeviceDeadline()), "config request");
  }
  protocol::Config config;
  if (go_config) {
    // A warm clone's config, or a cold boot's, came with its go line (the
    // same bytes as on its config disk, parsed as strictly).
    auto parsed = protocol::ParseConfig(*go_config);
    if (!parsed) return std::unexpected(std::move(parsed.error()).WithContext("go line config"));
    config = std::move(*parsed);
    Debug("config from the go line (" + std::to_string(go_config->size()) + " bytes)");
  } else {
    std::string config_device = CELLA_TRY(FindConfigDevice(DeviceDeadline()));
    config = CELLA_TRY(ReadConfigDisk(config_device));
    // Only its size: a long console line costs ~0.1 s under TCG.
    Debug("config from " + config_device + " (" +
          std::to_string(protocol::SerializeConfig(config).size()) + " bytes)");
  }

  if (!warm) {
    // Before the switch of root: the modules live in the initramfs.
    int later = 0;
    for (const ModuleGroup& group : module_groups) {
      if (ModuleGroupDeferrable(group.name) && ModuleGroupNeeded(group.name, config))
        later += LoadModuleGroup(group);
    }
    Debug("loaded " + std::to_string(later) + " modules this sandbox needs");
  }

  CELLA_TRY_CTX(AssembleRoot(config, DeviceDeadline()), "root filesystem");
  Debug("root assembled");
  CELLA_TRY_CTX(MountVolumes(config, DeviceDeadline()), "volumes");
  // Tidying up after a crash must never keep the sandbox from booting.
  if (config.init_mode == protocol::InitMode::kExec) {
    if (auto st = RecoverInterruptedUploads(config); !st)
      Say("warning: upload journal: " + st.error().message + " (continuing without it)");
  }
  if (config.init_mode == protocol::InitMode::kSystemd)
    CELLA_TRY_CTX(PrepareSystemd(config, KernelConsoleTtys(*cmdline)), "systemd mode");
  // The agent port must be found while /sys is where we know it is; it is
  // opened after the switch, through the moved /dev.
  std::string agent_port;
  if (config.init_mode == protocol::InitMode::kExec && !config.skip_guest_agent)
    agent_port = CELLA_TRY(FindVirtioPort(config.agent_port, DeviceDeadline()));
  CELLA_TRY_CTX(SwitchRoot(), "switch root");
  Debug("switched root");

  CELLA_TRY_CTX(ConfigureNetwork(config, DeviceDeadline()), "network");
  Debug("network up");
  CELLA_TRY_CTX(WriteIdentityFiles(config), "identity files");
  CELLA_TRY_CTX(InstallTrustedCertificates(config), "CA certificates");
  CELLA_TRY_CTX(ApplyCpuQuota(config.cpus), "cpu quota");
  // Like docker, a missing workdir is created (root-owned) rather than fatal.
  if (!config.workdir.empty()) CELLA_TRY_CTX(OpenDirBeneath("/", config.workdir), "workdir");
  CELLA_TRY_CTX(MountTmpfsAndSealRoot(config), "read-only root and tmpfs");
  CELLA_TRY_CTX(RecordStartKind(warm, config.init_mode == protocol::InitMode::kExec),
                "start marker");
  Debug("sandbox set up");

  if (config.init_mode == protocol::InitMode::kSystemd) {
    Say("handing over to the image's init (systemd mode)");
    return ExecImageInit();
  }
  if (config.skip_guest_agent) {
    int status = CELLA_TRY(RunMainOnConsole(config));
    Say(MainExitLine(status));
    PowerOff();
  }
  return ServeAgent(config, agent_port);
}

}  // namespace
}  // namespace cella::init

int main() {
  try {
    auto booted = cella::init::Boot();
    // Boot() returns only on failure, or after an exec or power-off failed.
    if (!booted) cella::init::FailAndPowerOff(booted.error());
    cella::init::FailAndPowerOff(cella::Error::Msg("init finished without powering off"));
  } catch (const std::exception& e) {
    // PID 1 must not exit (the kernel panics): power off instead.
    cella::init::PanicAndPowerOff(e.what());
  }
}
