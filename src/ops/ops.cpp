#include "ops/ops.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backend/cpu/cpu_kernels.h"
#include "backend/cpu/quantized_matmul.h"
#include "core/device.h"
#include "moxin/errors.h"

#if MOXIN_WITH_CUDA
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/cuda_runtime.h"
// Tensors on the GPU go to the CUDA backend; everything below this line is the CPU path.
#define DISPATCH_CUDA(tensor, call) \
  if ((tensor).device() == Device::CUDA) return cuda::call
#else
#define DISPATCH_CUDA(tensor, call) \
  if ((tensor).device() == Device::CUDA) device::require(Device::CUDA)
#endif

namespace moxin::ops {

namespace {

void require_f32(const Tensor& x, const char* op) {
  if (!x.defined() || x.dtype() != DType::F32)
    throw_error(ErrorKind::Compute, std::string(op) + ": activations must be defined float32");
}

Shape with_last(const Shape& shape, int64_t last) {
  Shape out = shape;
  out.back() = last;
  return out;
}

}  // namespace

Tensor linear(const Tensor& x, const Linear& layer) {
  DISPATCH_CUDA(x, linear(x, layer));
  require_f32(x, "linear");
  const int64_t in = layer.in_features();
  const int64_t out_features = layer.out_features();
  if (x.ndim() == 0 || x.dim(-1) != in)
    throw_error(ErrorKind::Compute, "linear: input " + shape_to_string(x.shape()) +
                                        " does not end in " + std::to_string(in));
  const int64_t M = x.numel() / in;
  Tensor y = Tensor::empty(with_last(x.shape(), out_features));
  const float* bias = layer.bias.defined() ? layer.bias.data<float>() : nullptr;
  if (layer.quantized) {
    cpu::quantized_matmul(x.data<float>(), M, *layer.quantized, bias, y.data_mut<float>());
  } else {
    cpu::matmul_nt(x.data<float>(), M, in, layer.weight.raw(), layer.weight.dtype(), out_features,
                   bias, y.data_mut<float>());
  }
  return y;
}

void linear_accumulate(Tensor& y, const Tensor& x, const Linear& layer) {
  DISPATCH_CUDA(x, linear_accumulate(y, x, layer));
  add_inplace(y, linear(x, layer));
}

std::vector<Tensor> linear_same_input(const Tensor& x, const std::vector<const Linear*>& layers,
                                      const RMSNorm* norm) {
  DISPATCH_CUDA(x, linear_same_input(x, layers, norm));
  const Tensor h = norm ? rms_norm(x, *norm) : x;
  std::vector<Tensor> out;
  out.reserve(layers.size());
  for (const Linear* layer : layers) out.push_back(linear(h, *layer));
  return out;
}

void swiglu_mlp_accumulate(Tensor& x, const Linear& gate, const Linear& up, const Linear& down,
                           const RMSNorm* norm) {
  DISPATCH_CUDA(x, swiglu_mlp_accumulate(x, gate, up, down, norm));
  linear_accumulate(x, swiglu_linear(x, gate, up, norm), down);
}

Tensor layer_norm_linear(const Tensor& x, const LayerNorm& norm, const Linear& layer) {
  DISPATCH_CUDA(x, layer_norm_linear(x, norm, layer));
  return linear(layer_norm(x, norm), layer);
}

Tensor gelu_linear(Tensor& x, const Linear& layer) {
  DISPATCH_CUDA(x, gelu_linear(x, layer));
  gelu_inplace(x);
  return linear(x, layer);
}

Tensor swiglu_linear(const Tensor& x, const Linear& gate, const Linear& up, const RMSNorm* norm) {
  DISPATCH_CUDA(x, swiglu_linear(x, gate, up, norm));
  const Tensor h = norm ? rms_norm(x, *norm) : x;
  return silu_mul(linear(h, gate), linear(h, up));
}

Tensor layer_norm(const Tensor& x, const LayerNorm& norm) {
  DISPATCH_CUDA(x, layer_norm(x, norm));
  require_f32(x, "layer_norm");
  const int64_t D = x.dim(-1);
  Tensor y = Tensor::empty(x.shape());
  cpu::layer_norm(x.data<float>(), x.numel() / D, D, norm.weight.data<float>(),
                  norm.bias.data<float>(), norm.eps, y.data_mut<float>());
  return y;
}

Tensor rms_norm(const Tensor& x, const RMSNorm& norm) {
  DISPATCH_CUDA(x, rms_norm(x, norm));
  require_f32(x, "rms_norm");
  const int64_t D = x.dim(-1);
  Tensor y = Tensor::empty(x.shape());
  cpu::rms_norm(x.data<float>(), x.numel() / D, D, norm.weight.data<float>(), norm.eps,
                y.data_mut<float>());
  return y;
}

void gelu_inplace(Tensor& x) {
  DISPATCH_CUDA(x, gelu_inplace(x));
  require_f32(x, "gelu");
  cpu::gelu_erf_inplace(x.data_mut<float>(), x.numel());
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  DISPATCH_CUDA(gate, silu_mul(gate, up));
  require_f32(gate, "silu_mul");
  require_f32(up, "silu_mul");
  if (gate.shape() != up.shape()) throw_error(ErrorKind::Compute, "silu_mul: shape mismatch");
  Tensor out = Tensor::empty(gate.shape());
  cpu::silu_mul(gate.data<float>(), up.data<float>(), gate.numel(), out.data_mut<float>());
  return out;
}

void add_inplace(Tensor& x, const Tensor& y) {
  DISPATCH_CUDA(x, add_inplace(x, y));
  require_f32(x, "add");
  require_f32(y, "add");
  if (y.numel() == 0 || x.numel() % y.numel() != 0)
    throw_error(ErrorKind::Compute,
                "add: " + shape_to_string(x.shape()) + " vs " + shape_to_string(y.shape()));
  for (int64_t at = 0; at < x.numel(); at += y.numel())
    cpu::add_inplace(x.data_mut<float>() + at, y.data<float>(), y.numel());
}

void add_scaled_inplace(Tensor& x, const Tensor& y, const Tensor& scale) {
  DISPATCH_CUDA(x, add_scaled_inplace(x, y, scale));
  require_f32(x, "add_scaled");
  const int64_t D = x.dim(-1);
  if (x.numel() != y.numel() || scale.numel() != D)
    throw_error(ErrorKind::Compute, "add_scaled: shape mismatch");
  cpu::add_scaled_rows_inplace(x.data_mut<float>(), y.data<float>(), scale.data<float>(),
                               x.numel() / D, D);
}

Tensor embedding(const Tensor& ids, const Tensor& table) {
  DISPATCH_CUDA(table, embedding(ids, table));
  const int64_t vocab = table.dim(0);
  const int64_t D = table.dim(1);
  std::vector<int64_t> rows(size_t(ids.numel()));
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int64_t id =
        ids.dtype() == DType::I64 ? ids.data<int64_t>()[i] : int64_t(ids.data<int32_t>()[i]);
    if (id < 0 || id >= vocab)
      throw_error(ErrorKind::Request, "token id " + std::to_string(id) +
                                          " is outside the vocabulary [0, " +
                                          std::to_string(vocab) + ")");
    rows[size_t(i)] = id;
  }
  Tensor out = Tensor::empty({ids.numel(), D});
  cpu::gather_rows(table.raw(), table.dtype(), D, rows.data(), ids.numel(), out.data_mut<float>());
  return out;
}

