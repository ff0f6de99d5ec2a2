// Linear layers on the GPU.
//  - Few rows (decode, M <= kGemvMaxRows): our matrix-vector kernels. One warp per output row
//    streams the row's weights with 16-byte loads, exactly once, and keeps the activations in
//    float32; MLX 4- and 8-bit weights are dequantized in registers as they arrive.
//  - Many rows (prefill, vision, projector): cuBLASLt. Activations are rounded to the weight's
//    16-bit type (bf16 or f16) and the products accumulate in float32 (F32 weights: plain FP32).
//    Quantized weights are first expanded to bf16 in pool scratch.
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/cuda_ops.h"
#include "moxin/errors.h"
#include "moxin/quantize.h"

namespace moxin::cuda {

namespace {

constexpr int kGemvMaxRows = 8;
constexpr int kGemvWarps = 8;

template <int M>
__device__ __forceinline__ void warp_reduce(float (&acc)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
}

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

// 8 weights of a 16-byte chunk as f32.
template <class W>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&w)[8]);
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& raw, float (&w)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[2 * i] = __uint_as_float(words[i] << 16);
    w[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& raw, float (&w)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &words[i], 4);
    const float2 f = __half22float2(h);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}

template <class W>
__device__ __forceinline__ float load_weight(const W* w, int64_t i) {
  if constexpr (std::is_same_v<W, float>) {
    return w[i];
  } else if constexpr (std::is_same_v<W, __half>) {
    return __half2float(w[i]);
  } else {
    return bf16_bits_to_f32(reinterpret_cast<const uint16_t*>(w)[i]);
  }
}

// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for 16-bit weights. kVector: K % 8 == 0 and
// 16-byte aligned rows, so each lane reads 8 weights per load; otherwise element by element.
template <int M, class W, bool kVector>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv16_kernel(const float* __restrict__ x, const W* __restrict__ w,
                  const float* __restrict__ bias, float* __restrict__ y, int64_t N, int64_t K) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n >= N) return;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  const W* row = w + n * K;
  if constexpr (kVector) {
    const uint4* row16 = reinterpret_cast<const uint4*>(row);
    const int64_t chunks = K / 8;
#pragma unroll 4
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint4 raw = __ldg(row16 + c);
      float wv[8];
      unpack8<W>(raw, wv);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4* xr = reinterpret_cast<const float4*>(x + m * K) + 2 * c;
        const float4 a = xr[0], b = xr[1];
        acc[m] += a.x * wv[0] + a.y * wv[1] + a.z * wv[2] + a.w * wv[3] + b.x * wv[4] +
                  b.y * wv[5] + b.z * wv[6] + b.w * wv[7];
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wk = load_weight(row, k);
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] += x[m * K + k] * wk;
    }
  }
  warp_reduce<M>(acc);
  if (lane == 0) {
    const float b = bias ? bias[n] : 0.0f;
#pragma unroll
    for (int m = 0; m < M; ++m) y[m * N + n] = acc[m] + b;
  }
}

// Decode products, one block of kGemvThreads per kGemvRowsPerBlock output rows: the threads
// stride over 16-byte chunks of K, each loading the chunk of every row of the block (weights
// streamed with evict-first loads, read exactly once) and the matching activations once for
// all of them, so activation traffic is a fraction of weight traffic. Partial sums are reduced
// across the block at the end.
constexpr int kGemvThreads = 128;
constexpr int kGemvRowsPerBlock = 4;

template <int M, int R>
__device__ __forceinline__ void block_reduce_store(float (&acc)[R][M], int64_t n0, int64_t N,
                                                   const float* bias, float* y) {
  __shared__ float partial[kGemvThreads / 32][R * M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) partial[warp][r * M + m] = v;
    }
  __syncthreads();
  if (threadIdx.x < R * M) {
    const int r = threadIdx.x / M, m = threadIdx.x % M;
    const int64_t n = n0 + r;
    if (n < N) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kGemvThreads / 32; ++w) v += partial[w][threadIdx.x];
      y[m * N + n] = v + (bias ? bias[n] : 0.0f);
    }
  }
}

