// Decode without launch overhead: one decode step of the generic model code (MoxinVLM::
// decode_token, the same ops as always) recorded once into a CUDA graph and replayed for
// every later token.
//
// Why this works without a dedicated model runner: while the step is recorded the backend
// (a) hands out memory from an arena the graph owns, so every intermediate has a fixed address
// on every replay, and (b) lets the position-dependent kernels (rotary embedding, the KV
// cache write and decode attention) add a device-resident delta to the host position they were
// given. The graph ends by picking the greedy token into the input slot of the next step and
// incrementing the delta, so a replay needs no host-to-device copy at all.
//
// Greedy generation launches several steps recorded back to back in one graph: between graph
// launches the GPU idles (the graph's end, the token's copy to the host, the next graph's start)
// and the first product of a step cannot prefetch its weights under the previous step's tail.
//
// The caches are StaticKVCache: preallocated to a fixed capacity (the recorded graph holds
// their addresses), filled by the ordinary prefill, and advanced on the host after each replay.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "moxin/kv_cache.h"
#include "moxin/model.h"
#include "moxin/tensor.h"

namespace moxin::cuda {

// A KV cache of fixed capacity on the GPU (allocated on first use, never reallocated).
class StaticKVCache final : public KeyValueCache {
 public:
  explicit StaticKVCache(int64_t capacity) : capacity_(capacity) {}
  int64_t offset() const override { return offset_; }
  int64_t capacity() const { return capacity_; }
  CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) override;
  CachedKV rope_update_and_fetch(Tensor& queries, Tensor& keys, const Tensor& values,
                                 float theta) override;
  std::optional<CachedKV> reserve_and_fetch(const Tensor& keys, const Tensor& values) override;
  void reset() override { offset_ = 0; }
  void advance(int64_t n);  // positions written by a replayed graph
  void rewind(int64_t offset) { offset_ = offset < offset_ ? offset : offset_; }

 private:
  // Storage, checks, room for an update of `geometry` [B, n_kv_heads, L, head_dim].
  void prepare(const Tensor& keys, const Tensor& values, const Shape& geometry);

  int64_t capacity_;
  Tensor keys_, values_;  // [B, n_kv_heads, capacity, head_dim]
  int64_t offset_ = 0;
};

class DecodeGraph {
 public:
  static constexpr int kMaxStepsPerLaunch = 16;

  // `capacity`: positions the caches hold (prompt + generated tokens). Batch 1.
  // `steps_per_launch`: steps in the recording generate_greedy launches while at least that many
  // tokens are wanted (1: one step per launch; 0: the default, 4 or MOXIN_CUDA_GRAPH_STEPS).
  DecodeGraph(MoxinVLM& model, int64_t capacity, int steps_per_launch = 0);
  ~DecodeGraph();
  DecodeGraph(const DecodeGraph&) = delete;
  DecodeGraph& operator=(const DecodeGraph&) = delete;

  KVCacheList& caches() { return caches_; }  // give these to model.forward for the prefill

  // One step for `token` through the recorded graph: logits [1, 1, vocab] on the GPU, valid
  // until the next step. Records the graph on first use.
  Tensor step(int32_t token);

  // Greedy generation after a prefill whose logits [1, n, vocab] (GPU) end at the cache's
  // offset: the first token is the argmax of the last row, each next one is picked inside the
  // graph. Only one int32 per token crosses to the host. Returns the `count` tokens, the same
  // whatever the steps per launch.
  std::vector<int32_t> generate_greedy(const Tensor& prefill_logits, int count);

  // Host time spent per token (launches + token readback issue), microseconds, last generation.
  double host_us_per_token() const { return host_us_per_token_; }
  bool recorded() const { return exec_ != nullptr; }

 private:
  void record();
  // Queues `steps` steps (1, or the many-step recording's count) at the caches' offset; the
  // first call records and launches one step. Returns the steps launched.
  int launch(int steps);
  int64_t room() const;    // positions left in the caches
  void check_room() const;

  MoxinVLM& model_;
  KVCacheList caches_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  void* exec_ = nullptr;  // cudaGraphExec_t of one step
  int steps_per_launch_ = 1;
  double host_us_per_token_ = 0;
};

// argmax of the last row of logits [..., vocab] (GPU), as a host int.
int32_t argmax_last(const Tensor& logits);

}  // namespace moxin::cuda