Tensor self_attention_qkv(const Tensor& qkv, int64_t heads) {
  DISPATCH_CUDA(qkv, self_attention_qkv(qkv, heads));
  require_f32(qkv, "self_attention");
  const int64_t B = qkv.dim(0), T = qkv.dim(1), D = qkv.dim(2) / 3;
  if (qkv.ndim() != 3 || qkv.dim(2) != 3 * D || heads <= 0 || D % heads != 0)
    throw_error(ErrorKind::Compute,
                "self_attention: bad qkv shape " + shape_to_string(qkv.shape()));
  const int64_t Dh = D / heads;
  Tensor out = Tensor::empty({B, T, D});
  cpu::AttentionShape s{};
  s.Lq = T;
  s.Lk = T;
  s.Hq = heads;
  s.Hkv = heads;
  s.Dh = Dh;
  s.q_row_stride = 3 * D;
  s.kv_row_stride = 3 * D;
  s.kv_head_stride = Dh;
  s.out_row_stride = D;
  s.scale = 1.0f / std::sqrt(float(Dh));
  for (int64_t b = 0; b < B; ++b) {
    const float* base = qkv.data<float>() + b * T * 3 * D;
    cpu::attention(base, base + D, base + 2 * D, out.data_mut<float>() + b * T * D, s);
  }
  return out;
}

