// Linear layers on the GPU.
//  - Few rows (decode, M <= kGemvMaxRows): our matrix-vector kernels. One warp per output row
//    streams the row's weights with 16-byte loads, exactly once, and keeps the activations in
//    float32; MLX 4- and 8-bit weights are dequantized in registers as they arrive.
//  - Many rows (prefill, vision, projector): cuBLASLt. Activations are rounded to the weight's
//    16-bit type (bf16 or f16) and the products accumulate in float32 (F32 weights: plain FP32).
//    Quantized weights are first expanded to bf16 in pool scratch.
#include <cstdlib>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <algorithm>
#include <bit>
#include <sstream>
#include <string>
#include <type_traits>
#include <tuple>
#include <vector>

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
                  const float* __restrict__ bias, const float* residual, float* y, int64_t N,
                  int64_t K) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  // Weights are constant: their first bytes may be fetched before the predecessor finishes.
  if (kVector && n < N && lane < K / 8) prefetch_l2(reinterpret_cast<const uint4*>(w + n * K) + lane);
  pdl_wait();
  pdl_trigger();
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
    for (int m = 0; m < M; ++m) y[m * N + n] = acc[m] + b + (residual ? residual[m * N + n] : 0.0f);
  }
}

// Decode products, one block of kGemvThreads per kGemvRowsPerBlock output rows: the threads
// stride over 16-byte chunks of K, each loading the chunk of every row of the block (weights
// streamed with evict-first loads, read exactly once) and the matching activations once for
// all of them, so activation traffic is a fraction of weight traffic. Partial sums are reduced
// across the block at the end.
constexpr int kGemvThreads = 128;
constexpr int kGemvRowsPerBlock = 4;

// y = acc + bias (+ residual, which may alias y: each output is read and written by the same
// thread).
template <int M, int R>
__device__ __forceinline__ void block_reduce_store(float (&acc)[R][M], int64_t n0, int64_t N,
                                                   const float* bias, const float* residual,
                                                   float* y) {
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
  static_assert(R * M <= kGemvThreads, "one thread per output of the block");
  if (threadIdx.x < R * M) {
    const int r = threadIdx.x / M, m = threadIdx.x % M;
    const int64_t n = n0 + r;
    if (n < N) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kGemvThreads / 32; ++w) v += partial[w][threadIdx.x];
      y[m * N + n] = v + (bias ? bias[n] : 0.0f) + (residual ? residual[m * N + n] : 0.0f);
    }
  }
}

template <int M, class W, int R>
__global__ void __launch_bounds__(kGemvThreads)
    gemv16_rows_kernel(const float* __restrict__ x, const W* __restrict__ w,
                       const float* __restrict__ bias, const float* residual, float* y, int64_t N,
                       int64_t K) {
  const int64_t n0 = int64_t(blockIdx.x) * R;
  const int64_t chunks = K / 8;
  // Weights are constant: the first chunk of each row may be fetched before the predecessor
  // kernel finishes (programmatic dependent launch); activations only after pdl_wait.
  if (threadIdx.x < chunks)
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (n0 + r < N) prefetch_l2(reinterpret_cast<const uint4*>(w + (n0 + r) * K) + threadIdx.x);
  pdl_wait();
  pdl_trigger();
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
  block_reduce_store<M, R>(acc, n0, N, bias, residual, y);
}

// Code j of a packed word as an exact float: the code's bits placed under the exponent of 2^23
// by one byte permute, then 2^23 subtracted (cheaper than an integer conversion). For 4-bit
// words the even and odd nibbles are first split into two words of bytes (two instructions
// for eight codes). The group's affine map is applied once per chunk as s * sum(x q) + b * sum(x).
__device__ __forceinline__ float code_from_byte(uint32_t bytes, int j) {
  return __uint_as_float(__byte_perm(bytes, 0x4b000000u, 0x7440 | j)) - 8388608.0f;
}

// dot of the codes of one 16-byte chunk with xv (kPerChunk floats).
template <int kBits>
__device__ __forceinline__ float chunk_dot(const uint4& raw, const float* xv) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  float dot = 0.0f;
  if constexpr (kBits == 8) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dot = fmaf(xv[i * 4 + j], code_from_byte(words[i], j), dot);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = words[i] & 0x0f0f0f0fu, hi = (words[i] >> 4) & 0x0f0f0f0fu;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dot = fmaf(xv[i * 8 + 2 * j], code_from_byte(lo, j), dot);
        dot = fmaf(xv[i * 8 + 2 * j + 1], code_from_byte(hi, j), dot);
      }
    }
  }
  return dot;
}

// R output rows per block of kGemvThreads: each thread loads the 16-byte chunk c of all R rows
// at once (R * 16 bytes in flight per thread), then the chunk's activations once for all of
// them. R is chosen per launch so that narrow products still give every SM a block.
template <int M, int kBits, int R>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_quant_rows_kernel(const float* __restrict__ x, const uint32_t* __restrict__ packed,
                           const void* __restrict__ scales, const void* __restrict__ biases,
                           DType param_dtype, int group_size, const float* __restrict__ bias,
                           const float* residual, float* y, int64_t N, int64_t K) {
  constexpr int kPerChunk = 128 / kBits;
  const int64_t n0 = int64_t(blockIdx.x) * R;
  const int64_t chunks = K / kPerChunk, groups = K / group_size;
  if (threadIdx.x < chunks)
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (n0 + r < N)
        prefetch_l2(reinterpret_cast<const uint4*>(packed) + (n0 + r) * chunks + threadIdx.x);
  pdl_wait();
  pdl_trigger();
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
  // Group sizes are powers of two (32, 64, 128): a chunk's group is a shift away, not a 64-bit
  // division per chunk.
  const int group_shift = __ffs(group_size) - 1;
  for (int64_t c = threadIdx.x; c < chunks; c += kGemvThreads) {
    uint4 raw[R];
    const int64_t g = (c * kPerChunk) >> group_shift;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r < N ? n0 + r : N - 1;  // rows past N compute and are dropped
      raw[r] = __ldcs(reinterpret_cast<const uint4*>(packed) + n * chunks + c);
    }
    float s[R], b[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r < N ? n0 + r : N - 1;
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
      for (int r = 0; r < R; ++r) acc[r][m] += s[r] * chunk_dot<kBits>(raw[r], xv) + b[r] * xs;
    }
  }
  block_reduce_store<M, R>(acc, n0, N, bias, residual, y);
}

// Expansion of 4- and 8-bit codes: one thread per eight weights (one word of 4-bit codes, two
// of 8-bit), which lie in one group, stored as one 16-byte bf16 chunk, so that a warp writes
// 512 contiguous bytes; indices in 32 bits. (A 64-bit division per word, and 8-byte stores at
// 8 bits, kept the previous version well short of the copy rate; so did 32 weights per thread,
// whose strided stores tied up the L1: bench/GPU_NOTES.md run 16.) Each weight is s q + b by
// one float FMA, then rounded to bf16.
template <int kBits>
__global__ void dequantize_eights_bf16_kernel(const void* __restrict__ packed,
                                              const void* __restrict__ scales,
                                              const void* __restrict__ biases, DType param_dtype,
                                              int group_shift, uint32_t eights_per_row,
                                              uint32_t groups_per_row, uint32_t total,
                                              __nv_bfloat16* __restrict__ out) {
  using Codes = std::conditional_t<kBits == 4, uint32_t, uint2>;
  for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += gridDim.x * blockDim.x) {
    const uint32_t n = e / eights_per_row, k0 = (e - n * eights_per_row) * 8;
    const uint32_t g = n * groups_per_row + (k0 >> group_shift);
    const float s = load_f32(scales, param_dtype, g), b = load_f32(biases, param_dtype, g);
    const Codes raw = __ldcs(static_cast<const Codes*>(packed) + e);
    float q[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (kBits == 4) {
        // Even codes in the low nibbles, odd in the high ones, as chunk_dot splits them.
        q[2 * j] = code_from_byte(raw & 0x0f0f0f0fu, j);
        q[2 * j + 1] = code_from_byte((raw >> 4) & 0x0f0f0f0fu, j);
      } else {
        q[j] = code_from_byte(raw.x, j);
        q[4 + j] = code_from_byte(raw.y, j);
      }
    }
    uint32_t pairs[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 v =
          __floats2bfloat162_rn(fmaf(s, q[2 * i], b), fmaf(s, q[2 * i + 1], b));
      pairs[i] = *reinterpret_cast<const uint32_t*>(&v);
    }
    reinterpret_cast<uint4*>(out)[e] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  }
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

// One product's form: `batch` products share x and write consecutive [M, N] outputs, their
// weights consecutive [N, K] matrices (layers placed side by side at load).
struct GemmShape {
  int64_t M, N, K;
  cudaDataType type, out_type;
  bool bias;
  int batch;
  auto key() const { return std::make_tuple(M, N, K, int(type), int(out_type), bias, batch); }
};

// Plans live for the process: one per shape seen (a model has a few dozen). cuBLASLt's first
// pick is kept: timing its next seven picks per shape and keeping the fastest (H100, every
// prefill and tower shape) changed neither the prefill nor the vision time measurably.
GemmPlan* find_plan(const GemmShape& s) {
  static std::mutex mutex;
  static std::map<decltype(s.key()), GemmPlan> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(s.key());
  if (it != plans.end()) return &it->second;

  size_t workspace_bytes = 0;
  cublaslt_workspace(&workspace_bytes);
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  GemmPlan plan;
  for (bool fused : {s.bias, false}) {
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
    MOXIN_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&plan.a, s.type, uint64_t(s.K), uint64_t(s.N), s.K));
    MOXIN_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&plan.b, s.type, uint64_t(s.K), uint64_t(s.M), s.K));
    MOXIN_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&plan.c, s.out_type, uint64_t(s.N), uint64_t(s.M), s.N));
    if (s.batch > 1) {
      const int32_t count = s.batch;
      const int64_t strides[3] = {s.N * s.K, 0, s.M * s.N};  // weights, shared x, outputs
      const cublasLtMatrixLayout_t layouts[3] = {plan.a, plan.b, plan.c};
      for (int i = 0; i < 3; ++i) {
        MOXIN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
            layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
        MOXIN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
            layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i],
            sizeof strides[i]));
      }
    }
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
      return &plans.emplace(s.key(), plan).first->second;
    }
    cublasLtMatmulDescDestroy(plan.desc);
    cublasLtMatrixLayoutDestroy(plan.a);
    cublasLtMatrixLayoutDestroy(plan.b);
    cublasLtMatrixLayoutDestroy(plan.c);
    if (!fused) break;
  }
  throw_error(ErrorKind::Compute, "cuBLASLt has no algorithm for a " + std::to_string(s.M) + "x" +
                                      std::to_string(s.N) + "x" + std::to_string(s.K) +
                                      " product");
}

