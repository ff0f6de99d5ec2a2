// A ragged batch scenario shared by the CPU test (test_batch.cpp) and the GPU test
// (tests/cuda/test_cuda_batch.cpp): several sequences, each with its own random image and
// prompt length, run as one right-padded batch (prefill + greedy decode steps) and one by one.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "moxin/model.h"
#include "ops/ops.h"

namespace moxin::test {

struct BatchInputs {
  Tensor dino, siglip;  // [B, S, S, 3]
  Tensor ids;           // [B, L] I32, sequence b's prompt in its first lengths[b] ids, then 0s
  std::vector<int64_t> lengths;
  std::vector<Tensor> dino_each, siglip_each;  // [1, S, S, 3]
  std::vector<Tensor> ids_each;                // [1, lengths[b]]
  int64_t batch() const { return int64_t(lengths.size()); }
};

inline Tensor random_image(int64_t size, std::mt19937& rng) {
  // Values in the range normalised pixels take; the content only has to differ per sequence.
  std::uniform_real_distribution<float> dist(-1.5f, 1.5f);
  std::vector<float> v(size_t(size * size * 3));
  for (float& x : v) x = dist(rng);
  return Tensor::from_vector({1, size, size, 3}, v);
}

inline BatchInputs make_batch_inputs(const MoxinVLM& model, const std::vector<int64_t>& lengths,
                                     uint32_t seed) {
  std::mt19937 rng(seed);
  BatchInputs in;
  in.lengths = lengths;
  const int64_t B = int64_t(lengths.size());
  const int64_t L = *std::max_element(lengths.begin(), lengths.end());
  const int64_t vocab = model.config.text_config.vocab_size;
  std::uniform_int_distribution<int32_t> token(2, int32_t(vocab - 1));
  in.ids = Tensor::zeros({B, L}, DType::I32);
  std::vector<Tensor> dino, siglip;
  for (int64_t b = 0; b < B; ++b) {
    in.dino_each.push_back(random_image(model.config.image_sizes[0], rng));
    in.siglip_each.push_back(random_image(model.config.image_sizes[1], rng));
    Tensor ids = Tensor::empty({1, lengths[size_t(b)]}, DType::I32);
    for (int64_t l = 0; l < lengths[size_t(b)]; ++l) {
      const int32_t id = l == 0 ? 1 : token(rng);  // BOS first
      ids.data_mut<int32_t>()[l] = id;
      in.ids.data_mut<int32_t>()[b * L + l] = id;
    }
    in.ids_each.push_back(ids);
  }
  in.dino = ops::concat(in.dino_each, 0);
  in.siglip = ops::concat(in.siglip_each, 0);
  return in;
}

// logits[b][s]: sequence b's logits (host floats) after the prefill (s = 0) and decode step s;
// tokens[b][s]: the greedy token picked from logits[b][s].
struct GreedyRun {
  std::vector<std::vector<std::vector<float>>> logits;
  std::vector<std::vector<int32_t>> tokens;
};

inline int32_t argmax_row(const std::vector<float>& row) {
  return int32_t(std::max_element(row.begin(), row.end()) - row.begin());
}

// Appends each sequence's row of logits [B, 1, V] to `run` and returns the greedy tokens.
inline std::vector<int32_t> record_step(const Tensor& logits, int64_t first_sequence,
                                        GreedyRun& run) {
  const std::vector<float> all = logits.to_vector();
  const int64_t B = logits.dim(0), V = logits.dim(-1);
  std::vector<int32_t> picked;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> row(all.begin() + b * V, all.begin() + (b + 1) * V);
    const size_t seq = size_t(first_sequence + b);
    picked.push_back(argmax_row(row));
    run.tokens[seq].push_back(picked.back());
    run.logits[seq].push_back(std::move(row));
  }
  return picked;
}

inline Tensor token_batch(const std::vector<int32_t>& tokens) {
  Tensor t = Tensor::empty({int64_t(tokens.size())}, DType::I32);
  std::copy(tokens.begin(), tokens.end(), t.data_mut<int32_t>());
  return t;
}

// The whole batch at once: the ragged prefill, then `steps` greedy decode steps.
inline GreedyRun run_batched(MoxinVLM& model, const BatchInputs& in, KVCacheList& cache,
                             int steps) {
  GreedyRun run;
  run.logits.resize(size_t(in.batch()));
  run.tokens.resize(size_t(in.batch()));
  Tensor logits = model.forward(in.dino, in.siglip, in.ids, in.lengths, cache);
  EXPECT_EQ(logits.shape(), (Shape{in.batch(), 1, model.config.text_config.vocab_size}));
  std::vector<int32_t> next = record_step(logits, 0, run);
  for (int s = 0; s < steps; ++s)
    next = record_step(model.decode_token(token_batch(next), cache), 0, run);
  return run;
}

// Each sequence alone (B = 1, its own length, no padding) through the same steps.
inline GreedyRun run_one_by_one(MoxinVLM& model, const BatchInputs& in, int steps) {
  GreedyRun run;
  run.logits.resize(size_t(in.batch()));
  run.tokens.resize(size_t(in.batch()));
  for (int64_t b = 0; b < in.batch(); ++b) {
    KVCacheList cache;
    const size_t i = size_t(b);
    Tensor logits = model.forward(in.dino_each[i], in.siglip_each[i], in.ids_each[i], cache, 1);
    std::vector<int32_t> next = record_step(logits, b, run);
    for (int s = 0; s < steps; ++s)
      next = record_step(model.decode_token(token_batch(next), cache), b, run);
  }
  return run;
}

// max |a - e| / max |e| over one row of logits.
inline double relative_error(const std::vector<float>& actual, const std::vector<float>& expected) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    diff = std::max(diff, double(std::abs(actual[i] - expected[i])));
    scale = std::max(scale, double(std::abs(expected[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// Every sequence's logits within `tolerance` (relative_error) of the expected run at every
// step, and the same greedy tokens. Returns the worst relative error seen.
inline double expect_same_run(const GreedyRun& actual, const GreedyRun& expected,
                              double tolerance) {
  double worst = 0;
  EXPECT_EQ(actual.logits.size(), expected.logits.size());
  for (size_t b = 0; b < std::min(actual.logits.size(), expected.logits.size()); ++b) {
    EXPECT_EQ(actual.tokens[b], expected.tokens[b]) << "sequence " << b;
    EXPECT_EQ(actual.logits[b].size(), expected.logits[b].size());
    for (size_t s = 0; s < std::min(actual.logits[b].size(), expected.logits[b].size()); ++s) {
      const double e = relative_error(actual.logits[b][s], expected.logits[b][s]);
      worst = std::max(worst, e);
      EXPECT_LE(e, tolerance) << "sequence " << b << " step " << s;
    }
  }
  return worst;
}

}  // namespace moxin::test