namespace {

// Causal attention of q [B, Lq, Hq, Dh] over a cache's history (keys/values [B, Hkv, capacity,
// Dh]): sequence b's queries stand at positions starts[b].. and see the history up to
// starts[b] + Lq (keys past it belong to nothing it has written: another sequence's longer
// prompt, or stale padding). -> [B, Lq, Hq * Dh]
Tensor cached_attention(const Tensor& q, const CachedKV& kv, const std::vector<int64_t>& starts,
                        int64_t window) {
  const int64_t B = q.dim(0), Lq = q.dim(1), Hq = q.dim(2), Dh = q.dim(3);
  const int64_t Hkv = kv.keys.dim(1), capacity = kv.keys.dim(2);
  Tensor out = Tensor::empty({B, Lq, Hq * Dh});
  cpu::AttentionShape s{};
  s.Lq = Lq;
  s.Hq = Hq;
  s.Hkv = Hkv;
  s.Dh = Dh;
  s.q_row_stride = Hq * Dh;
  s.kv_row_stride = Dh;
  s.kv_head_stride = capacity * Dh;
  s.out_row_stride = Hq * Dh;
  s.causal = true;
  s.window = window;
  s.scale = 1.0f / std::sqrt(float(Dh));
  for (int64_t b = 0; b < B; ++b) {
    s.q_offset = starts[size_t(b)];
    s.Lk = s.q_offset + Lq;
    const int64_t kv_batch = b * Hkv * capacity * Dh;
    cpu::attention(q.data<float>() + b * Lq * Hq * Dh, kv.keys.data<float>() + kv_batch,
                   kv.values.data<float>() + kv_batch, out.data_mut<float>() + b * Lq * Hq * Dh, s);
  }
  return out;
}

void check_cache_matches(const Tensor& q, const CachedKV& kv) {
  if (kv.keys.dim(0) != q.dim(0) || kv.keys.dim(3) != q.dim(3) || kv.length > kv.keys.dim(2))
    throw_error(ErrorKind::Compute, "causal_attention: queries " + shape_to_string(q.shape()) +
                                        " do not match the cache " +
                                        shape_to_string(kv.keys.shape()));
}

}  // namespace

Tensor self_attention_linear(const Tensor& qkv, int64_t heads, const Linear& proj) {
  DISPATCH_CUDA(qkv, self_attention_linear(qkv, heads, proj));
  return linear(self_attention_qkv(qkv, heads), proj);
}

void causal_attention_accumulate(Tensor& x, const Tensor& q, const CachedKV& kv,
                                 int64_t q_offset, int64_t window, const Linear& o_proj) {
  DISPATCH_CUDA(q, causal_attention_accumulate(x, q, kv, q_offset, window, o_proj));
  linear_accumulate(x, causal_attention(q, kv, q_offset, window), o_proj);
}

void rope_attention_accumulate(Tensor& x, Tensor& q, const Tensor& k, const Tensor& v,
                               const CachedKV& kv, int64_t q_offset, float theta, int64_t window,
                               const Linear& o_proj) {
#if MOXIN_WITH_CUDA
  if (q.device() == Device::CUDA &&
      cuda::fused_rope_attention_accumulate(x, q, k, v, kv, q_offset, theta, window, o_proj))
    return;
#endif
  // The separate steps (the CPU, and GPU steps the fused kernel does not take).
  Tensor keys = kv.keys, values = kv.values;  // the cache's storage
  rope_write_pair(q, keys, k, values, v, q_offset, theta);
  causal_attention_accumulate(x, q, kv, q_offset, window, o_proj);
}

Tensor causal_attention(const Tensor& q, const CachedKV& kv, int64_t q_offset, int64_t window) {
  DISPATCH_CUDA(q, causal_attention(q, kv, q_offset, window));
  require_f32(q, "causal_attention");
  check_cache_matches(q, kv);
  if (kv.length != q_offset + q.dim(1))
    throw_error(ErrorKind::Compute, "causal_attention: queries " + shape_to_string(q.shape()) +
                                        " at " + std::to_string(q_offset) + " do not end the " +
                                        std::to_string(kv.length) + " cached positions");
  return cached_attention(q, kv, std::vector<int64_t>(size_t(q.dim(0)), q_offset), window);
}

void rope_inplace(Tensor& x, int64_t offset, float theta) {
  DISPATCH_CUDA(x, rope_inplace(x, offset, theta));
  require_f32(x, "rope");
  const int64_t B = x.dim(0), L = x.dim(1), H = x.dim(2), Dh = x.dim(3);
  std::vector<int64_t> positions(size_t(B * L));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) positions[size_t(b * L + l)] = offset + l;
  cpu::rope_inplace(x.data_mut<float>(), B * L, H, Dh, positions.data(), theta);
}

