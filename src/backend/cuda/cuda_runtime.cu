// Device discovery, the stream-ordered memory pool, copies and the shared handles.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/cuda_runtime.h"
#include "moxin/errors.h"

namespace moxin::cuda {

void fail_cuda(cudaError_t status, const char* statement, const char* file, int line) {
  throw_error(ErrorKind::Compute, std::string("CUDA error ") + cudaGetErrorName(status) + " (" +
                                      cudaGetErrorString(status) + ") in `" + statement +
                                      "` at " + file + ":" + std::to_string(line));
}

void fail_cublas(cublasStatus_t status, const char* statement, const char* file, int line) {
  throw_error(ErrorKind::Compute, std::string("cuBLAS error ") + cublasLtGetStatusName(status) +
                                      " (" + cublasLtGetStatusString(status) + ") in `" +
                                      statement + "` at " + file + ":" + std::to_string(line));
}

namespace {

// Why CUDA cannot be used, or "" when it can. Asked once: the answer does not change.
const std::string& unavailability() {
  static const std::string reason = [] {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it so later queries start clean
      return std::string("CUDA is not usable on this machine: ") + cudaGetErrorString(status) +
             " (" + cudaGetErrorName(status) + "); is an NVIDIA driver for CUDA 13 installed?";
    }
    if (count == 0) return std::string("CUDA is not usable on this machine: no CUDA device found");
    return std::string();
  }();
  return reason;
}

// Everything the backend keeps for the life of the process. Owned by one static object whose
// destructor releases the handles in reverse order; failures during process teardown (the
// driver may already be gone) are ignored.
class Runtime {
 public:
  Runtime() {
    require_available();
    MOXIN_CUDA_CHECK(cudaSetDevice(0));
    MOXIN_CUDA_CHECK(cudaGetDeviceProperties(&props_, 0));
    MOXIN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    MOXIN_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool_, 0));
    // Freed blocks stay in the pool: per-op allocations then cost a few hundred nanoseconds.
    uint64_t threshold = UINT64_MAX;
    MOXIN_CUDA_CHECK(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &threshold));
    // A block freed on one stream is reused by another only once its free has completed:
    // never by a wait the pool inserts, which would serialise work run side by side.
    int no = 0;
    MOXIN_CUDA_CHECK(
        cudaMemPoolSetAttribute(pool_, cudaMemPoolReuseAllowInternalDependencies, &no));
    MOXIN_CUBLAS_CHECK(cublasLtCreate(&lt_));
    workspace_bytes_ = size_t(32) << 20;
    MOXIN_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
    other_bytes_ += std::ptrdiff_t(workspace_bytes_);
  }
  ~Runtime() {
    if (side_workspace_) cudaFree(side_workspace_);
    if (fork_) cudaEventDestroy(fork_);
    if (join_) cudaEventDestroy(join_);
    if (side_stream_) cudaStreamDestroy(side_stream_);
    if (workspace_) cudaFree(workspace_);
    if (lt_) cublasLtDestroy(lt_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  cudaStream_t stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;
  cudaDeviceProp props_{};
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::atomic<std::ptrdiff_t> other_bytes_{0};

  // The side stream of run_concurrently, its own cuBLASLt scratch and the fork/join events,
  // made on first use.
  void ensure_side_stream() {
    std::call_once(side_once_, [this] {
      MOXIN_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
      MOXIN_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
      MOXIN_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
      MOXIN_CUDA_CHECK(cudaMalloc(&side_workspace_, workspace_bytes_));
      other_bytes_ += std::ptrdiff_t(workspace_bytes_);
    });
  }
  std::once_flag side_once_;
  cudaStream_t side_stream_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
  void* side_workspace_ = nullptr;
};

Runtime& runtime() {
  static Runtime instance;
  return instance;
}

thread_local CaptureArena* g_arena = nullptr;
// The stream this thread's work goes to: the side stream inside run_concurrently's second
// piece of work, else (null) the main one.
thread_local cudaStream_t g_current_stream = nullptr;
const int* g_position_delta = nullptr;

}  // namespace

bool available() { return unavailability().empty(); }

