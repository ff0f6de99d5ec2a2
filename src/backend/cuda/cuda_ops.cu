// The ops of src/ops/ops.h on the GPU, except linear (cuda_linear.cu): element-wise work,
// norms, rotary embedding, shape plumbing and attention. Float32 activations throughout.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/cuda_runtime.h"
#include "moxin/errors.h"

namespace moxin::cuda {

namespace {

constexpr int kThreads = 256;

void require_f32_cuda(const Tensor& x, const char* op) {
  if (!x.defined() || x.dtype() != DType::F32 || x.device() != Device::CUDA)
    throw_error(ErrorKind::Compute, std::string(op) + ": activations must be float32 on the GPU");
}

void require_on_gpu(const Tensor& t, const char* op, const char* what) {
  if (!t.defined() || t.device() != Device::CUDA)
    throw_error(ErrorKind::Compute, std::string(op) + ": " + what + " is not on the GPU");
}

__device__ __forceinline__ int delta_of(const int* delta) { return delta ? *delta : 0; }

// ------------------------------------------------------------------------------------------
// Reductions

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  v = lane < warps ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Norms write float32, or bf16 rounded from the same float32 values (the input of bf16
// products, written by the norm itself rather than by a pass of its own).
template <class T>
__device__ __forceinline__ void store_out(T* y, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) {
    y[i] = v;
  } else {
    y[i] = __float2bfloat16(v);
  }
}

// Four consecutive outputs at y + 4 * i4 (16-byte aligned for float, 8 for bf16).
template <class T>
__device__ __forceinline__ void store_out4(T* y, int64_t i4, float4 v) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(y)[i4] = v;
  } else {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 bits;
    memcpy(&bits.x, &lo, 4);
    memcpy(&bits.y, &hi, 4);
    reinterpret_cast<uint2*>(y)[i4] = bits;
  }
}

// Rows of up to kNormVecs float4 per thread (4096 floats at kThreads) are read once, with every
// load in flight at once, and stay in registers between a norm's passes (the general kernels
// below walk the row in dependent steps: latency-bound at the decoder's 4096 columns).
constexpr int kNormVecs = 4;

bool norm_rows_vectorised(int64_t D, std::initializer_list<const void*> pointers) {
  if (D % 4 != 0 || D > 4 * kThreads * kNormVecs) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// This thread's float4s of the block's row of x (zeros past its end), every load issued at once.
__device__ __forceinline__ void load_row_vec(const float* x, int D, float4 (&v)[kNormVecs]) {
  const float4* xr = reinterpret_cast<const float4*>(x + int64_t(blockIdx.x) * D);
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) {
    const int i4 = threadIdx.x + k * kThreads;
    v[k] = i4 < D / 4 ? xr[i4] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_vec_kernel(const float* __restrict__ x, const float* __restrict__ w, float eps, int D,
                        T* __restrict__ y) {
  pdl_wait();
  pdl_trigger();
  __shared__ float scratch[32];
  const int n4 = D / 4;
  float4 v[kNormVecs];
  load_row_vec(x, D, v);
  float sq = 0;
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k)
    sq += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
  sq = block_sum(sq, scratch);
  const float inv = 1.0f / sqrtf(sq / float(D) + eps);
  T* yr = y + int64_t(blockIdx.x) * D;
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) {
    const int i4 = threadIdx.x + k * kThreads;
    if (i4 >= n4) continue;
    const float4 g = reinterpret_cast<const float4*>(w)[i4];
    store_out4(yr, i4,
               make_float4(g.x * (v[k].x * inv), g.y * (v[k].y * inv), g.z * (v[k].z * inv),
                           g.w * (v[k].w * inv)));
  }
}

template <class T>
__global__ void rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                float eps, int64_t D, T* __restrict__ y) {
  pdl_wait();
  pdl_trigger();
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * D;
  T* yr = y + blockIdx.x * D;
  float sq = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) sq += xr[i] * xr[i];
  sq = block_sum(sq, scratch);
  const float inv = 1.0f / sqrtf(sq / float(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) store_out(yr, i, w[i] * (xr[i] * inv));
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    layer_norm_vec_kernel(const float* __restrict__ x, const float* __restrict__ w,
                          const float* __restrict__ b, float eps, int D, T* __restrict__ y) {
  __shared__ float scratch[32];
  const int n4 = D / 4;
  float4 v[kNormVecs];
  load_row_vec(x, D, v);
  float sum = 0;
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) sum += v[k].x + v[k].y + v[k].z + v[k].w;
  const float mean = block_sum(sum, scratch) / float(D);
  float sq = 0;  // centred second pass, as torch computes it
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) {
    if (threadIdx.x + k * kThreads >= n4) continue;
    const float4 d = make_float4(v[k].x - mean, v[k].y - mean, v[k].z - mean, v[k].w - mean);
    sq += d.x * d.x + d.y * d.y + d.z * d.z + d.w * d.w;
  }
  const float inv = 1.0f / sqrtf(block_sum(sq, scratch) / float(D) + eps);
  T* yr = y + int64_t(blockIdx.x) * D;
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) {
    const int i4 = threadIdx.x + k * kThreads;
    if (i4 >= n4) continue;
    const float4 g = reinterpret_cast<const float4*>(w)[i4];
    const float4 c = reinterpret_cast<const float4*>(b)[i4];
    store_out4(yr, i4,
               make_float4((v[k].x - mean) * inv * g.x + c.x, (v[k].y - mean) * inv * g.y + c.y,
                           (v[k].z - mean) * inv * g.z + c.z, (v[k].w - mean) * inv * g.w + c.w));
  }
}

template <class T>
__global__ void layer_norm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                  const float* __restrict__ b, float eps, int64_t D,
                                  T* __restrict__ y) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * D;
  T* yr = y + blockIdx.x * D;
  float sum = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) sum += xr[i];
  const float mean = block_sum(sum, scratch) / float(D);
  float sq = 0;  // centred second pass, as torch computes it
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float d = xr[i] - mean;
    sq += d * d;
  }
  const float inv = 1.0f / sqrtf(block_sum(sq, scratch) / float(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    store_out(yr, i, (xr[i] - mean) * inv * w[i] + b[i]);
}

// ------------------------------------------------------------------------------------------
// Element-wise

__device__ __forceinline__ float gelu(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

// out = gelu(x): in place (out == x, float) or into the bf16 input of the next product.
template <class T>
__global__ void gelu_kernel(const float* x, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_out(out, i, gelu(x[i]));
}

__device__ __forceinline__ float load_in(const float* x, int64_t i) { return x[i]; }
__device__ __forceinline__ float load_in(const __nv_bfloat16* x, int64_t i) {
  return __bfloat162float(x[i]);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// SiLU(gate) * up for bf16 gate, up and output, 8 elements (16 bytes) per thread and step.
__global__ void silu_mul_bf16x8_kernel(const uint4* __restrict__ g, const uint4* __restrict__ u,
                                       uint4* __restrict__ out, int64_t n8) {
  pdl_wait();
  pdl_trigger();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint4 gv = g[i], uv = u[i];
    const auto* gp = reinterpret_cast<const __nv_bfloat162*>(&gv);
    const auto* up = reinterpret_cast<const __nv_bfloat162*>(&uv);
    uint4 result;
    auto* rp = reinterpret_cast<__nv_bfloat162*>(&result);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 gf = __bfloat1622float2(gp[j]), uf = __bfloat1622float2(up[j]);
      rp[j] = __floats2bfloat162_rn(silu(gf.x) * uf.x, silu(gf.y) * uf.y);
    }
    out[i] = result;
  }
}

template <class In, class Out>
__global__ void silu_mul_kernel(const In* __restrict__ g, const In* __restrict__ u,
                                Out* __restrict__ out, int64_t n) {
  pdl_wait();
  pdl_trigger();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    store_out(out, i, silu(load_in(g, i)) * load_in(u, i));
  }
}

// x[i] += y[i % ny]: y of x's shape, or a trailing part repeated.
__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ y, int64_t n,
                           int64_t ny) {
  pdl_wait();
  pdl_trigger();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] += y[ny == n ? i : i % ny];
}

__global__ void add_scaled_kernel(float* __restrict__ x, const float* __restrict__ y,
                                  const float* __restrict__ scale, int64_t n, int64_t D) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i] * scale[i % D];
}

__global__ void widen_kernel(const void* __restrict__ src, DType dtype, int64_t n,
                             float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = load_f32(src, dtype, i);
}

// out[i, :] = table[ids[i], :]; ids were validated (or, in a recorded step, by the runner).
template <class Id>
__global__ void embedding_kernel(const Id* __restrict__ ids, const void* __restrict__ table,
                                 DType dtype, int64_t vocab, int64_t D, float* __restrict__ out) {
  pdl_wait();
  pdl_trigger();
  int64_t id = int64_t(ids[blockIdx.x]);
  id = id < 0 ? 0 : (id >= vocab ? vocab - 1 : id);  // never read outside the table
  // Block y takes elements [y * blockDim.x, ...) of the row: one element per thread, so a
  // decode step's single row is one memory latency (a loop per thread was ~10 us of each token).
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d < D) out[blockIdx.x * D + d] = load_f32(table, dtype, id * D + d);
}

// dst row r (+ delta * delta_stride) = src row r (stride 0 repeats one row); with src2/dst2,
// the same copy of a second pair of the same geometry in the same launch (keys and values).
__global__ void copy_rows_kernel(const float* __restrict__ src, int64_t src_stride,
                                 float* __restrict__ dst, int64_t dst_stride, int64_t rows,
                                 int64_t row_len, const int* delta, int64_t delta_stride,
                                 const float* __restrict__ src2, float* __restrict__ dst2) {
  pdl_wait();
  pdl_trigger();
  const int64_t shift = int64_t(delta_of(delta)) * delta_stride;
  const int64_t per_pair = rows * row_len, n = src2 ? 2 * per_pair : per_pair;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const bool second = i >= per_pair;
    const int64_t j = second ? i - per_pair : i;
    const int64_t r = j / row_len, c = j % row_len;
    (second ? dst2 : dst)[r * dst_stride + shift + c] = (second ? src2 : src)[r * src_stride + c];
  }
}

void launch_copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride,
                      int64_t rows, int64_t row_len, const int* delta, int64_t delta_stride,
                      const float* src2, float* dst2) {
  const int64_t n = rows * row_len * (src2 ? 2 : 1);
  if (n == 0) return;
  launch_pdl(copy_rows_kernel, blocks_for(n, kThreads), kThreads, 0, src, src_stride, dst,
             dst_stride, rows, row_len, delta, delta_stride, src2, dst2);
  MOXIN_LAUNCH_CHECK();
}

}  // namespace

void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
               int64_t row_len, const int* delta, int64_t delta_stride) {
  launch_copy_rows(src, src_stride, dst, dst_stride, rows, row_len, delta, delta_stride, nullptr,
                   nullptr);
}

