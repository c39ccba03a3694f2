// The pure text behind cella-init's systemd mode: which console gettys get
// masked, and the agent unit systemd runs.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "guest/init/format.h"

namespace cella::init {
namespace {

using Ttys = std::vector<std::string>;

TEST(InitConsoleTtys, NamesFromConsoleArgumentsWithOptionsCut) {
  EXPECT_EQ(KernelConsoleTtys("console=ttyS0 panic=-1 quiet"), Ttys{"ttyS0"});
  EXPECT_EQ(KernelConsoleTtys("quiet console=tty0 console=ttyS1,115200n8\n"),
            (Ttys{"tty0", "ttyS1"}));
  EXPECT_EQ(KernelConsoleTtys("panic=-1 quiet"), Ttys{});
}

TEST(InitConsoleTtys, RefusesNamesThatAreNotPlainUnitInstances) {
  // They would name a unit file outside the unit directory, or none at all.
  EXPECT_EQ(KernelConsoleTtys("console=/dev/ttyS0 console= console=,9600 console=a.b"), Ttys{});
  // Only the exact key counts.
  EXPECT_EQ(KernelConsoleTtys("xconsole=ttyS0 console_msg=ttyS1"), Ttys{});
}

TEST(InitSystemdAgentUnit, RunsAgentOnPortAndPowersOffOnShutdown) {
  protocol::Config c;
  c.agent_port = "cella.agent";
  std::string unit = SystemdAgentUnit(c, "/run/cella/cella-agent");
  EXPECT_NE(unit.find("\nExecStart=/run/cella/cella-agent --virtio-port cella.agent "
                      "--on-shutdown poweroff --harden\n"),
            std::string::npos)
      << unit;
  EXPECT_NE(unit.find("\nDefaultDependencies=no\n"), std::string::npos) << unit;
  EXPECT_NE(unit.find("\nWantedBy=multi-user.target\n"), std::string::npos) << unit;
}

TEST(InitSystemdAgentUnit, PrivilegedSkipsHardening) {
  protocol::Config c;
  c.agent_port = "other.port";
  c.privileged = true;
  std::string unit = SystemdAgentUnit(c, "/run/cella/cella-agent");
  EXPECT_NE(unit.find("--virtio-port other.port --on-shutdown poweroff\n"), std::string::npos)
      << unit;
  EXPECT_EQ(unit.find("--harden"), std::string::npos) << unit;
}

}  // namespace
}  // namespace cella::init