void require_available() {
  if (!available()) throw_error(ErrorKind::Compute, unavailability());
}

std::string describe() {
  if (!available()) return "CUDA (unavailable: " + unavailability() + ")";
  const cudaDeviceProp& p = runtime().props_;
  char text[256];
  std::snprintf(text, sizeof text, "%s (sm_%d%d, %d SMs, %.1f GiB)", p.name, p.major, p.minor,
                p.multiProcessorCount, double(p.totalGlobalMem) / double(1ull << 30));
  return text;
}

cudaStream_t stream() { return g_current_stream ? g_current_stream : runtime().stream_; }
const cudaDeviceProp& properties() { return runtime().props_; }
bool switched_off(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] == '0';
}
int setting(const char* name, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  return v ? std::clamp(std::atoi(v), lo, hi) : fallback;
}
bool pdl_enabled() {
  static const bool enabled = properties().major >= 9 && !switched_off("MOXIN_CUDA_PDL");
  return enabled;
}
namespace {
std::atomic<bool> g_pdl_in_recordings{false};
}  // namespace

void set_pdl_in_recordings(bool on) { g_pdl_in_recordings = on; }

bool pdl_in_graphs() {
  static const int forced = [] {  // MOXIN_CUDA_PDL_GRAPH=0 or 1 overrides the recorder's choice
    const char* v = std::getenv("MOXIN_CUDA_PDL_GRAPH");
    return v && (v[0] == '0' || v[0] == '1') ? v[0] - '0' : -1;
  }();
  return forced >= 0 ? forced == 1 : g_pdl_in_recordings.load();
}
cublasLtHandle_t cublaslt() { return runtime().lt_; }
void* cublaslt_workspace(size_t* bytes) {
  Runtime& rt = runtime();
  *bytes = rt.workspace_bytes_;
  return g_current_stream ? rt.side_workspace_ : rt.workspace_;  // only ever the side stream
}

void set_capture_arena(CaptureArena* arena) { g_arena = arena; }
bool capturing() { return g_arena != nullptr; }
const int* position_delta() { return g_position_delta; }
void set_position_delta(const int* delta) { g_position_delta = delta; }
void add_other_bytes(std::ptrdiff_t bytes) { runtime().other_bytes_ += bytes; }

std::shared_ptr<void> allocate(size_t bytes) {
  Runtime& rt = runtime();
  const size_t rounded = (bytes + 255) / 256 * 256;
  if (g_arena) {
    // Recording a decode step: fixed addresses from the graph's arena, never freed singly.
    if (g_arena->used + rounded > g_arena->size)
      throw_error(ErrorKind::Compute, "decode graph arena exhausted (" +
                                          std::to_string(g_arena->size) + " bytes)");
    void* p = g_arena->base + g_arena->used;
    g_arena->used += rounded;
    return std::shared_ptr<void>(p, [](void*) {});
  }
  void* p = nullptr;
  const cudaError_t status = cudaMallocAsync(&p, rounded ? rounded : 256, stream());
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw_error(ErrorKind::Compute, "out of GPU memory allocating " + std::to_string(bytes) +
                                        " bytes");
  }
  MOXIN_CUDA_CHECK(status);
  // Stream-ordered free: the block returns to the pool once the work queued before it on the
  // stream current at the free is done (inside run_concurrently, a piece of work frees on its
  // own stream what it dropped; after it, the main stream has waited for both).
  return std::shared_ptr<void>(p, [](void* q) { cudaFreeAsync(q, stream()); });
}

void copy(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes) {
  if (bytes == 0) return;
  MOXIN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream()));
  // Host buffers are pageable and the caller may reuse them at once: finish before returning.
  if (!dst_on_device || !src_on_device) MOXIN_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void fill_zero(void* data, size_t bytes) {
  if (bytes == 0) return;
  MOXIN_CUDA_CHECK(cudaMemsetAsync(data, 0, bytes, stream()));
}

void synchronize() { MOXIN_CUDA_CHECK(cudaStreamSynchronize(stream())); }