void rope_inplace_pair(Tensor& q, Tensor& k, int64_t offset, float theta) {
  DISPATCH_CUDA(q, rope_inplace_pair(q, k, offset, theta));
  rope_inplace(q, offset, theta);
  rope_inplace(k, offset, theta);
}

namespace {

// Positions for a batch of B sequences of L rows that must fit below `limit`.
void check_batch_positions(const BatchPositions& p, int64_t B, int64_t L, int64_t limit,
                           const char* op) {
  if (p.size() != B)
    throw_error(ErrorKind::Compute, std::string(op) + ": " + std::to_string(p.size()) +
                                        " positions for a batch of " + std::to_string(B));
  for (const int64_t at : p.host)
    if (at < 0 || at + L > limit)
      throw_error(ErrorKind::Compute, std::string(op) + ": position " + std::to_string(at) + " + " +
                                          std::to_string(L) + " rows outside [0, " +
                                          std::to_string(limit) + "]");
}

}  // namespace

Tensor causal_attention(const Tensor& q, const CachedKV& kv, const BatchPositions& start,
                        int64_t window) {
  DISPATCH_CUDA(q, causal_attention(q, kv, start, window));
  require_f32(q, "causal_attention");
  check_cache_matches(q, kv);
  check_batch_positions(start, q.dim(0), q.dim(1), kv.length, "causal_attention");
  return cached_attention(q, kv, start.host, window);
}

void rope_inplace(Tensor& x, const BatchPositions& start, float theta) {
  DISPATCH_CUDA(x, rope_inplace(x, start, theta));
  require_f32(x, "rope");
  const int64_t B = x.dim(0), L = x.dim(1), H = x.dim(2), Dh = x.dim(3);
  check_batch_positions(start, B, L, std::numeric_limits<int64_t>::max() / 2, "rope");
  std::vector<int64_t> positions(size_t(B * L));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) positions[size_t(b * L + l)] = start.host[size_t(b)] + l;
  cpu::rope_inplace(x.data_mut<float>(), B * L, H, Dh, positions.data(), theta);
}

void write_positions(Tensor& dst, const Tensor& src, const BatchPositions& at) {
  DISPATCH_CUDA(dst, write_positions(dst, src, at));
  require_f32(src, "write_positions");
  require_f32(dst, "write_positions");
  const int64_t B = src.dim(0), H = src.dim(1), L = src.dim(2), D = src.dim(3);
  if (src.ndim() != 4 || dst.ndim() != 4 || dst.dim(0) != B || dst.dim(1) != H || dst.dim(3) != D)
    throw_error(ErrorKind::Compute, "write_positions: " + shape_to_string(src.shape()) + " into " +
                                        shape_to_string(dst.shape()));
  const int64_t capacity = dst.dim(2);
  check_batch_positions(at, B, L, capacity, "write_positions");
  for (int64_t b = 0; b < B; ++b)
    cpu::copy_rows(src.data<float>() + b * H * L * D, L * D,
                   dst.data_mut<float>() + (b * H * capacity + at.host[size_t(b)]) * D,
                   capacity * D, H, L * D);
}

BatchPositions batch_positions(std::vector<int64_t> positions, Device device) {
  BatchPositions p;
  p.host = std::move(positions);
  if (device != Device::CPU) {
    Tensor values = Tensor::empty({p.size()}, DType::I32);
    for (int64_t b = 0; b < p.size(); ++b) {
      const int64_t v = p.host[size_t(b)];
      if (v < 0 || v > std::numeric_limits<int32_t>::max())
        throw_error(ErrorKind::Compute, "position " + std::to_string(v) + " out of range");
      values.data_mut<int32_t>()[b] = int32_t(v);
    }
    p.device = values.to_device(device);
  }
  return p;
}

Tensor heads_first(const Tensor& x) {
  DISPATCH_CUDA(x, heads_first(x));
  require_f32(x, "heads_first");
  const int64_t B = x.dim(0), L = x.dim(1), H = x.dim(2), Dh = x.dim(3);
  Tensor out = Tensor::empty({B, H, L, Dh});
  const float* src = x.data<float>();
  float* dst = out.data_mut<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dst + ((b * H + h) * L + l) * Dh, src + ((b * L + l) * H + h) * Dh,
                    size_t(Dh) * sizeof(float));
  return out;
}