template <int M, class W>
__global__ void __launch_bounds__(kGemvThreads)
    gemv16_rows_kernel(const float* __restrict__ x, const W* __restrict__ w,
                       const float* __restrict__ bias, float* __restrict__ y, int64_t N,
                       int64_t K) {
  constexpr int R = kGemvRowsPerBlock;
  const int64_t n0 = int64_t(blockIdx.x) * R;
  const int64_t chunks = K / 8;
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
#pragma unroll 2
  for (int64_t c = threadIdx.x; c < chunks; c += kGemvThreads) {
    float wv[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (n0 + r < N) raw = __ldcs(reinterpret_cast<const uint4*>(w + (n0 + r) * K) + c);
      unpack8<W>(raw, wv[r]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float4* xr = reinterpret_cast<const float4*>(x + m * K) + 2 * c;
      const float4 a = xr[0], b = xr[1];
#pragma unroll
      for (int r = 0; r < R; ++r)
        acc[r][m] += a.x * wv[r][0] + a.y * wv[r][1] + a.z * wv[r][2] + a.w * wv[r][3] +
                     b.x * wv[r][4] + b.y * wv[r][5] + b.z * wv[r][6] + b.w * wv[r][7];
    }
  }
  block_reduce_store<M, R>(acc, n0, N, bias, y);
}

// Code j of a packed word as an exact float: the code's bits OR'd under the exponent of 2^23,
// then 2^23 subtracted (cheaper than an integer conversion). The group's affine map is applied
// once per chunk as s * sum(x q) + b * sum(x).
template <int kBits>
__device__ __forceinline__ float quant_code(uint32_t word, int j) {
  uint32_t bits;
  if constexpr (kBits == 8) {
    bits = __byte_perm(word, 0x4b000000u, 0x7440 | j);
  } else {
    bits = ((word >> (kBits * j)) & ((1u << kBits) - 1u)) | 0x4b000000u;
  }
  return __uint_as_float(bits) - 8388608.0f;
}

template <int M, int kBits>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_quant_rows_kernel(const float* __restrict__ x, const uint32_t* __restrict__ packed,
                           const void* __restrict__ scales, const void* __restrict__ biases,
                           DType param_dtype, int group_size, const float* __restrict__ bias,
                           float* __restrict__ y, int64_t N, int64_t K) {
  constexpr int R = kGemvRowsPerBlock;
  constexpr int kPerChunk = 128 / kBits;
  constexpr int kPerWord = 32 / kBits;
  const int64_t n0 = int64_t(blockIdx.x) * R;
  const int64_t chunks = K / kPerChunk, groups = K / group_size;
  const int64_t row_chunks = K * kBits / 128;
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
  for (int64_t c = threadIdx.x; c < chunks; c += kGemvThreads) {
    uint4 raw[R];
    float s[R], b[R];
    const int64_t g = c * kPerChunk / group_size;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r < N ? n0 + r : N - 1;  // rows past N compute and are dropped
      raw[r] = __ldcs(reinterpret_cast<const uint4*>(packed) + n * row_chunks + c);
      s[r] = load_f32(scales, param_dtype, n * groups + g);
      b[r] = load_f32(biases, param_dtype, n * groups + g);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xv[kPerChunk];
      const float4* xr = reinterpret_cast<const float4*>(x + m * K + c * kPerChunk);
      float xs = 0.0f;
#pragma unroll
      for (int v = 0; v < kPerChunk / 4; ++v) {
        const float4 a = xr[v];
        xv[4 * v] = a.x;
        xv[4 * v + 1] = a.y;
        xv[4 * v + 2] = a.z;
        xv[4 * v + 3] = a.w;
        xs += (a.x + a.y) + (a.z + a.w);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t words[4] = {raw[r].x, raw[r].y, raw[r].z, raw[r].w};
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < kPerWord; ++j) dot += xv[i * kPerWord + j] * quant_code<kBits>(words[i], j);
        acc[r][m] += s[r] * dot + b[r] * xs;
      }
    }
  }
  block_reduce_store<M, R>(acc, n0, N, bias, y);
}

