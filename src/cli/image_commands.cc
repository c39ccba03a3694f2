#include "cli/image_commands.h"

#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>

#include "base/io.h"
#include "base/log.h"
#include "cli/commands.h"
#include "cli/sandbox_context.h"
#include "host/os/digest.h"
#include "host/os/paths.h"
#include "host/registry/auth.h"
#include "host/registry/image_store.h"
#include "host/registry/reference.h"
#include "host/sandbox/spec.h"
#include "host/template/template_store.h"

namespace cella::cli {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::string> SplitCommaList(std::string_view text) {
  std::vector<std::string> items;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string_view::npos) comma = text.size();
    std::string_view item = text.substr(start, comma - start);
    if (!item.empty()) items.emplace_back(item);
    start = comma + 1;
  }
  return items;
}

registry::StoreOptions StoreOptionsFrom(const RegistryFlags& flags) {
  registry::StoreOptions options;
  if (const char* env = std::getenv("CELLA_INSECURE_REGISTRIES"))
    options.client.insecure_hosts = SplitCommaList(env);
  for (const auto& host : flags.insecure_registries) options.client.insecure_hosts.push_back(host);
  if (const char* env = std::getenv("CELLA_CA_FILE")) options.client.ca_file = env;
  if (!flags.ca_file.empty()) options.client.ca_file = flags.ca_file;
  return options;
}

// Progress and messages for a person on stderr. A failed write there has
// nowhere to be reported, so its result is deliberately dropped here, once.
__attribute__((format(printf, 1, 2))) void PrintToStderr(const char* format, ...) {
  va_list args;
  va_start(args, format);
  (void)std::vfprintf(stderr, format, args);
  va_end(args);
}

std::string HumanBytes(int64_t bytes) {
  char buf[32];
  int n;
  if (bytes >= (1 << 20))
    n = std::snprintf(buf, sizeof buf, "%.1f MB", static_cast<double>(bytes) / (1 << 20));
  else if (bytes >= 1024)
    n = std::snprintf(buf, sizeof buf, "%.1f kB", static_cast<double>(bytes) / 1024);
  else
    n = std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  if (n < 0) return std::to_string(bytes) + " B";
  return buf;
}

std::string ShortDigest(std::string_view digest) {
  size_t colon = digest.find(':');
  std::string_view hex = colon == std::string_view::npos ? digest : digest.substr(colon + 1);
  return std::string(hex.substr(0, 12));
}

// Per-blob lines redrawn in place on a TTY; otherwise silent until Summary.
class PullProgress : public registry::ProgressSink {
 public:
  explicit PullProgress(std::string reference)
      : reference_(std::move(reference)),
        tty_(::isatty(STDERR_FILENO) == 1),
        started_(Clock::now()) {}

  void BlobStarted(std::string_view digest, int64_t total, int64_t resumed_from) override {
    if (!tty_) return;
    PrintToStderr("%s: %s%s\n", ShortDigest(digest).c_str(), HumanBytes(total).c_str(),
                  resumed_from > 0 ? " (resuming)" : "");
    last_draw_ = Clock::now();
  }
  void BlobProgress(std::string_view digest, int64_t done, int64_t total) override {
    bytes_in_flight_ = done;
    if (!tty_) return;
    auto now = Clock::now();
    if (now - last_draw_ < std::chrono::milliseconds(100) && done != total) return;
    last_draw_ = now;
    PrintToStderr("\r%s: %s / %s\033[K", ShortDigest(digest).c_str(), HumanBytes(done).c_str(),
                  HumanBytes(total).c_str());
  }
  void BlobFinished(std::string_view digest, registry::BlobOutcome outcome) override {
    if (outcome == registry::BlobOutcome::kFetched) {
      ++fetched_;
      bytes_fetched_ += bytes_in_flight_;
    } else {
      ++already_present_;
    }
    bytes_in_flight_ = 0;
    if (!tty_) return;
    PrintToStderr("\r%s: %s\033[K\n", ShortDigest(digest).c_str(),
                  outcome == registry::BlobOutcome::kFetched ? "done" : "already present");
  }