namespace {

// [B, L, H, Dh] -> [B, H, L, Dh]
__global__ void heads_first_kernel(const float* __restrict__ x, float* __restrict__ out,
                                   int64_t B, int64_t L, int64_t H, int64_t Dh) {
  const int64_t n = B * L * H * Dh;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % Dh;
    int64_t t = i / Dh;
    const int64_t h = t % H;
    t /= H;
    const int64_t l = t % L, b = t / L;
    out[((b * H + h) * L + l) * Dh + d] = x[i];
  }
}

__global__ void patchify_kernel(const float* __restrict__ images, int64_t B, int64_t S, int64_t C,
                                int64_t P, float* __restrict__ out) {
  const int64_t G = S / P, row_len = C * P * P, n = B * G * G * row_len;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = i % row_len, patch = i / row_len;
    const int64_t kx = col % P, ky = (col / P) % P, c = col / (P * P);
    const int64_t gx = patch % G, gy = (patch / G) % G, b = patch / (G * G);
    out[i] = images[((b * S + gy * P + ky) * S + gx * P + kx) * C + c];
  }
}

// Rotate-half RoPE on x [B, L, H, Dh] at positions offset (+ delta) + l, or, for a ragged
// batch (`starts` set, I32 [B]), at starts[b] + l. x2 [B, L, H2, Dh] (queries and keys in one
// launch) is rotated the same way when given.
__global__ void rope_kernel(float* x, int64_t B, int64_t L, int64_t H, int64_t Dh, int64_t offset,
                            const int* delta, const int* __restrict__ starts,
                            const float* __restrict__ inv_freqs, float* x2, int64_t H2) {
  pdl_wait();
  pdl_trigger();
  const int64_t heads = H + H2;  // per position, x's then x2's
  const int64_t half = Dh / 2, n = B * L * heads * half;
  const int64_t base = offset + delta_of(delta);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t f = i % half, row = i / half;  // row = (b * L + l) * heads + h
    const int64_t position_row = row / heads, h = row % heads;  // position_row = b * L + l
    const int64_t l = position_row % L;
    const int64_t pos = starts ? int64_t(starts[position_row / L]) + l : base + l;
    const float angle = float(pos) * inv_freqs[f];
    float s, c;
    sincosf(angle, &s, &c);
    float* v = h < H ? x + (position_row * H + h) * Dh : x2 + (position_row * H2 + h - H) * Dh;
    const float a = v[f], b = v[f + half];
    v[f] = a * c - b * s;
    v[f + half] = b * c + a * s;
  }
}

// RoPE and the KV append of L positions in one launch: queries [B, L, Hq, Dh] rotated in
// place; keys [B, L, Hkv, Dh] rotated into the key cache and values copied into the value cache
// at positions at (+ delta) + l, caches [B, Hkv, capacity, Dh]. Same angles as rope_kernel.
// Thread i takes frequency f of `group_heads` heads of one (b, l) position, the heads running
// q's then k's: one sincos serves them all (per element, the sincos dominated a prefill's
// launch). A decode step takes one head per thread: its 40 heads are all the parallelism
// there is (eight per thread cost it ~1% of its tokens per second).
__global__ void rope_append_kernel(float* __restrict__ q, const float* __restrict__ k,
                                   const float* __restrict__ v, float* __restrict__ keys,
                                   float* __restrict__ values, int64_t B, int L, int Hq, int Hkv,
                                   int Dh, int64_t capacity, int64_t at, const int* delta,
                                   const float* __restrict__ inv_freqs, int group_heads) {
  pdl_wait();
  pdl_trigger();
  const int half = Dh / 2, heads = Hq + Hkv;
  const int head_groups = (heads + group_heads - 1) / group_heads;
  const int64_t n = B * L * head_groups * half;
  const int64_t first = at + delta_of(delta);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int f = int(i % half);
    const int64_t row = i / half;  // (b * L + l) * head_groups + group
    const int group = int(row % head_groups);
    const int64_t token = row / head_groups;  // b * L + l
    const int64_t b = token / L, pos = first + token % L;
    float s, c;
    sincosf(float(pos) * inv_freqs[f], &s, &c);
    for (int h = group * group_heads; h < min(heads, (group + 1) * group_heads); ++h) {
      if (h < Hq) {
        float* x = q + (token * Hq + h) * Dh;
        const float x0 = x[f], x1 = x[f + half];
        x[f] = x0 * c - x1 * s;
        x[f + half] = x1 * c + x0 * s;
      } else {
        const int64_t src_row = (token * Hkv + (h - Hq)) * Dh;
        const int64_t dst_row = ((b * Hkv + (h - Hq)) * capacity + pos) * Dh;
        const float k0 = k[src_row + f], k1 = k[src_row + f + half];
        keys[dst_row + f] = k0 * c - k1 * s;
        keys[dst_row + f + half] = k1 * c + k0 * s;
        values[dst_row + f] = v[src_row + f];
        values[dst_row + f + half] = v[src_row + f + half];
      }
    }
  }
}

// dst [B, H, capacity, D][b, h, at[b] + l] = src [B, H, L, D][b, h, l]: the ragged KV append.
__global__ void write_positions_ragged_kernel(const float* __restrict__ src,
                                              float* __restrict__ dst, int64_t B, int64_t H,
                                              int64_t L, int64_t D, int64_t capacity,
                                              const int* __restrict__ at) {
  pdl_wait();
  pdl_trigger();
  const int64_t n = B * H * L * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, row = i / D;  // row = (b * H + h) * L + l
    const int64_t l = row % L, bh = row / L;
    dst[(bh * capacity + at[bh / H] + l) * D + d] = src[i];
  }
}

// ------------------------------------------------------------------------------------------
// Attention

struct AttnArgs {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  // Set instead of `out` by prefills whose output feeds a bf16 product (tensor-core kernel only).
  __nv_bfloat16* out_bf16;
  int64_t Lq, Lk, Hq, Hkv, Dh;
  int64_t q_row, kv_row, kv_head, out_row;  // strides in floats
  int64_t q_batch, kv_batch, out_batch;
  bool causal;
  int64_t q_offset, window;
  float scale;
  const int* delta;  // added to q_offset and Lk (recorded decode steps)
  // Ragged batches: batch b's queries start at q_starts[b] (I32, device) and see keys
  // [0, q_starts[b] + Lq); q_offset and Lk then only bound the launch (Lk: the longest).
  const int* q_starts;
};

constexpr int kFlashMaxDh = 128;  // head dims up to this

// Flash-style attention for many query rows (prefill and the vision towers) on the tensor
// cores. Each warp takes 16 query rows of one head; keys and values stream through shared
// memory a tile at a time with an online softmax, so no score matrix is ever written. The
// products are mma.m16n8k16 in "3xBF16": every float operand x is split into hi = bf16(x) and
// lo = bf16(x - hi), and a b is taken as ah bh + ah bl + al bh with float32 accumulation. The
// dropped al bl term and the rounding of lo leave ~2^-17 relative error per product, so the
// float32 parity of the CUDA-core kernel this replaced (1e-4, float32 checkpoints included)
// holds at three tensor-core operations per product instead of one.
//
// Keys and values are split once per call by a small kernel into four bf16 planes (K hi, K lo,
// V hi, V lo; rows padded to whole tiles, columns to kDhp), which the attention blocks copy
// into shared memory with cp.async, a tile ahead of the one they compute on. (Splitting in
// every block, from float32 loads, left the loads' latency exposed and repeated the work once
// per block of rows: bench/GPU_NOTES.md.)
//
// Block shapes: kRowWarps groups of 16 query rows; the kSplit warps of a group take kSlice
// keys each of every kKeys-key tile, and merge their partial softmaxes at the end. Splitting
// the keys multiplies the warps per SM when there are few rows (the towers: 16 heads x 17
// groups of 16 rows, about two warps per SM unsplit, each a chain of dependent tensor-core
// operations).
template <int kDhp_, int kRowWarps_, int kSplit_, int kKeys_>
struct MmaAttentionShape {
  static constexpr int kDhp = kDhp_;  // the head dim rounded up to 16 (zero columns past it)
  static constexpr int kRowWarps = kRowWarps_, kSplit = kSplit_, kKeys = kKeys_;
  static constexpr int kWarps = kRowWarps * kSplit, kThreads = 32 * kWarps;
  static constexpr int kSlice = kKeys / kSplit;
  static_assert(kSlice % 16 == 0, "a warp's keys make whole 16-key steps");
  // Row stride in bf16: rows 16-byte aligned (cp.async, ldmatrix), and an odd multiple of 4
  // words, so the 8 rows one fragment load touches fall in distinct banks.
  static constexpr int kStride = kDhp + 8;
  static constexpr int kPlane = kKeys * kStride;  // K hi, K lo, V hi, V lo in turn
  static constexpr size_t kStagesBytes = size_t(2) * 4 * kPlane * sizeof(__nv_bfloat16);
  // After the last tile: each warp's 16 x kDhp outputs, then its rows' max and sum.
  static constexpr int kPartFloats = 16 * kDhp + 32;
  static constexpr size_t kMergeBytes = kSplit > 1 ? size_t(kWarps) * kPartFloats * 4 : 0;
  static constexpr size_t kBytes = kStagesBytes > kMergeBytes ? kStagesBytes : kMergeBytes;
};

struct SplitPair {
  uint32_t hi, lo;  // two bf16 each, the first element in the low half
};

__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}

__device__ __forceinline__ SplitPair split_pair(float x0, float x1) {
  const __nv_bfloat162 hi = __floats2bfloat162_rn(x0, x1);
  const float2 back = __bfloat1622float2(hi);
  return {bf16x2_bits(hi), bf16x2_bits(__floats2bfloat162_rn(x0 - back.x, x1 - back.y))};
}

// Keys and values [B, Hkv, rows of Lk, Dh] (AttnArgs strides) -> the four planes
// [4][B * Hkv][rows][kDhp] of bf16 pairs, zero past Lk and past the head.
__global__ void split_keys_values_kernel(AttnArgs a, int64_t B, int64_t rows, int dhp,
                                         uint32_t* __restrict__ planes) {
  const int64_t pairs_per_row = dhp / 2, plane = B * a.Hkv * rows * pairs_per_row;
  const int64_t Lk = a.Lk;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < plane;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = 2 * (i % pairs_per_row), row = i / pairs_per_row;
    const int64_t j = row % rows, bg = row / rows;
    const int64_t at = (bg / a.Hkv) * a.kv_batch + (bg % a.Hkv) * a.kv_head + j * a.kv_row + d;
    const bool in = j < Lk;
    const float k0 = in && d < a.Dh ? a.k[at] : 0.0f, k1 = in && d + 1 < a.Dh ? a.k[at + 1] : 0.0f;
    const float v0 = in && d < a.Dh ? a.v[at] : 0.0f, v1 = in && d + 1 < a.Dh ? a.v[at + 1] : 0.0f;
    const SplitPair k = split_pair(k0, k1), v = split_pair(v0, v1);
    planes[i] = k.hi;
    planes[plane + i] = k.lo;
    planes[2 * plane + i] = v.hi;
    planes[3 * plane + i] = v.lo;
  }
}

