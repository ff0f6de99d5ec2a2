// Shared by the backend's .cu files: the one stream everything runs on, error checks that name
// the failing statement, the cuBLASLt handle and the decode-graph hooks.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

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

// Whether the diagnostic switch `name` (an environment variable) is set to 0: the backend's
// optional paths (MOXIN_CUDA_PDL, MOXIN_CUDA_RECORD, ...) are on unless switched off this way.
bool switched_off(const char* name);
// The integer setting `name` (an environment variable) clamped to [lo, hi], or `fallback` unset.
int setting(const char* name, int fallback, int lo, int hi);

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

// Programmatic dependent launch (Hopper and later): a kernel launched with launch_pdl may be
// scheduled while its predecessor in the stream is still running, so its launch and any
// prologue that reads only constant data (a product's weights, prefetched into L2) overlap the
// predecessor's tail. Every such kernel must call pdl_wait() before it reads anything a
// predecessor wrote or writes anything at all; pdl_trigger() lets the next kernel start early.
// On older GPUs both are no-ops and the attribute is not set. MOXIN_CUDA_PDL=0 turns it off.
bool pdl_enabled();
// Whether launches recorded into a decode graph carry the attribute too: the recorder's choice
// (set_pdl_in_recordings; see DecodeGraph::record), or MOXIN_CUDA_PDL_GRAPH=0/1.
bool pdl_in_graphs();
void set_pdl_in_recordings(bool on);

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// cp.async (Ampere and later): global -> shared copies that need no registers while in flight.
__device__ __forceinline__ void copy_async16(void* smem, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                   uint32_t(__cvta_generic_to_shared(smem))),
               "l"(global)
               : "memory");
}
__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

template <class... KernelArgs, class... Args>
void launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream();
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  // In a recorded decode step only where the recorder asks for it: there the overlap measured
  // slower for bf16 (H200: 172.5 vs 177.7 tok/s; H100: 158.5 vs 159.9) and faster for 4/8-bit
  // (H100: 299 vs 276, 184 vs 175), whose products prefetch weights before pdl_wait.
  config.numAttrs = pdl_enabled() && (!capturing() || pdl_in_graphs()) ? 1 : 0;
  MOXIN_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

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
