#include "host/sandbox/fuse_share.h"

#include <unistd.h>

#include <cstring>
#include <vector>

#include "base/log.h"

namespace cella::sandbox {

Result<std::unique_ptr<share::FuseServer>> OpenFuseServer(const FuseShareOptions& options) {
  share::FuseServerOptions server;
  server.read_only = options.mode != protocol::MountMode::kReadWrite;
  // As virtiofsd does: cella run as root gives the guest's new files to
  // the guest's user, anyone else keeps them as their own.
  server.owner_from_guest = ::geteuid() == 0;
  std::string root = options.host_path;
  if (options.is_file) {
    auto slash = options.host_path.rfind('/');
    root = slash == 0 ? "/" : options.host_path.substr(0, slash);
    // overlayfs needs a directory as its lower: an overlay single file is
    // served as a directory showing only it; rw and ro ones are the root.
    if (options.mode == protocol::MountMode::kOverlay)
      server.only_entry = options.host_path.substr(slash + 1);
    else
      server.single_file = options.host_path.substr(slash + 1);
  }
  return share::FuseServer::Open(root, std::move(server));
}

Result<std::unique_ptr<FuseShare>> FuseShare::Start(host::AgentClient& agent, uint32_t index,
                                                    std::shared_ptr<share::FuseServer> server) {
  std::unique_ptr<FuseShare> share(new FuseShare());
  share->index_ = index;
  share->server_ = std::move(server);
  share->stream_ = CELLA_TRY_CTX(agent.ServeShare(index), "share " + std::to_string(index));
  share->thread_ = std::thread([s = share.get()] { s->Serve(); });
  return share;
}

FuseShare::~FuseShare() {
  if (thread_.joinable()) thread_.join();
}

void FuseShare::Serve() {
  // One buffer of the largest request; a request arrives in pieces of any
  // size (Data frames), and only whole ones are handled.
  std::vector<std::byte> buf(share::kFuseMaxRequest);
  size_t have = 0;
  for (;;) {
    auto n = stream_->Read(std::span(buf).subspan(have));
    if (!n || *n == 0) {
      log::Debug("share: stream ended",
                 {{"share", index_}, {"error", n ? "eof" : n.error().message}});
      return;
    }
    have += *n;
    while (have >= 4) {
      uint32_t len = 0;
      std::memcpy(&len, buf.data(), sizeof len);
      if (len < 40 || len > share::kFuseMaxRequest) {
        log::Warn("share: the guest sent a FUSE request of a bad length; share no longer served",
                  {{"share", index_}, {"len", len}});
        return;
      }
      if (have < len) break;
      std::vector<std::byte> reply = server_->Handle(std::span(buf).first(len));
      if (!reply.empty()) {
        if (auto st = stream_->Write(reply); !st) {
          log::Debug("share: reply not sent", {{"share", index_}, {"error", st.error().message}});
          return;
        }
      }
      std::memmove(buf.data(), buf.data() + len, have - len);
      have -= len;
    }
  }
}

}  // namespace cella::sandbox