// c += a b for a 16 x 16 bf16 A fragment and a 16 x 8 B fragment (b0: k 0-7, b1: k 8-15).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ah bh + ah bl + al bh, the small terms first.
__device__ __forceinline__ void mma_3xbf16(float (&c)[4], const uint32_t (&a_hi)[4],
                                           const uint32_t (&a_lo)[4], uint32_t bh0, uint32_t bh1,
                                           uint32_t bl0, uint32_t bl1) {
  mma_bf16(c, a_lo, bh0, bh1);
  mma_bf16(c, a_hi, bl0, bl1);
  mma_bf16(c, a_hi, bh0, bh1);
}

// Four 8 x 8 bf16 matrices, lane l addressing row l % 8 of matrix l / 8: thread (g, t) gets
// row g, columns 2t and 2t + 1 of each.
__device__ __forceinline__ void ldmatrix_x4(const __nv_bfloat16* row, uint32_t (&b)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(uint32_t(__cvta_generic_to_shared(row)))
               : "memory");
}

// B fragments of two adjacent 8-column tiles from a row-major [k][n] bf16 tile: lanes 0-15
// address rows 0-15 at column n0, lanes 16-31 the same rows at n0 + 8.
__device__ __forceinline__ void ldmatrix_x4_trans(const __nv_bfloat16* row, uint32_t (&b)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(uint32_t(__cvta_generic_to_shared(row)))
               : "memory");
}

__device__ __forceinline__ void store_attention_out(const AttnArgs& a, int64_t i, float v) {
  if (a.out_bf16) {
    a.out_bf16[i] = __float2bfloat16(v);
  } else {
    a.out[i] = v;
  }
}

// One tile of the four planes into a shared-memory stage, 16 bytes per copy; `src` points at
// the tile's first row in the first plane. Offsets within a plane are 32-bit.
template <class Shape>
__device__ __forceinline__ void fetch_kv_tile(const __nv_bfloat16* src, int64_t plane,
                                              __nv_bfloat16* stage) {
  constexpr int kChunks = Shape::kDhp / 8, kPerPlane = Shape::kKeys * kChunks;
#pragma unroll
  for (int p = 0; p < 4; ++p, src += plane, stage += Shape::kPlane)
    for (int i = threadIdx.x; i < kPerPlane; i += Shape::kThreads) {
      const int row = i / kChunks, chunk = i % kChunks;
      copy_async16(stage + row * Shape::kStride + 8 * chunk, src + row * Shape::kDhp + 8 * chunk);
    }
}

template <class Shape>
__global__ void __launch_bounds__(Shape::kThreads)
    flash_attention_mma_kernel(AttnArgs a, const __nv_bfloat16* __restrict__ planes,
                               int64_t plane_rows, int64_t plane) {
  constexpr int kDhp = Shape::kDhp, kStride = Shape::kStride, kPlane = Shape::kPlane;
  constexpr int kSplit = Shape::kSplit, kSlice = Shape::kSlice, kKeys = Shape::kKeys;
  constexpr int kSteps = kDhp / 16, kOutTiles = kDhp / 8, kKeyTiles = kSlice / 8;
  extern __shared__ __align__(16) unsigned char mma_smem[];
  __nv_bfloat16* stages = reinterpret_cast<__nv_bfloat16*>(mma_smem);
  const int Dh = int(a.Dh);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // fragment row group and column pair
  const int slice = (warp % kSplit) * kSlice;  // this warp's first key within each tile
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t kv_group = h / (a.Hq / a.Hkv);
  // Rows and key positions fit 32 bits (positions are bounded by the model's context).
  const int Lq = int(a.Lq), window = int(a.window);
  const int block_row0 = int(blockIdx.x) * (16 * Shape::kRowWarps);
  const int row0 = block_row0 + 16 * (warp / kSplit);  // this warp's first query row
  const bool warp_has_rows = row0 < Lq;
  const int q_offset = a.q_starts ? a.q_starts[b] : int(a.q_offset);
  const int Lk = a.q_starts ? q_offset + Lq : int(a.Lk);

  // Keys the block (and the warp's rows) can see.
  int key_begin = 0, key_end = Lk, warp_begin = 0, warp_end = warp_has_rows ? Lk : 0;
  if (a.causal) {
    key_end = min(Lk, q_offset + min(block_row0 + 16 * Shape::kRowWarps, Lq));
    if (warp_has_rows) warp_end = min(Lk, q_offset + min(row0 + 16, Lq));
    if (window > 0) {
      key_begin = max(0, q_offset + block_row0 - window + 1);
      warp_begin = max(0, q_offset + row0 - window + 1);
    }
    key_begin = key_begin / kKeys * kKeys;
  }
  const int tiles = key_end > key_begin ? (key_end - key_begin + kKeys - 1) / kKeys : 0;
  const __nv_bfloat16* kv_rows = planes + (b * a.Hkv + kv_group) * plane_rows * kDhp;
  if (tiles > 0) fetch_kv_tile<Shape>(kv_rows + int64_t(key_begin) * kDhp, plane, stages);
  copy_async_commit();

  // The warp's queries as A fragments (register r: row g + 8 (r % 2), columns 2t + 8 (r / 2)
  // and the next of each 16-column step), scaled so that exp2 gives the softmax.
  uint32_t q_hi[kSteps][4], q_lo[kSteps][4];
  {
    const float q_scale = a.scale * 1.4426950408889634f;  // log2(e)
    const float* q_rows[2];
    bool q_valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + g + 8 * r;
      q_valid[r] = row < Lq;
      q_rows[r] = a.q + b * a.q_batch + h * Dh + int64_t(q_valid[r] ? row : 0) * a.q_row;
    }
    // Every load first, then the arithmetic: interleaved, the compiler kept ~4 loads in flight
    // and the prologue took a quarter of the decoder's stall samples. Pairs load as float2
    // where the layout allows (the models' shapes always do).
    const bool pairs = Dh % 2 == 0 && a.q_row % 2 == 0 && a.q_batch % 2 == 0 &&
                       reinterpret_cast<uintptr_t>(a.q) % 8 == 0;
    float2 x[kSteps][4];
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int col = 16 * s + 2 * t + 8 * (r / 2);
        const float* q = q_rows[r % 2] + col;
        const bool valid = q_valid[r % 2];
        if (pairs) {
          x[s][r] = valid && col < Dh ? *reinterpret_cast<const float2*>(q) : make_float2(0, 0);
        } else {
          x[s][r].x = valid && col < Dh ? q[0] : 0.0f;
          x[s][r].y = valid && col + 1 < Dh ? q[1] : 0.0f;
        }
      }
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const SplitPair p = split_pair(x[s][r].x * q_scale, x[s][r].y * q_scale);
        q_hi[s][r] = p.hi;
        q_lo[s][r] = p.lo;
      }
  }
  const int pos0 = q_offset + row0 + g;  // absolute positions of rows g and g + 8

  float o[kOutTiles][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

  for (int tile = 0; tile < tiles; ++tile) {
    const int j0 = key_begin + tile * kKeys;
    copy_async_wait<0>();
    // One barrier per tile: this tile has landed (every thread's part of it), and every warp
    // is done with the previous one, whose stage the next tile now fills while this one is
    // computed.
    __syncthreads();
    if (tile + 1 < tiles)
      fetch_kv_tile<Shape>(kv_rows + int64_t(j0 + kKeys) * kDhp, plane,
                           stages + ((tile + 1) % 2) * 4 * kPlane);
    copy_async_commit();
    const __nv_bfloat16* k_hi = stages + (tile % 2) * 4 * kPlane + slice * kStride;
    const __nv_bfloat16 *k_lo = k_hi + kPlane, *v_hi = k_lo + kPlane, *v_lo = v_hi + kPlane;
    const int js = j0 + slice;  // this warp's keys: js ..

    if (js < warp_end && js + kSlice > warp_begin) {  // else nothing this warp sees
      float s[kKeyTiles][4];
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      // B[k = head column][n = key] is a key row: ldmatrix (not transposed) of keys 8n.. and
      // 8n + 8.. at columns 16st and 16st + 8 gives both fragments of two key tiles.
      const int k_at = (8 * (lane / 16) + lane % 8) * kStride + 8 * (lane / 8 % 2);
#pragma unroll
      for (int st = 0; st < kSteps; ++st)
#pragma unroll
        for (int n = 0; n < kKeyTiles; n += 2) {
          uint32_t bh[4], bl[4];
          ldmatrix_x4(k_hi + k_at + 8 * n * kStride + 16 * st, bh);
          ldmatrix_x4(k_lo + k_at + 8 * n * kStride + 16 * st, bl);
          mma_3xbf16(s[n], q_hi[st], q_lo[st], bh[0], bh[1], bl[0], bl[1]);
          mma_3xbf16(s[n + 1], q_hi[st], q_lo[st], bh[2], bh[3], bl[2], bl[3]);
        }

      // Masks only where some key of the slice is hidden from some row of the warp.
      const int first_pos = q_offset + row0, last_pos = first_pos + 15;
      const bool all_visible =
          js + kSlice <= key_end &&
          (!a.causal || (js + kSlice - 1 <= first_pos && (window <= 0 || js > last_pos - window)));
      if (!all_visible) {
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = js + 8 * n + 2 * t + (e % 2);
            const int pos = pos0 + 8 * (e / 2);
            bool visible = j < key_end;
            if (a.causal) visible = visible && j <= pos && (window <= 0 || j > pos - window);
            if (!visible) s[n][e] = -INFINITY;
          }
      }
      // Online softmax of rows g (elements 0, 1) and g + 8 (2, 3): a row's kSlice / 4
      // scores of this tile per lane, its kSlice across the lane's quad.
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        tile_max[0] = fmaxf(tile_max[0], fmaxf(s[n][0], s[n][1]));
        tile_max[1] = fmaxf(tile_max[1], fmaxf(s[n][2], s[n][3]));
      }
      float correction[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(m[r], tile_max[r]);
        correction[r] = m_new == -INFINITY ? 1.0f : exp2f(m[r] - m_new);
        m[r] = m_new;
      }
      float row_sum[2] = {0.0f, 0.0f};  // this lane's share; the quad is summed at the end
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float mr = m[e / 2];
          s[n][e] = mr == -INFINITY ? 0.0f : exp2f(s[n][e] - mr);
          row_sum[e / 2] += s[n][e];
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) l[r] = l[r] * correction[r] + row_sum[r];
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n) {
        o[n][0] *= correction[0];
        o[n][1] *= correction[0];
        o[n][2] *= correction[1];
        o[n][3] *= correction[1];
      }

      // O += P V: the score tiles 2kk and 2kk + 1 are the A fragment of keys 16kk.. as they are.
