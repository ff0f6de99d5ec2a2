// CPU kernels on raw float32 activations. Weights arrive in their stored dtype and are widened
// tile by tile into cache-sized scratch, never wholesale. Every kernel accumulates in float32.
#pragma once

#include <cstdint>

#include "moxin/dtype.h"

namespace moxin::cpu {

// y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]); w is F32, BF16 or F16. Dense products go through
// BLAS (sgemm); only the dtype widening of weight tiles is ours.
void matmul_nt(const float* x, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N,
               const float* bias, float* y);

// Rows of `table` [*, D] gathered and widened to float32: out[i] = table[ids[i]].
void gather_rows(const void* table, DType dtype, int64_t D, const int64_t* ids, int64_t n,
                 float* out);

// Widens n elements of a float tensor to float32.
void widen(const void* src, DType dtype, int64_t n, float* out);

// `rows` rows of `row_len` floats from src (rows `src_stride` apart; 0 repeats one row) to dst
// (rows `dst_stride` apart).
void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
               int64_t row_len);
// images [B, S, S, C] NHWC -> [B * (S/P)^2, C * P * P], patches in (c, kh, kw) order.
void patchify(const float* images, int64_t B, int64_t S, int64_t C, int64_t P, float* out);

void layer_norm(const float* x, int64_t rows, int64_t D, const float* weight, const float* bias,
                float eps, float* y);
void rms_norm(const float* x, int64_t rows, int64_t D, const float* weight, float eps, float* y);

void gelu_erf_inplace(float* x, int64_t n);
// out[i] = silu(gate[i]) * up[i]
void silu_mul(const float* gate, const float* up, int64_t n, float* out);
void add_inplace(float* x, const float* y, int64_t n);
// x[r, :] += y[r, :] * scale[:]   (LayerScale residual)
void add_scaled_rows_inplace(float* x, const float* y, const float* scale, int64_t rows, int64_t D);

// Rotary embedding, rotate-half layout, in place on x [rows, n_heads, head_dim] where row r
// sits at position positions[r].
void rope_inplace(float* x, int64_t rows, int64_t n_heads, int64_t head_dim,
                  const int64_t* positions, float theta);

// Scaled dot-product attention for one batch element.
//   q: [Lq, Hq, Dh] rows of stride q_row_stride (floats)
//   k, v: head g at k + g * kv_head_stride, position j at + j * kv_row_stride
//   out: [Lq, Hq, Dh] rows of stride out_row_stride
// Query head h reads KV head h / (Hq / Hkv). With `causal`, query i sits at absolute position
// q_offset + i and sees keys j <= q_offset + i, and only j > q_offset + i - window when
// window > 0.
struct AttentionShape {
  int64_t Lq, Lk, Hq, Hkv, Dh;
  int64_t q_row_stride, kv_row_stride, kv_head_stride, out_row_stride;
  bool causal = false;
  int64_t q_offset = 0;
  int64_t window = 0;
  float scale = 1.0f;
};
void attention(const float* q, const float* k, const float* v, float* out, const AttentionShape& s);

}  // namespace moxin::cpu