void run_concurrently(const std::function<void()>& first, const std::function<void()>& second) {
  // MOXIN_CUDA_SIDE_STREAM=0 runs them in turn (the baseline of the bench notes).
  static const bool enabled = !switched_off("MOXIN_CUDA_SIDE_STREAM");
  if (!enabled || g_current_stream || capturing()) {  // nested, or in a graph recording: in turn
    first();
    second();
    return;
  }
  Runtime& rt = runtime();
  rt.ensure_side_stream();
  MOXIN_CUDA_CHECK(cudaEventRecord(rt.fork_, rt.stream_));
  MOXIN_CUDA_CHECK(cudaStreamWaitEvent(rt.side_stream_, rt.fork_, 0));
  // The main stream waits for the side stream's work however `second` ends, so nothing it
  // enqueued (or freed) can outlive the call unordered.
  struct Join {
    Runtime& rt;
    ~Join() {
      g_current_stream = nullptr;
      if (cudaEventRecord(rt.join_, rt.side_stream_) == cudaSuccess)
        cudaStreamWaitEvent(rt.stream_, rt.join_, 0);
    }
  };
  {
    Join join{rt};
    g_current_stream = rt.side_stream_;
    second();  // enqueued first: its kernels start while `first` is still being enqueued
    g_current_stream = nullptr;
    first();
  }
}

MemoryStats memory_stats() {
  Runtime& rt = runtime();
  MemoryStats s;
  uint64_t value = 0;
  MOXIN_CUDA_CHECK(cudaMemPoolGetAttribute(rt.pool_, cudaMemPoolAttrReservedMemHigh, &value));
  s.pool_reserved_peak = value;
  MOXIN_CUDA_CHECK(cudaMemPoolGetAttribute(rt.pool_, cudaMemPoolAttrUsedMemHigh, &value));
  s.pool_used_peak = value;
  s.other_bytes = size_t(rt.other_bytes_.load());
  // Recorded graphs allocate their intermediates from the device's graph memory pool.
  MOXIN_CUDA_CHECK(cudaDeviceGetGraphMemAttribute(0, cudaGraphMemAttrReservedMemHigh, &value));
  s.other_bytes += size_t(value);
  size_t free_bytes = 0, total = 0;
  MOXIN_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  s.device_used = total - free_bytes;
  s.device_total = total;
  return s;
}

void reset_peak_memory() {
  Runtime& rt = runtime();
  uint64_t zero = 0;
  MOXIN_CUDA_CHECK(cudaMemPoolSetAttribute(rt.pool_, cudaMemPoolAttrReservedMemHigh, &zero));
  MOXIN_CUDA_CHECK(cudaMemPoolSetAttribute(rt.pool_, cudaMemPoolAttrUsedMemHigh, &zero));
  MOXIN_CUDA_CHECK(cudaDeviceSetGraphMemAttribute(0, cudaGraphMemAttrReservedMemHigh, &zero));
}

double measure_copy_bandwidth_gbs(size_t bytes) {
  Runtime& rt = runtime();
  void *a = nullptr, *b = nullptr;
  MOXIN_CUDA_CHECK(cudaMalloc(&a, bytes));
  const cudaError_t status = cudaMalloc(&b, bytes);
  if (status != cudaSuccess) {
    cudaFree(a);
    MOXIN_CUDA_CHECK(status);
  }
  // Not zeros: the pattern is irrelevant to a copy engine, but nothing reads untouched pages.
  MOXIN_CUDA_CHECK(cudaMemsetAsync(a, 0x5a, bytes, rt.stream_));
  cudaEvent_t start, stop;
  MOXIN_CUDA_CHECK(cudaEventCreate(&start));
  MOXIN_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < 13; ++i) {
    MOXIN_CUDA_CHECK(cudaEventRecord(start, rt.stream_));
    MOXIN_CUDA_CHECK(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes,
                                     cudaMemcpyDeviceToDevice, rt.stream_));
    MOXIN_CUDA_CHECK(cudaEventRecord(stop, rt.stream_));
    MOXIN_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MOXIN_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i >= 2) times.push_back(ms);  // the first two warm up
  }
  std::sort(times.begin(), times.end());
  const float median_ms = times[times.size() / 2];
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(bytes) / (double(median_ms) * 1e-3) / 1e9;
}

}  // namespace moxin::cuda