#pragma unroll
      for (int kk = 0; kk < kSlice / 16; ++kk) {
        uint32_t p_hi[4], p_lo[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float* pair = &s[2 * kk + r / 2][2 * (r % 2)];
          const SplitPair p = split_pair(pair[0], pair[1]);
          p_hi[r] = p.hi;
          p_lo[r] = p.lo;
        }
        const int at = (16 * kk + lane % 16) * kStride + 8 * (lane / 16);
#pragma unroll
        for (int n = 0; n < kOutTiles; n += 2) {
          uint32_t bh[4], bl[4];
          ldmatrix_x4_trans(v_hi + at + 8 * n, bh);
          ldmatrix_x4_trans(v_lo + at + 8 * n, bl);
          mma_3xbf16(o[n], p_hi, p_lo, bh[0], bh[1], bl[0], bl[1]);
          mma_3xbf16(o[n + 1], p_hi, p_lo, bh[2], bh[3], bl[2], bl[3]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if constexpr (kSplit == 1) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + g + 8 * r;
      if (row >= Lq) continue;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      const int64_t at = b * a.out_batch + int64_t(row) * a.out_row + h * Dh;
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * n + 2 * t + e;
          if (col < Dh) store_attention_out(a, at + col, o[n][2 * r + e] * inv);
        }
    }
  } else {
    // Once every warp is past its last tile, the stages are free: each warp leaves its
    // unnormalised rows, maxima and sums there, and the block merges each row group's kSplit
    // parts.
    __syncthreads();
    float* part = reinterpret_cast<float*>(mma_smem) + warp * Shape::kPartFloats;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) part[(g + 8 * r) * kDhp + 8 * n + 2 * t + e] = o[n][2 * r + e];
      if (t == 0) {
        part[16 * kDhp + g + 8 * r] = m[r];
        part[16 * kDhp + 16 + g + 8 * r] = l[r];
      }
    }
    __syncthreads();
    const float* parts = reinterpret_cast<const float*>(mma_smem);
    for (int i = threadIdx.x; i < Shape::kRowWarps * 16 * Dh; i += Shape::kThreads) {
      const int group = i / (16 * Dh), row = i / Dh % 16, col = i % Dh;
      const int q_row = block_row0 + 16 * group + row;
      if (q_row >= Lq) continue;
      const float* first = parts + group * kSplit * Shape::kPartFloats;
      float top = -INFINITY;
      for (int s = 0; s < kSplit; ++s)
        top = fmaxf(top, first[s * Shape::kPartFloats + 16 * kDhp + row]);
      float num = 0.0f, den = 0.0f;
      for (int s = 0; s < kSplit; ++s) {
        const float* p = first + s * Shape::kPartFloats;
        const float ms = p[16 * kDhp + row];
        if (ms == -INFINITY) continue;  // saw no key of this row
        const float w = exp2f(ms - top);
        num += w * p[row * kDhp + col];
        den += w * p[16 * kDhp + 16 + row];
      }
      store_attention_out(a, b * a.out_batch + int64_t(q_row) * a.out_row + h * Dh + col,
                          den > 0.0f ? num / den : 0.0f);
    }
  }
}

// Splits the keys and values, then launches the kernel of one block shape.
template <class Shape>
void launch_mma_attention(const AttnArgs& a, int64_t B) {
  static const bool opted_in = [] {  // shared memory past 48 KB, once per shape
    MOXIN_CUDA_CHECK(cudaFuncSetAttribute(flash_attention_mma_kernel<Shape>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(Shape::kBytes)));
    return true;
  }();
  (void)opted_in;
  constexpr int kDhp = Shape::kDhp;
  const int64_t rows = (a.Lk + Shape::kKeys - 1) / Shape::kKeys * Shape::kKeys;
  const int64_t pairs = B * a.Hkv * rows * (kDhp / 2);
  Tensor planes = Tensor::empty({4 * pairs}, DType::I32, Device::CUDA);
  split_keys_values_kernel<<<blocks_for(pairs, kThreads), kThreads, 0, stream()>>>(
      a, B, rows, kDhp, reinterpret_cast<uint32_t*>(planes.data_mut<int32_t>()));
  MOXIN_LAUNCH_CHECK();
  constexpr int kBlockRows = 16 * Shape::kRowWarps;
  const dim3 grid(unsigned((a.Lq + kBlockRows - 1) / kBlockRows), unsigned(a.Hq), unsigned(B));
  flash_attention_mma_kernel<Shape><<<grid, Shape::kThreads, Shape::kBytes, stream()>>>(
      a, reinterpret_cast<const __nv_bfloat16*>(planes.data<int32_t>()), rows, 2 * pairs);
}

// Head dims up to 80 (the towers): one row group of 16 per block, its keys split four ways.
// 128 (the decoder, 280 rows x 32 heads): four row groups, keys not split, 32-key tiles (a
// two-way split measured slower, 71 against 52 us per call: its 16-key slices pay each
// tile's fixed costs for half the work).
void launch_mma_attention(const AttnArgs& a, int64_t B) {
  if (a.Dh <= 32) launch_mma_attention<MmaAttentionShape<32, 1, 4, 64>>(a, B);
  else if (a.Dh <= 64) launch_mma_attention<MmaAttentionShape<64, 1, 4, 64>>(a, B);
  else if (a.Dh <= 80) launch_mma_attention<MmaAttentionShape<80, 1, 4, 64>>(a, B);
  else launch_mma_attention<MmaAttentionShape<128, 4, 1, 32>>(a, B);
}

// Decode attention: one query row per (head, batch) over the whole history. 8 warps split the
// keys; each lane owns every 32nd element of the head; the warps' partial softmaxes are merged
// through shared memory at the end.
//
// Split (flash-decoding): with kSplit, block z takes only the keys [z * kSplitKeys,
// (z + 1) * kSplitKeys) of the history and writes its partial softmax (max, sum, weighted values)
// to `partials` [B, Hq, splits, Dh + 2]. The last block of a (head, batch) row to finish, known
// from an arrival counter, merges the row's partials, so the merge needs no second launch; it
// also resets the counter for the next launch (and the next replay of a recorded step). The
// split count follows the cache's capacity (fixed when a step is recorded), blocks past the
// current length write an empty partial, so long histories get splits * Hq blocks instead of Hq.
// A split block's keys are one step of its warps, and every key before the new position was
// stored by an earlier step: they are loaded before waiting for the previous kernel
// (programmatic dependent launch), so their latency overlaps its tail.
//
// kRope (split only): q and the new key arrive as projected. The kernel rotates them (the angles
// of rope_append_kernel), stages the new key and value in shared memory, and one block per KV
// head stores them in the cache at the new position: the decode step's RoPE + KV append launch
// is gone (for grids of one wave: fused_decode_fits_one_wave). No block of this launch reads
// that position from the cache.
constexpr int kDecodeWarps = 8;
constexpr int kDecodeKeys = 8;  // keys per warp and step
constexpr int kSplitKeys = kDecodeWarps * kDecodeKeys;

struct DecodeRope {
  const float* k = nullptr;  // [B, 1, Hkv, Dh] new keys and values, as projected
  const float* v = nullptr;
  float* keys = nullptr;     // the cache, where AttnArgs reads it
  float* values = nullptr;
  const float* inv_freqs = nullptr;  // [Dh / 2]
};

template <bool kSplit, bool kRope>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    decode_attention_kernel(AttnArgs a, DecodeRope rope, float* __restrict__ partials,
                            int* __restrict__ arrivals) {
  static_assert(kSplit || !kRope, "the fused RoPE takes the split kernel");
  __shared__ float part_acc[kDecodeWarps][kFlashMaxDh];
  __shared__ float part_m[kDecodeWarps], part_l[kDecodeWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int64_t g = h / (a.Hq / a.Hkv);
  const int Dh = int(a.Dh);
  // The position is known before the previous kernel ends: the delta was advanced by the
  // previous step's last kernel, ragged starts were uploaded before the step.
  const int64_t shift = delta_of(a.delta);
  const int64_t pos = a.q_starts ? int64_t(a.q_starts[b]) : a.q_offset + shift;  // Lq == 1
  const int64_t Lk = a.q_starts ? pos + 1 : a.Lk + shift;
  const float kLog2e = 1.4426950408889634f;
  int64_t begin = 0, end = Lk;
  if (a.causal) {
    end = min(Lk, pos + 1);
    if (a.window > 0) begin = max(int64_t(0), pos - a.window + 1);
  }
  if constexpr (kSplit) {
    begin = max(begin, int64_t(blockIdx.z) * kSplitKeys);
    end = min(end, int64_t(blockIdx.z + 1) * kSplitKeys);
  }
  const float* kbase = a.k + b * a.kv_batch + g * a.kv_head;
  const float* vbase = a.v + b * a.kv_batch + g * a.kv_head;
  float kr[kDecodeKeys][4], vr[kDecodeKeys][4];
  // Key rows j0.. of this warp with j in [begin, last), into registers (zeros elsewhere).
  auto load_keys = [&](int64_t j0, int64_t last) {
#pragma unroll
    for (int t = 0; t < kDecodeKeys; ++t) {
      const bool valid = j0 + t >= begin && j0 + t < last;
      const float* krow = kbase + (j0 + t) * a.kv_row;
      const float* vrow = vbase + (j0 + t) * a.kv_row;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int d = lane + 32 * i;
        kr[t][i] = valid && d < Dh ? __ldcg(krow + d) : 0.0f;
        vr[t][i] = valid && d < Dh ? __ldcg(vrow + d) : 0.0f;
      }
    }
  };
  const int64_t split_j0 = begin + warp * kDecodeKeys;
  if constexpr (kSplit) load_keys(split_j0, min(end, pos));
  const bool has_new = begin <= pos && pos < end;  // the same for the whole block
  // The new position's key and value (key(d), value(d)) into the slot of the warp holding it.
  auto place_new = [&](auto key, auto value) {
#pragma unroll
    for (int t = 0; t < kDecodeKeys; ++t) {
      if (split_j0 + t != pos) continue;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int d = lane + 32 * i;
        kr[t][i] = d < Dh ? key(d) : 0.0f;
        vr[t][i] = d < Dh ? value(d) : 0.0f;
      }
    }
  };
  // kRope: the angles depend only on the position, so they are ready before the wait.
  __shared__ float cos_f[kFlashMaxDh / 2], sin_f[kFlashMaxDh / 2];
  const int half = Dh / 2;
  if (kRope && threadIdx.x < half) {
    float sn, cs;
    sincosf(float(pos) * rope.inv_freqs[threadIdx.x], &sn, &cs);
    cos_f[threadIdx.x] = cs;
    sin_f[threadIdx.x] = sn;
  }
  pdl_wait();
  pdl_trigger();

  float q[4], acc[4];
  const float* qrow = a.q + b * a.q_batch + h * Dh;
  if constexpr (kRope) {
    // Stage the raw query and the new key and value (blocks whose keys include them).
    __shared__ float q_raw[kFlashMaxDh], k_raw[kFlashMaxDh], v_raw[kFlashMaxDh];
    const float* knew = rope.k + (b * a.Hkv + g) * Dh;
    const float* vnew = rope.v + (b * a.Hkv + g) * Dh;
    if (threadIdx.x < Dh) {
      q_raw[threadIdx.x] = qrow[threadIdx.x];
      if (has_new) {
        k_raw[threadIdx.x] = knew[threadIdx.x];
        v_raw[threadIdx.x] = vnew[threadIdx.x];
      }
    }
    __syncthreads();
    // Element d of the rotate-half RoPE, as rope_append_kernel computes it.
    auto rotated = [&](const float* x, int d) {
      if (d < half) return x[d] * cos_f[d] - x[d + half] * sin_f[d];
      return x[d] * cos_f[d - half] + x[d - half] * sin_f[d - half];
    };
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int d = lane + 32 * i;
      q[i] = d < Dh ? rotated(q_raw, d) * a.scale * kLog2e : 0.0f;
      acc[i] = 0.0f;
    }
    if (has_new) {
      place_new([&](int d) { return rotated(k_raw, d); }, [&](int d) { return v_raw[d]; });
      if (h % (a.Hq / a.Hkv) == 0 && threadIdx.x < Dh) {  // one block per KV head stores them
        const int64_t at = b * a.kv_batch + g * a.kv_head + pos * a.kv_row + threadIdx.x;
        rope.keys[at] = rotated(k_raw, threadIdx.x);
        rope.values[at] = v_raw[threadIdx.x];
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int d = lane + 32 * i;
      q[i] = d < Dh ? qrow[d] * a.scale * kLog2e : 0.0f;
      acc[i] = 0.0f;
    }
    // The new position was stored by the previous kernel.
    if constexpr (kSplit)
      if (has_new)
        place_new([&](int d) { return kbase[pos * a.kv_row + d]; },
                  [&](int d) { return vbase[pos * a.kv_row + d]; });
  }

  // Each warp takes kDecodeKeys consecutive keys per step, their key and value rows loaded
  // together before any arithmetic: one memory latency per step instead of one per key, and
  // the keys' dot products reduce across the warp side by side. (Key by key: H100 bf16 decode
  // 162.1-162.2 tok/s, 4-bit 304-317; this way 164.6-164.7 and 326.1-326.6 in the same call.)
  float m = -INFINITY, l = 0.0f;
  auto attend = [&](int64_t j0) {
    float s[kDecodeKeys];
#pragma unroll
    for (int t = 0; t < kDecodeKeys; ++t)
      s[t] = (q[0] * kr[t][0] + q[1] * kr[t][1]) + (q[2] * kr[t][2] + q[3] * kr[t][3]);
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int t = 0; t < kDecodeKeys; ++t) s[t] += __shfl_xor_sync(0xffffffffu, s[t], o);
    float m_new = m;
