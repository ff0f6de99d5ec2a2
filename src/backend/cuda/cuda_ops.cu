// The ops of src/ops/ops.h on the GPU, except linear (cuda_linear.cu): element-wise work,
// norms, rotary embedding, shape plumbing and attention. Float32 activations throughout.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
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

// Output float32, or bf16 rounded from the same float32 values (the input of bf16 products).
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
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = w[i] * (xr[i] * inv);
    if constexpr (std::is_same_v<T, float>) {
      yr[i] = v;
    } else {
      yr[i] = __float2bfloat16(v);
    }
  }
}

__global__ void layer_norm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                  const float* __restrict__ b, float eps, int64_t D,
                                  float* __restrict__ y) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * D;
  float* yr = y + blockIdx.x * D;
  float sum = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) sum += xr[i];
  const float mean = block_sum(sum, scratch) / float(D);
  float sq = 0;  // centred second pass, as torch computes it
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float d = xr[i] - mean;
    sq += d * d;
  }
  const float inv = 1.0f / sqrtf(block_sum(sq, scratch) / float(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// ------------------------------------------------------------------------------------------
// Element-wise

__global__ void gelu_kernel(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752440f));
}

__global__ void silu_mul_kernel(const float* __restrict__ g, const float* __restrict__ u,
                                float* __restrict__ out, int64_t n) {
  pdl_wait();
  pdl_trigger();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
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
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    out[blockIdx.x * D + d] = load_f32(table, dtype, id * D + d);
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

// One decode position's RoPE and KV append in one launch: queries [B, 1, Hq, Dh] rotated in
// place; keys [B, Hkv, 1, Dh] rotated into the key cache and values copied into the value cache
// at position at (+ delta), caches [B, Hkv, capacity, Dh]. Same angles as rope_kernel.
__global__ void rope_append_kernel(float* __restrict__ q, const float* __restrict__ k,
                                   const float* __restrict__ v, float* __restrict__ keys,
                                   float* __restrict__ values, int64_t B, int64_t Hq, int64_t Hkv,
                                   int64_t Dh, int64_t capacity, int64_t at, const int* delta,
                                   const float* __restrict__ inv_freqs) {
  pdl_wait();
  pdl_trigger();
  const int64_t half = Dh / 2, heads = Hq + Hkv, n = B * heads * half;
  const int64_t pos = at + delta_of(delta);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t f = i % half, row = i / half;
    const int64_t b = row / heads, h = row % heads;
    float s, c;
    sincosf(float(pos) * inv_freqs[f], &s, &c);
    if (h < Hq) {
      float* x = q + (b * Hq + h) * Dh;
      const float x0 = x[f], x1 = x[f + half];
      x[f] = x0 * c - x1 * s;
      x[f + half] = x1 * c + x0 * s;
    } else {
      const int64_t head = b * Hkv + (h - Hq);
      const float* src = k + head * Dh;
      float* dst = keys + (head * capacity + pos) * Dh;
      const float k0 = src[f], k1 = src[f + half];
      dst[f] = k0 * c - k1 * s;
      dst[f + half] = k1 * c + k0 * s;
      float* vdst = values + (head * capacity + pos) * Dh;
      vdst[f] = v[head * Dh + f];
      vdst[f + half] = v[head * Dh + f + half];
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

// Flash-style attention for many query rows (prefill and the vision towers), float32 on the
// CUDA cores, register-tiled: a block of 256 threads takes 16 * kRows query rows of one head;
// keys and values stream through shared memory 64 at a time with an online softmax, so no
// score matrix is ever written. Thread (ty, tx) of a 16 x 16 grid computes a kRows x 4 tile of
// scores (rows kRows ty.., keys 4 tx..) from transposed Q and K tiles, keeps the online softmax
// of its rows (max and sum across the 16 threads of a row group by warp shuffles), and
// accumulates its rows x every 16th column of the output. kRows = 2 doubles the blocks of short
// sequences (the towers: 16 heads, 257 rows). It replaced a kernel with eight threads per query
// row and shuffles per key (20.0 -> 14.6 ms of GPU time over one vision encode + prefill pair
// on an H100, bench/GPU_NOTES.md).
constexpr int kTileKeys = 64;
constexpr int kKeyPad = kTileKeys + 4;        // row stride of the transposed key tile (floats)
constexpr int kTileCols = kFlashMaxDh / 16;  // output columns per thread, at most

template <int kRows>
struct AttentionTile {
  static constexpr int kBlockRows = 16 * kRows;
  static constexpr int kRowPad = kBlockRows + 4;  // row stride of the transposed Q and P tiles
  // Qt [Dh][kRowPad], Kt [Dh][kKeyPad], V [kTileKeys][Dh], Pt [kTileKeys][kRowPad] (floats)
  static size_t smem(int64_t Dh) {
    return size_t(Dh * kRowPad + Dh * kKeyPad + kTileKeys * Dh + kTileKeys * kRowPad) *
           sizeof(float);
  }
};

template <int kRows>
__device__ __forceinline__ void load_rows(const float* p, float (&out)[kRows]) {
  if constexpr (kRows == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x, out[1] = v.y;
  }
}

template <int kRows>
__global__ void __launch_bounds__(256) flash_attention_tiled_kernel(AttnArgs a) {
  using Tile = AttentionTile<kRows>;
  constexpr int kBlockRows = Tile::kBlockRows, kRowPad = Tile::kRowPad;
  extern __shared__ float tile_smem[];
  const int Dh = int(a.Dh);
  float* qt = tile_smem;                 // scaled queries, transposed
  float* kt = qt + Dh * kRowPad;         // keys, transposed
  float* vs = kt + Dh * kKeyPad;         // values
  float* pt = vs + kTileKeys * Dh;       // probabilities, transposed
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (a.Hq / a.Hkv);
  const int64_t row0 = int64_t(blockIdx.x) * kBlockRows;
  const int64_t shift = delta_of(a.delta);
  const int64_t q_offset = a.q_starts ? int64_t(a.q_starts[b]) : a.q_offset + shift;
  const int64_t Lk = a.q_starts ? q_offset + a.Lq : a.Lk + shift;
  const float kLog2e = 1.4426950408889634f;

  // Tile fills: warp w takes rows w, w + 8, ..., its lanes consecutive elements of the head
  // (coalesced reads, no division by Dh).
  const int lane = tid % 32, warp = tid / 32;
  const float* qbase = a.q + b * a.q_batch + h * Dh;
  for (int r = warp; r < kBlockRows; r += 8) {
    const int64_t row = row0 + r;
    for (int d = lane; d < Dh; d += 32)
      qt[d * kRowPad + r] = row < a.Lq ? qbase[row * a.q_row + d] * a.scale * kLog2e : 0.0f;
  }
  int64_t key_begin = 0, key_end = Lk;
  if (a.causal) {
    key_end = min(Lk, q_offset + min(row0 + kBlockRows, a.Lq));
    if (a.window > 0) key_begin = max(int64_t(0), q_offset + row0 - a.window + 1);
    key_begin = key_begin / kTileKeys * kTileKeys;
  }
  const float* kbase = a.k + b * a.kv_batch + g * a.kv_head;
  const float* vbase = a.v + b * a.kv_batch + g * a.kv_head;

  float m[kRows], l[kRows], acc[kRows][kTileCols];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kTileCols; ++c) acc[i][c] = 0.0f;
  }
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kTileKeys) {
    __syncthreads();  // the previous tile's keys, values and probabilities are consumed
    for (int kk = warp; kk < kTileKeys; kk += 8) {
      const int64_t j = j0 + kk;
      const bool in = j < key_end;
      for (int d = lane; d < Dh; d += 32) {
        kt[d * kKeyPad + kk] = in ? kbase[j * a.kv_row + d] : 0.0f;
        vs[kk * Dh + d] = in ? vbase[j * a.kv_row + d] : 0.0f;
      }
    }
    __syncthreads();
    float s[kRows][4];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) s[i][jj] = 0.0f;
#pragma unroll 8
    for (int d = 0; d < Dh; ++d) {
      float qa[kRows];
      load_rows<kRows>(qt + d * kRowPad + kRows * ty, qa);
      const float4 kv = *reinterpret_cast<const float4*>(kt + d * kKeyPad + 4 * tx);
      const float ka[4] = {kv.x, kv.y, kv.z, kv.w};
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) s[i][jj] = fmaf(qa[i], ka[jj], s[i][jj]);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t pos = q_offset + row0 + kRows * ty + i;  // this row's absolute position
      float tile_max = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int64_t j = j0 + 4 * tx + jj;
        bool visible = j < key_end;
        if (a.causal) visible = visible && j <= pos && (a.window <= 0 || j > pos - a.window);
        if (!visible) s[i][jj] = -INFINITY;
        tile_max = fmaxf(tile_max, s[i][jj]);
      }
      // The 16 threads of a row group are 16 consecutive lanes of one warp.
      for (int o = 1; o < 16; o <<= 1)
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      const float m_new = fmaxf(m[i], tile_max);
      float p[4], row_sum = 0.0f;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        p[jj] = m_new == -INFINITY ? 0.0f : exp2f(s[i][jj] - m_new);
        row_sum += p[jj];
      }
      for (int o = 1; o < 16; o <<= 1) row_sum += __shfl_xor_sync(0xffffffffu, row_sum, o);
      const float correction = m_new == -INFINITY ? 1.0f : exp2f(m[i] - m_new);
      l[i] = l[i] * correction + row_sum;
