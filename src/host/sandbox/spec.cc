#include "host/sandbox/spec.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "host/sandbox/layout.h"
#include "host/store/state_store.h"

namespace cella::sandbox {
namespace {

using nlohmann::json;
constexpr int kSpecVersion = 1;

Result<protocol::MountMode> ParseMode(const std::string& name) {
  if (name == "ro") return protocol::MountMode::kReadOnly;
  if (name == "rw") return protocol::MountMode::kReadWrite;
  if (name == "overlay") return protocol::MountMode::kOverlay;
  return Fail("sandbox spec: unknown volume mode \"" + name + "\"");
}

}  // namespace

std::string EncodeSpec(const SandboxSpec& spec) {
  json out;
  out["version"] = kSpecVersion;
  out["guest"] = json::parse(protocol::SerializeConfig(spec.guest));
  out["image"] = spec.image;
  out["root_image_path"] = spec.root_image_path;
  out["cpus"] = spec.shape.cpus;
  out["memory_mib"] = spec.shape.memory_mib;
  out["volumes"] = json::array();
  for (const auto& v : spec.volumes) {
    out["volumes"].push_back({{"name", v.name},
                              {"host_path", v.host_path},
                              {"guest_path", v.guest_path},
                              {"mode", protocol::ToString(v.mode)},
                              {"overlay_path", v.overlay_path},
                              {"anonymous", v.anonymous}});
  }
  out["shares"] = json::array();
  for (const auto& s : spec.shares) {
    out["shares"].push_back({{"host_path", s.host_path},
                             {"guest_path", s.guest_path},
                             {"mode", protocol::ToString(s.mode)},
                             {"is_file", s.is_file}});
  }
  out["ports"] = json::array();
  for (const auto& p : spec.ports) {
    out["ports"].push_back(
        {{"host_ip", p.host_ip}, {"host_port", p.host_port}, {"guest_port", p.guest_port}});
  }
  out["kernel_path"] = spec.kernel_path;
  out["accel"] = spec.accel;
  out["boot_timeout_s"] = spec.boot_timeout_s;
  out["upper_image"] = spec.upper_image;
  out["log_max_bytes"] = spec.log_max_bytes;
  out["restart"] = ToString(spec.restart);
  if (!spec.labels.empty()) out["labels"] = spec.labels;
  if (spec.cold) out["cold"] = true;
  const EgressSpec& e = spec.egress;
  json egress = {{"enabled", e.enabled},
                 {"all_public", e.all_public},
                 {"allow", e.allow},
                 {"allow_private", e.allow_private},
                 {"host_loopback", e.host_loopback},
                 {"intercept", e.intercept},
                 {"dns_servers", e.dns_servers},
                 {"upstream_ca", e.upstream_ca},
                 {"pins", json::array()},
                 {"secrets", json::array()}};
  for (const auto& p : e.pins) {
    egress["pins"].push_back({{"name", p.name},
                              {"port", p.port},
                              {"address", p.address},
                              {"address_port", p.address_port}});
  }
  for (const auto& sec : e.secrets) {
    egress["secrets"].push_back({{"name", sec.name},
                                 {"placeholder", sec.placeholder},
                                 {"hosts", sec.hosts},
                                 {"from_env", sec.from_env}});
  }
  out["egress"] = egress;
  return out.dump();
}

Result<SandboxSpec> DecodeSpec(std::string_view text) {
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) return Fail("sandbox spec: not a JSON object");
  // The spec is written by cella itself, so a type mismatch means a damaged
  // store: report it rather than guess.
  try {
    if (doc.value("version", 0) != kSpecVersion)
      return Fail("sandbox spec: unsupported version " + doc.value("version", json()).dump());
    SandboxSpec spec;
    spec.guest = CELLA_TRY_CTX(protocol::ParseConfig(doc.at("guest").dump()), "sandbox spec");
    spec.image = doc.at("image").get<std::string>();
    spec.root_image_path = doc.at("root_image_path").get<std::string>();
    spec.shape.cpus = doc.at("cpus").get<double>();
    spec.shape.memory_mib = doc.at("memory_mib").get<int>();
    for (const auto& v : doc.at("volumes")) {
      VolumeSpec vol;
      vol.name = v.at("name").get<std::string>();
      vol.host_path = v.at("host_path").get<std::string>();
      vol.guest_path = v.at("guest_path").get<std::string>();
      vol.mode = CELLA_TRY(ParseMode(v.at("mode").get<std::string>()));
      vol.overlay_path = v.at("overlay_path").get<std::string>();
      vol.anonymous = v.value("anonymous", false);  // absent in older specs
      spec.volumes.push_back(std::move(vol));
    }
    // Absent in specs written before host shares existed.
    if (doc.contains("shares")) {
      for (const auto& s : doc.at("shares")) {
        ShareSpec share;
        share.host_path = s.at("host_path").get<std::string>();
        share.guest_path = s.at("guest_path").get<std::string>();
        share.mode = CELLA_TRY(ParseMode(s.at("mode").get<std::string>()));
        share.is_file = s.at("is_file").get<bool>();
        spec.shares.push_back(std::move(share));
      }
    }
    for (const auto& p : doc.at("ports")) {
      spec.ports.push_back({p.at("host_ip").get<std::string>(), p.at("host_port").get<uint16_t>(),
                            p.at("guest_port").get<uint16_t>()});
    }
    spec.kernel_path = doc.at("kernel_path").get<std::string>();
    spec.accel = doc.at("accel").get<std::string>();
    spec.boot_timeout_s = doc.at("boot_timeout_s").get<int>();
    spec.upper_image = doc.at("upper_image").get<std::string>();
    // Absent in specs written before logs were capped.
    spec.log_max_bytes = doc.value("log_max_bytes", kDefaultLogMaxBytes);
    // Absent in specs written before --restart.
    spec.restart = CELLA_TRY(ParseRestartPolicy(doc.value("restart", std::string("no"))));
    spec.cold = doc.value("cold", false);  // absent before warm starts
    if (doc.contains("labels"))
      spec.labels = doc.at("labels").get<std::map<std::string, std::string>>();
    if (doc.contains("egress")) {
      const json& e = doc.at("egress");
      EgressSpec& out = spec.egress;
      out.enabled = e.at("enabled").get<bool>();
      out.allow = e.at("allow").get<std::vector<std::string>>();
      out.allow_private = e.at("allow_private").get<bool>();
      out.intercept = e.at("intercept").get<bool>();
      // Absent from specs stored before the default network existed.
      out.all_public = e.value("all_public", false);
      out.host_loopback = e.value("host_loopback", false);
      out.dns_servers = e.value("dns_servers", std::vector<std::string>{});
      out.upstream_ca = e.at("upstream_ca").get<std::string>();
      for (const auto& p : e.at("pins")) {
        out.pins.push_back({p.at("name").get<std::string>(), p.at("port").get<uint16_t>(),
                            p.at("address").get<std::string>(),
                            p.at("address_port").get<uint16_t>()});
      }
      for (const auto& sec : e.at("secrets")) {
        out.secrets.push_back({sec.at("name").get<std::string>(),
                               sec.at("placeholder").get<std::string>(),
                               sec.at("hosts").get<std::vector<std::string>>(),
                               sec.at("from_env").get<std::string>()});
      }
    }
    return spec;
  } catch (const json::exception& e) {
    return Fail(std::string("sandbox spec: ") + e.what());
  }
}

