// Guest networking without any tool from the image: loopback always; eth0
// (the first non-loopback interface) with guest_ip/guest_cidr, MTU and a
// default route via ioctls; /etc/hosts, /etc/resolv.conf and the host name.
#pragma once

#include "base/result.h"
#include "guest/init/devices.h"
#include "protocol/config.h"

namespace cella::init {

// Brings lo up, and when the config enables the network, configures the
// first non-loopback interface (waiting for it until deadline); when it
// does not, any interface but lo that is up (a warm clone's, see below) is
// taken down again, as a cold boot leaves them.
Status ConfigureNetwork(const protocol::Config& config, Deadline deadline);

// Warm starts, at the template point: brings lo and the first non-loopback
// interface (when the shape has a NIC) up, with IPv6 off and the IPv4
// address and default route every sandbox's NIC has (protocol/network.h).
// None of it depends on a sandbox (a clone's config brings its own MAC and
// MTU, and ConfigureNetwork changes the address only if the config names
// another); each first SIOCSIFFLAGS, address and route (the NIC's receive
// ring, the FIB) costs a clone ~20-30 ms under TCG.
Status BringLinksUpForClones();

// The guest kernel's BPF JIT off (net.core.bpf_jit_enable = 0). Under TCG
// the JIT is translated code writing code QEMU would translate again; every
// exec's seccomp filter paid for it (~3k guest instructions, ~6 ms in a
// fresh copy of a VM), while the syscalls the filter always allows never
// run it (the kernel's per-syscall action cache answers them). BPF programs
// run interpreted.
Status TurnOffBpfJit();

// sethostname + /etc/hostname (when hostname is set), /etc/hosts, and
// /etc/resolv.conf (when there are DNS servers), in the current root. Files
// are replaced, not edited: the root's writable layer is this sandbox's own.
Status WriteIdentityFiles(const protocol::Config& config);
// Appends config.ca_certificates to the image's CA bundles (creating a
// bundle where the image has none) so TLS clients trust the egress proxy.
Status InstallTrustedCertificates(const protocol::Config& config);

}  // namespace cella::init