// w [batch, N, K] and x [M, K] of `type`, y [batch, M, N] of `out_type` (f32, or bf16 for
// products whose outputs only feed an element-wise kernel, which then reads half the bytes):
// y = x W^T + bias, or y += x W^T + bias when `accumulate` (cuBLASLt reads y as C with beta =
// 1: no temporary, no separate add). The unfused bias fallback is float32 and batch 1 only.
void gemm(const void* w, const void* x, cudaDataType type, int64_t M, int64_t N, int64_t K,
          const float* bias, void* y, bool accumulate = false,
          cudaDataType out_type = CUDA_R_32F, int batch = 1) {
  const GemmShape shape{M, N, K, type, out_type, bias != nullptr, batch};
  GemmPlan* plan = find_plan(shape);
  if (bias && !plan->fused_bias && (out_type != CUDA_R_32F || batch > 1))
    throw_error(ErrorKind::Compute, "cuBLASLt cannot add this bias to this product");
  if (plan->fused_bias)
    MOXIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
        plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  size_t workspace_bytes = 0;
  void* workspace = cublaslt_workspace(&workspace_bytes);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  MOXIN_CUBLAS_CHECK(cublasLtMatmul(cublaslt(), plan->desc, &alpha, w, plan->a, x, plan->b, &beta,
                                    y, plan->c, y, plan->c, &plan->algo, workspace,
                                    workspace_bytes, stream()));
  if (bias && !plan->fused_bias) {
    add_bias_kernel<<<blocks_for(M * N, 256), 256, 0, stream()>>>(static_cast<float*>(y), bias,
                                                                  M * N, N);
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

// ------------------------------------------------------------------------------------------
// Decode-product variants are picked per shape by timing them once (single-row products only,
// outside a graph recording): which layout streams fastest depends on N, K and the card, and a
// few microseconds of one-time measurement beat a guess. Every variant computes the same
// function (only the summation order differs). MOXIN_CUDA_TUNE_LOG=1 prints the choices.

using TuneKey = std::tuple<int64_t, int64_t, int>;  // N, K, weight kind

std::atomic<int> forced_variant{-1};

// Calls take(item) for each item of the environment variable `name`, a list separated by ','
// or ';' (for scripts that split their own lists on commas); warns of items it refuses.
template <class Take>
void for_each_env_item(const char* name, const Take& take) {
  const char* v = std::getenv(name);
  if (!v) return;
  std::string items = v;
  std::replace(items.begin(), items.end(), ';', ',');
  std::istringstream spec(items);
  for (std::string item; std::getline(spec, item, ',');)
    if (!take(item)) std::fprintf(stderr, "moxin: %s: ignored '%s'\n", name, item.c_str());
}

// MOXIN_CUDA_GEMV_VARIANTS="N:K:kind=v,...": the variant of those shapes, untimed (keys as the
// tune log prints them), to compare variants inside a decode step: the tuner times each
// product alone, back to back, where the smaller ones' weights stay in L2.
const std::map<TuneKey, int>& pinned_variants() {
  static const std::map<TuneKey, int> pinned = [] {
    std::map<TuneKey, int> out;
    for_each_env_item("MOXIN_CUDA_GEMV_VARIANTS", [&](const std::string& item) {
      long long n = 0, k = 0;
      int kind = 0, variant = 0;
      if (std::sscanf(item.c_str(), "%lld:%lld:%d=%d", &n, &k, &kind, &variant) != 4) return false;
      out[TuneKey{n, k, kind}] = variant;
      return true;
    });
    return out;
  }();
  return pinned;
}

// How much faster than the pick so far a later variant must time to replace it (below).
constexpr float kTuneMargin = 0.97f;

// `untimed` >= 0: that variant without timing (unless a test forces or the environment pins
// another), for products whose best pick the timing alone cannot see.
template <class Launch>
int tuned_variant(const TuneKey& key, int variants, const Launch& launch, int untimed = -1) {
  const int forced = forced_variant.load(std::memory_order_relaxed);
  if (forced >= 0) return std::min(forced, variants - 1);
  if (auto it = pinned_variants().find(key); it != pinned_variants().end())
    return std::clamp(it->second, 0, variants - 1);
  if (untimed >= 0) return std::min(untimed, variants - 1);
  static std::mutex mutex;
  static std::map<TuneKey, int> chosen;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = chosen.find(key);
    if (it != chosen.end()) return it->second;
  }
  if (capturing() || variants == 1) return 0;
  cudaEvent_t begin, end;
  MOXIN_CUDA_CHECK(cudaEventCreate(&begin));
  MOXIN_CUDA_CHECK(cudaEventCreate(&end));
  int best = 0;
  float best_ms = 0;
  std::string log;
  for (int v = 0; v < variants; ++v) {
    launch(v);  // warm-up
    float ms = 1e30f;
    for (int rep = 0; rep < 3; ++rep) {
      MOXIN_CUDA_CHECK(cudaEventRecord(begin, stream()));
      for (int i = 0; i < 4; ++i) launch(v);
      MOXIN_CUDA_CHECK(cudaEventRecord(end, stream()));
      MOXIN_CUDA_CHECK(cudaEventSynchronize(end));
      float t = 0;
      MOXIN_CUDA_CHECK(cudaEventElapsedTime(&t, begin, end));
      ms = std::min(ms, t / 4);
    }
    log += " v" + std::to_string(v) + "=" + std::to_string(int(ms * 1000.0f)) + "us";
    // A later variant replaces the pick only when clearly faster: timings of a few
    // microseconds tie within noise, and a tie broken by noise moved q/k/v at 4 bits from the
    // first variant to the second between runs (9 against 9 us alone; 444 against 453 tok/s in
    // the decode graph, bench/GPU_NOTES.md run 12). The first variant is each kind's usual best.
    if (v == 0 || ms < best_ms * kTuneMargin) {
      best = v;
      best_ms = ms;
    }
  }
  cudaEventDestroy(begin);
  cudaEventDestroy(end);
  static const bool print = std::getenv("MOXIN_CUDA_TUNE_LOG") != nullptr;
  if (print)
    std::fprintf(stderr, "moxin gemv tune N=%lld K=%lld kind=%d:%s -> v%d\n",
                 (long long)std::get<0>(key), (long long)std::get<1>(key), std::get<2>(key),
                 log.c_str(), best);
  std::lock_guard<std::mutex> lock(mutex);
  chosen[key] = best;
  return best;
}

template <int M, class W, int R>
void launch_gemv16_rows(const float* x, const W* w, const float* bias, const float* residual,
                        float* y, int64_t N, int64_t K) {
  launch_pdl(gemv16_rows_kernel<M, W, R>, unsigned((N + R - 1) / R), kGemvThreads, 0, x, w, bias,
             residual, y, N, K);
}

template <int M, class W>
void launch_gemv16_warp(const float* x, const W* w, const float* bias, const float* residual,
                        float* y, int64_t N, int64_t K) {
  launch_pdl(gemv16_kernel<M, W, true>, unsigned((N + kGemvWarps - 1) / kGemvWarps),
             kGemvWarps * 32, 0, x, w, bias, residual, y, N, K);
}

// Runs variant v of a product that writes y (+ residual): tuning times each variant into a
// scratch output without the residual, so timing never adds into the real y twice.
template <class Run>
void run_tuned(const TuneKey& key, int variants, int64_t outputs, const float* residual, float* y,
               const Run& run, int untimed = -1) {
  Tensor scratch;
  const int v = tuned_variant(key, variants, [&](int candidate) {
    if (residual && !scratch.defined())
      scratch = Tensor::empty({outputs}, DType::F32, Device::CUDA);
    run(candidate, nullptr, residual ? scratch.data_mut<float>() : y);
  }, untimed);
  run(v, residual, y);
}

template <int M, class W>
void launch_gemv16_vector(const float* x, const W* w, const float* bias, const float* residual,
                          float* y, int64_t N, int64_t K, int kind) {
  if constexpr (M == 1) {
    run_tuned(TuneKey{N, K, kind}, 4, N, residual, y, [&](int v, const float* res, float* out) {
      switch (v) {
        case 0: launch_gemv16_rows<M, W, 4>(x, w, bias, res, out, N, K); break;
        case 1: launch_gemv16_rows<M, W, 8>(x, w, bias, res, out, N, K); break;
        case 2: launch_gemv16_rows<M, W, 2>(x, w, bias, res, out, N, K); break;
        default: launch_gemv16_warp<M, W>(x, w, bias, res, out, N, K); break;
      }
    });
  } else {
    launch_gemv16_rows<M, W, kGemvRowsPerBlock>(x, w, bias, residual, y, N, K);
  }
}

template <int M>
void launch_gemv16(const float* x, const void* w, DType dtype, const float* bias,
                   const float* residual, float* y, int64_t N, int64_t K) {
  const unsigned blocks = unsigned((N + kGemvWarps - 1) / kGemvWarps);
  const bool vector = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(w) % 16 == 0;
  const int threads = kGemvWarps * 32;
  if (vector && dtype == DType::BF16) {
    launch_gemv16_vector<M, __nv_bfloat16>(x, static_cast<const __nv_bfloat16*>(w), bias,
                                           residual, y, N, K, 16);
    return;
  }
  if (vector && dtype == DType::F16) {
    launch_gemv16_vector<M, __half>(x, static_cast<const __half*>(w), bias, residual, y, N, K, 17);
    return;
  }
#define MOXIN_GEMV16(W)                                                                       \
  if (vector) {                                                                               \
    gemv16_kernel<M, W, true><<<blocks, threads, 0, stream()>>>(                              \
        x, static_cast<const W*>(w), bias, residual, y, N, K);                                \
  } else {                                                                                    \
    gemv16_kernel<M, W, false><<<blocks, threads, 0, stream()>>>(                             \
        x, static_cast<const W*>(w), bias, residual, y, N, K);                                \
  }
  if (dtype == DType::BF16) {
    MOXIN_GEMV16(__nv_bfloat16)
  } else if (dtype == DType::F16) {
    MOXIN_GEMV16(__half)
  } else {
    // F32 weights: element path (rare; test checkpoints only).
    gemv16_kernel<M, float, false><<<blocks, threads, 0, stream()>>>(
        x, static_cast<const float*>(w), bias, residual, y, N, K);
  }
#undef MOXIN_GEMV16
  MOXIN_LAUNCH_CHECK();
}

template <int M, int kBits, int R>
void launch_gemv_quant_r(const float* x, const QuantizedTensor& q, const float* bias,
                         const float* residual, float* y, int64_t N, int64_t K) {
  const unsigned blocks = unsigned((N + R - 1) / R);
  launch_pdl(gemv_quant_rows_kernel<M, kBits, R>, blocks, kGemvThreads, 0, x,
             q.weight.data<uint32_t>(), q.scales.raw(), q.biases.raw(), q.scales.dtype(),
             q.group_size, bias, residual, y, N, K);
}

// Rows per block: more rows share each activation load and put more weight bytes in flight
// per thread, fewer rows give narrow products a block on every SM. These float kernels serve
// several rows of x, and single rows whose activations do not fit the fixed-point kernel's
// shared memory (those time the choices once per shape). Several rows keep R small so
// registers stay bounded.
template <int M, int kBits>
void launch_gemv_quant_bits(const float* x, const QuantizedTensor& q, const float* bias,
                            const float* residual, float* y, int64_t N, int64_t K) {
  if constexpr (M == 1) {
    run_tuned(TuneKey{N, K, kBits * 100 + q.group_size}, 4, N, residual, y,
              [&](int v, const float* res, float* out) {
                switch (v) {
                  case 0: launch_gemv_quant_r<M, kBits, 4>(x, q, bias, res, out, N, K); break;
                  case 1: launch_gemv_quant_r<M, kBits, 8>(x, q, bias, res, out, N, K); break;
                  case 2: launch_gemv_quant_r<M, kBits, 16>(x, q, bias, res, out, N, K); break;
                  default: launch_gemv_quant_r<M, kBits, 2>(x, q, bias, res, out, N, K); break;
                }
              });
  } else {
    launch_gemv_quant_r<M, kBits, kGemvRowsPerBlock>(x, q, bias, residual, y, N, K);
  }
}

template <int M>
void launch_gemv_quant(const float* x, const QuantizedTensor& q, const float* bias,
                       const float* residual, float* y, int64_t N, int64_t K) {
  if (q.bits == 4) {
    launch_gemv_quant_bits<M, 4>(x, q, bias, residual, y, N, K);
  } else {
    launch_gemv_quant_bits<M, 8>(x, q, bias, residual, y, N, K);
  }
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

// ------------------------------------------------------------------------------------------
// Single-row products that share their input, in one launch (decode): q/k/v as up to three
// segments of one grid (each block takes R rows of one segment), and the SwiGLU input half as
// gate and up rows side by side in each block, which then writes silu(gate) * up directly.
// Same per-row arithmetic as the kernels above; the point is fewer, wider launches.

struct GemvSegment {
  const void* w = nullptr;       // 16-bit weights [N, K], or packed codes
  const void* scales = nullptr;  // quantized only
  const void* biases = nullptr;
  const float* bias = nullptr;   // [N] or null
  float* y = nullptr;            // [N]
  const float* residual = nullptr;  // added to y (may alias it); fixed-point kernel only
  int64_t N = 0;
  int64_t first_block = 0;
};
struct GemvSegments {
  GemvSegment seg[3];
  int count = 0;
  int64_t units = 0;  // groups of rows_per_block rows over all segments (gate/up: one segment's)
  DType param_dtype = DType::BF16;
  int group_size = 64;
};

__device__ __forceinline__ int segment_of(const GemvSegments& s) {
  int i = 0;
  if (s.count > 1 && blockIdx.x >= s.seg[1].first_block) i = 1;
  if (s.count > 2 && blockIdx.x >= s.seg[2].first_block) i = 2;
  return i;
}

// Sum acc[RT] over the block; thread t < RT gets total t in `out` (shared).
template <int RT>
__device__ __forceinline__ void block_reduce_rows(float (&acc)[RT], float* out) {
  __shared__ float partial[kGemvThreads / 32][RT];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    float v = acc[r];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < RT) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kGemvThreads / 32; ++w) v += partial[w][threadIdx.x];
    out[threadIdx.x] = v;
  }
  __syncthreads();
}

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// kBits 0: 16-bit weights W; 4 / 8: MLX codes. kGated: segments 0 (gate) and 1 (up) share the
// block, R rows each, and segment 0's y receives silu(gate) * up.
// norm_weight (optional): the products take rms_norm(x) * norm_weight instead of x. Every block
// reads all of x anyway, so it also sums x^2 on the way and scales its dot products by
// 1 / sqrt(mean(x^2) + eps) at the end (the norm is linear in x once that factor is known):
// no separate normalisation kernel and no normalised copy of x.
template <class W, int kBits, int R, bool kGated>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_multi_kernel(const float* __restrict__ x, GemvSegments segs, int64_t K,
                      const float* __restrict__ norm_weight, float norm_eps) {
  constexpr int RT = kGated ? 2 * R : R;
  constexpr int kPerChunk = kBits ? 128 / kBits : 8;
  const int si = kGated ? 0 : segment_of(segs);
  const GemvSegment& s0 = segs.seg[si];
  const GemvSegment& s1 = segs.seg[kGated ? 1 : si];
  const int64_t N = s0.N;
  const int64_t n0 = (int64_t(blockIdx.x) - s0.first_block) * R;
  const int64_t chunks = K / kPerChunk, groups = kBits ? K / segs.group_size : 1;
  const int group_shift = kBits ? __ffs(segs.group_size) - 1 : 0;  // sizes are powers of two
  int64_t row[RT];
  const void* base[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int rr = r % R;
    row[r] = n0 + rr < N ? n0 + rr : N - 1;  // rows past N compute and are dropped
    base[r] = (kGated && r >= R) ? s1.w : s0.w;
  }
  if (threadIdx.x < chunks)
#pragma unroll
    for (int r = 0; r < RT; ++r)
      prefetch_l2(static_cast<const uint4*>(base[r]) + row[r] * chunks + threadIdx.x);
  pdl_wait();
  pdl_trigger();
  float acc[RT + 1];  // the last slot: sum of x^2 for the norm
#pragma unroll
  for (int r = 0; r <= RT; ++r) acc[r] = 0.0f;
  for (int64_t c = threadIdx.x; c < chunks; c += kGemvThreads) {
    uint4 raw[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r)
      raw[r] = __ldcs(static_cast<const uint4*>(base[r]) + row[r] * chunks + c);
    float xv[kPerChunk];
    const float4* xr = reinterpret_cast<const float4*>(x + c * kPerChunk);
    float xs = 0.0f;
#pragma unroll
    for (int v = 0; v < kPerChunk / 4; ++v) {
      float4 a = xr[v];
      if (norm_weight) {
        acc[RT] += (a.x * a.x + a.y * a.y) + (a.z * a.z + a.w * a.w);
        const float4 g = reinterpret_cast<const float4*>(norm_weight + c * kPerChunk)[v];
        a = make_float4(a.x * g.x, a.y * g.y, a.z * g.z, a.w * g.w);
      }
      xv[4 * v] = a.x;
      xv[4 * v + 1] = a.y;
      xv[4 * v + 2] = a.z;
      xv[4 * v + 3] = a.w;
      if constexpr (kBits != 0) xs += (a.x + a.y) + (a.z + a.w);
    }
    if constexpr (kBits == 0) {
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        float wv[8];
        unpack8<W>(raw[r], wv);
        acc[r] += xv[0] * wv[0] + xv[1] * wv[1] + xv[2] * wv[2] + xv[3] * wv[3] +
                  xv[4] * wv[4] + xv[5] * wv[5] + xv[6] * wv[6] + xv[7] * wv[7];
      }
    } else {
      const int64_t g = (c * kPerChunk) >> group_shift;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const GemvSegment& sr = (kGated && r >= R) ? s1 : s0;
        const float sc = load_f32(sr.scales, segs.param_dtype, row[r] * groups + g);
        const float bi = load_f32(sr.biases, segs.param_dtype, row[r] * groups + g);
        acc[r] += sc * chunk_dot<kBits>(raw[r], xv) + bi * xs;
      }
    }
  }
  __shared__ float total[RT + 1];
  block_reduce_rows<RT + 1>(acc, total);
  if (threadIdx.x < R) {
    const int64_t n = n0 + threadIdx.x;
    if (n < N) {
      const float scale = norm_weight ? 1.0f / sqrtf(total[RT] / float(K) + norm_eps) : 1.0f;
      const float a = total[threadIdx.x] * scale + (s0.bias ? s0.bias[n] : 0.0f);
      if constexpr (kGated) {
        s0.y[n] =
            silu_times(a, total[R + threadIdx.x] * scale + (s1.bias ? s1.bias[n] : 0.0f));
      } else {
        s0.y[n] = a;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Single-row 4/8-bit products in integer arithmetic (decode at batch 1).
//
// Dequantizing in float costs about three instructions per weight (byte permute, subtract,
// FMA), which the float kernels above pay on every weight. Here each block first converts x
// (times the norm weight, when a norm is folded in) to 16-bit fixed point per 16-byte chunk of
// codes (32 activations at 4 bits, 16 at 8; the CPU VNNI kernels use one step per weight
// group, which is coarser): dx = max|x_c| / 32767, xq = round(x / dx). The codes then multiply
// as integers with dp4a (four 8 x 8-bit products and an add in one instruction; xq is
// 256 hi + lo, two byte planes, so each code meets two dp4a):
//     sum_k (s q_k + b) x_k  =  s dx sum_k q_k xq_k + b sum_k x_k + error,
// the integer sums exact and |x_k - dx xq_k| <= dx / 2, so each output is within
// 2^-16 sum_c max|x_c| sum_k |s q_k| of the float product (checked by the tests). A 4-bit word
// splits into its even and odd nibbles with two masks: 8 weights in 6 instructions.
// A chunk holding inf or NaN makes the outputs NaN.
//
// Shared memory: {dx, sum of x} per chunk, then the fixed-point activations,
// word-major within 16-byte chunks of codes ((word j of chunk c) at j * chunks + c) so that the
// lanes of a warp, which read consecutive chunks, never hit the same bank; then a staging ring
// per warp. After the conversion each warp takes R rows at a time (R gate and R up rows when
// gated), its lanes striding over the rows' chunks, kUnroll chunks per row and step. Codes and
// their scale/bias words travel by cp.async into the warp's ring, kStages - 1 steps ahead
// of the one being computed: the loads in flight hold no registers, so they neither limit
// occupancy nor wait for a register copy (Nsight Compute on the register-pipelined version:
// 16 warps per SM stalled on L1TEX, 20-31% of DRAM bandwidth). The bytes in flight per SM set
// the pace (half the ring measured 20% slower: bench/GPU_NOTES.md), so products whose
// activations leave room take deeper rings.
constexpr int kFixedWarps = 16;
constexpr int kFixedStages = 3;  // steps per warp in flight or being computed, at least
// Deeper rings where shared memory allows: 4 steps for every variant, 6 or 8 for those of two
// chunks per lane and step (their steps are half as large).
constexpr int kFixedMaxStages = 8;

// Shared memory in 16-byte words: per chunk {dx, sum x} and the fixed-point activations; then
// per warp a staging ring of `stages` steps, each `slots` chunks of codes per lane, then the
// scales and the biases of each of the step's rows.
__host__ __device__ inline int64_t fixed_activation_words(int64_t K, int bits) {
  return (K * bits / 128 * 8 + 15) / 16 + K * 2 / 16;
}
// Bytes of one row's scales (or biases) for one step: the groups of its 32 x unroll chunks
// (steps start on group bounds), copied from the 16-byte word holding the first one.
__host__ __device__ inline int fixed_param_row_bytes(int bits, int unroll, int group_size,
                                                     int param_bytes) {
  const int groups = 32 * unroll * (128 / bits) / group_size;
  return (groups * param_bytes + 30) / 16 * 16;
}
// One step of one warp's ring: `rows` rows of `unroll` chunks per lane.
__host__ __device__ inline int fixed_stage_bytes(int bits, int rows, int unroll, int group_size,
                                                 int param_bytes) {
  return rows * unroll * 32 * 16 + rows * 2 * fixed_param_row_bytes(bits, unroll, group_size,
                                                                    param_bytes);
}
size_t fixed_smem_bytes(int64_t K, int bits, int stage_bytes, int stages) {
  return size_t(fixed_activation_words(K, bits)) * 16 +
         size_t(kFixedWarps) * size_t(stages) * size_t(stage_bytes);
}

// Whether `bytes` of dynamic shared memory fit one fixed-point block (1 KB: the kernel's
// static share).
bool fixed_smem_fits(size_t bytes) {
  return bytes + 1024 <= size_t(properties().sharedMemPerBlockOptin);
}

// Whether the fixed-point kernel takes this product: 4/8-bit, MLX group sizes, an even number
// of groups per row (the shapes its GPU tests cover), parameter tensors 16-byte aligned (they
// travel in 16-byte copies), and every variant's shallowest ring in one block's shared memory.
bool fixed_point_fits(int bits, int group_size, int64_t K, DType param_dtype, const void* scales,
                      const void* biases) {
  if (!(bits == 4 || bits == 8) || !(group_size == 32 || group_size == 64 || group_size == 128) ||
      K % group_size != 0 || (K / group_size) % 2 != 0 ||
      reinterpret_cast<uintptr_t>(scales) % 16 != 0 || reinterpret_cast<uintptr_t>(biases) % 16 != 0)
    return false;
  const int param_bytes = param_dtype == DType::F32 ? 4 : 2;
  int widest = 0;  // {rows per step, unroll} of launch_fixed_variant's shapes, gated or not
  for (const auto& [rows, unroll] : {std::pair{2, 2}, {1, 4}, {4, 1}, {1, 2}, {3, 2}, {2, 1}})
    widest = std::max(widest, fixed_stage_bytes(bits, rows, unroll, group_size, param_bytes));
  return fixed_smem_fits(fixed_smem_bytes(K, bits, widest, kFixedStages));
}

// acc + the dot of four signed (hi) or unsigned (lo) activation bytes with four code bytes.
__device__ __forceinline__ int dp4a_hi(uint32_t x_bytes, uint32_t codes, int acc) {
  int d;
  asm("dp4a.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x_bytes), "r"(codes), "r"(acc));
  return d;
}
__device__ __forceinline__ int dp4a_lo(uint32_t x_bytes, uint32_t codes, int acc) {
  int d;
  asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x_bytes), "r"(codes), "r"(acc));
  return d;
}

// One word of fixed-point activations per word of codes, as byte planes (xq = 256 hi + lo, hi
// signed, lo unsigned). 4-bit: {hi of the even codes 0 2 4 6, hi of the odd 1 3 5 7, lo even,
// lo odd}, the order the nibble split produces; 8-bit: {hi of codes 0-3, lo of codes 0-3}.
template <int kBits>
using FixedWord = std::conditional_t<kBits == 4, uint4, uint2>;

// Adding 1.5 * 2^23 to v, |v| < 2^22, in one FMA leaves round-to-nearest-even(v) in the 16 low
// bits of the sum's pattern (the integer step is the sum's last place): the conversion
// instruction it replaces runs at a quarter of the FMA rate.
constexpr float kRoundingShift = 12582912.0f;

// Writes x (times norm_weight) in fixed point; returns this thread's share of sum x^2.
// after_first_loads() runs once, when the loads of the first pass are issued and before any
// of them is used.
template <int kBits, class AfterFirstLoads>
__device__ __forceinline__ float convert_activations(const float* __restrict__ x,
                                                     const float* __restrict__ norm_weight,
                                                     int64_t K, float2* chunk_params,
                                                     FixedWord<kBits>* xq,
                                                     const AfterFirstLoads& after_first_loads) {
  constexpr int kPerWord = 32 / kBits;
  const int words = int(K / kPerWord), chunks = words / 4;
  const int threads = int(blockDim.x), thread = int(threadIdx.x);
  // Each thread's words of one pass are loaded before any is converted: converting each word
  // as it arrived cost a round trip to L2 per word after the wait, which down_proj's K (3.5
  // words per thread at 4 bits, 7 at 8 bits) paid in turn.
  constexpr int kVecs = kPerWord / 4;           // float4 per word
  constexpr int kWordsInFlight = 8 / kVecs;     // per thread and pass: 8 float4 loads
  float sum_sq = 0.0f;
  for (int pass = 0; pass < words; pass += kWordsInFlight * threads) {
    float4 loaded[kWordsInFlight][kVecs], gains[kWordsInFlight][kVecs];
#pragma unroll
    for (int b = 0; b < kWordsInFlight; ++b) {
      const int w = pass + b * threads + thread;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        loaded[b][i] = w < words ? reinterpret_cast<const float4*>(x + w * kPerWord)[i]
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
        if (norm_weight)
          gains[b][i] = w < words ? reinterpret_cast<const float4*>(norm_weight + w * kPerWord)[i]
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    if (pass == 0) after_first_loads();
#pragma unroll
    for (int b = 0; b < kWordsInFlight; ++b) {
      const int w = pass + b * threads + thread;
      // The same for every thread, so the whole block leaves (the shuffles below need whole
      // warps); threads past the end within the last words go on as inactive.
      if (pass + b * threads >= words) break;
      float v[kPerWord];
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        float4 a = loaded[b][i];
        if (norm_weight) {
          sum_sq += (a.x * a.x + a.y * a.y) + (a.z * a.z + a.w * a.w);
          const float4 g = gains[b][i];
          a = make_float4(a.x * g.x, a.y * g.y, a.z * g.z, a.w * g.w);
        }
        v[4 * i] = a.x;
        v[4 * i + 1] = a.y;
        v[4 * i + 2] = a.z;
        v[4 * i + 3] = a.w;
      }
      float peak = 0.0f, chunk_sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) {
        peak = fmaxf(peak, fabsf(v[i]));
        chunk_sum += v[i];
      }
      // The four words of a chunk are on four consecutive lanes, aligned (blockDim.x is a
      // multiple of 32, words a multiple of 4).
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, o));
        chunk_sum += __shfl_xor_sync(0xffffffffu, chunk_sum, o);
      }
      if (w >= words) continue;
      // fmaxf drops NaN, the sum keeps it (and inf): such a chunk's outputs become NaN, as do
      // those of a chunk beyond 2^126, whose reciprocal the fast division would flush to zero.
      // A chunk below 2^-100 counts as zero (32767 / peak overflows a float below about
      // 2^-113).
      const bool finite = isfinite(chunk_sum) && peak <= 0x1p126f;
      const float inv = finite && peak >= 0x1p-100f ? __fdividef(32767.0f, peak) : 0.0f;
      // Byte 1 of each pattern is the high byte of xq (signed), byte 0 the low one.
      uint32_t p[kPerWord];
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) p[i] = __float_as_uint(fmaf(v[i], inv, kRoundingShift));
      FixedWord<kBits> word;
      if constexpr (kBits == 4) {
        // {hi, hi, lo, lo} of codes (0, 2), (4, 6), (1, 3), (5, 7), then regrouped.
        const uint32_t e0 = __byte_perm(p[0], p[2], 0x4051), e1 = __byte_perm(p[4], p[6], 0x4051);
        const uint32_t o0 = __byte_perm(p[1], p[3], 0x4051), o1 = __byte_perm(p[5], p[7], 0x4051);
        word = make_uint4(__byte_perm(e0, e1, 0x5410), __byte_perm(o0, o1, 0x5410),
                          __byte_perm(e0, e1, 0x7632), __byte_perm(o0, o1, 0x7632));
      } else {
        const uint32_t a = __byte_perm(p[0], p[1], 0x4051), c = __byte_perm(p[2], p[3], 0x4051);
        word = make_uint2(__byte_perm(a, c, 0x5410), __byte_perm(a, c, 0x7632));
      }
      xq[(w & 3) * chunks + (w >> 2)] = word;
      if ((w & 3) == 0)
        chunk_params[w >> 2] = make_float2(peak * (1.0f / 32767.0f),
                                          finite ? chunk_sum : __int_as_float(0x7fc00000));
    }
  }
  return sum_sq;
}

