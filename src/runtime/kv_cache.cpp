#include "moxin/kv_cache.h"

#include <algorithm>
#include <string>

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

void check_compatible(const Shape& a, const Shape& b) {
  if (a[0] != b[0] || a[1] != b[1] || a[3] != b[3])
    throw_error(ErrorKind::Compute, "KV cache holds " + shape_to_string(a) + " but the update is " +
                                        shape_to_string(b));
}

// Each sequence's offset: the per-sequence list while they differ, else offset() for all.
std::vector<int64_t> current_offsets(const std::vector<int64_t>& ragged, int64_t offset,
                                     int64_t batch) {
  return ragged.empty() ? std::vector<int64_t>(size_t(batch), offset) : ragged;
}

// A ragged append must start where the cache's sequences stand and keep its valid counts
// within the update.
void check_append(const RaggedAppend& append, const std::vector<int64_t>& offsets,
                  int64_t update_length) {
  const size_t B = offsets.size();
  if (append.at.host.size() != B || append.valid.size() != B)
    throw_error(ErrorKind::Compute, "KV cache ragged update: positions for " +
                                        std::to_string(append.at.host.size()) + " and counts for " +
                                        std::to_string(append.valid.size()) + " sequences, batch " +
                                        std::to_string(B));
  for (size_t b = 0; b < B; ++b) {
    if (append.at.host[b] != offsets[b])
      throw_error(ErrorKind::Compute, "KV cache ragged update: sequence " + std::to_string(b) +
                                          " is at " + std::to_string(offsets[b]) +
                                          " but the update starts at " +
                                          std::to_string(append.at.host[b]));
    if (append.valid[b] < 0 || append.valid[b] > update_length)
      throw_error(ErrorKind::Compute, "KV cache ragged update: " + std::to_string(append.valid[b]) +
                                          " valid rows of " + std::to_string(update_length));
  }
}

// The offsets after a ragged append, and whether they all agree (the cache is uniform again:
// e.g. a "ragged" batch whose sequences have equal lengths).
std::vector<int64_t> offsets_after(const RaggedAppend& append) {
  std::vector<int64_t> out(append.valid.size());
  for (size_t b = 0; b < out.size(); ++b) out[b] = append.at.host[b] + append.valid[b];
  return out;
}

// Stores `next` as (offset, per-sequence list): the list only while the offsets differ.
void store_offsets(std::vector<int64_t> next, int64_t& offset, std::vector<int64_t>& ragged) {
  offset = next.empty() ? 0 : *std::max_element(next.begin(), next.end());
  const bool uniform =
      std::all_of(next.begin(), next.end(), [&](int64_t o) { return o == next.front(); });
  if (uniform) {
    ragged.clear();
  } else {
    ragged = std::move(next);
  }
}

// A uniform append expressed as a ragged one: every sequence at its own offset, all rows valid.
RaggedAppend uniform_append(const std::vector<int64_t>& offsets, int64_t update_length) {
  RaggedAppend append;
  append.at.host = offsets;
  append.valid.assign(offsets.size(), update_length);
  return append;
}

int64_t furthest(const std::vector<int64_t>& at, int64_t update_length) {
  return (at.empty() ? 0 : *std::max_element(at.begin(), at.end())) + update_length;
}

}  // namespace

CachedKV KeyValueCache::update_and_fetch_ragged(const Tensor& keys, const Tensor& values,
                                                const RaggedAppend& append) {
  // The model sends ragged appends only for batches that are ragged; a cache that knows no
  // per-sequence offsets can still take one whose sequences all stand level and are all real.
  const int64_t L = keys.ndim() == 4 ? keys.dim(2) : 0;
  bool uniform = offsets().empty() && append.valid.size() == append.at.host.size();
  for (size_t b = 0; uniform && b < append.at.host.size(); ++b)
    uniform = append.at.host[b] == offset() && append.valid[b] == L;
  if (!uniform)
    throw_error(ErrorKind::Request,
                "this KV cache does not support sequences of different lengths in one batch");
  return update_and_fetch(keys, values);
}

CachedKV KeyValueCache::rope_update_and_fetch(Tensor& queries, Tensor& keys,
                                              const Tensor& values, float theta) {
  ops::rope_inplace_pair(queries, keys, offset(), theta);
  return update_and_fetch(ops::heads_first(keys), ops::heads_first(values));
}

CachedKV ConcatKeyValueCache::update_and_fetch(const Tensor& keys, const Tensor& values) {
  check_pair(keys, values);
  if (!offsets_.empty())  // sequences at different positions: each appends at its own
    return update_and_fetch_ragged(keys, values, uniform_append(offsets_, keys.dim(2)));
  if (!keys_.defined()) {
    keys_ = keys.clone();
    values_ = values.clone();
  } else {
    check_compatible(keys_.shape(), keys.shape());
    keys_ = ops::concat({keys_, keys}, 2);
    values_ = ops::concat({values_, values}, 2);
  }
  offset_ += keys.dim(2);
  return {keys_, values_, offset_};
}

