// Per-layer key/value caches for the decoder. Keys and values are [B, n_kv_heads, L, head_dim]
// float32, the layout MLX's caches use, so each head's history is one contiguous block.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "moxin/tensor.h"

namespace moxin {

// The whole history after an update: keys and values are [B, n_kv_heads, capacity, head_dim]
// with the first `length` positions valid (capacity >= length; preallocated caches keep room
// to grow, so the valid positions of one head are followed by unused ones). After a ragged
// update `length` is the furthest position written for any sequence; each sequence's own
// history is shorter or equal, and its queries know where they stand (BatchPositions).
struct CachedKV {
  Tensor keys;
  Tensor values;
  int64_t length = 0;
};

// Ragged batches (sequences of different lengths, right-padded to one [B, L] tensor).
//
// One position per sequence: where its first new token sits, which is also the sequence's
// cache offset. `host` serves checks and the CPU kernels; `device`, when defined, holds the
// same values as I32 [B] on the GPU the activations live on, uploaded once per forward call and
// read by the rotary, KV-write and attention kernels of every layer (a GPU op given an
// undefined `device` uploads `host` itself).
struct BatchPositions {
  std::vector<int64_t> host;  // [B]
  Tensor device;              // I32 [B] on the activations' device, or undefined
  int64_t size() const { return int64_t(host.size()); }
};

// One ragged append of keys/values [B, n_kv_heads, L_new, head_dim]: row l of sequence b goes
// to position at.host[b] + l, and only its first valid[b] rows are real tokens (the rest is
// right padding). Afterwards the sequence's offset is at.host[b] + valid[b]; its padded rows
// were written too but lie past its offset, so its next update overwrites them. Attention is
// causal, so a real token never sees the padding that follows it.
struct RaggedAppend {
  BatchPositions at;           // each sequence's offset before the update (== the cache's)
  std::vector<int64_t> valid;  // [B], each in [0, L_new]
};

class KeyValueCache {
 public:
  virtual ~KeyValueCache() = default;
  // Number of positions already cached: the position of the next token. While the sequences
  // of a ragged batch stand at different positions (offsets() not empty), the largest of them.
  virtual int64_t offset() const = 0;
  // Each sequence's offset [B] while they differ (after a ragged update); empty while every
  // sequence stands at offset(). Caches without ragged support keep the default.
  virtual std::vector<int64_t> offsets() const { return {}; }
  // Appends keys/values [B, n_kv_heads, L_new, head_dim] and returns the whole history,
  // offset() + L_new positions. The returned tensors alias the cache until the next update.
  // On a cache holding a ragged batch, each sequence appends at its own offset.
  virtual CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) = 0;
  // The ragged append (RaggedAppend above). The default serves caches without ragged
  // support: an append that is in fact uniform (every sequence at offset(), every row valid)
  // goes to update_and_fetch; anything else is a Request error.
  virtual CachedKV update_and_fetch_ragged(const Tensor& keys, const Tensor& values,
                                           const RaggedAppend& append);
  // The decoder's RoPE and append in one call: queries [B, L, Hq, D] and keys [B, L, Hkv, D]
  // (the projections' layout) rotated at positions offset() + l, keys and values appended,
  // the whole history returned. queries are rotated in place; keys may be. The default rotates
  // both and calls update_and_fetch; caches that preallocate (KVCache, the GPU's static cache)
  // store a single position's rotated keys directly (one launch on a GPU).
  virtual CachedKV rope_update_and_fetch(Tensor& queries, Tensor& keys, const Tensor& values,
                                         float theta);
  // Room for L more positions, keys and values [B, L, n_kv_heads, head_dim] as projected, left
  // unwritten: offset() advances by L and the history comes back with those positions for the
  // caller to fill (a GPU decode step rotates and stores its new key inside the attention
  // kernel: ops::rope_attention_accumulate). Caches that cannot lend their storage, and
  // ragged batches, return nothing and change nothing.
  virtual std::optional<CachedKV> reserve_and_fetch(const Tensor& keys, const Tensor& values) {
    (void)keys;
    (void)values;
    return std::nullopt;
  }
  virtual void reset() = 0;
};

// Keeps the history as one tensor and concatenates on every update: simple, O(L) copy per step.
// Ragged appends first pad the history with zeros up to the furthest position written.
class ConcatKeyValueCache final : public KeyValueCache {
 public:
  int64_t offset() const override { return offset_; }
  std::vector<int64_t> offsets() const override { return offsets_; }
  CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) override;
  CachedKV update_and_fetch_ragged(const Tensor& keys, const Tensor& values,
                                   const RaggedAppend& append) override;
  void reset() override;

 private:
  Tensor keys_, values_;  // [B, n_kv_heads, length, head_dim]
  int64_t offset_ = 0;
  std::vector<int64_t> offsets_;  // per sequence while they differ, else empty
};

// Preallocates room for `step` positions at a time and grows by whole steps: appending a token
// copies only that token.
class KVCache final : public KeyValueCache {
 public:
  explicit KVCache(int64_t step = 256) : step_(step) {}
  int64_t offset() const override { return offset_; }
  std::vector<int64_t> offsets() const override { return offsets_; }
  int64_t capacity() const { return capacity_; }
  CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) override;
  CachedKV update_and_fetch_ragged(const Tensor& keys, const Tensor& values,
                                   const RaggedAppend& append) override;
  CachedKV rope_update_and_fetch(Tensor& queries, Tensor& keys, const Tensor& values,
                                 float theta) override;
  std::optional<CachedKV> reserve_and_fetch(const Tensor& keys, const Tensor& values) override;
  void reset() override;

 private:
  // Buffers of the geometry [B, n_kv_heads, *, head_dim] on `device`, with `needed` positions
  // of room.
  void prepare(const Shape& geometry, Device device, int64_t needed);
  void grow(const Shape& geometry, Device device, int64_t needed);
  int64_t step_;
  Tensor keys_, values_;          // [B, n_kv_heads, capacity, head_dim]
  int64_t offset_ = 0;            // the largest of offsets_ while they differ
  std::vector<int64_t> offsets_;  // per sequence while they differ, else empty
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
