#include "core/device.h"

#include <cstdlib>
#include <cstring>

#include "moxin/errors.h"

#if MOXIN_WITH_CUDA
#include "backend/cuda/cuda_runtime.h"
#endif

namespace moxin::device {

namespace {

// 64-byte alignment keeps every row start SIMD- and cache-line-friendly.
std::shared_ptr<void> allocate_host(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw_error(ErrorKind::Compute, "out of memory allocating " + std::to_string(bytes) + " bytes");
  return std::shared_ptr<void>(p, std::free);
}

#if !MOXIN_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw_error(ErrorKind::Compute, "this build of moxin-vlm has no CUDA support (rebuild with "
                                  "the CUDA toolkit present and -DMOXIN_CUDA=ON)");
}
#endif

}  // namespace

bool available(Device device) {
  if (device == Device::CPU) return true;
#if MOXIN_WITH_CUDA
  return cuda::available();
#else
  return false;
#endif
}

void require(Device device) {
  if (device == Device::CPU) return;
#if MOXIN_WITH_CUDA
  cuda::require_available();
#else
  no_cuda();
#endif
}

std::string describe(Device device) {
  if (device == Device::CPU) return "CPU";
#if MOXIN_WITH_CUDA
  return cuda::describe();
#else
  return "CUDA (not built)";
#endif
}

std::shared_ptr<void> allocate(Device device, size_t bytes) {
  if (device == Device::CPU) return allocate_host(bytes);
#if MOXIN_WITH_CUDA
  return cuda::allocate(bytes);
#else
  no_cuda();
#endif
}

void copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) {
  if (bytes == 0) return;
  if (dst_device == Device::CPU && src_device == Device::CPU) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if MOXIN_WITH_CUDA
  cuda::copy(dst, dst_device == Device::CUDA, src, src_device == Device::CUDA, bytes);
#else
  no_cuda();
#endif
}

void fill_zero(Device device, void* data, size_t bytes) {
  if (bytes == 0) return;
  if (device == Device::CPU) {
    std::memset(data, 0, bytes);
    return;
  }
#if MOXIN_WITH_CUDA
  cuda::fill_zero(data, bytes);
#else
  no_cuda();
#endif
}

Device parse(const std::string& name) {
  if (name == "cpu") return Device::CPU;
  if (name == "cuda") return Device::CUDA;
  throw_error(ErrorKind::Request, "unknown device '" + name + "' (expected cpu or cuda)");
}

}  // namespace moxin::device
