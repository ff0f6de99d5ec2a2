#include "moxin/kv_cache.h"

#include <cstring>

#include "moxin/errors.h"

namespace moxin {

namespace {

void check_pair(const Tensor& keys, const Tensor& values) {
  if (keys.ndim() != 4 || keys.shape() != values.shape() || keys.dtype() != DType::F32 ||
      values.dtype() != DType::F32)
    throw_error(ErrorKind::Compute, "KV cache update: keys " + shape_to_string(keys.shape()) +
                                        " and values " + shape_to_string(values.shape()) +
                                        " must be float32 [B, n_kv_heads, L, head_dim]");
}

void check_compatible(const Tensor& held, const Tensor& incoming) {
  const Shape& a = held.shape();
  const Shape& b = incoming.shape();
  if (a[0] != b[0] || a[1] != b[1] || a[3] != b[3])
    throw_error(ErrorKind::Compute, "KV cache holds " + shape_to_string(a) +
                                        " but the update is " + shape_to_string(b));
}

// Copies src [B, H, L_src, D] into dst [B, H, L_dst, D] at position `at` along L.
void copy_positions(const Tensor& src, Tensor& dst, int64_t at) {
  const int64_t B = src.dim(0), H = src.dim(1), L = src.dim(2), D = src.dim(3);
  const int64_t dst_len = dst.dim(2);
  const float* s = src.data<float>();
  float* d = dst.data_mut<float>();
  for (int64_t bh = 0; bh < B * H; ++bh)
    std::memcpy(d + (bh * dst_len + at) * D, s + bh * L * D, size_t(L * D) * sizeof(float));
}

}  // namespace

CachedKV ConcatKeyValueCache::update_and_fetch(const Tensor& keys, const Tensor& values) {
  check_pair(keys, values);
  if (!keys_.defined()) {
    keys_ = keys.clone();
    values_ = values.clone();
  } else {
    check_compatible(keys_, keys);
    Shape shape = keys_.shape();
    shape[2] += keys.dim(2);
    Tensor new_keys = Tensor::empty(shape), new_values = Tensor::empty(shape);
    copy_positions(keys_, new_keys, 0);
    copy_positions(values_, new_values, 0);
    copy_positions(keys, new_keys, offset_);
    copy_positions(values, new_values, offset_);
    keys_ = std::move(new_keys);
    values_ = std::move(new_values);
  }
  offset_ += keys.dim(2);
  return {keys_, values_, offset_};
}

void ConcatKeyValueCache::reset() {
  keys_ = Tensor();
  values_ = Tensor();
  offset_ = 0;
}

void KVCache::grow(int64_t batch, int64_t heads, int64_t head_dim, int64_t needed) {
  const int64_t steps = (needed + step_ - 1) / step_;
  const int64_t capacity = steps * step_;
  Tensor keys = Tensor::zeros({batch, heads, capacity, head_dim});
  Tensor values = Tensor::zeros({batch, heads, capacity, head_dim});
  if (keys_.defined()) {
    // Only the valid prefix of each head moves; the rest of the old buffer is unused room.
    const float* ks = keys_.data<float>();
    const float* vs = values_.data<float>();
    float* kd = keys.data_mut<float>();
    float* vd = values.data_mut<float>();
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
      std::memcpy(kd + bh * capacity * head_dim, ks + bh * capacity_ * head_dim,
                  size_t(offset_ * head_dim) * sizeof(float));
      std::memcpy(vd + bh * capacity * head_dim, vs + bh * capacity_ * head_dim,
                  size_t(offset_ * head_dim) * sizeof(float));
    }
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  capacity_ = capacity;
}

CachedKV KVCache::update_and_fetch(const Tensor& keys, const Tensor& values) {
  check_pair(keys, values);
  if (step_ <= 0) throw_error(ErrorKind::Compute, "KV cache step must be positive");
  if (keys_.defined() && offset_ == 0) {
    // After reset() the buffers are reused only for sequences of the same geometry.
    const Shape& held = keys_.shape();
    if (held[0] != keys.dim(0) || held[1] != keys.dim(1) || held[3] != keys.dim(3)) {
      keys_ = values_ = Tensor();
      capacity_ = 0;
    }
  }
  if (keys_.defined()) check_compatible(keys_, keys);
  const int64_t needed = offset_ + keys.dim(2);
  if (!keys_.defined() || needed > capacity_) grow(keys.dim(0), keys.dim(1), keys.dim(3), needed);
  copy_positions(keys, keys_, offset_);
  copy_positions(values, values_, offset_);
  offset_ = needed;
  return {keys_, values_, offset_};
}

void KVCache::reset() {
  // The buffers stay allocated for the next sequence.
  offset_ = 0;
}

}  // namespace moxin
