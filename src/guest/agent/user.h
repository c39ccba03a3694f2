// Resolves an exec "user" spec against the /etc/passwd and /etc/group of
// the current root, parsed by hand: the agent is static and runs inside
// arbitrary images, so NSS (getpwnam & co.) is not available.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace cella::agent {

struct Identity {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary groups, primary gid included
  std::string home;           // "/" when the user has no passwd entry
};

// spec: "name", "uid", "uid:gid", "name:group" (either side numeric or a
// name). A numeric uid without a passwd entry is allowed (gid 0, home "/"),
// like docker; an unknown name fails with ENOENT.
Result<Identity> ResolveUser(std::string_view spec, std::string_view passwd_text,
                             std::string_view group_text);
// Same, reading /etc/passwd and /etc/group (missing files read as empty).
Result<Identity> ResolveUser(std::string_view spec);

}  // namespace cella::agent
