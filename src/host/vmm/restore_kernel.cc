#include "host/vmm/restore_kernel.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <span>
#include <string>

#include "base/io.h"
#include "base/unique_fd.h"
#include "host/kernel/pvh.h"

namespace cella::vmm {
namespace {

// Linux boot protocol (Documentation/arch/x86/boot.rst): enough of the
// real-mode header for its signature and setup size.
constexpr size_t kHeaderBytes = 0x210;

}  // namespace

Result<bool> WriteRestoreKernel(const std::string& kernel_path, const std::string& out_path) {
  UniqueFd in(::open(kernel_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!in) return FailErrno("open kernel " + kernel_path);
  struct stat st {};
  if (::fstat(in.Get(), &st) != 0) return FailErrno("stat kernel " + kernel_path);
  const auto size = static_cast<size_t>(st.st_size);
  if (!S_ISREG(st.st_mode) || size < kHeaderBytes) return false;
  std::string header(kHeaderBytes, '\0');
  CELLA_TRY_CTX(ReadExact(in.Get(), std::as_writable_bytes(std::span(header))),
                "read kernel header of " + kernel_path);
  // A PVH boot's ELF: the stub names the same entry and loads nothing.
  if (std::memcmp(header.data(),
                  "\x7f"
                  "ELF",
                  4) == 0) {
    auto entry = CELLA_TRY(kernel::PvhEntryPointOfFile(kernel_path));
    if (!entry) return false;
    CELLA_TRY_CTX(WriteStringToFile(out_path, kernel::PvhRestoreStub(*entry), 0600),
                  "write restore kernel");
    return true;
  }
  const std::optional<size_t> setup_bytes =
      kernel::BzImageSetupBytes(std::as_bytes(std::span(header)));
  if (!setup_bytes) return false;
  // A file shorter than its own header claims is no kernel to trim: the
  // caller passes it as it is and QEMU says what it thinks of it.
  const size_t stub_bytes = *setup_bytes + kRestoreKernelPayload;
  if (size < stub_bytes) return false;
  std::string stub(stub_bytes, '\0');
  std::memcpy(stub.data(), header.data(), kHeaderBytes);
  CELLA_TRY_CTX(ReadExact(in.Get(), std::as_writable_bytes(std::span(stub).subspan(kHeaderBytes))),
                "read kernel " + kernel_path);
  CELLA_TRY_CTX(WriteStringToFile(out_path, stub, 0600), "write restore kernel");
  return true;
}

}  // namespace cella::vmm
