// Publishes a guest TCP port on a host address: every connection accepted on
// the host becomes an agent port stream to 127.0.0.1:<guest port> inside the
// guest (host/agent/client.h OpenPort), so it works with any network mode,
// even --no-network.
//
// Threading: one accept thread plus two pump threads per live connection.
// Stop() closes the listener, shuts every connection down and joins all
// threads; the opener must stay valid until then.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "base/result.h"
#include "base/unique_fd.h"
#include "base/wake_fd.h"
#include "host/agent/client.h"

namespace cella::sandbox {

using PortOpener = std::function<Result<std::unique_ptr<host::PortStream>>(uint16_t guest_port)>;

class PortForwarder {
 public:
  // Binds host_ip:host_port (IPv4; host_port 0 picks one, see BoundPort).
  static Result<std::unique_ptr<PortForwarder>> Start(const std::string& host_ip,
                                                      uint16_t host_port, uint16_t guest_port,
                                                      PortOpener opener);
  ~PortForwarder();
  void Stop();
  uint16_t BoundPort() const { return bound_port_; }

 private:
  struct Connection;
  PortForwarder() = default;
  void AcceptLoop();
  void Serve(const std::shared_ptr<Connection>& conn);
  void ReapFinished();

  uint16_t guest_port_ = 0;
  uint16_t bound_port_ = 0;
  PortOpener opener_;
  UniqueFd listen_fd_;
  WakeFd wake_fd_;
  std::thread accept_thread_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::list<std::shared_ptr<Connection>> connections_;
};

// "8080:80", "127.0.0.1:8080:80", "0.0.0.0:8080:80" -> (ip, host, guest).
struct PortMapping {
  std::string host_ip = "127.0.0.1";
  uint16_t host_port = 0;
  uint16_t guest_port = 0;
};
Result<PortMapping> ParsePortMapping(std::string_view text);

}  // namespace cella::sandbox