// Integer dot of one 16-byte chunk of codes with its fixed-point activations.
template <int kBits>
__device__ __forceinline__ int chunk_dot_fixed(const uint4& raw, const FixedWord<kBits> (&xw)[4]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  int high = 0, low = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kBits == 4) {
      const uint32_t even = words[j] & 0x0f0f0f0fu, odd = (words[j] >> 4) & 0x0f0f0f0fu;
      high = dp4a_hi(xw[j].x, even, high);
      high = dp4a_hi(xw[j].y, odd, high);
      low = dp4a_lo(xw[j].z, even, low);
      low = dp4a_lo(xw[j].w, odd, low);
    } else {
      high = dp4a_hi(xw[j].x, words[j], high);
      low = dp4a_lo(xw[j].y, words[j], low);
    }
  }
  return high * 256 + low;
}

// A scale or bias staged in shared memory, of the tensor's type.
__device__ __forceinline__ float param_at(const char* p, DType dtype) {
  if (dtype == DType::F32) return *reinterpret_cast<const float*>(p);
  const uint16_t bits = *reinterpret_cast<const uint16_t*>(p);
  if (dtype == DType::BF16) return __uint_as_float(uint32_t(bits) << 16);
  __half h;
  memcpy(&h, &bits, 2);
  return __half2float(h);
}
__device__ __forceinline__ float bf16_at(const char* p) {
  return __uint_as_float(uint32_t(*reinterpret_cast<const uint16_t*>(p)) << 16);
}

