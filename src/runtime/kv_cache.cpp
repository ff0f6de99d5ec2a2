#include "moxin/kv_cache.h"


#include "moxin/errors.h"
#include "ops/ops.h"

namespace moxin {

namespace {

void check_pair(const Tensor& keys, const Tensor& values) {
  if (keys.ndim() != 4 || keys.shape() != values.shape() || keys.dtype() != DType::F32 ||
      values.dtype() != DType::F32 || keys.device() != values.device())
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

}  // namespace

CachedKV ConcatKeyValueCache::update_and_fetch(const Tensor& keys, const Tensor& values) {
  check_pair(keys, values);
  if (!keys_.defined()) {
    keys_ = keys.clone();
    values_ = values.clone();
  } else {
    check_compatible(keys_, keys);
    keys_ = ops::concat({keys_, keys}, 2);
    values_ = ops::concat({values_, values}, 2);
  }
  offset_ += keys.dim(2);
  return {keys_, values_, offset_};
}

void ConcatKeyValueCache::reset() {
  keys_ = Tensor();
  values_ = Tensor();
  offset_ = 0;
}

void KVCache::grow(const Tensor& like, int64_t needed) {
  const int64_t steps = (needed + step_ - 1) / step_;
  const int64_t capacity = steps * step_;
  const Shape shape = {like.dim(0), like.dim(1), capacity, like.dim(3)};
  Tensor keys = Tensor::zeros(shape, DType::F32, like.device());
  Tensor values = Tensor::zeros(shape, DType::F32, like.device());
  if (keys_.defined() && offset_ > 0) {
    // Only the valid prefix of each head moves; the rest of the old buffer is unused room.
    ops::write_positions(keys, ops::slice(keys_, 2, 0, offset_), 0);
    ops::write_positions(values, ops::slice(values_, 2, 0, offset_), 0);
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
  if (!keys_.defined() || needed > capacity_) grow(keys, needed);
  ops::write_positions(keys_, keys, offset_);
  ops::write_positions(values_, values, offset_);
  offset_ = needed;
  return {keys_, values_, offset_};
}

void KVCache::reset() {
  // The buffers stay allocated for the next sequence.
  offset_ = 0;
}

}  // namespace moxin
