// Choosing the next token from logits: greedy at temperature 0 (the crate's `sample`), else
// sampling from softmax(logits / T) after the filters Hugging Face's generate() applies, in its
// order: repetition penalty, temperature, top-k, top-p, min-p.
//
// Reproducibility: the random source is std::mt19937_64, whose output sequence the C++
// standard fixes bit for bit, turned into uniform doubles by our own code ((x >> 11) * 2^-53),
// not by std::uniform_real_distribution (whose algorithm differs between standard libraries).
// The same seed, logits and options therefore give the same ids on every platform.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "moxin/tensor.h"

namespace moxin {

struct SamplingOptions {
  float temperature = 0.0f;         // 0: greedy (argmax); else > 0 and finite
  int32_t top_k = 0;                // 0: off; else keep the k best (ties with the k-th kept, as HF)
  float top_p = 1.0f;               // 1: off; in (0, 1]: smallest head with mass >= top_p
  float min_p = 0.0f;               // 0: off; in [0, 1): keep p >= min_p * p_max
  float repetition_penalty = 1.0f;  // 1: off; > 0: seen ids' logits / r if > 0, * r if < 0
  uint64_t seed = 0;

  // Error(Request) naming the first option out of range.
  void validate() const;
};

// Uniform doubles in [0, 1) from std::mt19937_64, identical on every standard library.
class SamplingRng {
 public:
  explicit SamplingRng(uint64_t seed = 0) : engine_(seed) {}
  double uniform() { return double(engine_() >> 11) * 0x1.0p-53; }
  void reseed(uint64_t seed) { engine_.seed(seed); }

 private:
  std::mt19937_64 engine_;
};

// The crate's sample(): logits [..., vocab] holding one row (leading dims multiply to 1), any
// float dtype, any device. Temperature 0 is argmax (the lowest id among equal maxima, as
// torch.argmax); otherwise a draw from softmax(logits / temperature).
// Ids at or above `num_valid_ids` (when >= 0) are never chosen: the model's embedding has rows
// (32064) the tokenizer cannot decode (32001). NaN or +inf among the valid logits is
// Error(Compute) (a numeric failure upstream, not something to sample from); -inf is a
// legitimate "never". All valid logits -inf is Error(Compute).
int32_t sample(const Tensor& logits, float temperature, SamplingRng& rng,
               int32_t num_valid_ids = -1);

// With every option. `previous` are the ids the repetition penalty applies to (HF penalises
// the whole input_ids: prompt and generated tokens; duplicates count once).
int32_t sample(const Tensor& logits, const SamplingOptions& options, SamplingRng& rng,
               std::span<const int32_t> previous = {}, int32_t num_valid_ids = -1);

// The distribution sample() draws from, over ids [0, vocab): zeros for filtered ids, summing to
// 1 (a one-hot at temperature 0). For tests and for callers that want probabilities.
std::vector<double> sampling_distribution(const Tensor& logits, const SamplingOptions& options,
                                          std::span<const int32_t> previous = {},
                                          int32_t num_valid_ids = -1);

// Keeps options, RNG state and the vocabulary mask together for a generation loop.
class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options, int32_t num_valid_ids = -1);
  int32_t operator()(const Tensor& logits, std::span<const int32_t> previous = {});
  const SamplingOptions& options() const { return options_; }
  int32_t num_valid_ids() const { return num_valid_ids_; }

 private:
  SamplingOptions options_;
  int32_t num_valid_ids_;
  SamplingRng rng_;
};

}  // namespace moxin