// Any supported width: the weight expanded to bf16 [N, K] for cuBLASLt.
__global__ void dequantize_bf16_kernel(const uint8_t* __restrict__ packed,
                                       const void* __restrict__ scales,
                                       const void* __restrict__ biases, DType param_dtype,
                                       int group_size, int bits, int64_t N, int64_t K,
                                       __nv_bfloat16* __restrict__ out) {
  const int64_t row_bytes = K * bits / 8, groups = K / group_size;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * K;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K;
    const uint8_t* row = packed + n * row_bytes;
    const int64_t bit = k * bits, byte = bit >> 3;
    const int shift = int(bit & 7);
    uint32_t window = row[byte];
    if (shift + bits > 8) window |= uint32_t(row[byte + 1]) << 8;
    const uint32_t code = (window >> shift) & ((1u << bits) - 1u);
    const int64_t g = n * groups + k / group_size;
    out[i] = __float2bfloat16(load_f32(scales, param_dtype, g) * float(code) +
                              load_f32(biases, param_dtype, g));
  }
}

template <class T>
__global__ void narrow_kernel(const float* __restrict__ x, int64_t n, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<T, __half>) {
      out[i] = __float2half(x[i]);
    } else {
      out[i] = __float2bfloat16(x[i]);
    }
  }
}

__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, int64_t n,
                                int64_t N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] += bias[i % N];
}

// ------------------------------------------------------------------------------------------
// cuBLASLt: y^T [N, M] = W [N, K] (op T of the column-major K x N view) * x^T [K, M].

struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool fused_bias = false;
};

using PlanKey = std::tuple<int64_t, int64_t, int64_t, int, bool>;

// Plans live for the process: one per shape seen (a model has a few dozen).
GemmPlan* find_plan(int64_t M, int64_t N, int64_t K, cudaDataType type, bool bias) {
  static std::mutex mutex;
  static std::map<PlanKey, GemmPlan> plans;
  std::lock_guard<std::mutex> lock(mutex);
  const PlanKey key{M, N, K, int(type), bias};
  auto it = plans.find(key);
  if (it != plans.end()) return &it->second;

  size_t workspace_bytes = 0;
  cublaslt_workspace(&workspace_bytes);
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  GemmPlan plan;
  for (bool fused : {bias, false}) {
    MOXIN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, compute, CUDA_R_32F));
    const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
    MOXIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                      &transa, sizeof transa));
    MOXIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                      &transb, sizeof transb));
    if (fused) {
      const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      MOXIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                        &epilogue, sizeof epilogue));
      const cudaDataType bias_type = CUDA_R_32F;
      MOXIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
          plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
    }
    MOXIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, type, uint64_t(K), uint64_t(N), K));
    MOXIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, type, uint64_t(K), uint64_t(M), K));
    MOXIN_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, uint64_t(N), uint64_t(M), N));
    cublasLtMatmulPreference_t pref = nullptr;
    MOXIN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    MOXIN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes, sizeof workspace_bytes));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        cublaslt(), plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (status == CUBLAS_STATUS_SUCCESS && found > 0) {
      plan.algo = result.algo;
      plan.fused_bias = fused;
      return &plans.emplace(key, plan).first->second;
    }
    cublasLtMatmulDescDestroy(plan.desc);
    cublasLtMatrixLayoutDestroy(plan.a);
    cublasLtMatrixLayoutDestroy(plan.b);
    cublasLtMatrixLayoutDestroy(plan.c);
    if (!fused) break;
  }
  throw_error(ErrorKind::Compute, "cuBLASLt has no algorithm for a " + std::to_string(M) + "x" +
                                      std::to_string(N) + "x" + std::to_string(K) + " product");
}

// w [N, K] and x [M, K] of `type`, y [M, N] f32.
void gemm(const void* w, const void* x, cudaDataType type, int64_t M, int64_t N, int64_t K,
          const float* bias, float* y) {
  GemmPlan* plan = find_plan(M, N, K, type, bias != nullptr);
  if (plan->fused_bias)
    MOXIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
        plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  size_t workspace_bytes = 0;
  void* workspace = cublaslt_workspace(&workspace_bytes);
  const float alpha = 1.0f, beta = 0.0f;
  MOXIN_CUBLAS_CHECK(cublasLtMatmul(cublaslt(), plan->desc, &alpha, w, plan->a, x, plan->b, &beta,
                                    y, plan->c, y, plan->c, &plan->algo, workspace,
                                    workspace_bytes, stream()));
  if (bias && !plan->fused_bias) {
    add_bias_kernel<<<blocks_for(M * N, 256), 256, 0, stream()>>>(y, bias, M * N, N);
    MOXIN_LAUNCH_CHECK();
  }
}

