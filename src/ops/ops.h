// The operations model code is written in. Activations are float32 tensors; weights are in
// their stored dtype (or MLX-quantized). Model code calls these and never a backend directly.
#pragma once

#include "moxin/kv_cache.h"
#include "moxin/model.h"
#include "moxin/tensor.h"

#include <functional>
#include <vector>

namespace moxin::ops {

// x [..., in] -> [..., out]
Tensor linear(const Tensor& x, const Linear& layer);
// y += linear(x, layer): a residual branch added into the stream (on a GPU decode step, in the
// product's epilogue).
void linear_accumulate(Tensor& y, const Tensor& x, const Linear& layer);
// Linear layers that read the same input (q/k/v projections): out[i] = linear(h, *layers[i])
// with h = rms_norm(x, *norm), or x when norm is null. A backend may run them as one product
// with the norm folded in; results equal the separate calls up to float rounding.
std::vector<Tensor> linear_same_input(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm* norm = nullptr);
// silu(linear(h, gate)) * linear(h, up), h as above: the input half of a SwiGLU MLP (one
// product on a GPU decode step).
Tensor swiglu_linear(const Tensor& x, const Linear& gate, const Linear& up,
                     const RMSNorm* norm = nullptr);
// A whole SwiGLU MLP with its residual: x += linear(swiglu_linear(x, gate, up, norm), down).
// On a GPU prefill, SiLU(gate) * up is written in bf16 for the down product by its own kernel.
void swiglu_mlp_accumulate(Tensor& x, const Linear& gate, const Linear& up, const Linear& down,
                           const RMSNorm* norm = nullptr);
// linear(layer_norm(x, norm), layer) (a tower's qkv and fc1 products): on a GPU the norm writes
// the product's bf16 input itself.
Tensor layer_norm_linear(const Tensor& x, const LayerNorm& norm, const Linear& layer);
// linear(gelu(x), layer), x consumed: its contents afterwards are unspecified (the CPU applies
// the GELU in place; a GPU writes the product's bf16 input instead).
Tensor gelu_linear(Tensor& x, const Linear& layer);
Tensor layer_norm(const Tensor& x, const LayerNorm& norm);
Tensor rms_norm(const Tensor& x, const RMSNorm& norm);
void gelu_inplace(Tensor& x);                           // exact (erf) GELU
Tensor silu_mul(const Tensor& gate, const Tensor& up);  // silu(gate) * up
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
// Attention and the product that reads it: linear(self_attention_qkv(qkv, heads), proj), and
// x += linear(causal_attention(q, kv, q_offset, window), o_proj). On a GPU prefill the
// attention kernel writes the product's bf16 input itself.
Tensor self_attention_linear(const Tensor& qkv, int64_t heads, const Linear& proj);
void causal_attention_accumulate(Tensor& x, const Tensor& q, const CachedKV& kv,
                                 int64_t q_offset, int64_t window, const Linear& o_proj);
// One decode position of a decoder layer's attention: queries q [B, 1, Hq, Dh] and keys k
// [B, 1, Hkv, Dh] as projected are rotated (RoPE) at position q_offset, the rotated key and the
// value v stored there in the history (the cache's storage, kv.length == q_offset + 1, as
// KeyValueCache::reserve_and_fetch returns it), and x += linear(attention, o_proj). q may be
// rotated in place. On a GPU the attention kernel rotates and stores the new key itself.
void rope_attention_accumulate(Tensor& x, Tensor& q, const Tensor& k, const Tensor& v,
                               const CachedKV& kv, int64_t q_offset, float theta, int64_t window,
                               const Linear& o_proj);
// In place on x [B, L, H, Dh]: rotate-half RoPE at positions offset..offset+L-1.
void rope_inplace(Tensor& x, int64_t offset, float theta);
// The same on queries [B, L, Hq, Dh] and keys [B, L, Hkv, Dh] (one launch on a GPU).
void rope_inplace_pair(Tensor& q, Tensor& k, int64_t offset, float theta);
// dst [B, H, capacity, D][:, :, at : at + L] = src [B, H, L, D] (the KV cache append)
void write_positions(Tensor& dst, const Tensor& src, int64_t at);
// Both halves of a KV append (keys and values of one geometry) at once (one launch on a GPU).
void write_positions_pair(Tensor& keys, const Tensor& new_keys, Tensor& values,
                          const Tensor& new_values, int64_t at);
// RoPE and the KV append of L positions together (one launch on a GPU): queries [B, L, Hq, D]
// rotated in place, new_keys [B, L, Hkv, D] (as projected: no heads-first copy) stored rotated
// and new_values as they are, at positions at.. of the caches [B, Hkv, capacity, D].
void rope_write_pair(Tensor& queries, Tensor& keys, const Tensor& new_keys, Tensor& values,
                     const Tensor& new_values, int64_t at, float theta);

// Ragged batches: the same three ops with a position per sequence (moxin/kv_cache.h says how
// right-padded batches use them). Sequence b's row l sits at position start.host[b] + l.
//
// Decoder attention for q [B, Lq, Hq, Dh]: sequence b's query i sees its keys
// j <= start[b] + i (kv.length >= start[b] + Lq for every b) -> [B, Lq, Hq * Dh].
Tensor causal_attention(const Tensor& q, const CachedKV& kv, const BatchPositions& start,
                        int64_t window);
// RoPE in place on x [B, L, H, Dh] at positions start[b] + l.
void rope_inplace(Tensor& x, const BatchPositions& start, float theta);
// dst [B, H, capacity, D][b, :, at[b] : at[b] + L] = src [B, H, L, D][b]
void write_positions(Tensor& dst, const Tensor& src, const BatchPositions& at);
// Per-sequence positions for ops on `device`: the device copy is made here, once.
BatchPositions batch_positions(std::vector<int64_t> positions, Device device);
// x [B, L, D] -> [B, 1, D], row index[b] of each sequence (the last real token of each
// right-padded sequence).
Tensor select_positions(const Tensor& x, const std::vector<int64_t>& index);
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

// Two independent pieces of work on `device`: on a GPU they overlap (two streams; what either
// produces is ready for the work after the call), elsewhere they run in turn.
void run_concurrently(Device device, const std::function<void()>& first,
                      const std::function<void()>& second);

// body(inputs), for work whose shapes follow its inputs' shapes (the image encoder) and which
// reads nothing else but `weights`. On a GPU the first call with given input shapes runs body
// as it is, the second records it into a CUDA graph kept in `state` (the caller's) and every
// later call replays it, so its hundreds of launches cost one. A recording keeps the weights it
// read alive, and all recordings are dropped as soon as any weight is another tensor than it
// was (replaced, moved, quantized). The result is the caller's own tensor either way.
// Elsewhere, or where a recording fails (the work then runs as it is from then on), body
// simply runs.
Tensor run_recorded(Device device, std::shared_ptr<void>& state, const std::vector<Tensor>& inputs,
                    const std::vector<Tensor>& weights,
                    const std::function<Tensor(const std::vector<Tensor>&)>& body);

}  // namespace moxin::ops
