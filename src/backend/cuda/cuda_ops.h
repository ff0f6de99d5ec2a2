// The ops of src/ops/ops.h for tensors on a CUDA device: same signatures, same semantics, same
// float32 activations. ops.cpp forwards here when its input lives on the GPU.
#pragma once

#include <vector>

#include "moxin/kv_cache.h"
#include "moxin/model.h"
#include "moxin/tensor.h"

namespace moxin::cuda {

Tensor linear(const Tensor& x, const Linear& layer);
void linear_accumulate(Tensor& y, const Tensor& x, const Linear& layer);
std::vector<Tensor> linear_same_input(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm* norm);
Tensor swiglu_linear(const Tensor& x, const Linear& gate, const Linear& up, const RMSNorm* norm);
// Products whose input a producer kernel writes in bf16 itself (one pass over the activations
// fewer): whether linear() of M rows of K takes bf16 rows for this layer (cuBLASLt on bf16 or
// quantized weights), and that product from such rows, into a new y or accumulated into y.
bool takes_bf16_rows(const Linear& layer, int64_t M, int64_t K);
void linear_from_bf16(const Tensor& xb, const Linear& layer, Tensor& y, bool accumulate);
// Products of rms_norm(x) by bias-free layers that take bf16 rows, with bf16 outputs.
std::vector<Tensor> products_bf16_out(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm& norm);
Tensor layer_norm_linear(const Tensor& x, const LayerNorm& norm, const Linear& layer);
Tensor gelu_linear(Tensor& x, const Linear& layer);
void swiglu_mlp_accumulate(Tensor& x, const Linear& gate, const Linear& up, const Linear& down,
                           const RMSNorm* norm);
Tensor layer_norm(const Tensor& x, const LayerNorm& norm);
Tensor rms_norm(const Tensor& x, const RMSNorm& norm);
// The same norm with its output rounded to bf16: the input of cuBLASLt products, in one pass.
Tensor rms_norm_bf16(const Tensor& x, const RMSNorm& norm);
void gelu_inplace(Tensor& x);
Tensor silu_mul(const Tensor& gate, const Tensor& up);
void add_inplace(Tensor& x, const Tensor& y);
void add_scaled_inplace(Tensor& x, const Tensor& y, const Tensor& scale);
Tensor embedding(const Tensor& ids, const Tensor& table);
Tensor self_attention_qkv(const Tensor& qkv, int64_t heads);
Tensor self_attention_linear(const Tensor& qkv, int64_t heads, const Linear& proj);
Tensor causal_attention(const Tensor& q, const CachedKV& kv, int64_t q_offset, int64_t window);
// ops::rope_attention_accumulate in one attention launch (RoPE and the KV store inside it),
// then o_proj; false, with nothing done, where that launch does not apply (switched off, or a
// grid over one wave), for the caller to take the separate ops.
bool fused_rope_attention_accumulate(Tensor& x, Tensor& q, const Tensor& k, const Tensor& v,
                                     const CachedKV& kv, int64_t q_offset, float theta,
                                     int64_t window, const Linear& o_proj);
void causal_attention_accumulate(Tensor& x, const Tensor& q, const CachedKV& kv,
                                 int64_t q_offset, int64_t window, const Linear& o_proj);
void rope_inplace(Tensor& x, int64_t offset, float theta);
void rope_inplace_pair(Tensor& q, Tensor& k, int64_t offset, float theta);
Tensor heads_first(const Tensor& x);
// `rows` rows of `row_len` floats, device to device (src stride 0 repeats one row); with
// `delta`, dst is shifted by *delta * delta_stride, read on the device (recorded decode steps).
// Shape plumbing (concat, slice, repeat_batch) is built on it in ops.cpp.
void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
               int64_t row_len, const int* delta = nullptr, int64_t delta_stride = 0);
Tensor patchify(const Tensor& images, int64_t patch);
void write_positions(Tensor& dst, const Tensor& src, int64_t at);
void rope_write_pair(Tensor& queries, Tensor& keys, const Tensor& new_keys, Tensor& values,
                     const Tensor& new_values, int64_t at, float theta);
void write_positions_pair(Tensor& dst, const Tensor& src, Tensor& dst2, const Tensor& src2,
                          int64_t at);
// Ragged batches (ops.h): per-sequence positions, read on the device from start.device (I32
// [B]; uploaded here when undefined). Not for recorded decode steps, which are batch 1.
Tensor causal_attention(const Tensor& q, const CachedKV& kv, const BatchPositions& start,
                        int64_t window);
void rope_inplace(Tensor& x, const BatchPositions& start, float theta);
void write_positions(Tensor& dst, const Tensor& src, const BatchPositions& at);
Tensor to_f32(const Tensor& t);

// Single-row products pick their kernel variant by timing once per shape; tests force each
// variant in turn (0..4; kinds with fewer variants take their last for larger indices) and
// restore tuning with -1.
void set_gemv_variant_for_testing(int variant);

}  // namespace moxin::cuda
