// Memory templates for warm starts: a guest saved at its template point
// (protocol/warm.h) once per machine shape, restored copy-on-write by every
// later sandbox of that shape. Layout, shared by every sandbox home of one
// cella home (like the image store):
//
//   <home>/templates/<key>/manifest.json   key parts, sizes, created (written last)
//   <home>/templates/<key>/memory          guest RAM (sparse; clones map it privately)
//   <home>/templates/<key>/state           QEMU device state (x-ignore-shared: no RAM)
//   <home>/templates/<key>.partial.<pid>   a template being built; never read
//   <home>/templates/<key>.lock            flock'd by the builder of <key>
//
// A template is built in its .partial directory and committed by renaming
// the directory (after fsync of every file and of the directory): a process
// killed at any moment leaves a .partial that nothing trusts. The builder
// holds an exclusive flock on <key>.lock for the whole build, so a partial
// whose key is not locked is stale (its builder is gone, whatever process
// has its pid now) and the next build removes it. Find() also checks the
// manifest against the files.
//
// Thread-safe (no shared state); across processes, one builds a key at a
// time (the lock) and the others boot cold meanwhile.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/vmm/qemu_backend.h"
#include "host/vmm/vm_config.h"

namespace cella::warm {

std::string TemplatesDir(const std::string& home);  // <home>/templates

// Why `vm` cannot start from a template (empty: it can). Host shares need
// guest RAM shared with virtiofsd; systemd-mode guests hand PID 1 over.
std::string WhyCold(const vmm::VMConfig& vm, bool systemd_mode);

// The machine shape a template stands for, one "part value" per line:
// QEMU binary, kernel, initramfs (path size mtime), the full kernel command
// line, cpus, memory, accelerator, each disk in attach order (the image's
// lower disks by identity, every other disk by role and read-only flag
// only), NIC or none, the microvm firmware file; under KVM also the host
// kernel release and the host CPU (HostCpuIdentity), which a saved vCPU
// state is only loadable with. Key = the first 16 hex digits of its SHA-256.
// A seeded upper (cella.seeded_upper=1 in KernelArgs, protocol/warm.h) adds
// the upper disk file's size: its ext4 is the template's.
Result<std::string> ShapeText(const vmm::VMConfig& vm, const vmm::QemuBackendOptions& options);
std::string KeyOf(const std::string& shape_text);
// "vendor | model name | flags <hash>" of the first processor in a
// /proc/cpuinfo text.
std::string HostCpuIdentity(std::string_view cpuinfo);

struct TemplateInfo {
  std::string key;
  std::string dir;
  std::string shape;  // ShapeText
  std::string image;  // the first lower (or root) disk: what rmi/gc look for
  // The template's writable-layer disk (`upper.seed`), synced at the
  // template point with the root made on it: a clone attaches a copy of
  // it. Empty unless the shape is seeded.
  std::string upper_seed;
  int memory_mb = 0;
  double cpus = 0;
  int64_t created = 0;        // unix seconds
  uint64_t disk_bytes = 0;    // allocated bytes of its files
  uint64_t memory_bytes = 0;  // apparent size of the memory file
  uint64_t state_bytes = 0;
};

// The committed template for `key`, checked (manifest parses and names the
// key, memory and state files are there with the recorded sizes); nullopt
// when there is none, or when it is proven bad by that check (it is then
// removed). An error reading it (EIO, EMFILE, EACCES...) is returned and
// the template left alone.
Result<std::optional<TemplateInfo>> Find(const std::string& home, const std::string& key);

// Boots a capture VM of `vm`'s shape (its own disks replaced by small
// placeholders, user-mode NIC if any, no sandbox file touched), saves it at
// the template point and commits it, holding the key's build lock all the
// while. EWOULDBLOCK when another process is building the same key now;
// when one committed it meanwhile, that one is returned.
// A seeded shape's upper disk is made by `make_upper_seed(path)` (a fresh
// ext4 the size of the sandbox's own), kept as the template's upper.seed.
Result<TemplateInfo> Create(const std::string& home, const vmm::VMConfig& vm,
                            const vmm::QemuBackendOptions& options,
                            const std::function<Status(const std::string&)>& make_upper_seed = {});

// Makes `vm` a clone of `t` (role, memory file, incoming state).
void MakeClone(const TemplateInfo& t, vmm::VMConfig& vm);

// Removes the `<key>.partial.*` directories whose key's build lock is free
// (their builder is gone); Create does this before every build.
void RemoveStalePartials(const std::string& home);

// Every committed template, oldest first; unreadable ones are skipped.
Result<std::vector<TemplateInfo>> List(const std::string& home);
// Removes one (a template in use keeps its clones running: they map the
// unlinked file): renamed aside first (to a `.partial.` name, swept if the
// deletion fails or is cut short), so a clone looking it up meanwhile finds
// all of it or none, then deleted. ENOENT when there is no such key.
Status Remove(const std::string& home, const std::string& key);
// Removes the templates whose image file is gone (after rmi / image gc);
// returns how many.
Result<int> RemoveOrphans(const std::string& home);

}  // namespace cella::warm