  void Summary() const {
    double seconds = std::chrono::duration<double>(Clock::now() - started_).count();
    PrintToStderr(
        "pulled %s: %d blobs fetched (%s), %d already present, root image ready, %.1f s\n",
        reference_.c_str(), fetched_, HumanBytes(bytes_fetched_).c_str(), already_present_,
        seconds);
  }

 private:
  std::string reference_;
  bool tty_;
  Clock::time_point started_;
  Clock::time_point last_draw_{};
  int fetched_ = 0;
  int already_present_ = 0;
  int64_t bytes_fetched_ = 0;
  int64_t bytes_in_flight_ = 0;
};

Result<registry::Platform> PlatformFrom(const std::string& text) {
  if (text.empty()) return registry::Platform{};
  return CELLA_TRY_CTX(registry::ParsePlatform(text), "--platform");
}

Result<registry::ImageStore> OpenStore(const RegistryFlags& flags) {
  std::string home = CELLA_TRY(host::CellaHome());
  return registry::ImageStore::Open(home, StoreOptionsFrom(flags));
}

struct Pulled {
  registry::ImageRecord record;
  std::string rootfs_path;
};

// Fetches and converts: after a pull, `run` only boots. Prints one summary
// line on stderr (plus per-blob lines on a TTY).
Result<Pulled> PullAndConvert(registry::ImageStore& store, const registry::Reference& ref,
                              const registry::Platform& platform) {
  PullProgress progress(ref.String());
  Pulled pulled;
  // The store's errors already name the reference.
  pulled.record = CELLA_TRY(store.Pull(ref, platform, &progress));
  pulled.rootfs_path =
      CELLA_TRY_CTX(store.EnsureRootfs(pulled.record), "root image of " + pulled.record.reference);
  progress.Summary();
  return pulled;
}

int Report(const Error& error) {
  PrintToStderr("cella: %s\n", error.message.c_str());
  return kExitCellaError;
}

template <class T>
int ReportOr(const Result<T>& result, int ok_code = 0) {
  return result ? ok_code : Report(result.error());
}

Result<void> PullImpl(const PullArgs& args) {
  registry::Reference ref = CELLA_TRY_CTX(registry::ParseReference(args.reference), "reference");
  registry::Platform platform = CELLA_TRY(PlatformFrom(args.platform));
  registry::ImageStore store = CELLA_TRY(OpenStore(args.registry));
  Pulled pulled = CELLA_TRY(PullAndConvert(store, ref, platform));
  std::printf("%s\n", pulled.record.manifest_digest.c_str());
  return {};
}

std::string FormatTime(int64_t unix_seconds) {
  std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  if (::gmtime_r(&t, &tm) == nullptr) return "-";
  char buf[32];
  if (std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &tm) == 0) return "-";
  return buf;
}

Result<void> ImagesImpl(OutputFormat format) {
  registry::ImageStore store = CELLA_TRY(OpenStore({}));
  std::vector<registry::ImageRecord> images = CELLA_TRY(store.List());
  if (format == OutputFormat::kJson) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& image : images) {
      out.push_back({{"reference", image.reference},
                     {"repository", image.repository},
                     {"tag", image.tag},
                     {"digest", image.manifest_digest},
                     {"media_type", image.manifest_media_type},
                     {"platform", image.platform.String()},
                     {"layers", image.layers.size()},
                     {"size", image.size},
                     {"created", image.created},
                     {"added_at", image.added_at}});
    }
    std::printf("%s\n", out.dump(2).c_str());
    return {};
  }
  if (format == OutputFormat::kQuiet) {
    for (const auto& image : images) std::printf("%s\n", image.reference.c_str());
    return {};
  }
  std::printf("%-48s %-16s %-14s %-12s %10s  %s\n", "REPOSITORY", "TAG", "DIGEST", "PLATFORM",
              "SIZE", "ADDED");
  for (const auto& image : images) {
    std::printf("%-48s %-16s %-14s %-12s %10s  %s\n", image.repository.c_str(),
                image.tag.empty() ? "<none>" : image.tag.c_str(),
                ShortDigest(image.manifest_digest).c_str(), image.platform.String().c_str(),
                HumanBytes(image.size).c_str(), FormatTime(image.added_at).c_str());
  }
  return {};
}