#pragma unroll
    for (int t = 0; t < kDecodeKeys; ++t) {
      if (j0 + t >= end) s[t] = -INFINITY;  // key j0 is always real, so m_new is finite
      m_new = fmaxf(m_new, s[t]);
    }
    const float correction = exp2f(m - m_new);
    l *= correction;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] *= correction;
#pragma unroll
    for (int t = 0; t < kDecodeKeys; ++t) {
      const float p = exp2f(s[t] - m_new);
      l += p;
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += p * vr[t][i];
    }
    m = m_new;
  };
  if constexpr (kSplit) {
    if (split_j0 < end) attend(split_j0);
  } else {
    for (int64_t j0 = begin + warp * kDecodeKeys; j0 < end; j0 += kDecodeWarps * kDecodeKeys) {
      load_keys(j0, end);
      attend(j0);
    }
  }
  if (lane == 0) {
    part_m[warp] = m;
    part_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int d = lane + 32 * i;
    if (d < kFlashMaxDh) part_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) m_all = fmaxf(m_all, part_m[w]);
  if constexpr (kSplit) {
    float* part = partials + ((b * a.Hq + h) * gridDim.z + blockIdx.z) * (Dh + 2);
    for (int d = threadIdx.x; d < Dh + 1; d += blockDim.x) {
      float num = 0.0f, den = 0.0f;
      for (int w = 0; w < kDecodeWarps; ++w) {
        if (part_m[w] == -INFINITY) continue;
        const float f = exp2f(part_m[w] - m_all);
        num += d < Dh ? part_acc[w][d] * f : 0.0f;
        den += part_l[w] * f;
      }
      if (d < Dh) {
        part[2 + d] = num;
      } else {
        part[0] = m_all;
        part[1] = den;
      }
    }
    // Publish this partial, then count it; the block that completes the count merges.
    __shared__ bool merges;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      int* arrived = arrivals + b * a.Hq + h;
      merges = atomicAdd(arrived, 1) == int(gridDim.z) - 1;
      if (merges) *arrived = 0;
    }
    __syncthreads();
    if (!merges) return;
    __threadfence();
    // Each thread's element of every partial, kMergeBatch partials' loads in flight at once,
    // merged with a running maximum: one L2 round trip per batch. (A loop over the partials,
    // each load behind the previous one's branch, put a chain of about 2 x splits round trips
    // at the end of every layer's attention; with the new value staged beside the new key:
    // H100 4-bit 414.6 -> 428.0 tok/s, bf16 164.6 -> 167.0 in one call, bench/GPU_NOTES.md.)
    constexpr int kMergeBatch = 8;
    const int splits = int(gridDim.z);
    const float* rows = partials + (b * a.Hq + h) * splits * (Dh + 2);
    float* out_row = a.out + b * a.out_batch + h * Dh;
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
      float row_max = -INFINITY, num = 0.0f, den = 0.0f;
      for (int z0 = 0; z0 < splits; z0 += kMergeBatch) {
        float pm[kMergeBatch], pl[kMergeBatch], pa[kMergeBatch];
#pragma unroll
        for (int i = 0; i < kMergeBatch; ++i) {
          const bool real = z0 + i < splits;
          const float* r = rows + (z0 + i) * (Dh + 2);
          pm[i] = real ? __ldcg(r) : -INFINITY;
          pl[i] = real ? __ldcg(r + 1) : 0.0f;
          pa[i] = real ? __ldcg(r + 2 + d) : 0.0f;
        }
        float batch_max = row_max;
#pragma unroll
        for (int i = 0; i < kMergeBatch; ++i) batch_max = fmaxf(batch_max, pm[i]);
        if (batch_max == -INFINITY) continue;  // no key in these partials yet
        const float rescale = exp2f(row_max - batch_max);  // 0 while row_max is -inf
        num *= rescale;
        den *= rescale;
#pragma unroll
        for (int i = 0; i < kMergeBatch; ++i) {
          const float f = exp2f(pm[i] - batch_max);  // 0 for empty partials (-inf)
          num += pa[i] * f;
          den += pl[i] * f;
        }
        row_max = batch_max;
      }
      out_row[d] = den > 0.0f ? num / den : 0.0f;
    }
    return;
  }
  float* orow = a.out + b * a.out_batch + h * Dh;
  for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
    float num = 0.0f, den = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) {
      if (part_m[w] == -INFINITY) continue;
      const float f = exp2f(part_m[w] - m_all);
      num += part_acc[w][d] * f;
      den += part_l[w] * f;
    }
    orow[d] = den > 0.0f ? num / den : 0.0f;
  }
}

// Arrival counters of split decode attention, one per (batch, head) row, zero between launches
// (the merging block resets its row's). Kept for the process and grown outside recorded steps
// (a recording replays with the addresses it saw).
int* split_arrivals(int64_t rows) {
  static std::mutex mutex;
  static Tensor counters;
  std::lock_guard<std::mutex> lock(mutex);
  if (!counters.defined() || counters.numel() < rows) {
    if (capturing())
      throw_error(ErrorKind::Compute, "decode attention: run a step eagerly before recording");
    counters = Tensor::zeros({std::max<int64_t>(rows, 256)}, DType::I32, Device::CUDA);
  }
  return counters.data_mut<int32_t>();
}

bool split_decode_attention() {
  static const bool on = !switched_off("MOXIN_CUDA_SPLIT_ATTENTION");
  return on;
}

// MOXIN_CUDA_FUSED_ROPE_ATTENTION=0: a decode step rotates and stores its new key in a launch
// of its own before attention (the comparison baseline).
bool fused_rope_attention() {
  static const bool on = !switched_off("MOXIN_CUDA_FUSED_ROPE_ATTENTION");
  return on;
}

// Whether `blocks` blocks of the fused decode attention run in one wave. After the previous
// kernel ends each of its blocks stages the raw query and key, takes a barrier and rotates them:
// in one wave that costs less than the RoPE launch it replaces, over many waves (large batches,
// long caches) every wave pays it, and the separate launch measured faster (H100, bf16 batch of
// 32: 2203 fused against 2331 tokens/s, bench/GPU_NOTES.md).
bool fused_decode_fits_one_wave(int64_t blocks) {
  static const int64_t resident = [] {
    int per_sm = 0;
    MOXIN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, decode_attention_kernel<true, true>, kDecodeWarps * 32, 0));
    return int64_t(std::max(per_sm, 1)) * properties().multiProcessorCount;
  }();
  return blocks <= resident;
}

// inv_freq = 1 / theta^(2f / Dh), computed on the host exactly as the CPU path does (glibc's
// powf), so both paths rotate by bit-identical angles; one small table per (Dh, theta), made
// during the prefill (never inside a recorded step).
const float* inv_freq_table(int64_t Dh, float theta) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, float>, Tensor> tables;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = tables.find({Dh, theta});
  if (it == tables.end()) {
    if (capturing())
      throw_error(ErrorKind::Compute, "rope: run a prefill before recording a decode step");
    std::vector<float> values(size_t(Dh / 2));
    for (int64_t f = 0; f < Dh / 2; ++f)
      values[size_t(f)] = 1.0f / std::pow(theta, float(2 * f) / float(Dh));
    it = tables.emplace(std::pair{Dh, theta},
                        Tensor::from_vector({Dh / 2}, values).to_device(Device::CUDA)).first;
  }
  return it->second.data<float>();
}

// `key_capacity`: the most keys a recorded step may ever see (the cache's capacity), which
// fixes the split count of decode attention. `rope`: a decode step whose queries and new key
// are still to be rotated and the key and value still to be stored (split kernel only).
void launch_attention(const AttnArgs& a, int64_t B, int64_t key_capacity = 0,
                      const DecodeRope* rope = nullptr) {
  if (a.Dh > kFlashMaxDh || a.Dh < 1)
    throw_error(ErrorKind::Compute, "attention: head dim " + std::to_string(a.Dh) +
                                        " unsupported on CUDA (at most 128)");
  if (a.Hkv <= 0 || a.Hq % a.Hkv != 0)
    throw_error(ErrorKind::Compute, "attention: query heads not a multiple of KV heads");
  if (a.Lq == 0 || B == 0) return;
  if (a.Lq == 1 && a.causal) {
    const int64_t splits = (std::max(key_capacity, a.Lk) + kSplitKeys - 1) / kSplitKeys;
    if (rope || (splits > 1 && split_decode_attention())) {
      Tensor partials =
          Tensor::empty({B, a.Hq, splits, a.Dh + 2}, DType::F32, Device::CUDA);
      const dim3 grid(unsigned(a.Hq), unsigned(B), unsigned(splits));
      if (rope)
        launch_pdl(decode_attention_kernel<true, true>, grid, kDecodeWarps * 32, 0, a, *rope,
                   partials.data_mut<float>(), split_arrivals(B * a.Hq));
      else
        launch_pdl(decode_attention_kernel<true, false>, grid, kDecodeWarps * 32, 0, a,
                   DecodeRope{}, partials.data_mut<float>(), split_arrivals(B * a.Hq));
    } else {
      launch_pdl(decode_attention_kernel<false, false>, dim3(unsigned(a.Hq), unsigned(B)),
                 kDecodeWarps * 32, 0, a, DecodeRope{}, static_cast<float*>(nullptr),
                 static_cast<int*>(nullptr));
    }
  } else {
    if (a.delta) throw_error(ErrorKind::Compute, "a recorded decode step takes one token");
    launch_mma_attention(a, B);
  }
  MOXIN_LAUNCH_CHECK();
}

}  // namespace