namespace {

int normalize_axis(int axis, int ndim, const char* op) {
  const int a = axis < 0 ? axis + ndim : axis;
  if (a < 0 || a >= ndim) throw_error(ErrorKind::Compute, std::string(op) + ": axis out of range");
  return a;
}

// Row copies on whichever device holds the tensors: the one primitive the shape plumbing
// below needs from a backend, so concat/slice/repeat_batch exist once.
void copy_rows(Device device, const float* src, int64_t src_stride, float* dst, int64_t dst_stride,
               int64_t rows, int64_t row_len) {
  if (device == Device::CUDA) {
#if MOXIN_WITH_CUDA
    cuda::copy_rows(src, src_stride, dst, dst_stride, rows, row_len);
#else
    device::require(Device::CUDA);
#endif
    return;
  }
  cpu::copy_rows(src, src_stride, dst, dst_stride, rows, row_len);
}

// Elements before and after `axis`: a contiguous tensor is outer x dim(axis) x inner.
std::pair<int64_t, int64_t> outer_inner(const Shape& shape, int axis) {
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < axis; ++i) outer *= shape[size_t(i)];
  for (size_t i = size_t(axis) + 1; i < shape.size(); ++i) inner *= shape[i];
  return {outer, inner};
}

}  // namespace

Tensor concat(const std::vector<Tensor>& parts, int axis) {
  if (parts.empty()) throw_error(ErrorKind::Compute, "concat of nothing");
  const Device device = parts[0].device();
  const int a = normalize_axis(axis, parts[0].ndim(), "concat");
  Shape shape = parts[0].shape();
  shape[size_t(a)] = 0;
  for (const Tensor& p : parts) {
    require_f32(p, "concat");
    bool fits = p.ndim() == parts[0].ndim() && p.device() == device;
    for (int i = 0; fits && i < p.ndim(); ++i) fits = i == a || p.dim(i) == shape[size_t(i)];
    if (!fits)
      throw_error(ErrorKind::Compute, "concat: " + shape_to_string(p.shape()) + " does not fit " +
                                          shape_to_string(parts[0].shape()));
    shape[size_t(a)] += p.dim(a);
  }
  Tensor out = Tensor::empty(shape, DType::F32, device);
  const auto [outer, inner] = outer_inner(shape, a);
  const int64_t out_row = shape[size_t(a)] * inner;
  int64_t at = 0;
  for (const Tensor& p : parts) {
    const int64_t row = p.dim(a) * inner;
    copy_rows(device, p.data<float>(), row, out.data_mut<float>() + at, out_row, outer, row);
    at += row;
  }
  return out;
}

Tensor slice(const Tensor& x, int axis, int64_t begin, int64_t end) {
  require_f32(x, "slice");
  const int a = normalize_axis(axis, x.ndim(), "slice");
  if (begin < 0 || end > x.dim(a) || begin > end)
    throw_error(ErrorKind::Compute, "slice [" + std::to_string(begin) + ", " + std::to_string(end) +
                                        ") of " + shape_to_string(x.shape()));
  Shape shape = x.shape();
  shape[size_t(a)] = end - begin;
  Tensor out = Tensor::empty(shape, DType::F32, x.device());
  const auto [outer, inner] = outer_inner(x.shape(), a);
  copy_rows(x.device(), x.data<float>() + begin * inner, x.dim(a) * inner, out.data_mut<float>(),
            (end - begin) * inner, outer, (end - begin) * inner);
  return out;
}

Tensor repeat_batch(const Tensor& x, int64_t batch) {
  require_f32(x, "repeat_batch");
  if (x.ndim() == 0 || x.dim(0) != 1)
    throw_error(ErrorKind::Compute, "repeat_batch needs [1, ...]");
  if (batch < 0) throw_error(ErrorKind::Compute, "repeat_batch: negative batch");
  Shape shape = x.shape();
  shape[0] = batch;
  Tensor out = Tensor::empty(shape, DType::F32, x.device());
  copy_rows(x.device(), x.data<float>(), 0, out.data_mut<float>(), x.numel(), batch, x.numel());
  return out;
}