// Root images ("<hex>.erofs") sandboxes boot from, each with one sandbox
// that uses it: whatever their state, they need it to start again.
Result<std::map<std::string, std::string>> RootImagesInUse() {
  SandboxContext ctx = CELLA_TRY(OpenSandboxes());
  std::map<std::string, std::string> in_use;
  for (const store::SandboxRecord& r : CELLA_TRY(ctx.store.List(store::ListScope::kAll))) {
    auto spec = sandbox::DecodeSpec(r.spec_json);
    if (!spec) return Fail("sandbox " + r.Label() + ": " + spec.error().message);
    if (spec->root_image_path.empty()) continue;
    in_use.try_emplace(std::filesystem::path(spec->root_image_path).filename().string(), r.Label());
  }
  return in_use;
}

// Memory templates of root images that are gone can never be used again.
void RemoveOrphanTemplates() {
  auto home = host::CellaHome();
  if (!home) return;
  auto removed = warm::RemoveOrphans(*home);
  if (!removed)
    log::Warn("could not remove the templates of removed images",
              {{"error", removed.error().message}});
  else if (*removed > 0)
    std::printf("removed %d memory templates of removed images\n", *removed);
}

// `rmi ID`: the references whose manifest digest (the ID `cella images`
// shows) starts with `text` ("sha256:" optional, at least 4 hex digits).
// Empty when `text` is not ID-shaped or matches nothing; an error when it
// matches more than one image.
Result<std::vector<std::string>> ReferencesById(registry::ImageStore& store,
                                                const std::string& text) {
  std::string hex = text.starts_with("sha256:") ? text.substr(7) : text;
  if (hex.size() < 4 || hex.size() > 64 || !std::ranges::all_of(hex, [](char c) {
        return std::isxdigit(static_cast<unsigned char>(c)) &&
               !std::isupper(static_cast<unsigned char>(c));
      }))
    return std::vector<std::string>{};
  std::set<std::string> digests;
  std::vector<std::string> references;
  for (const registry::ImageRecord& image : CELLA_TRY(store.List())) {
    std::string digest = image.manifest_digest.substr(image.manifest_digest.find(':') + 1);
    if (!digest.starts_with(hex)) continue;
    digests.insert(image.manifest_digest);
    references.push_back(image.reference);
  }
  if (digests.size() > 1)
    return Fail("image ID prefix " + text + " is ambiguous: it matches " +
                std::to_string(digests.size()) + " images; give more of it");
  return references;
}

Result<void> RmiOne(const std::string& text, bool force);

Result<void> RmiImpl(const std::string& text, bool force) {
  {
    registry::ImageStore store = CELLA_TRY(OpenStore({}));
    // A name first (as docker); an ID or ID prefix when no image has that name.
    auto ref = registry::ParseReference(text);
    bool named = ref && store.Find(*ref).has_value();
    if (!named) {
      std::vector<std::string> by_id = CELLA_TRY(ReferencesById(store, text));
      if (by_id.size() > 1 && !force)
        return Fail("image " + text + " has " + std::to_string(by_id.size()) +
                    " names; remove them by name, or all at once with cella rmi -f");
      if (!by_id.empty()) {
        for (const std::string& reference : by_id) CELLA_TRY(RmiOne(reference, force));
        return {};
      }
    }
  }
  return RmiOne(text, force);
}