template <class T>
Tensor narrowed(const Tensor& x, DType dtype) {
  Tensor out = Tensor::empty(x.shape(), dtype, Device::CUDA);
  narrow_kernel<T><<<blocks_for(x.numel(), 256), 256, 0, stream()>>>(
      x.data<float>(), x.numel(), static_cast<T*>(out.raw_mut()));
  MOXIN_LAUNCH_CHECK();
  return out;
}

template <int M>
void launch_gemv16(const float* x, const void* w, DType dtype, const float* bias, float* y,
                   int64_t N, int64_t K) {
  const unsigned blocks = unsigned((N + kGemvWarps - 1) / kGemvWarps);
  const bool vector = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(w) % 16 == 0;
  const int threads = kGemvWarps * 32;
  const unsigned row_blocks = unsigned((N + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock);
  if (vector && dtype == DType::BF16) {
    gemv16_rows_kernel<M, __nv_bfloat16><<<row_blocks, kGemvThreads, 0, stream()>>>(
        x, static_cast<const __nv_bfloat16*>(w), bias, y, N, K);
    MOXIN_LAUNCH_CHECK();
    return;
  }
  if (vector && dtype == DType::F16) {
    gemv16_rows_kernel<M, __half><<<row_blocks, kGemvThreads, 0, stream()>>>(
        x, static_cast<const __half*>(w), bias, y, N, K);
    MOXIN_LAUNCH_CHECK();
    return;
  }
#define MOXIN_GEMV16(W)                                                                       \
  if (vector) {                                                                               \
    gemv16_kernel<M, W, true>                                                                 \
        <<<blocks, threads, 0, stream()>>>(x, static_cast<const W*>(w), bias, y, N, K);       \
  } else {                                                                                    \
    gemv16_kernel<M, W, false>                                                                \
        <<<blocks, threads, 0, stream()>>>(x, static_cast<const W*>(w), bias, y, N, K);       \
  }
  if (dtype == DType::BF16) {
    MOXIN_GEMV16(__nv_bfloat16)
  } else if (dtype == DType::F16) {
    MOXIN_GEMV16(__half)
  } else {
    // F32 weights: element path (rare; test checkpoints only).
    gemv16_kernel<M, float, false>
        <<<blocks, threads, 0, stream()>>>(x, static_cast<const float*>(w), bias, y, N, K);
  }
#undef MOXIN_GEMV16
  MOXIN_LAUNCH_CHECK();
}

template <int M>
void launch_gemv_quant(const float* x, const QuantizedTensor& q, const float* bias, float* y,
                       int64_t N, int64_t K) {
  const unsigned blocks = unsigned((N + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock);
  const auto* packed = q.weight.data<uint32_t>();
  if (q.bits == 4) {
    gemv_quant_rows_kernel<M, 4><<<blocks, kGemvThreads, 0, stream()>>>(
        x, packed, q.scales.raw(), q.biases.raw(), q.scales.dtype(), q.group_size, bias, y, N, K);
  } else {
    gemv_quant_rows_kernel<M, 8><<<blocks, kGemvThreads, 0, stream()>>>(
        x, packed, q.scales.raw(), q.biases.raw(), q.scales.dtype(), q.group_size, bias, y, N, K);
  }
  MOXIN_LAUNCH_CHECK();
}

template <template <int> class F, class... Args>
void dispatch_rows(int64_t M, Args&&... args) {
  switch (M) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    case 4: F<4>::run(args...); break;
    case 5: F<5>::run(args...); break;
    case 6: F<6>::run(args...); break;
    case 7: F<7>::run(args...); break;
    default: F<8>::run(args...); break;
  }
}
template <int M>
struct Gemv16 {
  template <class... A>
  static void run(A&&... a) { launch_gemv16<M>(a...); }
};
template <int M>
struct GemvQuant {
  template <class... A>
  static void run(A&&... a) { launch_gemv_quant<M>(a...); }
};

}  // namespace