Tensor select_positions(const Tensor& x, const std::vector<int64_t>& index) {
  require_f32(x, "select_positions");
  if (x.ndim() != 3 || int64_t(index.size()) != x.dim(0))
    throw_error(ErrorKind::Compute, "select_positions: " + std::to_string(index.size()) +
                                        " indices for " + shape_to_string(x.shape()));
  const int64_t B = x.dim(0), L = x.dim(1), D = x.dim(2);
  Tensor out = Tensor::empty({B, 1, D}, DType::F32, x.device());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t l = index[size_t(b)];
    if (l < 0 || l >= L)
      throw_error(ErrorKind::Compute, "select_positions: index " + std::to_string(l) +
                                          " outside [0, " + std::to_string(L) + ")");
    copy_rows(x.device(), x.data<float>() + (b * L + l) * D, D, out.data_mut<float>() + b * D, D, 1,
              D);
  }
  return out;
}

Tensor patchify(const Tensor& images, int64_t patch) {
  DISPATCH_CUDA(images, patchify(images, patch));
  require_f32(images, "patchify");
  const int64_t B = images.dim(0), S = images.dim(1), C = images.dim(3);
  if (images.ndim() != 4 || images.dim(2) != S || patch <= 0 || S % patch != 0)
    throw_error(ErrorKind::Compute, "patchify: " + shape_to_string(images.shape()));
  const int64_t G = S / patch;
  Tensor out = Tensor::empty({B * G * G, C * patch * patch});
  cpu::patchify(images.data<float>(), B, S, C, patch, out.data_mut<float>());
  return out;
}

Tensor to_f32(const Tensor& t) {
  DISPATCH_CUDA(t, to_f32(t));
  if (!t.defined() || t.dtype() == DType::F32) return t;
  Tensor out = Tensor::empty(t.shape());
  cpu::widen(t.raw(), t.dtype(), t.numel(), out.data_mut<float>());
  return out;
}

void write_positions(Tensor& dst, const Tensor& src, int64_t at) {
  DISPATCH_CUDA(dst, write_positions(dst, src, at));
  require_f32(src, "write_positions");
  const int64_t B = src.dim(0), H = src.dim(1), L = src.dim(2), D = src.dim(3);
  if (dst.ndim() != 4 || dst.dim(0) != B || dst.dim(1) != H || dst.dim(3) != D || at < 0 ||
      at + L > dst.dim(2))
    throw_error(ErrorKind::Compute, "write_positions: " + shape_to_string(src.shape()) + " at " +
                                        std::to_string(at) + " into " +
                                        shape_to_string(dst.shape()));
  cpu::copy_rows(src.data<float>(), L * D, dst.data_mut<float>() + at * D, dst.dim(2) * D, B * H,
                 L * D);
}

void write_positions_pair(Tensor& keys, const Tensor& new_keys, Tensor& values,
                          const Tensor& new_values, int64_t at) {
  DISPATCH_CUDA(keys, write_positions_pair(keys, new_keys, values, new_values, at));
  write_positions(keys, new_keys, at);
  write_positions(values, new_values, at);
}

void rope_write_pair(Tensor& queries, Tensor& keys, const Tensor& new_keys, Tensor& values,
                     const Tensor& new_values, int64_t at, float theta) {
  DISPATCH_CUDA(keys, rope_write_pair(queries, keys, new_keys, values, new_values, at, theta));
  if (new_keys.ndim() != 4 || new_values.shape() != new_keys.shape() || queries.ndim() != 4 ||
      queries.dim(0) != new_keys.dim(0) || queries.dim(1) != new_keys.dim(1))
    throw_error(ErrorKind::Compute, "rope_write_pair: queries " + shape_to_string(queries.shape()) +
                                        " and keys " + shape_to_string(new_keys.shape()) +
                                        " are not [B, L, H, D] of one B and L");
  Tensor rotated = new_keys.clone();
  rope_inplace_pair(queries, rotated, at, theta);
  write_positions_pair(keys, heads_first(rotated), values, heads_first(new_values), at);
}

void run_concurrently(Device device, const std::function<void()>& first,
                      const std::function<void()>& second) {
#if MOXIN_WITH_CUDA
  if (device == Device::CUDA) return cuda::run_concurrently(first, second);
#endif
  (void)device;
  first();
  second();
}

Tensor run_recorded(Device device, std::shared_ptr<void>& state, const std::vector<Tensor>& inputs,
                    const std::vector<Tensor>& weights,
                    const std::function<Tensor(const std::vector<Tensor>&)>& body) {
#if MOXIN_WITH_CUDA
  if (device == Device::CUDA) return cuda::run_recorded(state, inputs, weights, body);
#endif
  (void)device;
  (void)state;
  (void)weights;
  return body(inputs);
}

}  // namespace moxin::ops