Result<void> RmiOne(const std::string& text, bool force) {
  registry::Reference ref = CELLA_TRY_CTX(registry::ParseReference(text), "reference");
  registry::ImageStore store = CELLA_TRY(OpenStore({}));
  // docker's rule: an image a sandbox uses stays unless forced, and forced
  // only loses its name (gc keeps what a sandbox uses).
  if (auto found = store.Find(ref); found && !force) {
    auto in_use = CELLA_TRY(RootImagesInUse());
    std::string hex = found->manifest_digest.substr(found->manifest_digest.find(':') + 1);
    if (auto it = in_use.find(hex + ".erofs"); it != in_use.end()) {
      return Fail("image " + ref.String() + " is used by sandbox " + it->second +
                  "; remove the sandbox first (cella rm " + it->second +
                  "), or untag it with cella rmi -f");
    }
  }
  if (auto removed = store.Remove(ref); !removed) {
    if (removed.error().errno_value == ENOENT)
      return Fail("no such image: " + ref.String() + " (see `cella images`)");
    return std::unexpected(removed.error());
  }
  std::printf("removed %s\n", ref.String().c_str());
  RemoveOrphanTemplates();
  // The digests of files hashed for cache keys (host/os/digest.h): the
  // entries of files gone or changed since can never be hit again.
  std::string home = CELLA_TRY(host::CellaHome());
  if (auto pruned = host::PruneDigestCache(host::DigestCacheDir(home)); !pruned)
    log::Warn("could not prune the digest cache", {{"error", pruned.error().message}});
  return {};
}

Result<void> ImportImpl(const std::string& path, const std::string& reference) {
  std::optional<registry::Reference> ref;
  if (!reference.empty()) ref = CELLA_TRY_CTX(registry::ParseReference(reference), "reference");
  registry::ImageStore store = CELLA_TRY(OpenStore({}));
  registry::ImageRecord record = CELLA_TRY(store.Import(path, ref));  // names the path
  std::printf("%s %s\n", record.reference.c_str(), record.manifest_digest.c_str());
  return {};
}

Result<void> GcImpl() {
  registry::ImageStore store = CELLA_TRY(OpenStore({}));
  std::set<std::string> keep;
  for (const auto& [name, sandbox] : CELLA_TRY(RootImagesInUse())) keep.insert(name);
  registry::GcStats stats = CELLA_TRY(store.Gc(keep));
  std::printf("removed %zu blobs and %zu root images, freed %s\n", stats.blobs_removed,
              stats.rootfs_removed, HumanBytes(stats.bytes_freed).c_str());
  RemoveOrphanTemplates();
  return {};
}

Result<std::string> ReadAllBounded(int fd, size_t max_bytes) {
  std::string out;
  char buf[4096];
  while (true) {
    size_t got = CELLA_TRY(ReadSome(fd, std::as_writable_bytes(std::span(buf))));
    if (got == 0) return out;
    out.append(buf, got);
    if (out.size() > max_bytes)
      return Fail("more than " + std::to_string(max_bytes) + " bytes: not a password");
  }
}

// Reads one line from the terminal without echoing it.
Result<std::string> PromptHidden(const char* prompt) {
  PrintToStderr("%s", prompt);
  termios old_mode{};
  if (::tcgetattr(STDIN_FILENO, &old_mode) != 0) return FailErrno("tcgetattr(stdin)");
  termios quiet = old_mode;
  quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
  if (::tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet) != 0) return FailErrno("tcsetattr(stdin)");
  std::string line;
  char c = 0;
  Status read_status;
  while (true) {
    auto got = ReadSome(STDIN_FILENO, std::as_writable_bytes(std::span(&c, 1)));
    if (!got) {
      read_status = std::unexpected(got.error());
      break;
    }
    if (*got == 0 || c == '\n') break;
    line += c;
  }
  if (::tcsetattr(STDIN_FILENO, TCSAFLUSH, &old_mode) != 0) return FailErrno("tcsetattr(stdin)");
  PrintToStderr("\n");
  if (!read_status) return std::unexpected(read_status.error());
  return line;
}