Tensor linear(const Tensor& x, const Linear& layer) {
  if (!x.defined() || x.dtype() != DType::F32 || x.device() != Device::CUDA)
    throw_error(ErrorKind::Compute, "linear: activations must be float32 on the GPU");
  const QuantizedTensor* q = layer.quantized.get();
  const int64_t K = q ? q->in_features() : layer.weight.dim(1);
  const int64_t N = q ? q->out_features() : layer.weight.dim(0);
  if (x.ndim() == 0 || x.dim(-1) != K)
    throw_error(ErrorKind::Compute, "linear: input " + shape_to_string(x.shape()) +
                                        " does not end in " + std::to_string(K));
  const Tensor& w = q ? q->weight : layer.weight;
  if (w.device() != Device::CUDA)
    throw_error(ErrorKind::Compute, "linear: weights are not on the GPU (move the model first)");
  const float* bias = nullptr;
  if (layer.bias.defined()) {
    if (layer.bias.device() != Device::CUDA || layer.bias.dtype() != DType::F32 ||
        layer.bias.numel() != N)
      throw_error(ErrorKind::Compute, "linear: bias must be float32 [out] on the GPU");
    bias = layer.bias.data<float>();
  }
  Shape out_shape = x.shape();
  out_shape.back() = N;
  Tensor y = Tensor::empty(out_shape, DType::F32, Device::CUDA);
  const int64_t M = x.numel() / K;
  if (M == 0 || N == 0) return y;
  const float* xp = x.data<float>();
  float* yp = y.data_mut<float>();

  if (q) {
    if (q->scales.device() != Device::CUDA || q->biases.device() != Device::CUDA)
      throw_error(ErrorKind::Compute, "linear: quantization parameters are not on the GPU");
    const bool fast_bits = q->bits == 4 || q->bits == 8;
    if (M <= kGemvMaxRows && fast_bits && reinterpret_cast<uintptr_t>(xp) % 16 == 0) {
      for (int64_t m0 = 0; m0 < M; m0 += kGemvMaxRows) {
        const int64_t rows = std::min<int64_t>(kGemvMaxRows, M - m0);
        dispatch_rows<GemvQuant>(rows, xp + m0 * K, *q, bias, yp + m0 * N, N, K);
      }
      return y;
    }
    if (capturing())
      throw_error(ErrorKind::Compute, "linear: this quantized layer cannot run in a decode graph");
    Tensor dense = Tensor::empty({N, K}, DType::BF16, Device::CUDA);
    dequantize_bf16_kernel<<<blocks_for(N * K, 256), 256, 0, stream()>>>(
        static_cast<const uint8_t*>(q->weight.raw()), q->scales.raw(), q->biases.raw(),
        q->scales.dtype(), q->group_size, q->bits, N, K,
        static_cast<__nv_bfloat16*>(dense.raw_mut()));
    MOXIN_LAUNCH_CHECK();
    const Tensor xb = narrowed<__nv_bfloat16>(x, DType::BF16);
    gemm(dense.raw(), xb.raw(), CUDA_R_16BF, M, N, K, bias, yp);
    return y;
  }

  const DType wt = layer.weight.dtype();
  if (wt != DType::BF16 && wt != DType::F16 && wt != DType::F32)
    throw_error(ErrorKind::Compute, "linear: weights of dtype " + std::string(dtype_name(wt)) +
                                        " are not supported on CUDA");
  if (M <= kGemvMaxRows) {
    dispatch_rows<Gemv16>(M, xp, layer.weight.raw(), wt, bias, yp, N, K);
    return y;
  }
  if (capturing())
    throw_error(ErrorKind::Compute, "linear: a decode graph records one token at a time");
  if (wt == DType::F32) {
    gemm(layer.weight.raw(), xp, CUDA_R_32F, M, N, K, bias, yp);
  } else if (wt == DType::BF16) {
    const Tensor xb = narrowed<__nv_bfloat16>(x, DType::BF16);
    gemm(layer.weight.raw(), xb.raw(), CUDA_R_16BF, M, N, K, bias, yp);
  } else {
    const Tensor xh = narrowed<__half>(x, DType::F16);
    gemm(layer.weight.raw(), xh.raw(), CUDA_R_16F, M, N, K, bias, yp);
  }
  return y;
}

}  // namespace moxin::cuda