// kBf16Params: scales and biases are bf16 (MLX's usual choice), read without a type switch;
// otherwise their type is segs.param_dtype.
template <int kBits, int R, int kUnroll, bool kGated, bool kBf16Params, int kStages>
__global__ void __launch_bounds__(kFixedWarps * 32)
    gemv_fixed_kernel(const float* __restrict__ x, GemvSegments segs, int64_t K,
                      const float* __restrict__ norm_weight, float norm_eps) {
  constexpr int RT = kGated ? 2 * R : R;
  constexpr int kPerChunk = 128 / kBits;
  constexpr int kSlots = kUnroll * RT;  // 16-byte chunks per lane and step
  extern __shared__ uint4 fixed_smem[];
  const int chunks = int(K / kPerChunk), groups = int(K / segs.group_size);
  float2* chunk_params = reinterpret_cast<float2*>(fixed_smem);
  auto* xq = reinterpret_cast<FixedWord<kBits>*>(fixed_smem + (chunks * sizeof(float2) + 15) / 16);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int param_shift = segs.param_dtype == DType::F32 ? 2 : 1;  // log2 bytes per parameter
  // This warp's staging ring: kStages steps, each kSlots code chunks per lane (each lane reads
  // back only what it copied itself), then per row the scales and the biases of the step's
  // groups (copied 16 bytes at a time by a few lanes, read by all: one copy per 16 bytes of
  // parameters instead of two 4-byte copies per chunk, which made up most of the copies a
  // block issues before it can start).
  const int param_row_bytes =
      fixed_param_row_bytes(kBits, kUnroll, segs.group_size, 1 << param_shift);
  const int stage_bytes = kSlots * 32 * 16 + RT * 2 * param_row_bytes;
  char* ring = reinterpret_cast<char*>(fixed_smem + fixed_activation_words(K, kBits)) +
               size_t(warp) * kStages * stage_bytes;
  const int64_t tile_stride = int64_t(gridDim.x) * kFixedWarps;
  const int first = int(blockIdx.x) * kFixedWarps + warp;
  const int rounds = (chunks + 32 * kUnroll - 1) / (32 * kUnroll);
  const int64_t my_tiles = first < segs.units ? (segs.units - 1 - first) / tile_stride + 1 : 0;
  const int64_t steps = my_tiles * rounds;
  // Group sizes are powers of two: a chunk's group is a shift away (a division per chunk was a
  // good share of the hot loop's instructions).
  const int group_shift = __ffs(segs.group_size) - 1;
  // Step s is round s % rounds of this warp's tile s / rounds, in ring slot s % kStages:
  // kept as running cursors (one for the copies issued ahead, one for the step computed),
  // never divided out.
  struct Cursor {
    int64_t tile;
    int round, stage;
  };
  auto advance = [&](Cursor& cur) {
    if (++cur.round == rounds) {
      cur.round = 0;
      cur.tile += tile_stride;
    }
    if (++cur.stage == kStages) cur.stage = 0;
  };
  Cursor issued{first, 0, 0}, computed{first, 0, 0};

  // Row i of tile t (R rows of one segment; gated: R gate rows, then the same R up rows).
  struct Tile {
    int si;
    int64_t n0;
  };
  auto tile_of = [&](int64_t t) {
    Tile r;
    r.si = 0;
    if (!kGated) {
      if (segs.count > 1 && t >= segs.seg[1].first_block) r.si = 1;
      if (segs.count > 2 && t >= segs.seg[2].first_block) r.si = 2;
    }
    r.n0 = (t - segs.seg[r.si].first_block) * R;
    return r;
  };
  // The rows of the tile being issued: their codes, and the byte offset of their first
  // parameter, set at its first round.
  const uint4* tile_codes[RT];
  int64_t tile_params[RT];
  int tile_segment = 0;
  // The first group of the step whose chunks start at `round`.
  auto first_group = [&](int round) { return (round * kPerChunk) >> group_shift; };
  // Issues the copies of step s (at cursor `issued`, which it advances).
  auto issue = [&](int64_t s) {
    if (s < steps) {
      const int round = issued.round * 32 * kUnroll;
      char* stage = ring + issued.stage * stage_bytes;
      uint4* codes = reinterpret_cast<uint4*>(stage);
      char* params = stage + kSlots * 32 * 16;
      if (issued.round == 0) {
        const Tile tl = tile_of(issued.tile);
        tile_segment = tl.si;
        const GemvSegment& s0 = segs.seg[tl.si];
#pragma unroll
        for (int i = 0; i < RT; ++i) {
          const GemvSegment& sg = (kGated && i >= R) ? segs.seg[1] : s0;
          const int64_t n = tl.n0 + i % R < s0.N ? tl.n0 + i % R : s0.N - 1;  // past N: dropped
          tile_codes[i] = static_cast<const uint4*>(sg.w) + n * chunks;
          tile_params[i] = (n * groups) << param_shift;
        }
      }
      advance(issued);
      const int last = min(round + 32 * kUnroll, chunks);
      const int64_t begin = int64_t(first_group(round)) << param_shift;
      const int64_t end = int64_t(((last * kPerChunk - 1) >> group_shift) + 1) << param_shift;
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        const GemvSegment& sg = (kGated && i >= R) ? segs.seg[1] : segs.seg[tile_segment];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = round + 32 * u + lane;
          if (c >= chunks) continue;
          copy_async16(codes + (u * RT + i) * 32 + lane, tile_codes[i] + c);
        }
        // The 16-byte words holding the step's parameters: the tensors start 16-byte aligned
        // in allocations of whole 256-byte granules, so the last word stays inside them.
        const int64_t word0 = (tile_params[i] + begin) & ~int64_t(15);
        const int words = int((tile_params[i] + end - word0 + 15) >> 4);
        for (int j = lane; j < words; j += 32) {
          copy_async16(params + i * 2 * param_row_bytes + 16 * j,
                       static_cast<const char*>(sg.scales) + word0 + 16 * j);
          copy_async16(params + (i * 2 + 1) * param_row_bytes + 16 * j,
                       static_cast<const char*>(sg.biases) + word0 + 16 * j);
        }
      }
    }
    copy_async_commit();  // empty groups keep the count of pending groups uniform
  };

  // Weights are constant: the first steps may be in flight before the predecessor kernel
  // finishes (programmatic dependent launch). The loads of x after the wait land only about
  // when those have (they seem to queue behind them), so with nothing more in flight the SM's
  // share of the memory bus would idle while x is converted: the ring's last slot is filled
  // right behind the loads of x and streams during the conversion (H100: 4-bit +1.0%, 8-bit
  // +0.8%; two slots behind x and one fewer before the wait measured the same at 4 bits and
  // 2.2% slower at 8, bench/GPU_NOTES.md run 15).