// --------------------------------------------------------------------------------------------

namespace {

template <class T>
Tensor layer_norm_as(const Tensor& x, const LayerNorm& norm, DType dtype) {
  require_f32_cuda(x, "layer_norm");
  const int64_t D = x.dim(-1);
  require_on_gpu(norm.weight, "layer_norm", "weight");
  require_on_gpu(norm.bias, "layer_norm", "bias");
  if (norm.weight.numel() != D || norm.bias.numel() != D)
    throw_error(ErrorKind::Compute, "layer_norm: weight does not match " + shape_to_string(x.shape()));
  Tensor y = Tensor::empty(x.shape(), dtype, Device::CUDA);
  const int64_t rows = x.numel() / D;
  if (rows == 0) return y;
  const float *xp = x.data<float>(), *w = norm.weight.data<float>(), *b = norm.bias.data<float>();
  T* yp = static_cast<T*>(y.raw_mut());
  if (norm_rows_vectorised(D, {xp, w, b, yp})) {
    layer_norm_vec_kernel<T><<<unsigned(rows), kThreads, 0, stream()>>>(xp, w, b, norm.eps,
                                                                          int(D), yp);
  } else {
    layer_norm_kernel<T><<<unsigned(rows), kThreads, 0, stream()>>>(xp, w, b, norm.eps, D, yp);
  }
  MOXIN_LAUNCH_CHECK();
  return y;
}

template <class T>
Tensor rms_norm_as(const Tensor& x, const RMSNorm& norm, DType dtype) {
  require_f32_cuda(x, "rms_norm");
  const int64_t D = x.dim(-1);
  require_on_gpu(norm.weight, "rms_norm", "weight");
  if (norm.weight.numel() != D || norm.weight.dtype() != DType::F32)
    throw_error(ErrorKind::Compute, "rms_norm: weight does not match " + shape_to_string(x.shape()));
  Tensor y = Tensor::empty(x.shape(), dtype, Device::CUDA);
  const int64_t rows = x.numel() / D;
  if (rows == 0) return y;
  const float *xp = x.data<float>(), *w = norm.weight.data<float>();
  T* yp = static_cast<T*>(y.raw_mut());
  if (norm_rows_vectorised(D, {xp, w, yp})) {
    launch_pdl(rms_norm_vec_kernel<T>, unsigned(rows), kThreads, 0, xp, w, norm.eps, int(D), yp);
  } else {
    launch_pdl(rms_norm_kernel<T>, unsigned(rows), kThreads, 0, xp, w, norm.eps, D, yp);
  }
  MOXIN_LAUNCH_CHECK();
  return y;
}

template <class T>
Tensor silu_mul_as(const Tensor& gate, const Tensor& up, DType dtype) {
  require_f32_cuda(gate, "silu_mul");
  require_f32_cuda(up, "silu_mul");
  if (gate.shape() != up.shape()) throw_error(ErrorKind::Compute, "silu_mul: shape mismatch");
  Tensor out = Tensor::empty(gate.shape(), dtype, Device::CUDA);
  if (gate.numel() == 0) return out;
  launch_pdl(silu_mul_kernel<float, T>, blocks_for(gate.numel(), kThreads), kThreads, 0,
             gate.data<float>(), up.data<float>(), static_cast<T*>(out.raw_mut()), gate.numel());
  MOXIN_LAUNCH_CHECK();
  return out;
}

// Rows [M, K] of x when the layer's product would take them in bf16, else 0.
int64_t bf16_rows_for(const Tensor& x, const Linear& layer) {
  if (!x.defined() || x.ndim() == 0 || x.dim(-1) == 0) return 0;
  const int64_t K = x.dim(-1), M = x.numel() / K;
  return takes_bf16_rows(layer, M, K) ? M : 0;
}

}  // namespace

Tensor layer_norm(const Tensor& x, const LayerNorm& norm) {
  return layer_norm_as<float>(x, norm, DType::F32);
}

Tensor rms_norm(const Tensor& x, const RMSNorm& norm) {
  return rms_norm_as<float>(x, norm, DType::F32);
}

Tensor rms_norm_bf16(const Tensor& x, const RMSNorm& norm) {
  return rms_norm_as<__nv_bfloat16>(x, norm, DType::BF16);
}

void gelu_inplace(Tensor& x) {
  require_f32_cuda(x, "gelu");
  if (x.numel() == 0) return;
  gelu_kernel<float><<<blocks_for(x.numel(), kThreads), kThreads, 0, stream()>>>(
      x.data<float>(), x.numel(), x.data_mut<float>());
  MOXIN_LAUNCH_CHECK();
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  return silu_mul_as<float>(gate, up, DType::F32);
}

Tensor layer_norm_linear(const Tensor& x, const LayerNorm& norm, const Linear& layer) {
  if (bf16_rows_for(x, layer) == 0) return linear(layer_norm(x, norm), layer);
  Tensor y;
  linear_from_bf16(layer_norm_as<__nv_bfloat16>(x, norm, DType::BF16), layer, y, false);
  return y;
}

Tensor gelu_linear(Tensor& x, const Linear& layer) {
  require_f32_cuda(x, "gelu");
  if (bf16_rows_for(x, layer) == 0) {
    gelu_inplace(x);
    return linear(x, layer);
  }
  Tensor xb = Tensor::empty(x.shape(), DType::BF16, Device::CUDA);
  gelu_kernel<__nv_bfloat16><<<blocks_for(x.numel(), kThreads), kThreads, 0, stream()>>>(
      x.data<float>(), x.numel(), static_cast<__nv_bfloat16*>(xb.raw_mut()));
  MOXIN_LAUNCH_CHECK();
  Tensor y;
  linear_from_bf16(xb, layer, y, false);
  return y;
}

void swiglu_mlp_accumulate(Tensor& x, const Linear& gate, const Linear& up, const Linear& down,
                           const RMSNorm* norm) {
  const int64_t M = x.defined() && x.ndim() > 0 && x.dim(-1) > 0 ? x.numel() / x.dim(-1) : 0;
  if (M == 0 || !takes_bf16_rows(down, M, down.in_features())) {
    linear_accumulate(x, swiglu_linear(x, gate, up, norm), down);
    return;
  }
  // Many rows: gate and up as two products of the normalised bf16 input, SiLU(gate) * up in
  // bf16 for the down product, which adds into the residual stream. Bias-free gate and up (the
  // decoder's) write bf16 themselves, as a bf16 model's reference rounds them: the SiLU pass
  // then reads half the bytes.
  const int64_t K = x.dim(-1);
  Tensor gated;
  if (norm && !gate.bias.defined() && !up.bias.defined() && takes_bf16_rows(gate, M, K) &&
      takes_bf16_rows(up, M, K) && gate.out_features() == up.out_features()) {
    const std::vector<Tensor> halves = products_bf16_out(x, {&gate, &up}, *norm);
    gated = Tensor::empty(halves[0].shape(), DType::BF16, Device::CUDA);
    const int64_t n = gated.numel();
    if (n % 8 == 0) {  // pool allocations are 256-byte aligned
      launch_pdl(silu_mul_bf16x8_kernel, blocks_for(n / 8, kThreads), kThreads, 0,
                 static_cast<const uint4*>(halves[0].raw()),
                 static_cast<const uint4*>(halves[1].raw()), static_cast<uint4*>(gated.raw_mut()),
                 n / 8);
    } else {
      launch_pdl(silu_mul_kernel<__nv_bfloat16, __nv_bfloat16>, blocks_for(n, kThreads), kThreads,
                 0, static_cast<const __nv_bfloat16*>(halves[0].raw()),
                 static_cast<const __nv_bfloat16*>(halves[1].raw()),
                 static_cast<__nv_bfloat16*>(gated.raw_mut()), n);
    }
    MOXIN_LAUNCH_CHECK();
  } else {
    const std::vector<Tensor> halves = linear_same_input(x, {&gate, &up}, norm);
    gated = silu_mul_as<__nv_bfloat16>(halves[0], halves[1], DType::BF16);
  }
  linear_from_bf16(gated, down, x, true);
}

void add_inplace(Tensor& x, const Tensor& y) {
  require_f32_cuda(x, "add");
  require_f32_cuda(y, "add");
  if (y.numel() == 0 || x.numel() % y.numel() != 0)
    throw_error(ErrorKind::Compute, "add: " + shape_to_string(x.shape()) + " vs " +
                                        shape_to_string(y.shape()));
  launch_pdl(add_kernel, blocks_for(x.numel(), kThreads), kThreads, 0, x.data_mut<float>(),
             y.data<float>(), x.numel(), y.numel());
  MOXIN_LAUNCH_CHECK();
}

void add_scaled_inplace(Tensor& x, const Tensor& y, const Tensor& scale) {
  require_f32_cuda(x, "add_scaled");
  require_f32_cuda(y, "add_scaled");
  require_f32_cuda(scale, "add_scaled");
  const int64_t D = x.dim(-1);
  if (x.numel() != y.numel() || scale.numel() != D)
    throw_error(ErrorKind::Compute, "add_scaled: shape mismatch");
  if (x.numel() == 0) return;
  add_scaled_kernel<<<blocks_for(x.numel(), kThreads), kThreads, 0, stream()>>>(
      x.data_mut<float>(), y.data<float>(), scale.data<float>(), x.numel(), D);
  MOXIN_LAUNCH_CHECK();
}

Tensor embedding(const Tensor& ids, const Tensor& table) {
  require_on_gpu(table, "embedding", "table");
  if (table.ndim() != 2 || !is_float(table.dtype()) || table.dtype() == DType::F64)
    throw_error(ErrorKind::Compute, "embedding: table must be a float matrix");
  if (ids.dtype() != DType::I32 && ids.dtype() != DType::I64)
    throw_error(ErrorKind::Request, "token ids must be I32 or I64");
  const int64_t vocab = table.dim(0), D = table.dim(1), n = ids.numel();
  Tensor out = Tensor::empty({n, D}, DType::F32, Device::CUDA);
  if (out.numel() == 0) return out;
  // Ids are checked on the host (a recorded decode step's ids are checked by its runner
  // before they are written to the device); the kernel clamps as a last line of defence.
  if (!capturing()) {
    const Tensor host = ids.to_device(Device::CPU);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids.dtype() == DType::I64 ? host.data<int64_t>()[i]
                                                   : int64_t(host.data<int32_t>()[i]);
      if (id < 0 || id >= vocab)
        throw_error(ErrorKind::Request, "token id " + std::to_string(id) +
                                            " is outside the vocabulary [0, " +
                                            std::to_string(vocab) + ")");
    }
  }
  const Tensor dev = ids.to_device(Device::CUDA);
  if (n > 2147483647) throw_error(ErrorKind::Request, "too many token ids");
  const int64_t row_blocks = (D + kThreads - 1) / kThreads;
  if (row_blocks > 65535) throw_error(ErrorKind::Compute, "embedding: rows too wide");
  const dim3 grid{unsigned(n), unsigned(row_blocks)};
  if (ids.dtype() == DType::I64) {
    launch_pdl(embedding_kernel<int64_t>, grid, kThreads, 0, dev.data<int64_t>(),
               table.raw(), table.dtype(), vocab, D, out.data_mut<float>());
  } else {
    launch_pdl(embedding_kernel<int32_t>, grid, kThreads, 0, dev.data<int32_t>(),
               table.raw(), table.dtype(), vocab, D, out.data_mut<float>());
  }
  MOXIN_LAUNCH_CHECK();
  return out;
}