Result<void> LoginImpl(const LoginArgs& args) {
  if (args.host.empty()) return Fail("login: give the registry host (e.g. registry.example:5000)");
  std::string username = args.username;
  if (username.empty()) return Fail("login: give the user name with -u");
  std::string password;
  if (args.password_stdin) {
    password =
        CELLA_TRY_CTX(ReadAllBounded(STDIN_FILENO, size_t{64} * 1024), "read password from stdin");
    while (!password.empty() && (password.back() == '\n' || password.back() == '\r'))
      password.pop_back();
  } else if (::isatty(STDIN_FILENO) == 1) {
    password = CELLA_TRY(PromptHidden("Password: "));
  } else {
    return Fail("login: stdin is not a terminal: use --password-stdin");
  }
  if (password.empty()) return Fail("login: empty password");
  std::string home = CELLA_TRY(host::CellaHome());
  CELLA_TRY(host::MakeDirs(home, 0700));
  CELLA_TRY_CTX(registry::Login(home, args.host, username, password), "login " + args.host);
  std::printf("credentials for %s stored in %s\n", args.host.c_str(),
              registry::CellaCredentialsPath(home).c_str());
  return {};
}

}  // namespace

int PullCommand(const PullArgs& args) { return ReportOr(PullImpl(args)); }
int ImagesCommand(OutputFormat format) { return ReportOr(ImagesImpl(format)); }
int RmiCommand(const std::vector<std::string>& references, bool force) {
  int code = 0;
  for (const auto& ref : references) {
    if (auto removed = RmiImpl(ref, force); !removed) code = Report(removed.error());
  }
  return code;
}
int ImportCommand(const std::string& path, const std::string& reference) {
  return ReportOr(ImportImpl(path, reference));
}
int ImageGcCommand() { return ReportOr(GcImpl()); }
int LoginCommand(const LoginArgs& args) { return ReportOr(LoginImpl(args)); }

Result<RunImage> PrepareRunImage(const std::string& home, const std::string& reference,
                                 const std::string& platform_text, const RegistryFlags& flags,
                                 const std::string& pull) {
  registry::Reference ref = CELLA_TRY_CTX(registry::ParseReference(reference), "--image");
  registry::Platform platform = CELLA_TRY(PlatformFrom(platform_text));
  registry::ImageStore store = CELLA_TRY(registry::ImageStore::Open(home, StoreOptionsFrom(flags)));
  Pulled pulled;
  auto found = pull == "always"
                   ? Result<registry::ImageRecord>(std::unexpected(Error{"--pull always", ENOENT}))
                   : store.Find(ref);
  if (pull == "always") {
    pulled = CELLA_TRY(PullAndConvert(store, ref, platform));
  } else if (found) {
    pulled.record = std::move(*found);
    pulled.rootfs_path = CELLA_TRY_CTX(store.EnsureRootfs(pulled.record),
                                       "root image of " + pulled.record.reference);
  } else if (found.error().errno_value == ENOENT) {
    if (pull == "never")
      return std::unexpected(Error{"image " + ref.String() +
                                       " is not in the store and --pull never forbids pulling "
                                       "it (cella pull " +
                                       ref.String() + ")",
                                   ENOENT});
    pulled = CELLA_TRY(PullAndConvert(store, ref, platform));
  } else {
    return std::unexpected(std::move(found.error()).WithContext("image store"));
  }
  registry::ImageConfig config = CELLA_TRY_CTX(store.Config(pulled.record), "image config");
  RunImage image;
  image.rootfs_path = pulled.rootfs_path;
  image.defaults.entrypoint = config.entrypoint;
  image.defaults.cmd = config.cmd;
  image.defaults.env = config.env;
  image.defaults.workdir = config.working_dir;
  image.defaults.user = config.user;
  image.defaults.init_mode =
      config.IsSystemdInit() ? protocol::InitMode::kSystemd : protocol::InitMode::kExec;
  return image;
}

}  // namespace cella::cli