#pragma unroll
  for (int p = 0; p < kStages - 1; ++p) issue(p);
  pdl_wait();
  pdl_trigger();

  float sum_sq = convert_activations<kBits>(x, norm_weight, K, chunk_params, xq,
                                            [&] { issue(kStages - 1); });
  __shared__ float warp_sums[kFixedWarps];
  if (norm_weight) {
    for (int o = 16; o > 0; o >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, o);
    if (lane == 0) warp_sums[warp] = sum_sq;
  }
  __syncthreads();
  float scale = 1.0f;
  if (norm_weight) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kFixedWarps; ++w) total += warp_sums[w];
    scale = 1.0f / sqrtf(total / float(K) + norm_eps);
  }

  float acc[RT];
#pragma unroll
  for (int i = 0; i < RT; ++i) acc[i] = 0.0f;
  // The tile being computed (from its first step): its rows, where each row's parameters sit
  // within their 16-byte words, and (lane i < R) the residual of row i, loaded at the tile's
  // first step (at its end the load would add an L2 round trip to the kernel's tail, where
  // every warp's last tile ends).
  Tile tile{};
  int row_phase[RT];
  float residual_ahead = 0.0f;
  for (int64_t s = 0; s < steps; ++s) {
    // This lane's copies of step s have landed (at s = 0 those of step 1 too, which were in
    // flight before x's loads).
    copy_async_wait<kStages - 2>();
    __syncwarp();  // and every lane's (the parameters are shared), and step s - 1 is consumed
    // The slot step s - 1 used is free again (the ring's slots are all taken at s = 0).
    if (s > 0) issue(s + kStages - 1);
    if (computed.round == 0) {
      tile = tile_of(computed.tile);
      const GemvSegment& s0 = segs.seg[tile.si];
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        const int64_t n = tile.n0 + i % R < s0.N ? tile.n0 + i % R : s0.N - 1;  // as issued
        row_phase[i] = int((n * groups) << param_shift) & 15;
      }
      if (!kGated) {
        const int64_t n = tile.n0 + lane;
        residual_ahead = lane < R && s0.residual && n < s0.N ? s0.residual[n] : 0.0f;
      }
    }
    const int round = computed.round * 32 * kUnroll;
    const bool tile_done = computed.round == rounds - 1;
    const char* stage = ring + computed.stage * stage_bytes;
    const uint4* codes = reinterpret_cast<const uint4*>(stage);
    const char* params = stage + kSlots * 32 * 16;
    const int group0 = first_group(round);
    advance(computed);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = round + 32 * u + lane;
      if (c >= chunks) continue;
      FixedWord<kBits> xw[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) xw[j] = xq[j * chunks + c];
      const float2 cp = chunk_params[c];
      const int in_step = (((c * kPerChunk) >> group_shift) - group0) << param_shift;
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        const char* p = params + i * 2 * param_row_bytes +
                        ((row_phase[i] + (group0 << param_shift)) & 15) + in_step;
        const float sc = kBf16Params ? bf16_at(p) : param_at(p, segs.param_dtype);
        const float bi = kBf16Params ? bf16_at(p + param_row_bytes)
                                     : param_at(p + param_row_bytes, segs.param_dtype);
        acc[i] += sc * cp.x * float(chunk_dot_fixed<kBits>(codes[(u * RT + i) * 32 + lane], xw)) +
                  bi * cp.y;
      }
    }
    if (tile_done) {
#pragma unroll
      for (int i = 0; i < RT; ++i)
        for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
      const GemvSegment& s0 = segs.seg[tile.si];
      const GemvSegment& s1 = segs.seg[kGated ? 1 : tile.si];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t n = tile.n0 + i;
        if (lane != i || n >= s0.N) continue;
        const float a = acc[i] * scale + (s0.bias ? s0.bias[n] : 0.0f);
        if constexpr (kGated) {
          s0.y[n] = silu_times(a, acc[R + i] * scale + (s1.bias ? s1.bias[n] : 0.0f));
        } else {
          s0.y[n] = a + residual_ahead;
        }
      }