namespace {

// Bidirectional attention over fused projections qkv [B, T, 3D] into a new `out` [B, T, D] of
// `dtype` (float32, or bf16 for the product that reads it).
void self_attention_into(const Tensor& qkv, int64_t heads, DType dtype, Tensor& out) {
  require_f32_cuda(qkv, "self_attention");
  if (qkv.ndim() != 3 || heads <= 0 || qkv.dim(2) % 3 != 0 || (qkv.dim(2) / 3) % heads != 0)
    throw_error(ErrorKind::Compute, "self_attention: bad qkv shape " + shape_to_string(qkv.shape()));
  const int64_t B = qkv.dim(0), T = qkv.dim(1), D = qkv.dim(2) / 3;
  out = Tensor::empty({B, T, D}, dtype, Device::CUDA);
  AttnArgs a{};
  const float* base = qkv.data<float>();
  a.q = base;
  a.k = base + D;
  a.v = base + 2 * D;
  if (dtype == DType::BF16) {
    a.out_bf16 = static_cast<__nv_bfloat16*>(out.raw_mut());
  } else {
    a.out = out.data_mut<float>();
  }
  a.Lq = a.Lk = T;
  a.Hq = a.Hkv = heads;
  a.Dh = D / heads;
  a.q_row = a.kv_row = 3 * D;
  a.kv_head = a.Dh;
  a.out_row = D;
  a.q_batch = a.kv_batch = T * 3 * D;
  a.out_batch = T * D;
  a.causal = false;
  a.scale = 1.0f / std::sqrt(float(a.Dh));
  launch_attention(a, B);
}

// Causal attention of q [B, Lq, Hq, Dh] over a cache's history (keys/values [B, Hkv, capacity,
// Dh], kv.length valid) into a new `out` [B, Lq, Hq * Dh] of `dtype`, after checking that the
// two fit; the caller sets where the queries stand.
AttnArgs cached_attention_args(const Tensor& q, const CachedKV& kv, int64_t window, Tensor& out,
                               DType dtype = DType::F32) {
  require_f32_cuda(q, "causal_attention");
  require_f32_cuda(kv.keys, "causal_attention");
  require_f32_cuda(kv.values, "causal_attention");
  if (q.ndim() != 4 || kv.keys.ndim() != 4 || kv.keys.shape() != kv.values.shape())
    throw_error(ErrorKind::Compute, "causal_attention: bad shapes");
  const int64_t B = q.dim(0), Lq = q.dim(1), Hq = q.dim(2), Dh = q.dim(3);
  const int64_t Hkv = kv.keys.dim(1), capacity = kv.keys.dim(2);
  if (kv.keys.dim(0) != B || kv.keys.dim(3) != Dh || kv.length > capacity)
    throw_error(ErrorKind::Compute, "causal_attention: queries " + shape_to_string(q.shape()) +
                                        " do not match the cache " +
                                        shape_to_string(kv.keys.shape()));
  out = Tensor::empty({B, Lq, Hq * Dh}, dtype, Device::CUDA);
  AttnArgs a{};
  a.q = q.data<float>();
  a.k = kv.keys.data<float>();
  a.v = kv.values.data<float>();
  if (dtype == DType::BF16) {
    a.out_bf16 = static_cast<__nv_bfloat16*>(out.raw_mut());
  } else {
    a.out = out.data_mut<float>();
  }
  a.Lq = Lq;
  a.Lk = kv.length;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Dh = Dh;
  a.q_row = Hq * Dh;
  a.kv_row = Dh;
  a.kv_head = capacity * Dh;
  a.out_row = Hq * Dh;
  a.q_batch = Lq * Hq * Dh;
  a.kv_batch = Hkv * capacity * Dh;
  a.out_batch = Lq * Hq * Dh;
  a.causal = true;
  a.window = window;
  a.scale = 1.0f / std::sqrt(float(Dh));
  return a;
}

void check_queries_end_history(const Tensor& q, const CachedKV& kv, int64_t q_offset) {
  if (kv.length != q_offset + q.dim(1))
    throw_error(ErrorKind::Compute, "causal_attention: queries " + shape_to_string(q.shape()) +
                                        " at " + std::to_string(q_offset) + " do not end the " +
                                        std::to_string(kv.length) + " cached positions");
}

}  // namespace

Tensor self_attention_qkv(const Tensor& qkv, int64_t heads) {
  Tensor out;
  self_attention_into(qkv, heads, DType::F32, out);
  return out;
}

Tensor self_attention_linear(const Tensor& qkv, int64_t heads, const Linear& proj) {
  const int64_t rows = qkv.ndim() == 3 ? qkv.dim(0) * qkv.dim(1) : 0;
  if (rows == 0 || !takes_bf16_rows(proj, rows, qkv.dim(2) / 3))
    return linear(self_attention_qkv(qkv, heads), proj);
  Tensor attn, y;
  self_attention_into(qkv, heads, DType::BF16, attn);
  linear_from_bf16(attn, proj, y, false);
  return y;
}

Tensor causal_attention(const Tensor& q, const CachedKV& kv, int64_t q_offset, int64_t window) {
  Tensor out;
  AttnArgs a = cached_attention_args(q, kv, window, out);
  check_queries_end_history(q, kv, q_offset);
  a.q_offset = q_offset;
  a.delta = position_delta();
  launch_attention(a, q.dim(0), kv.keys.dim(2));
  return out;
}

bool fused_rope_attention_accumulate(Tensor& x, Tensor& q, const Tensor& k, const Tensor& v,
                                     const CachedKV& kv, int64_t q_offset, float theta,
                                     int64_t window, const Linear& o_proj) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v})
    require_f32_cuda(*t, "rope_attention_accumulate");
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.dim(1) != 1 ||
      k.dim(1) != 1 || q.dim(0) != k.dim(0) || q.dim(3) != k.dim(3) || q.dim(3) % 2 != 0 ||
      kv.keys.ndim() != 4 || kv.keys.dim(1) != k.dim(2))
    throw_error(ErrorKind::Compute, "rope_attention_accumulate: queries " +
                                        shape_to_string(q.shape()) + " and keys " +
                                        shape_to_string(k.shape()) +
                                        " must be one position of [B, 1, H, even Dh] matching "
                                        "the cache");
  if (!fused_rope_attention() || !split_decode_attention() ||
      !fused_decode_fits_one_wave(q.dim(0) * q.dim(2) *
                                  ((std::max(kv.keys.dim(2), kv.length) + kSplitKeys - 1) /
                                   kSplitKeys)))
    return false;
  Tensor attn;
  AttnArgs a = cached_attention_args(q, kv, window, attn);
  check_queries_end_history(q, kv, q_offset);
  a.q_offset = q_offset;
  a.delta = position_delta();
  Tensor keys = kv.keys, values = kv.values;
  const DecodeRope rope{k.data<float>(), v.data<float>(), keys.data_mut<float>(),
                        values.data_mut<float>(), inv_freq_table(q.dim(3), theta)};
  launch_attention(a, q.dim(0), kv.keys.dim(2), &rope);
  linear_accumulate(x, attn, o_proj);
  return true;
}

void causal_attention_accumulate(Tensor& x, const Tensor& q, const CachedKV& kv,
                                 int64_t q_offset, int64_t window, const Linear& o_proj) {
  const int64_t rows = q.ndim() == 4 ? q.dim(0) * q.dim(1) : 0;
  // Decode steps (one row: the split decode kernel, and a recorded graph's delta) and layers
  // without bf16 rows keep the float32 path.
  if (rows == 0 || q.dim(1) == 1 || !takes_bf16_rows(o_proj, rows, q.dim(2) * q.dim(3))) {
    linear_accumulate(x, causal_attention(q, kv, q_offset, window), o_proj);
    return;
  }
  Tensor attn;
  AttnArgs a = cached_attention_args(q, kv, window, attn, DType::BF16);
  check_queries_end_history(q, kv, q_offset);
  a.q_offset = q_offset;
  launch_attention(a, q.dim(0), kv.keys.dim(2));
  linear_from_bf16(attn, o_proj, x, true);
}

void rope_inplace(Tensor& x, int64_t offset, float theta) {
  require_f32_cuda(x, "rope");
  if (x.ndim() != 4 || x.dim(3) % 2 != 0)
    throw_error(ErrorKind::Compute, "rope: expected [B, L, H, Dh] with even Dh, got " +
                                        shape_to_string(x.shape()));
  const int64_t B = x.dim(0), L = x.dim(1), H = x.dim(2), Dh = x.dim(3);
  const int64_t n = B * L * H * (Dh / 2);
  if (n == 0) return;
  launch_pdl(rope_kernel, blocks_for(n, kThreads), kThreads, 0, x.data_mut<float>(), B, L, H, Dh,
             offset, position_delta(), static_cast<const int*>(nullptr),
             inv_freq_table(Dh, theta), static_cast<float*>(nullptr), int64_t(0));
  MOXIN_LAUNCH_CHECK();
}

void rope_inplace_pair(Tensor& q, Tensor& k, int64_t offset, float theta) {
  require_f32_cuda(q, "rope");
  require_f32_cuda(k, "rope");
  if (q.ndim() != 4 || k.ndim() != 4 || q.dim(3) % 2 != 0 || q.dim(0) != k.dim(0) ||
      q.dim(1) != k.dim(1) || q.dim(3) != k.dim(3))
    throw_error(ErrorKind::Compute, "rope: expected [B, L, H, Dh] queries and keys with even Dh, "
                                    "got " + shape_to_string(q.shape()) + " and " +
                                        shape_to_string(k.shape()));
  const int64_t B = q.dim(0), L = q.dim(1), Dh = q.dim(3);
  const int64_t n = B * L * (q.dim(2) + k.dim(2)) * (Dh / 2);
  if (n == 0) return;
  launch_pdl(rope_kernel, blocks_for(n, kThreads), kThreads, 0, q.data_mut<float>(), B, L,
             q.dim(2), Dh, offset, position_delta(), static_cast<const int*>(nullptr),
             inv_freq_table(Dh, theta), k.data_mut<float>(), k.dim(2));
  MOXIN_LAUNCH_CHECK();
}

