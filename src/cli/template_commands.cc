// cella template ls | rm | create: the memory templates warm starts come
// from (host/template/template_store.h).
#include <unistd.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "base/io.h"
#include "cli/commands.h"
#include "cli/run_options.h"
#include "cli/sandbox_context.h"
#include "host/os/paths.h"
#include "host/sandbox/compose.h"
#include "host/template/template_store.h"

namespace cella::cli {
namespace {

using nlohmann::json;

Status Print(std::string_view text) { return WriteAll(STDOUT_FILENO, text); }

// The shape lines a user cares about, from ShapeText.
std::string ShapePart(const std::string& shape, std::string_view part) {
  size_t at = 0;
  while (at < shape.size()) {
    size_t end = shape.find('\n', at);
    if (end == std::string::npos) end = shape.size();
    std::string_view line(shape.data() + at, end - at);
    if (line.starts_with(part) && line.size() > part.size() && line[part.size()] == ' ')
      return std::string(line.substr(part.size() + 1));
    at = end + 1;
  }
  return {};
}

// "<path> <size> <mtime>" -> path.
std::string PathOf(const std::string& identity) { return identity.substr(0, identity.find(' ')); }

}  // namespace

int TemplateLsCommand(ListFormat format) {
  auto run = [&]() -> Status {
    std::string home = CELLA_TRY(host::CellaHome());
    auto templates = CELLA_TRY(warm::List(home));
    json out = json::array();
    std::string text;
    char line[1024];
    std::snprintf(line, sizeof line, "%-16s %-5s %-7s %-6s %-9s %-12s %s\n", "KEY", "CPUS",
                  "MEMORY", "DISKS", "SIZE", "CREATED", "IMAGE");
    text += line;
    for (const warm::TemplateInfo& t : templates) {
      int disks = 0;
      for (size_t at = t.shape.find("disk "); at != std::string::npos;
           at = t.shape.find("\ndisk ", at + 1))
        ++disks;
      json parts = {{"kernel", PathOf(ShapePart(t.shape, "kernel"))},
                    {"initramfs", PathOf(ShapePart(t.shape, "initramfs"))},
                    {"accel", ShapePart(t.shape, "accel")},
                    {"nic", ShapePart(t.shape, "nic")},
                    {"disks", disks}};
      out.push_back({{"key", t.key},
                     {"image", t.image},
                     {"cpus", t.cpus},
                     {"memory_mb", t.memory_mb},
                     {"parts", parts},
                     {"shape", t.shape},
                     {"size_bytes", t.disk_bytes},
                     {"created", t.created}});
      std::snprintf(line, sizeof line, "%-16s %-5g %-7s %-6d %-9s %-12s %s\n", t.key.c_str(),
                    t.cpus, (std::to_string(t.memory_mb) + "MiB").c_str(), disks,
                    (std::to_string(t.disk_bytes >> 20) + "MiB").c_str(),
                    (DescribeAge(t.created * 1000, NowMs()) + " ago").c_str(), t.image.c_str());
      text += line;
    }
    return Print(format == ListFormat::kJson ? out.dump(2) + "\n" : text);
  };
  auto st = run();
  return st ? 0 : ReportFailure(st.error());
}

int TemplateRmCommand(const std::vector<std::string>& keys, bool all) {
  auto home = host::CellaHome();
  if (!home) return ReportFailure(home.error());
  std::vector<std::string> targets = keys;
  if (all) {
    auto listed = warm::List(*home);
    if (!listed) return ReportFailure(listed.error());
    for (const auto& t : *listed) targets.push_back(t.key);
  } else if (keys.empty()) {
    return ReportFailure(Error::Msg("template rm: name a KEY (see cella template ls) or --all"));
  }
  int code = 0;
  for (const std::string& key : targets) {
    Status st = warm::Remove(*home, key);
    if (st) st = Print(key + "\n");
    if (!st) code = ReportFailure(st.error());
  }
  return code;
}

int TemplateCreateCommand(RunArgs args) {
  auto home = host::CellaHome();
  if (!home) return ReportFailure(home.error());
  // Only this shape's new templates are reported: other sandboxes may build
  // theirs meanwhile (told apart by memory and CPUs; a template does not
  // name its image in a form the command line has).
  sandbox::MachineShape shape;
  if (!args.memory.empty()) {
    auto memory = ParseMemoryMiB(args.memory);
    if (!memory) return ReportFailure(memory.error());
    shape.memory_mib = *memory;
  }
  if (!args.cpus.empty()) {
    auto cpus = ParseCpus(args.cpus);
    if (!cpus) return ReportFailure(cpus.error());
    shape.cpus = *cpus;
  }
  auto before = warm::List(*home);
  if (!before) return ReportFailure(before.error());
  std::set<std::string> had;
  for (const auto& t : *before) had.insert(t.key);
  // The templates of this shape are made by running it: the same
  // composition, so the same keys. A foreground run's (a tmpfs writable
  // layer), and a detached run's first boot (its layer on a fresh disk of
  // --disk-size, seeded from the template): a foreground run given a disk
  // size has exactly that disk, and prints no ID.
  args.command = {"true"};
  args.entrypoint = std::string();
  args.cold = false;
  args.rm = true;
  args.detach = false;
  const std::string disk_size = args.disk_size;
  args.disk_size.clear();
  if (int code = RunCommand(args); code != 0) return code;
  args.disk_size = disk_size.empty() ? "8g" : disk_size;
  if (int code = RunCommand(args); code != 0) return code;
  auto after = warm::List(*home);
  if (!after) return ReportFailure(after.error());
  std::string made;
  for (const auto& t : *after)
    if (!had.contains(t.key) && t.memory_mb == shape.memory_mib && t.cpus == shape.cpus)
      made += t.key + "\n";
  if (made.empty()) {
    // Already there (or the shape boots cold): say which keys exist.
    return ReportFailure(
        Error::Msg("no new template: this shape had them already, or cannot have one (host "
                   "shares, systemd images); see cella template ls"));
  }
  auto st = Print(made);
  return st ? 0 : ReportFailure(st.error());
}

}  // namespace cella::cli