#pragma unroll
      for (int i = 0; i < RT; ++i) acc[i] = 0.0f;
    }
  }
  copy_async_wait<0>();
}

// The layers' common form for a fused launch, or false (mixed dtypes, unaligned, ...).
bool fusable(const float* x, const std::vector<const Linear*>& layers, int64_t K, int* bits) {
  const QuantizedTensor* q0 = layers[0]->quantized.get();
  *bits = q0 ? q0->bits : 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return false;
  for (const Linear* l : layers) {
    const QuantizedTensor* q = l->quantized.get();
    if (bool(q) != bool(q0)) return false;
    if (l->bias.defined() && (l->bias.device() != Device::CUDA || l->bias.dtype() != DType::F32))
      return false;
    if (q) {
      if (q->bits != q0->bits || q->group_size != q0->group_size || q->in_features() != K ||
          q->scales.dtype() != q0->scales.dtype() || q->weight.device() != Device::CUDA ||
          q->scales.device() != Device::CUDA || q->biases.device() != Device::CUDA)
        return false;
      if (q->bits != 4 && q->bits != 8) return false;
    } else {
      if (l->weight.dtype() != DType::BF16 || l->weight.ndim() != 2 || l->weight.dim(1) != K ||
          l->weight.device() != Device::CUDA || K % 8 != 0 ||
          reinterpret_cast<uintptr_t>(l->weight.raw()) % 16 != 0)
        return false;
    }
  }
  return true;
}

GemvSegments make_segments(const std::vector<const Linear*>& layers, const std::vector<float*>& ys,
                           int rows_per_block, bool gated) {
  GemvSegments s;
  s.count = int(layers.size());
  int64_t block = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Linear& l = *layers[i];
    GemvSegment& g = s.seg[i];
    if (l.quantized) {
      g.w = l.quantized->weight.raw();
      g.scales = l.quantized->scales.raw();
      g.biases = l.quantized->biases.raw();
      g.N = l.quantized->out_features();
      s.param_dtype = l.quantized->scales.dtype();
      s.group_size = l.quantized->group_size;
    } else {
      g.w = l.weight.raw();
      g.N = l.weight.dim(0);
    }
    g.bias = l.bias.defined() ? l.bias.data<float>() : nullptr;
    g.y = ys[i];
    g.first_block = gated ? 0 : block;
    block += (g.N + rows_per_block - 1) / rows_per_block;
  }
  s.units = gated ? (s.seg[0].N + rows_per_block - 1) / rows_per_block : block;
  return s;
}

template <int kBits, int R, bool kGated>
void launch_multi(const float* x, const std::vector<const Linear*>& layers,
                  const std::vector<float*>& ys, int64_t K, const RMSNorm* norm) {
  const GemvSegments s = make_segments(layers, ys, R, kGated);
  launch_pdl(gemv_multi_kernel<__nv_bfloat16, kBits, R, kGated>, unsigned(s.units), kGemvThreads,
             0, x, s, K, norm ? norm->weight.data<float>() : nullptr, norm ? norm->eps : 0.0f);
}

// Variants 0-2: block per rows (every format).
template <int kBits, bool kGated>
void launch_multi_tuned(const float* x, const std::vector<const Linear*>& layers,
                        const std::vector<float*>& ys, int64_t K, const RMSNorm* norm) {
  int64_t total = 0;
  for (const Linear* l : layers) total += l->out_features();
  auto run = [&](int v) {
    switch (v) {
      case 0: launch_multi<kBits, 4, kGated>(x, layers, ys, K, norm); break;
      case 1: launch_multi<kBits, 8, kGated>(x, layers, ys, K, norm); break;
      default: launch_multi<kBits, 2, kGated>(x, layers, ys, K, norm); break;
    }
  };
  run(tuned_variant(TuneKey{total, K, 1000 * (kGated ? 2 : 1) + kBits}, 3, run));
}

// MOXIN_CUDA_FIXED_BLOCKS="N:K=blocks,...": at most that many blocks for the fixed-point
// products of N outputs (gated: N gate rows) and K inputs, to measure inside a decode step what
// the SMs a product leaves free to its neighbours are worth (diagnostic; every tile is still
// computed, the resident warps take more of them).
const std::map<std::pair<int64_t, int64_t>, int64_t>& fixed_block_caps() {
  static const std::map<std::pair<int64_t, int64_t>, int64_t> caps = [] {
    std::map<std::pair<int64_t, int64_t>, int64_t> out;
    for_each_env_item("MOXIN_CUDA_FIXED_BLOCKS", [&](const std::string& item) {
      long long n = 0, k = 0, blocks = 0;
      if (std::sscanf(item.c_str(), "%lld:%lld=%lld", &n, &k, &blocks) != 3) return false;
      out[{n, k}] = blocks;
      return true;
    });
    return out;
  }();
  return caps;
}

// stage_bytes: one step of one warp's ring (fixed_stage_bytes), as the kernel lays it out.
template <int kBits, int R, int kUnroll, bool kGated, bool kBf16Params, int kStages>
void launch_fixed_kernel(const float* x, const GemvSegments& s, int64_t K, const RMSNorm* norm,
                         int stage_bytes) {
  // Blocks beyond what the SMs hold at once would only repeat the activation conversion: the
  // resident blocks loop over the tiles instead.
  auto* kernel = gemv_fixed_kernel<kBits, R, kUnroll, kGated, kBf16Params, kStages>;
  const size_t smem = fixed_smem_bytes(K, kBits, stage_bytes, kStages);
  // Dynamic shared memory beyond 48 KB must be opted into, up to the card's limit less the
  // kernel's static shared memory.
  static const int max_smem = [&] {
    cudaFuncAttributes attributes{};
    MOXIN_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const int limit = int(properties().sharedMemPerBlockOptin - attributes.sharedSizeBytes);
    MOXIN_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    return limit;
  }();
  if (smem > size_t(max_smem))
    throw_error(ErrorKind::Compute, "linear: fixed-point product too wide for shared memory");
  int per_sm = 0;
  MOXIN_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFixedWarps * 32, smem));
  const int64_t resident = int64_t(std::max(per_sm, 1)) * properties().multiProcessorCount;
  int64_t blocks = std::min((s.units + kFixedWarps - 1) / kFixedWarps, resident);
  if (!fixed_block_caps().empty()) {
    int64_t rows = s.seg[0].N;
    if (!kGated)
      for (int i = 1; i < s.count; ++i) rows += s.seg[i].N;
    if (auto it = fixed_block_caps().find({rows, K}); it != fixed_block_caps().end())
      blocks = std::clamp<int64_t>(it->second, 1, blocks);
  }
  launch_pdl(kernel, unsigned(blocks), kFixedWarps * 32, smem, x, s, K,
             norm ? norm->weight.data<float>() : nullptr, norm ? norm->eps : 0.0f);
}

// MOXIN_CUDA_FIXED_RING_STAGES=N: no ring deeper than N steps (3: the shallowest everywhere,
// the comparison baseline).
int fixed_ring_stages_limit() {
  static const int limit =
      setting("MOXIN_CUDA_FIXED_RING_STAGES", kFixedMaxStages, kFixedStages, kFixedMaxStages);
  return limit;
}

template <int kBits, int R, int kUnroll, bool kGated, bool kBf16Params>
void launch_fixed_depth(const float* x, const GemvSegments& s, int64_t K, const RMSNorm* norm) {
  constexpr int kSlots = kUnroll * (kGated ? 2 * R : R);
  const int stage_bytes = fixed_stage_bytes(kBits, kGated ? 2 * R : R, kUnroll, s.group_size,
                                            s.param_dtype == DType::F32 ? 4 : 2);
  auto fits = [&](int stages) {
    return stages <= fixed_ring_stages_limit() &&
           fixed_smem_fits(fixed_smem_bytes(K, kBits, stage_bytes, stages));
  };
  auto launch = [&](auto stages) {
    launch_fixed_kernel<kBits, R, kUnroll, kGated, kBf16Params, decltype(stages)::value>(
        x, s, K, norm, stage_bytes);
  };
  if constexpr (kSlots <= 2) {
    if (fits(8)) return launch(std::integral_constant<int, 8>{});
    if (fits(6)) return launch(std::integral_constant<int, 6>{});
  }
  if (fits(4)) return launch(std::integral_constant<int, 4>{});
  launch(std::integral_constant<int, kFixedStages>{});
}

template <int kBits, int R, int kUnroll, bool kGated>
void launch_fixed(const float* x, const GemvSegments& s, int64_t K, const RMSNorm* norm) {
  if (s.param_dtype == DType::BF16)
    launch_fixed_depth<kBits, R, kUnroll, kGated, true>(x, s, K, norm);
  else
    launch_fixed_depth<kBits, R, kUnroll, kGated, false>(x, s, K, norm);
}

// Variant v of the fixed-point kernel: rows per warp R and chunks per row and round, so that
// each lane keeps 2-4 loads of 16 bytes outstanding while it computes the previous round.
// make(R) builds the segments for R. The tuner times variants 0-3 (0-2 gated); variant 4,
// three rows, is taken untimed where launch_single_fixed says.
constexpr int fixed_variants(bool gated) { return gated ? 3 : 4; }
constexpr int kFixedThreeRowVariant = 4;