Result<RestartPolicy> ParseRestartPolicy(std::string_view text) {
  using enum RestartPolicy::Kind;
  RestartPolicy p;
  if (text == "no" || text.empty()) return p;
  if (text == "always") {
    p.kind = kAlways;
    return p;
  }
  if (text == "unless-stopped") {
    p.kind = kUnlessStopped;
    return p;
  }
  if (text == "on-failure") {
    p.kind = kOnFailure;
    return p;
  }
  if (text.starts_with("on-failure:")) {
    std::string_view n = text.substr(11);
    int value = 0;
    auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), value);
    if (ec != std::errc() || end != n.data() + n.size() || value <= 0)
      return Fail("--restart " + std::string(text) +
                  ": the retry count must be a positive number (on-failure:3)");
    p.kind = kOnFailure;
    p.max_retries = value;
    return p;
  }
  if (text.find(':') != std::string_view::npos && !text.starts_with("on-failure"))
    return Fail("--restart " + std::string(text) + ": only on-failure takes a retry count");
  return Fail("--restart " + std::string(text) +
              ": want no, on-failure[:N], always or unless-stopped");
}

std::string ToString(const RestartPolicy& policy) {
  using enum RestartPolicy::Kind;
  switch (policy.kind) {
    case kNo:
      return "no";
    case kOnFailure:
      return policy.max_retries > 0 ? "on-failure:" + std::to_string(policy.max_retries)
                                    : "on-failure";
    case kAlways:
      return "always";
    case kUnlessStopped:
      return "unless-stopped";
  }
  return "no";
}

bool ShouldRestart(const RestartPolicy& policy, bool failed, int restarts) {
  using enum RestartPolicy::Kind;
  switch (policy.kind) {
    case kNo:
      return false;
    case kOnFailure:
      return failed && (policy.max_retries == 0 || restarts < policy.max_retries);
    case kAlways:
    case kUnlessStopped:
      return true;
  }
  return false;
}

std::chrono::milliseconds NextRestartDelay(std::chrono::milliseconds previous,
                                           std::chrono::milliseconds last_run) {
  using std::chrono::milliseconds;
  constexpr milliseconds kFirst{100};
  constexpr milliseconds kMax{60'000};
  if (previous.count() <= 0 || last_run >= std::chrono::seconds(10)) return kFirst;
  return std::min(previous * 2, kMax);
}

Status RemoveAnonymousVolumes(store::StateStore& store, const std::string& sandbox_home,
                              std::string_view spec_json) {
  auto spec = DecodeSpec(spec_json);
  if (!spec) return std::unexpected(spec.error());
  std::string failed;
  for (const VolumeSpec& v : spec->volumes) {
    if (!v.anonymous) continue;
    Status st = store.RemoveVolume(v.name);
    if (!st && st.error().errno_value == ENOENT) continue;  // removed already
    if (st) {
      std::error_code ec;
      std::filesystem::remove_all(VolumesDir(sandbox_home) + "/" + v.name, ec);
      if (ec) st = Fail("remove the files of volume " + v.name + ": " + ec.message());
    }
    if (!st) failed += (failed.empty() ? "" : "; ") + st.error().message;
  }
  if (!failed.empty()) return Fail("anonymous volumes kept: " + failed);
  return {};
}

}  // namespace cella::sandbox