CachedKV ConcatKeyValueCache::update_and_fetch_ragged(const Tensor& keys, const Tensor& values,
                                                      const RaggedAppend& append) {
  check_pair(keys, values);
  const int64_t B = keys.dim(0), L = keys.dim(2);
  if (keys_.defined() && offset_ > 0) check_compatible(keys_.shape(), keys.shape());
  check_append(append, current_offsets(offsets_, offset_, B), L);
  if (!keys_.defined() || offset_ == 0) {  // nothing to keep (fresh, or reset)
    keys_ = Tensor::zeros({B, keys.dim(1), 0, keys.dim(3)}, DType::F32, keys.device());
    values_ = Tensor::zeros({B, keys.dim(1), 0, keys.dim(3)}, DType::F32, keys.device());
  }
  // Sequences ahead of others write past the end of the history: pad it with zeros first.
  const int64_t end = furthest(append.at.host, L);
  if (end > keys_.dim(2)) {
    const Tensor pad =
        Tensor::zeros({B, keys.dim(1), end - keys_.dim(2), keys.dim(3)}, DType::F32, keys.device());
    keys_ = ops::concat({keys_, pad}, 2);
    values_ = ops::concat({values_, pad}, 2);
  }
  ops::write_positions(keys_, keys, append.at);
  ops::write_positions(values_, values, append.at);
  store_offsets(offsets_after(append), offset_, offsets_);
  return {keys_, values_, end};
}

void ConcatKeyValueCache::reset() {
  keys_ = Tensor();
  values_ = Tensor();
  offset_ = 0;
  offsets_.clear();
}

void KVCache::grow(const Shape& geometry, Device device, int64_t needed) {
  const int64_t steps = (needed + step_ - 1) / step_;
  const int64_t capacity = steps * step_;
  const Shape shape = {geometry[0], geometry[1], capacity, geometry[3]};
  Tensor keys = Tensor::zeros(shape, DType::F32, device);
  Tensor values = Tensor::zeros(shape, DType::F32, device);
  if (keys_.defined() && offset_ > 0) {
    // Only the valid prefix of each head moves; the rest of the old buffer is unused room.
    // (With ragged offsets offset_ is the largest: every sequence's history is inside it.)
    ops::write_positions(keys, ops::slice(keys_, 2, 0, offset_), 0);
    ops::write_positions(values, ops::slice(values_, 2, 0, offset_), 0);
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  capacity_ = capacity;
}

void KVCache::prepare(const Shape& geometry, Device device, int64_t needed) {
  if (step_ <= 0) throw_error(ErrorKind::Compute, "KV cache step must be positive");
  if (keys_.defined() && offset_ == 0) {
    // After reset() the buffers are reused only for sequences of the same geometry.
    const Shape& held = keys_.shape();
    if (held[0] != geometry[0] || held[1] != geometry[1] || held[3] != geometry[3]) {
      keys_ = values_ = Tensor();
      capacity_ = 0;
    }
  }
  if (keys_.defined()) check_compatible(keys_.shape(), geometry);
  if (!keys_.defined() || needed > capacity_) grow(geometry, device, needed);
}

CachedKV KVCache::update_and_fetch(const Tensor& keys, const Tensor& values) {
  check_pair(keys, values);
  if (!offsets_.empty())  // sequences at different positions: each appends at its own
    return update_and_fetch_ragged(keys, values, uniform_append(offsets_, keys.dim(2)));
  const int64_t needed = offset_ + keys.dim(2);
  prepare(keys.shape(), keys.device(), needed);
  ops::write_positions_pair(keys_, keys, values_, values, offset_);
  offset_ = needed;
  return {keys_, values_, offset_};
}

CachedKV KVCache::rope_update_and_fetch(Tensor& queries, Tensor& keys, const Tensor& values,
                                        float theta) {
  if (!offsets_.empty() || keys.ndim() != 4)
    return KeyValueCache::rope_update_and_fetch(queries, keys, values, theta);
  check_pair(keys, values);  // [B, L, n_kv_heads, head_dim] here, as projected
  const int64_t L = keys.dim(1);
  prepare({keys.dim(0), keys.dim(2), L, keys.dim(3)}, keys.device(), offset_ + L);
  ops::rope_write_pair(queries, keys_, keys, values_, values, offset_, theta);
  offset_ += L;
  return {keys_, values_, offset_};
}

std::optional<CachedKV> KVCache::reserve_and_fetch(const Tensor& keys, const Tensor& values) {
  if (!offsets_.empty() || keys.ndim() != 4) return std::nullopt;
  check_pair(keys, values);  // [B, L, n_kv_heads, head_dim], as projected
  const int64_t L = keys.dim(1);
  prepare({keys.dim(0), keys.dim(2), L, keys.dim(3)}, keys.device(), offset_ + L);
  offset_ += L;
  return CachedKV{keys_, values_, offset_};
}

CachedKV KVCache::update_and_fetch_ragged(const Tensor& keys, const Tensor& values,
                                          const RaggedAppend& append) {
  check_pair(keys, values);
  const int64_t B = keys.dim(0), L = keys.dim(2);
  if (keys_.defined() && offset_ > 0) check_compatible(keys_.shape(), keys.shape());
  check_append(append, current_offsets(offsets_, offset_, B), L);
  // Every sequence writes all L rows (padding included) from its own offset.
  const int64_t end = furthest(append.at.host, L);
  prepare(keys.shape(), keys.device(), end);
  ops::write_positions(keys_, keys, append.at);
  ops::write_positions(values_, values, append.at);
  store_offsets(offsets_after(append), offset_, offsets_);
  return {keys_, values_, end};
}

void KVCache::reset() {
  // The buffers stay allocated for the next sequence.
  offset_ = 0;
  offsets_.clear();
}

}  // namespace moxin