template <int kBits, bool kGated, class MakeSegments>
void launch_fixed_variant(int v, const float* x, int64_t K, const RMSNorm* norm,
                          const MakeSegments& make) {
  if constexpr (kGated) {
    switch (v) {
      case 0: launch_fixed<kBits, 1, 2, true>(x, make(1), K, norm); break;
      case 1: launch_fixed<kBits, 1, 1, true>(x, make(1), K, norm); break;
      default: launch_fixed<kBits, 2, 1, true>(x, make(2), K, norm); break;
    }
  } else {
    switch (v) {
      case 0: launch_fixed<kBits, 2, 2, false>(x, make(2), K, norm); break;
      case 1: launch_fixed<kBits, 1, 4, false>(x, make(1), K, norm); break;
      case 2: launch_fixed<kBits, 4, 1, false>(x, make(4), K, norm); break;
      case 3: launch_fixed<kBits, 1, 2, false>(x, make(1), K, norm); break;
      default: launch_fixed<kBits, 3, 2, false>(x, make(3), K, norm); break;
    }
  }
}

template <int kBits, bool kGated>
void launch_multi_fixed(const float* x, const std::vector<const Linear*>& layers,
                        const std::vector<float*>& ys, int64_t K, const RMSNorm* norm) {
  int64_t total = 0;
  for (const Linear* l : layers) total += l->out_features();
  auto run = [&](int v) {
    launch_fixed_variant<kBits, kGated>(
        v, x, K, norm, [&](int R) { return make_segments(layers, ys, R, kGated); });
  };
  // Not the three-row variant: timed alone, it was the fastest for q/k/v at 8 bits and for
  // lm_head (9 against 11 us, 51 against 52), but slower inside the decode graph (H100: 273.6
  // against 279.7 tok/s, bench/GPU_NOTES.md run 12).
  // q/k/v at 4 bits: the first variant, untimed. Alone the variants time within 3% of each
  // other (8-9 us on an H100), and a run's tuner sometimes took the second, which decodes
  // slower inside the graph (H100: 444.2 against 452.6-453.8 tok/s in run 12, 452.6 against
  // 462.5 for the same binary in run 15; bench/GPU_NOTES.md).
  const int untimed = kBits == 4 && !kGated ? 0 : -1;
  run(tuned_variant(TuneKey{total, K, 3000 * (kGated ? 2 : 1) + kBits}, fixed_variants(kGated),
                    run, untimed));
}

// y (+ residual) = x W^T + bias for a single row of x.
template <int kBits>
void launch_single_fixed(const float* x, const QuantizedTensor& q, const float* bias,
                         const float* residual, float* y, int64_t N, int64_t K) {
  // The three-row variant, untimed, where it gives each warp one tile that travels whole in
  // its ring's first two steps, before the wait (4 bits, rows of at most two rounds: o_proj).
  // Alone it streams o_proj no faster than the others (6 us each on an H100), but inside the
  // decode graph it measured 453.6-453.8 tok/s against 441.9-443.8 (bench/GPU_NOTES.md run 12):
  // the product on 86 blocks, the SMs left free take the next product's first blocks early.
  // Elsewhere the four timed variants: down_proj on three rows measured 432 (with q/k/v on two
  // rows) and 455 (on three), a dependence on its neighbours the tuner cannot see.
  const bool three_rows = kBits == 4 && K * kBits / 128 <= 2 * 32 * 2 &&
                          (N + 2) / 3 <= int64_t(kFixedWarps) * properties().multiProcessorCount;
  run_tuned(
      TuneKey{N, K, 2000 + kBits * 100 + q.group_size},
      three_rows ? kFixedThreeRowVariant + 1 : fixed_variants(false), N, residual, y,
      [&](int v, const float* res, float* out) {
        launch_fixed_variant<kBits, false>(v, x, K, nullptr, [&](int R) {
          GemvSegments s;
          s.count = 1;
          s.param_dtype = q.scales.dtype();
          s.group_size = q.group_size;
          s.units = (N + R - 1) / R;
          GemvSegment& g = s.seg[0];
          g.w = q.weight.raw();
          g.scales = q.scales.raw();
          g.biases = q.biases.raw();
          g.bias = bias;
          g.residual = res;
          g.y = out;
          g.N = N;
          return s;
        });
      },
      three_rows ? kFixedThreeRowVariant : -1);
}

// Diagnostics: MOXIN_CUDA_QUANT_PATH forces one product path for quantized layers, so the
// implementations can be compared on a real checkpoint: gemv (the GEMV kernels at every M) or
// dense (dequantize + cuBLASLt at every M); float keeps the default choice by M but runs single
// rows through the float GEMV kernels instead of the fixed-point ones. Default: GEMV for
// M <= kGemvMaxRows (fixed point for one row where it fits), dequantize + cuBLASLt above.
enum class QuantPath { Auto, Gemv, Dense, Float };
QuantPath quant_path() {
  static const QuantPath path = [] {
    const char* v = std::getenv("MOXIN_CUDA_QUANT_PATH");
    if (v && std::strcmp(v, "gemv") == 0) return QuantPath::Gemv;
    if (v && std::strcmp(v, "dense") == 0) return QuantPath::Dense;
    if (v && std::strcmp(v, "float") == 0) return QuantPath::Float;
    return QuantPath::Auto;
  }();
  return path;
}

bool use_fixed_point(const QuantizedTensor& q) {
  return quant_path() != QuantPath::Float &&
         fixed_point_fits(q.bits, q.group_size, q.in_features(), q.scales.dtype(), q.scales.raw(),
                          q.biases.raw());
}
bool use_fixed_point(const std::vector<const Linear*>& layers) {
  for (const Linear* l : layers)
    if (!l->quantized || !use_fixed_point(*l->quantized)) return false;
  return true;
}

// bits 4 / 8: MLX codes; 0: bf16 weights.
template <bool kGated>
void launch_multi_for_bits(int bits, const float* x, const std::vector<const Linear*>& layers,
                           const std::vector<float*>& ys, int64_t K, const RMSNorm* norm) {
  if (bits == 4) {
    if (use_fixed_point(layers)) launch_multi_fixed<4, kGated>(x, layers, ys, K, norm);
    else launch_multi_tuned<4, kGated>(x, layers, ys, K, norm);
  } else if (bits == 8) {
    if (use_fixed_point(layers)) launch_multi_fixed<8, kGated>(x, layers, ys, K, norm);
    else launch_multi_tuned<8, kGated>(x, layers, ys, K, norm);
  } else {
    launch_multi_tuned<0, kGated>(x, layers, ys, K, norm);
  }
}

}  // namespace

void set_gemv_variant_for_testing(int variant) { forced_variant.store(variant); }

namespace {

// The layer's weights expanded to bf16 [N, K] in pool scratch (the cuBLASLt path of quantized
// layers).
Tensor dequantized_bf16(const QuantizedTensor& q) {
  const int64_t N = q.out_features(), K = q.in_features();
  Tensor dense = Tensor::empty({N, K}, DType::BF16, Device::CUDA);
  auto* dense_p = static_cast<__nv_bfloat16*>(dense.raw_mut());
  const int64_t eights = N * K / 8;  // K is a multiple of the group size, at least 32
  if ((q.bits == 4 || q.bits == 8) && eights < (int64_t(1) << 31)) {
    const int group_shift = std::countr_zero(unsigned(q.group_size));  // a power of two
    auto* kernel =
        q.bits == 4 ? dequantize_eights_bf16_kernel<4> : dequantize_eights_bf16_kernel<8>;
    kernel<<<blocks_for(eights, 256), 256, 0, stream()>>>(
        q.weight.raw(), q.scales.raw(), q.biases.raw(), q.scales.dtype(), group_shift,
        uint32_t(K / 8), uint32_t(K / q.group_size), uint32_t(eights), dense_p);
  } else {
    dequantize_bf16_kernel<<<blocks_for(N * K, 256), 256, 0, stream()>>>(
        static_cast<const uint8_t*>(q.weight.raw()), q.scales.raw(), q.biases.raw(),
        q.scales.dtype(), q.group_size, q.bits, N, K, dense_p);
  }
  MOXIN_LAUNCH_CHECK();
  return dense;
}

// The bf16 weights a cuBLASLt product of `layer` reads: its own, or quantized ones expanded
// into `holder` (pool scratch, kept by the caller until the product is queued).
const void* bf16_weights(const Linear& layer, Tensor& holder) {
  if (!layer.quantized) return layer.weight.raw();
  holder = dequantized_bf16(*layer.quantized);
  return holder.raw();
}

const float* bias_of(const Linear& layer) {
  return layer.bias.defined() ? layer.bias.data<float>() : nullptr;
}

// y = x W^T + bias, or y += x W^T + bias when `accumulate` (y then already has the output
// shape): decode products add into y in their epilogue, cuBLASLt ones with beta = 1.
void linear_into(const Tensor& x, const Linear& layer, Tensor& y, bool accumulate) {
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
  if (accumulate) {
    if (!y.defined() || y.shape() != out_shape || y.dtype() != DType::F32 ||
        y.device() != Device::CUDA)
      throw_error(ErrorKind::Compute, "linear: accumulator must be float32 " +
                                          shape_to_string(out_shape) + " on the GPU");
  } else {
    y = Tensor::empty(out_shape, DType::F32, Device::CUDA);
  }
  const int64_t M = x.numel() / K;
  if (M == 0 || N == 0) return;
  const float* xp = x.data<float>();
  float* yp = y.data_mut<float>();
  const float* residual = accumulate ? yp : nullptr;  // the GEMV epilogues add it

  if (q) {
    if (q->scales.device() != Device::CUDA || q->biases.device() != Device::CUDA)
      throw_error(ErrorKind::Compute, "linear: quantization parameters are not on the GPU");
    const bool fast_bits = q->bits == 4 || q->bits == 8;
    const QuantPath path = quant_path();
    const bool use_gemv =
        path == QuantPath::Gemv || (path != QuantPath::Dense && M <= kGemvMaxRows);
    if (use_gemv && fast_bits && reinterpret_cast<uintptr_t>(xp) % 16 == 0) {
      if (M == 1 && use_fixed_point(*q)) {
        if (q->bits == 4) launch_single_fixed<4>(xp, *q, bias, residual, yp, N, K);
        else launch_single_fixed<8>(xp, *q, bias, residual, yp, N, K);
        return;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kGemvMaxRows) {
        const int64_t rows = std::min<int64_t>(kGemvMaxRows, M - m0);
        dispatch_rows<GemvQuant>(rows, xp + m0 * K, *q, bias,
                                 residual ? residual + m0 * N : nullptr, yp + m0 * N, N, K);
      }
      return;
    }
    if (capturing())
      throw_error(ErrorKind::Compute, "linear: this quantized layer cannot run in a decode graph");
    const Tensor dense = dequantized_bf16(*q);
    const Tensor xb = narrowed<__nv_bfloat16>(x, DType::BF16);
    gemm(dense.raw(), xb.raw(), CUDA_R_16BF, M, N, K, bias, yp, accumulate);
    return;
  }

  const DType wt = layer.weight.dtype();
  if (wt != DType::BF16 && wt != DType::F16 && wt != DType::F32)
    throw_error(ErrorKind::Compute, "linear: weights of dtype " + std::string(dtype_name(wt)) +
                                        " are not supported on CUDA");
  if (M <= kGemvMaxRows) {
    dispatch_rows<Gemv16>(M, xp, layer.weight.raw(), wt, bias, residual, yp, N, K);
    return;
  }
  if (capturing())
    throw_error(ErrorKind::Compute, "linear: a decode graph records one token at a time");
  if (wt == DType::F32) {
    gemm(layer.weight.raw(), xp, CUDA_R_32F, M, N, K, bias, yp, accumulate);
  } else if (wt == DType::BF16) {
    const Tensor xb = narrowed<__nv_bfloat16>(x, DType::BF16);
    gemm(layer.weight.raw(), xb.raw(), CUDA_R_16BF, M, N, K, bias, yp, accumulate);
  } else {
    const Tensor xh = narrowed<__half>(x, DType::F16);
    gemm(layer.weight.raw(), xh.raw(), CUDA_R_16F, M, N, K, bias, yp, accumulate);
  }
}

}  // namespace

