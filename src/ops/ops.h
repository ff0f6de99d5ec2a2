// The operations model code is written in. Activations are float32 tensors; weights are in
// their stored dtype (or MLX-quantized). Model code calls these and never a backend directly.
#pragma once

#include "moxin/kv_cache.h"
#include "moxin/model.h"
#include "moxin/tensor.h"

#include <vector>

namespace moxin::ops {

// x [..., in] -> [..., out]
Tensor linear(const Tensor& x, const Linear& layer);
// Linear layers that read the same input (q/k/v projections): out[i] = linear(x, *layers[i]).
// A backend may run them as one product; results equal the separate calls.
std::vector<Tensor> linear_same_input(const Tensor& x, const std::vector<const Linear*>& layers);
// silu(linear(x, gate)) * linear(x, up), the input half of a SwiGLU MLP (one product on a GPU
// decode step).
Tensor swiglu_linear(const Tensor& x, const Linear& gate, const Linear& up);
Tensor layer_norm(const Tensor& x, const LayerNorm& norm);
Tensor rms_norm(const Tensor& x, const RMSNorm& norm);
void gelu_inplace(Tensor& x);                            // exact (erf) GELU
Tensor silu_mul(const Tensor& gate, const Tensor& up);   // silu(gate) * up
// x += y; y of x's shape, or of a trailing part of it repeated (pos_embed [1, N, D] over [B, N, D])
void add_inplace(Tensor& x, const Tensor& y);
void add_scaled_inplace(Tensor& x, const Tensor& y, const Tensor& scale);  // x += y * scale[D]
// ids [n] (I32 or I64, each checked against the table) -> [n, D] float32
Tensor embedding(const Tensor& ids, const Tensor& table);
// Bidirectional self-attention over fused projections qkv [B, T, 3 * D] (q, k, v blocks of
// `heads` heads each) -> [B, T, D]; scale head_dim^-0.5. The vision towers' attention.
Tensor self_attention_qkv(const Tensor& qkv, int64_t heads);
// Decoder attention: q [B, Lq, Hq, Dh] at positions q_offset.. over the cached history
// (keys/values [B, Hkv, capacity, Dh], `length` valid), causal, limited to `window` positions
// when window > 0 -> [B, Lq, Hq * Dh].
Tensor causal_attention(const Tensor& q, const CachedKV& kv, int64_t q_offset, int64_t window);
// In place on x [B, L, H, Dh]: rotate-half RoPE at positions offset..offset+L-1.
void rope_inplace(Tensor& x, int64_t offset, float theta);
// dst [B, H, capacity, D][:, :, at : at + L] = src [B, H, L, D] (the KV cache append)
void write_positions(Tensor& dst, const Tensor& src, int64_t at);
// [B, L, H, Dh] -> [B, H, L, Dh]
Tensor heads_first(const Tensor& x);
// Shape plumbing (float32, contiguous).
Tensor concat(const std::vector<Tensor>& parts, int axis);
Tensor slice(const Tensor& x, int axis, int64_t begin, int64_t end);
Tensor repeat_batch(const Tensor& x, int64_t batch);  // [1, ...] -> [batch, ...]
// images [B, S, S, C] -> [B * (S/P)^2, C * P * P], each patch in (c, kh, kw) order: a
// stride-P convolution becomes one matrix product with the conv weight flattened.
Tensor patchify(const Tensor& images, int64_t patch);
// Widens a small float tensor (norm weights, biases, embeddings of prefix tokens) to float32.
Tensor to_f32(const Tensor& t);

}  // namespace moxin::ops
