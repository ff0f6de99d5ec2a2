// Per-layer key/value caches for the decoder. Keys and values are [B, n_kv_heads, L, head_dim]
// float32, the layout MLX's caches use, so each head's history is one contiguous block.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "moxin/tensor.h"

namespace moxin {

// The whole history after an update: keys and values are [B, n_kv_heads, capacity, head_dim]
// with the first `length` positions valid (capacity >= length; preallocated caches keep room
// to grow, so the valid positions of one head are followed by unused ones).
struct CachedKV {
  Tensor keys;
  Tensor values;
  int64_t length = 0;
};

class KeyValueCache {
 public:
  virtual ~KeyValueCache() = default;
  // Number of positions already cached: the position of the next token.
  virtual int64_t offset() const = 0;
  // Appends keys/values [B, n_kv_heads, L_new, head_dim] and returns the whole history,
  // offset() + L_new positions. The returned tensors alias the cache until the next update.
  virtual CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) = 0;
  virtual void reset() = 0;
};

// Keeps the history as one tensor and concatenates on every update: simple, O(L) copy per step.
class ConcatKeyValueCache final : public KeyValueCache {
 public:
  int64_t offset() const override { return offset_; }
  CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) override;
  void reset() override;

 private:
  Tensor keys_, values_;
  int64_t offset_ = 0;
};

// Preallocates room for `step` positions at a time and grows by whole steps: appending a token
// copies only that token.
class KVCache final : public KeyValueCache {
 public:
  explicit KVCache(int64_t step = 256) : step_(step) {}
  int64_t offset() const override { return offset_; }
  int64_t capacity() const { return capacity_; }
  CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) override;
  void reset() override;

 private:
  void grow(const Tensor& like, int64_t needed);  // room for `needed` positions, on like's device
  int64_t step_;
  Tensor keys_, values_;  // [B, n_kv_heads, capacity, head_dim]
  int64_t offset_ = 0;
  int64_t capacity_ = 0;
};

// One cache per decoder layer. An empty list passed to forward() is filled with KVCache.
using KVCacheList = std::vector<std::unique_ptr<KeyValueCache>>;

template <class Cache = KVCache>
KVCacheList make_kv_caches(int64_t num_layers) {
  KVCacheList caches;
  for (int64_t i = 0; i < num_layers; ++i) caches.push_back(std::make_unique<Cache>());
  return caches;
}

}  // namespace moxin