#pragma unroll
      for (int c = 0; c < kTileCols; ++c) acc[i][c] *= correction;
      m[i] = m_new;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) pt[(4 * tx + jj) * kRowPad + kRows * ty + i] = p[jj];
    }
    __syncthreads();
    const int keys = int(min(int64_t(kTileKeys), key_end - j0));
#pragma unroll 4
    for (int kk = 0; kk < keys; ++kk) {
      float pa[kRows];
      load_rows<kRows>(pt + kk * kRowPad + kRows * ty, pa);
      const float* vrow = vs + kk * Dh;
#pragma unroll
      for (int c = 0; c < kTileCols; ++c) {
        const int col = tx + 16 * c;
        if (col >= Dh) continue;  // columns past the head (Dh = 64: half of them)
        const float v = vrow[col];
#pragma unroll
        for (int i = 0; i < kRows; ++i) acc[i][c] = fmaf(pa[i], v, acc[i][c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t row = row0 + kRows * ty + i;
    if (row >= a.Lq) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    float* orow = a.out + b * a.out_batch + row * a.out_row + h * Dh;
#pragma unroll
    for (int c = 0; c < kTileCols; ++c) {
      const int col = tx + 16 * c;
      if (col < Dh) orow[col] = acc[i][c] * inv;
    }
  }
}

// Opts the tiled kernel into the shared memory beyond 48 KB, once: up to the card's limit less
// its static share. Returns that limit.
template <int kRows>
size_t tiled_attention_limit() {
  static const size_t limit = [] {
    cudaFuncAttributes attributes{};
    MOXIN_CUDA_CHECK(cudaFuncGetAttributes(&attributes, flash_attention_tiled_kernel<kRows>));
    const size_t bytes = properties().sharedMemPerBlockOptin - attributes.sharedSizeBytes;
    MOXIN_CUDA_CHECK(cudaFuncSetAttribute(flash_attention_tiled_kernel<kRows>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    return bytes;
  }();
  return limit;
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
constexpr int kDecodeWarps = 8;
constexpr int kSplitKeys = 64;
template <bool kSplit>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    decode_attention_kernel(AttnArgs a, float* __restrict__ partials, int* __restrict__ arrivals) {
  pdl_wait();
  pdl_trigger();
  __shared__ float part_acc[kDecodeWarps][kFlashMaxDh];
  __shared__ float part_m[kDecodeWarps], part_l[kDecodeWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int64_t g = h / (a.Hq / a.Hkv);
  const int Dh = int(a.Dh);
  const int64_t shift = delta_of(a.delta);
  const int64_t pos = a.q_starts ? int64_t(a.q_starts[b]) : a.q_offset + shift;  // Lq == 1
  const int64_t Lk = a.q_starts ? pos + 1 : a.Lk + shift;
  const float kLog2e = 1.4426950408889634f;
  float q[4], acc[4];
  const float* qrow = a.q + b * a.q_batch + h * Dh;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int d = lane + 32 * i;
    q[i] = d < Dh ? qrow[d] * a.scale * kLog2e : 0.0f;
    acc[i] = 0.0f;
  }
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
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = begin + warp; j < end; j += kDecodeWarps) {
    const float* kr = kbase + j * a.kv_row;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int d = lane + 32 * i;
      if (d < Dh) s += q[i] * kr[d];
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float m_new = fmaxf(m, s);
    const float correction = exp2f(m - m_new), p = exp2f(s - m_new);
    l = l * correction + p;
    const float* vr = vbase + j * a.kv_row;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int d = lane + 32 * i;
      acc[i] = acc[i] * correction + (d < Dh ? p * vr[d] : 0.0f);
    }
    m = m_new;
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
    const float* rows = partials + (b * a.Hq + h) * gridDim.z * (Dh + 2);
    float row_max = -INFINITY;
    for (unsigned z = 0; z < gridDim.z; ++z) row_max = fmaxf(row_max, __ldcg(rows + z * (Dh + 2)));
    float* out_row = a.out + b * a.out_batch + h * Dh;
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
      float num = 0.0f, den = 0.0f;
      for (unsigned z = 0; z < gridDim.z; ++z) {
        const float* r = rows + z * (Dh + 2);
        const float rm = __ldcg(r);
        if (rm == -INFINITY) continue;
        const float f = exp2f(rm - row_max);
        num += __ldcg(r + 2 + d) * f;
        den += __ldcg(r + 1) * f;
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
  static const bool on = [] {
    const char* v = std::getenv("MOXIN_CUDA_SPLIT_ATTENTION");
    return !(v && v[0] == '0');
  }();
  return on;
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
// fixes the split count of decode attention.
void launch_attention(const AttnArgs& a, int64_t B, int64_t key_capacity = 0) {
  if (a.Dh > kFlashMaxDh || a.Dh < 1)
    throw_error(ErrorKind::Compute, "attention: head dim " + std::to_string(a.Dh) +
                                        " unsupported on CUDA (at most 128)");
  if (a.Hkv <= 0 || a.Hq % a.Hkv != 0)
    throw_error(ErrorKind::Compute, "attention: query heads not a multiple of KV heads");
  if (a.Lq == 0 || B == 0) return;
  if (a.Lq == 1 && a.causal) {
    const int64_t splits = (std::max(key_capacity, a.Lk) + kSplitKeys - 1) / kSplitKeys;
    if (splits > 1 && split_decode_attention()) {
      Tensor partials =
          Tensor::empty({B, a.Hq, splits, a.Dh + 2}, DType::F32, Device::CUDA);
      launch_pdl(decode_attention_kernel<true>,
                 dim3(unsigned(a.Hq), unsigned(B), unsigned(splits)), kDecodeWarps * 32, 0, a,
                 partials.data_mut<float>(), split_arrivals(B * a.Hq));
    } else {
      launch_pdl(decode_attention_kernel<false>, dim3(unsigned(a.Hq), unsigned(B)),
                 kDecodeWarps * 32, 0, a, static_cast<float*>(nullptr), static_cast<int*>(nullptr));
    }
  } else {
    if (a.delta) throw_error(ErrorKind::Compute, "a recorded decode step takes one token");
    // Four rows per thread when 64-row blocks fill every SM twice, else two (more, smaller
    // blocks: the towers' 16 heads, a single prefill).
    const int64_t blocks64 = (a.Lq + 63) / 64 * a.Hq * B;
    const bool wide = blocks64 >= 2 * int64_t(properties().multiProcessorCount);
    if (wide && AttentionTile<4>::smem(a.Dh) <= tiled_attention_limit<4>()) {
      const dim3 grid(unsigned((a.Lq + 63) / 64), unsigned(a.Hq), unsigned(B));
      flash_attention_tiled_kernel<4><<<grid, 256, AttentionTile<4>::smem(a.Dh), stream()>>>(a);
    } else if (AttentionTile<2>::smem(a.Dh) <= tiled_attention_limit<2>()) {
      const dim3 grid(unsigned((a.Lq + 31) / 32), unsigned(a.Hq), unsigned(B));
      flash_attention_tiled_kernel<2><<<grid, 256, AttentionTile<2>::smem(a.Dh), stream()>>>(a);
    } else {
      throw_error(ErrorKind::Compute, "attention: head dim " + std::to_string(a.Dh) +
                                          " needs more shared memory than this GPU has");
    }
  }
  MOXIN_LAUNCH_CHECK();
}

}  // namespace

// --------------------------------------------------------------------------------------------

Tensor layer_norm(const Tensor& x, const LayerNorm& norm) {
  require_f32_cuda(x, "layer_norm");
  const int64_t D = x.dim(-1);
  require_on_gpu(norm.weight, "layer_norm", "weight");
  require_on_gpu(norm.bias, "layer_norm", "bias");
  if (norm.weight.numel() != D || norm.bias.numel() != D)
    throw_error(ErrorKind::Compute, "layer_norm: weight does not match " + shape_to_string(x.shape()));
  Tensor y = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  const int64_t rows = x.numel() / D;
  if (rows == 0) return y;
  layer_norm_kernel<<<unsigned(rows), kThreads, 0, stream()>>>(
      x.data<float>(), norm.weight.data<float>(), norm.bias.data<float>(), norm.eps, D,
      y.data_mut<float>());
  MOXIN_LAUNCH_CHECK();
  return y;
}

namespace {

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
  launch_pdl(rms_norm_kernel<T>, unsigned(rows), kThreads, 0, x.data<float>(),
             norm.weight.data<float>(), norm.eps, D, static_cast<T*>(y.raw_mut()));
  MOXIN_LAUNCH_CHECK();
  return y;
}

}  // namespace

Tensor rms_norm(const Tensor& x, const RMSNorm& norm) {
  return rms_norm_as<float>(x, norm, DType::F32);
}

Tensor rms_norm_bf16(const Tensor& x, const RMSNorm& norm) {
  return rms_norm_as<__nv_bfloat16>(x, norm, DType::BF16);
}

void gelu_inplace(Tensor& x) {
  require_f32_cuda(x, "gelu");
  if (x.numel() == 0) return;
  gelu_kernel<<<blocks_for(x.numel(), kThreads), kThreads, 0, stream()>>>(x.data_mut<float>(),
                                                                          x.numel());
  MOXIN_LAUNCH_CHECK();
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  require_f32_cuda(gate, "silu_mul");
  require_f32_cuda(up, "silu_mul");
  if (gate.shape() != up.shape()) throw_error(ErrorKind::Compute, "silu_mul: shape mismatch");
  Tensor out = Tensor::empty(gate.shape(), DType::F32, Device::CUDA);
  if (gate.numel() == 0) return out;
  launch_pdl(silu_mul_kernel, blocks_for(gate.numel(), kThreads), kThreads, 0, gate.data<float>(),
             up.data<float>(), out.data_mut<float>(), gate.numel());
  MOXIN_LAUNCH_CHECK();
  return out;
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
  if (n == 0) return out;
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
  if (ids.dtype() == DType::I64) {
    launch_pdl(embedding_kernel<int64_t>, unsigned(n), kThreads, 0, dev.data<int64_t>(),
               table.raw(), table.dtype(), vocab, D, out.data_mut<float>());
  } else {
    launch_pdl(embedding_kernel<int32_t>, unsigned(n), kThreads, 0, dev.data<int32_t>(),
               table.raw(), table.dtype(), vocab, D, out.data_mut<float>());
  }
  MOXIN_LAUNCH_CHECK();
  return out;
}

Tensor self_attention_qkv(const Tensor& qkv, int64_t heads) {
  require_f32_cuda(qkv, "self_attention");
  if (qkv.ndim() != 3 || heads <= 0 || qkv.dim(2) % 3 != 0 || (qkv.dim(2) / 3) % heads != 0)
    throw_error(ErrorKind::Compute, "self_attention: bad qkv shape " + shape_to_string(qkv.shape()));
  const int64_t B = qkv.dim(0), T = qkv.dim(1), D = qkv.dim(2) / 3;
  Tensor out = Tensor::empty({B, T, D}, DType::F32, Device::CUDA);
  AttnArgs a{};
  const float* base = qkv.data<float>();
  a.q = base;
  a.k = base + D;
  a.v = base + 2 * D;
  a.out = out.data_mut<float>();
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
  return out;
}

namespace {

// Causal attention of q [B, Lq, Hq, Dh] over a cache's history (keys/values [B, Hkv, capacity,
// Dh], kv.length valid) into a new `out` [B, Lq, Hq * Dh], after checking that the two fit; the
// caller sets where the queries stand.
AttnArgs cached_attention_args(const Tensor& q, const CachedKV& kv, int64_t window, Tensor& out) {
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
  out = Tensor::empty({B, Lq, Hq * Dh}, DType::F32, Device::CUDA);
  AttnArgs a{};
  a.q = q.data<float>();
  a.k = kv.keys.data<float>();
  a.v = kv.values.data<float>();
  a.out = out.data_mut<float>();
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

}  // namespace

Tensor causal_attention(const Tensor& q, const CachedKV& kv, int64_t q_offset, int64_t window) {
  Tensor out;
  AttnArgs a = cached_attention_args(q, kv, window, out);
  if (kv.length != q_offset + q.dim(1))
    throw_error(ErrorKind::Compute, "causal_attention: queries " + shape_to_string(q.shape()) +
                                        " at " + std::to_string(q_offset) + " do not end the " +
                                        std::to_string(kv.length) + " cached positions");
  a.q_offset = q_offset;
  a.delta = position_delta();
  launch_attention(a, q.dim(0), kv.keys.dim(2));
  return out;
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
  if (new_keys.ndim() != 4 || new_keys.dim(2) != 1 || new_values.shape() != new_keys.shape() ||
      keys.ndim() != 4 || values.shape() != keys.shape() || queries.ndim() != 4 ||
      queries.dim(1) != 1 || queries.dim(0) != new_keys.dim(0) ||
      queries.dim(3) != new_keys.dim(3) || keys.dim(0) != new_keys.dim(0) ||
      keys.dim(1) != new_keys.dim(1) || keys.dim(3) != new_keys.dim(3) ||
      new_keys.dim(3) % 2 != 0)
    throw_error(ErrorKind::Compute, "rope_write_pair: queries " + shape_to_string(queries.shape()) +
                                        ", keys " + shape_to_string(new_keys.shape()) +
                                        " into " + shape_to_string(keys.shape()) +
                                        " (one position, even head dim)");
  if (at < 0 || at + 1 > keys.dim(2))
    throw_error(ErrorKind::Compute, "rope_write_pair: position " + std::to_string(at) +
                                        " outside the cache of " + std::to_string(keys.dim(2)));
  const int64_t B = new_keys.dim(0), Hkv = new_keys.dim(1), Dh = new_keys.dim(3);
  const int64_t Hq = queries.dim(2);
  const int64_t n = B * (Hq + Hkv) * (Dh / 2);
  if (n == 0) return;
  launch_pdl(rope_append_kernel, blocks_for(n, kThreads), kThreads, 0, queries.data_mut<float>(),
             new_keys.data<float>(), new_values.data<float>(), keys.data_mut<float>(),
             values.data_mut<float>(), B, Hq, Hkv, Dh, keys.dim(2), at, position_delta(),
             inv_freq_table(Dh, theta));
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
