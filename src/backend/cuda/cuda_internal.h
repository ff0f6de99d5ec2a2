// Shared by the backend's .cu files: the one stream everything runs on, error checks that name
// the failing statement, the cuBLASLt handle and the decode-graph hooks.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moxin/dtype.h"

namespace moxin::cuda {

[[noreturn]] void fail_cuda(cudaError_t status, const char* statement, const char* file, int line);
[[noreturn]] void fail_cublas(cublasStatus_t status, const char* statement, const char* file,
                              int line);

#define MOXIN_CUDA_CHECK(statement)                                                      \
  do {                                                                                   \
    const cudaError_t moxin_status_ = (statement);                                       \
    if (moxin_status_ != cudaSuccess)                                                    \
      ::moxin::cuda::fail_cuda(moxin_status_, #statement, __FILE__, __LINE__);           \
  } while (0)
#define MOXIN_CUBLAS_CHECK(statement)                                                    \
  do {                                                                                   \
    const cublasStatus_t moxin_status_ = (statement);                                    \
    if (moxin_status_ != CUBLAS_STATUS_SUCCESS)                                          \
      ::moxin::cuda::fail_cublas(moxin_status_, #statement, __FILE__, __LINE__);         \
  } while (0)
// After every launch: a bad configuration surfaces here, at the launch that caused it.
#define MOXIN_LAUNCH_CHECK() MOXIN_CUDA_CHECK(cudaGetLastError())

// The stream every op is ordered on (created with the runtime; non-blocking).
cudaStream_t stream();
const cudaDeviceProp& properties();

cublasLtHandle_t cublaslt();
// Scratch for cuBLASLt, allocated once so that matmuls never allocate (and stay capturable).
void* cublaslt_workspace(size_t* bytes);

// Decode-graph hooks (cuda_graph.cu). While a step is being captured, allocations come from a
// bump arena owned by the graph (fixed addresses, valid on every replay) and position-dependent
// kernels add a device-resident delta to their host position, so one recording serves every
// position.
struct CaptureArena {
  char* base = nullptr;
  size_t size = 0;
  size_t used = 0;
};
void set_capture_arena(CaptureArena* arena);  // nullptr ends arena allocation
bool capturing();
const int* position_delta();  // device int, or nullptr outside a recorded step
void set_position_delta(const int* delta);
void add_other_bytes(std::ptrdiff_t bytes);

inline unsigned blocks_for(int64_t n, int threads, int64_t cap = 65535LL * 8) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return unsigned(b);
}

// Element loads of the float storage types as f32.
__device__ __forceinline__ float load_f32(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::BF16:
      return __uint_as_float(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace moxin::cuda