Tensor heads_first(const Tensor& x) {
  require_f32_cuda(x, "heads_first");
  if (x.ndim() != 4) throw_error(ErrorKind::Compute, "heads_first: expected [B, L, H, Dh]");
  const int64_t B = x.dim(0), L = x.dim(1), H = x.dim(2), Dh = x.dim(3);
  // One position: [B, 1, H, Dh] and [B, H, 1, Dh] are the same bytes, so no copy (a decode
  // step saves two launches per layer). The result shares x's storage; callers only read it.
  if (L == 1) return x.reshape({B, H, L, Dh});
  Tensor out = Tensor::empty({B, H, L, Dh}, DType::F32, Device::CUDA);
  if (x.numel() == 0) return out;
  heads_first_kernel<<<blocks_for(x.numel(), kThreads), kThreads, 0, stream()>>>(
      x.data<float>(), out.data_mut<float>(), B, L, H, Dh);
  MOXIN_LAUNCH_CHECK();
  return out;
}

Tensor patchify(const Tensor& images, int64_t patch) {
  require_f32_cuda(images, "patchify");
  if (images.ndim() != 4 || images.dim(2) != images.dim(1) || patch <= 0 ||
      images.dim(1) % patch != 0)
    throw_error(ErrorKind::Compute, "patchify: " + shape_to_string(images.shape()));
  const int64_t B = images.dim(0), S = images.dim(1), C = images.dim(3), G = S / patch;
  Tensor out = Tensor::empty({B * G * G, C * patch * patch}, DType::F32, Device::CUDA);
  if (out.numel() == 0) return out;
  patchify_kernel<<<blocks_for(out.numel(), kThreads), kThreads, 0, stream()>>>(
      images.data<float>(), B, S, C, patch, out.data_mut<float>());
  MOXIN_LAUNCH_CHECK();
  return out;
}

void write_positions(Tensor& dst, const Tensor& src, int64_t at) {
  require_f32_cuda(dst, "write_positions");
  require_f32_cuda(src, "write_positions");
  if (src.ndim() != 4 || dst.ndim() != 4)
    throw_error(ErrorKind::Compute, "write_positions: expected [B, H, L, D] tensors");
  const int64_t B = src.dim(0), H = src.dim(1), L = src.dim(2), D = src.dim(3);
  if (dst.dim(0) != B || dst.dim(1) != H || dst.dim(3) != D || at < 0 || at + L > dst.dim(2))
    throw_error(ErrorKind::Compute, "write_positions: " + shape_to_string(src.shape()) + " at " +
                                        std::to_string(at) + " into " + shape_to_string(dst.shape()));
  // In a recorded decode step the position moves with every replay: shift by delta rows.
  copy_rows(src.data<float>(), L * D, dst.data_mut<float>() + at * D, dst.dim(2) * D, B * H, L * D,
            position_delta(), D);
}

void write_positions_pair(Tensor& dst, const Tensor& src, Tensor& dst2, const Tensor& src2,
                          int64_t at) {
  require_f32_cuda(dst, "write_positions");
  require_f32_cuda(src, "write_positions");
  require_f32_cuda(dst2, "write_positions");
  require_f32_cuda(src2, "write_positions");
  if (src.ndim() != 4 || dst.ndim() != 4 || src2.shape() != src.shape() ||
      dst2.shape() != dst.shape())
    throw_error(ErrorKind::Compute, "write_positions: expected two pairs of [B, H, L, D] tensors "
                                    "of one geometry");
  const int64_t B = src.dim(0), H = src.dim(1), L = src.dim(2), D = src.dim(3);
  if (dst.dim(0) != B || dst.dim(1) != H || dst.dim(3) != D || at < 0 || at + L > dst.dim(2))
    throw_error(ErrorKind::Compute, "write_positions: " + shape_to_string(src.shape()) + " at " +
                                        std::to_string(at) + " into " + shape_to_string(dst.shape()));
  launch_copy_rows(src.data<float>(), L * D, dst.data_mut<float>() + at * D, dst.dim(2) * D, B * H,
                   L * D, position_delta(), D, src2.data<float>(), dst2.data_mut<float>() + at * D);
}

void rope_write_pair(Tensor& queries, Tensor& keys, const Tensor& new_keys, Tensor& values,
                     const Tensor& new_values, int64_t at, float theta) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&queries, &keys, &new_keys, &values,
                                                              &new_values})
    require_f32_cuda(*t, "rope_write_pair");
  // queries [B, L, Hq, Dh], new keys and values [B, L, Hkv, Dh], caches [B, Hkv, capacity, Dh]
  if (new_keys.ndim() != 4 || new_values.shape() != new_keys.shape() || keys.ndim() != 4 ||
      values.shape() != keys.shape() || queries.ndim() != 4 ||
      queries.dim(0) != new_keys.dim(0) || queries.dim(1) != new_keys.dim(1) ||
      queries.dim(3) != new_keys.dim(3) || keys.dim(0) != new_keys.dim(0) ||
      keys.dim(1) != new_keys.dim(2) || keys.dim(3) != new_keys.dim(3) ||
      new_keys.dim(3) % 2 != 0)
    throw_error(ErrorKind::Compute, "rope_write_pair: queries " + shape_to_string(queries.shape()) +
                                        ", keys " + shape_to_string(new_keys.shape()) +
                                        " into " + shape_to_string(keys.shape()) +
                                        " (even head dim)");
  const int64_t B = new_keys.dim(0), L = new_keys.dim(1), Hkv = new_keys.dim(2);
  const int64_t Dh = new_keys.dim(3), Hq = queries.dim(2);
  if (at < 0 || at + L > keys.dim(2))
    throw_error(ErrorKind::Compute, "rope_write_pair: positions " + std::to_string(at) + ".." +
                                        std::to_string(at + L) + " outside the cache of " +
                                        std::to_string(keys.dim(2)));
  if (L > 1 && position_delta())
    throw_error(ErrorKind::Compute, "a recorded decode step takes one token");
  const int group_heads = L > 1 ? 8 : 1;
  const int64_t n = B * L * ((Hq + Hkv + group_heads - 1) / group_heads) * (Dh / 2);
  if (n == 0) return;
  launch_pdl(rope_append_kernel, blocks_for(n, kThreads), kThreads, 0, queries.data_mut<float>(),
             new_keys.data<float>(), new_values.data<float>(), keys.data_mut<float>(),
             values.data_mut<float>(), B, int(L), int(Hq), int(Hkv), int(Dh), keys.dim(2), at,
             position_delta(), inv_freq_table(Dh, theta), group_heads);
  MOXIN_LAUNCH_CHECK();
}

// --------------------------------------------------------------------------------------------
// Ragged batches

namespace {

// The device copy of per-sequence positions for a batch of B sequences of L rows below
// `limit`, checked on the host; uploaded into `holder` when the caller made none.
const int* ragged_positions(const BatchPositions& p, int64_t B, int64_t L, int64_t limit,
                            Tensor& holder, const char* op) {
  if (position_delta())
    throw_error(ErrorKind::Compute, std::string(op) +
                                        ": a recorded decode step has one sequence at one position");
  if (p.size() != B)
    throw_error(ErrorKind::Compute, std::string(op) + ": " + std::to_string(p.size()) +
                                        " positions for a batch of " + std::to_string(B));
  for (const int64_t at : p.host)
    if (at < 0 || at + L > limit || at > INT32_MAX)
      throw_error(ErrorKind::Compute, std::string(op) + ": position " + std::to_string(at) +
                                          " + " + std::to_string(L) + " rows outside [0, " +
                                          std::to_string(limit) + "]");
  if (p.device.defined()) {
    if (p.device.device() != Device::CUDA || p.device.dtype() != DType::I32 ||
        p.device.numel() != B)
      throw_error(ErrorKind::Compute, std::string(op) + ": device positions must be I32 [B] on "
                                                        "the GPU");
    return p.device.data<int32_t>();
  }
  Tensor host = Tensor::empty({B}, DType::I32);
  for (int64_t b = 0; b < B; ++b) host.data_mut<int32_t>()[b] = int32_t(p.host[size_t(b)]);
  holder = host.to_device(Device::CUDA);
  return holder.data<int32_t>();
}

}  // namespace

Tensor causal_attention(const Tensor& q, const CachedKV& kv, const BatchPositions& start,
                        int64_t window) {
  Tensor out;
  AttnArgs a = cached_attention_args(q, kv, window, out);
  Tensor holder;
  a.q_starts = ragged_positions(start, q.dim(0), q.dim(1), kv.length, holder, "causal_attention");
  launch_attention(a, q.dim(0), kv.keys.dim(2));
  return out;
}

void rope_inplace(Tensor& x, const BatchPositions& start, float theta) {
  require_f32_cuda(x, "rope");
  if (x.ndim() != 4 || x.dim(3) % 2 != 0)
    throw_error(ErrorKind::Compute, "rope: expected [B, L, H, Dh] with even Dh, got " +
                                        shape_to_string(x.shape()));
  const int64_t B = x.dim(0), L = x.dim(1), H = x.dim(2), Dh = x.dim(3);
  Tensor holder;
  const int* starts = ragged_positions(start, B, L, INT32_MAX, holder, "rope");
  const int64_t n = B * L * H * (Dh / 2);
  if (n == 0) return;
  launch_pdl(rope_kernel, blocks_for(n, kThreads), kThreads, 0, x.data_mut<float>(), B, L, H, Dh,
             int64_t(0), static_cast<const int*>(nullptr), starts, inv_freq_table(Dh, theta),
             static_cast<float*>(nullptr), int64_t(0));
  MOXIN_LAUNCH_CHECK();
}

void write_positions(Tensor& dst, const Tensor& src, const BatchPositions& at) {
  require_f32_cuda(dst, "write_positions");
  require_f32_cuda(src, "write_positions");
  if (src.ndim() != 4 || dst.ndim() != 4)
    throw_error(ErrorKind::Compute, "write_positions: expected [B, H, L, D] tensors");
  const int64_t B = src.dim(0), H = src.dim(1), L = src.dim(2), D = src.dim(3);
  if (dst.dim(0) != B || dst.dim(1) != H || dst.dim(3) != D)
    throw_error(ErrorKind::Compute, "write_positions: " + shape_to_string(src.shape()) +
                                        " into " + shape_to_string(dst.shape()));
  Tensor holder;
  const int* positions = ragged_positions(at, B, L, dst.dim(2), holder, "write_positions");
  const int64_t n = src.numel();
  if (n == 0) return;
  launch_pdl(write_positions_ragged_kernel, blocks_for(n, kThreads), kThreads, 0,
             src.data<float>(), dst.data_mut<float>(), B, H, L, D, dst.dim(2), positions);
  MOXIN_LAUNCH_CHECK();
}

Tensor to_f32(const Tensor& t) {
  if (!t.defined() || t.dtype() == DType::F32) return t;
  require_on_gpu(t, "to_f32", "input");
  if (t.dtype() != DType::BF16 && t.dtype() != DType::F16)
    throw_error(ErrorKind::Compute, "to_f32: cannot widen " + std::string(dtype_name(t.dtype())));
  Tensor out = Tensor::empty(t.shape(), DType::F32, Device::CUDA);
  if (t.numel() == 0) return out;
  widen_kernel<<<blocks_for(t.numel(), kThreads), kThreads, 0, stream()>>>(
      t.raw(), t.dtype(), t.numel(), out.data_mut<float>());
  MOXIN_LAUNCH_CHECK();
  return out;
}

}  // namespace moxin::cuda