Tensor linear(const Tensor& x, const Linear& layer) {
  Tensor y;
  linear_into(x, layer, y, false);
  return y;
}

void linear_accumulate(Tensor& y, const Tensor& x, const Linear& layer) {
  linear_into(x, layer, y, true);
}

namespace {

// The norm weight a fused launch can read in its prologue, or false.
bool norm_fusable(const RMSNorm* norm, int64_t K) {
  return !norm || (norm->weight.device() == Device::CUDA && norm->weight.dtype() == DType::F32 &&
                   norm->weight.numel() == K &&
                   reinterpret_cast<uintptr_t>(norm->weight.raw()) % 16 == 0);
}

// Whether every layer runs through cuBLASLt on bf16 activations at M rows: bf16 weights, or
// quantized ones expanded to bf16.
bool bf16_products(const std::vector<const Linear*>& layers, int64_t M, int64_t K) {
  if (M <= kGemvMaxRows || quant_path() == QuantPath::Gemv || capturing()) return false;
  for (const Linear* l : layers) {
    if (l->in_features() != K) return false;
    if (l->bias.defined() && (l->bias.device() != Device::CUDA || l->bias.dtype() != DType::F32))
      return false;
    if (l->quantized) {
      const QuantizedTensor& q = *l->quantized;
      if (q.weight.device() != Device::CUDA || q.scales.device() != Device::CUDA ||
          q.biases.device() != Device::CUDA)
        return false;
    } else if (l->weight.dtype() != DType::BF16 || l->weight.device() != Device::CUDA) {
      return false;
    }
  }
  return true;
}

// Whether b's bf16 weights lie right after a's, same shape, neither with a bias: the two
// products of one input then run as one strided-batched product (see move_side_by_side in
// the model's device move). MOXIN_CUDA_BATCHED_PRODUCTS=0 runs them one by one.
bool side_by_side(const Linear& a, const Linear& b) {
  static const bool enabled = !switched_off("MOXIN_CUDA_BATCHED_PRODUCTS");
  return enabled && !a.quantized && !b.quantized && !a.bias.defined() && !b.bias.defined() &&
         a.weight.dtype() == DType::BF16 && b.weight.dtype() == DType::BF16 &&
         a.weight.device() == Device::CUDA && b.weight.device() == Device::CUDA &&
         a.weight.shape() == b.weight.shape() &&
         static_cast<const char*>(a.weight.raw()) + a.weight.nbytes() == b.weight.raw();
}

// Products of x (normalised by `norm` when given) rounded to bf16 once, in one kernel, and
// read by every layer's cuBLASLt product; outputs in `out_dtype` (F32 or BF16).
std::vector<Tensor> bf16_row_products(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm* norm, DType out_dtype) {
  const int64_t K = x.dim(-1), M = x.numel() / K;
  const Tensor xb = norm ? rms_norm_bf16(x, *norm) : narrowed<__nv_bfloat16>(x, DType::BF16);
  const cudaDataType out_type = out_dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
  std::vector<Tensor> out;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Linear& l = *layers[i];
    Shape shape = x.shape();
    shape.back() = l.out_features();
    if (i + 1 < layers.size() && side_by_side(l, *layers[i + 1])) {
      // Both products in one batched launch, their outputs in one allocation.
      Tensor both = Tensor::empty({2, M * l.out_features()}, out_dtype, Device::CUDA);
      gemm(l.weight.raw(), xb.raw(), CUDA_R_16BF, M, l.out_features(), K, nullptr,
           both.raw_mut(), false, out_type, 2);
      out.push_back(both.slice_rows(0, 1).reshape(shape));
      out.push_back(both.slice_rows(1, 2).reshape(shape));
      ++i;
      continue;
    }
    Tensor y = Tensor::empty(shape, out_dtype, Device::CUDA);
    Tensor holder;
    gemm(bf16_weights(l, holder), xb.raw(), CUDA_R_16BF, M, l.out_features(), K, bias_of(l),
         y.raw_mut(), false, out_type);
    out.push_back(std::move(y));
  }
  return out;
}

std::vector<Tensor> separate_products(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm* norm) {
  std::vector<Tensor> out;
  const int64_t K = x.ndim() ? x.dim(-1) : 0;
  if (x.defined() && x.dtype() == DType::F32 && x.device() == Device::CUDA && K > 0 &&
      bf16_products(layers, x.numel() / K, K)) {
    // Many rows with bf16 products (prefill).
    return bf16_row_products(x, layers, norm, DType::F32);
  }
  const Tensor h = norm ? rms_norm(x, *norm) : x;
  for (const Linear* l : layers) out.push_back(linear(h, *l));
  return out;
}

}  // namespace

bool takes_bf16_rows(const Linear& layer, int64_t M, int64_t K) {
  return bf16_products({&layer}, M, K);
}

void linear_from_bf16(const Tensor& xb, const Linear& layer, Tensor& y, bool accumulate) {
  const int64_t K = xb.dim(-1), M = xb.numel() / K, N = layer.out_features();
  if (xb.dtype() != DType::BF16 || xb.device() != Device::CUDA || !takes_bf16_rows(layer, M, K))
    throw_error(ErrorKind::Compute, "linear: bf16 rows " + shape_to_string(xb.shape()) +
                                        " do not suit this layer");
  Shape shape = xb.shape();
  shape.back() = N;
  if (!accumulate) {
    y = Tensor::empty(shape, DType::F32, Device::CUDA);
  } else if (!y.defined() || y.dtype() != DType::F32 || y.device() != Device::CUDA ||
             y.shape() != shape) {
    throw_error(ErrorKind::Compute, "linear: cannot accumulate " + shape_to_string(shape) +
                                        " into " + shape_to_string(y.shape()));
  }
  Tensor holder;
  gemm(bf16_weights(layer, holder), xb.raw(), CUDA_R_16BF, M, N, K, bias_of(layer), y.raw_mut(),
       accumulate);
}

std::vector<Tensor> products_bf16_out(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm& norm) {
  const int64_t K = x.dim(-1), M = x.numel() / K;
  for (const Linear* l : layers)
    if (!takes_bf16_rows(*l, M, K) || l->bias.defined())
      throw_error(ErrorKind::Compute, "linear: no bf16-output product for this layer");
  return bf16_row_products(x, layers, &norm, DType::BF16);
}

std::vector<Tensor> linear_same_input(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm* norm) {
  if (layers.empty() || layers.size() > 3 || !x.defined() || x.dtype() != DType::F32 ||
      x.device() != Device::CUDA || x.ndim() == 0 || x.numel() != x.dim(-1))
    return separate_products(x, layers, norm);
  const int64_t K = x.dim(-1);
  int bits = 0;
  if (!fusable(x.data<float>(), layers, K, &bits) || !norm_fusable(norm, K))
    return separate_products(x, layers, norm);
  std::vector<Tensor> out;
  std::vector<float*> ys;
  for (const Linear* l : layers) {
    if (l->in_features() != K)
      throw_error(ErrorKind::Compute, "linear: input " + shape_to_string(x.shape()) +
                                          " does not end in " + std::to_string(l->in_features()));
    Shape shape = x.shape();
    shape.back() = l->out_features();
    out.push_back(Tensor::empty(shape, DType::F32, Device::CUDA));
    ys.push_back(out.back().data_mut<float>());
  }
  launch_multi_for_bits<false>(bits, x.data<float>(), layers, ys, K, norm);
  return out;
}

Tensor swiglu_linear(const Tensor& x, const Linear& gate, const Linear& up, const RMSNorm* norm) {
  const std::vector<const Linear*> layers = {&gate, &up};
  int bits = 0;
  const bool single_row = x.defined() && x.dtype() == DType::F32 &&
                          x.device() == Device::CUDA && x.ndim() > 0 && x.numel() == x.dim(-1);
  if (!single_row || gate.out_features() != up.out_features() ||
      !fusable(x.data<float>(), layers, x.dim(-1), &bits) || !norm_fusable(norm, x.dim(-1))) {
    const std::vector<Tensor> halves = separate_products(x, layers, norm);
    return silu_mul(halves[0], halves[1]);
  }
  const int64_t K = x.dim(-1);
  if (gate.in_features() != K || up.in_features() != K)
    throw_error(ErrorKind::Compute, "swiglu: input " + shape_to_string(x.shape()) +
                                        " does not end in " + std::to_string(gate.in_features()));
  Shape shape = x.shape();
  shape.back() = gate.out_features();
  Tensor y = Tensor::empty(shape, DType::F32, Device::CUDA);
  const std::vector<float*> ys = {y.data_mut<float>(), nullptr};
  launch_multi_for_bits<true>(bits, x.data<float>(), layers, ys, K, norm);
  return y;
}

}  // namespace moxin::cuda
