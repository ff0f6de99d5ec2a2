// Token sampling: HF generate()'s logits processors re-derived from their documented semantics.
#include "moxin/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <unordered_set>

#include "moxin/errors.h"

namespace moxin {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The single row of logits as float32 on the host.
std::vector<float> logits_row(const Tensor& logits) {
  if (!logits.defined() || logits.ndim() < 1 || logits.dim(-1) < 1)
    throw_error(ErrorKind::Request, "logits must be a tensor [..., vocab] with vocab >= 1");
  if (logits.numel() != logits.dim(-1))
    throw_error(ErrorKind::Request,
                "sample() takes one row of logits, got " + shape_to_string(logits.shape()));
  return logits.to_vector();
}

int64_t valid_count(int64_t vocab, int32_t num_valid_ids) {
  if (num_valid_ids == 0) throw_error(ErrorKind::Request, "num_valid_ids must not be 0");
  return num_valid_ids < 0 ? vocab : std::min<int64_t>(vocab, num_valid_ids);
}

// Unnormalised weights exp(z) over ids [0, n), where z = (penalised logit - max) / T and
// filtered ids hold weight 0. At temperature 0 the result is a one-hot at the argmax.
std::vector<double> weights(const std::vector<float>& row, const SamplingOptions& o,
                            std::span<const int32_t> previous, int64_t n) {
  std::vector<float> scores(row.begin(), row.begin() + n);
  for (int64_t i = 0; i < n; ++i) {
    const float v = scores[size_t(i)];
    if (std::isnan(v) || v == std::numeric_limits<float>::infinity())
      throw_error(ErrorKind::Compute,
                  "logit of id " + std::to_string(i) + " is " + (std::isnan(v) ? "NaN" : "+inf"));
  }
  if (o.repetition_penalty != 1.0f) {
    std::unordered_set<int32_t> seen;
    for (const int32_t id : previous) {
      if (id < 0) throw_error(ErrorKind::Request, "negative token id in the penalty history");
      if (id >= n || !seen.insert(id).second) continue;
      float& s = scores[size_t(id)];
      // HF's RepetitionPenaltyLogitsProcessor, in float32 as it computes.
      s = s < 0 ? s * o.repetition_penalty : s / o.repetition_penalty;
    }
  }

  // The best id: lowest among equal maxima, so greedy is deterministic on ties.
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (scores[size_t(i)] != -std::numeric_limits<float>::infinity() &&
        (best < 0 || scores[size_t(i)] > scores[size_t(best)]))
      best = i;
  if (best < 0) throw_error(ErrorKind::Compute, "every candidate logit is -inf");

  std::vector<double> w(static_cast<size_t>(n), 0.0);
  if (o.temperature == 0.0f) {
    w[size_t(best)] = 1.0;
    return w;
  }

  const double top = scores[size_t(best)];
  std::vector<double> z(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) z[size_t(i)] = (double(scores[size_t(i)]) - top) / o.temperature;
  int64_t alive = std::count_if(z.begin(), z.end(), [](double v) { return v != kNegInf; });

  if (o.top_k > 0 && o.top_k < alive) {
    std::vector<double> sorted(z);
    std::nth_element(sorted.begin(), sorted.begin() + (o.top_k - 1), sorted.end(),
                     std::greater<double>());
    const double kth = sorted[size_t(o.top_k - 1)];
    for (double& v : z)
      if (v < kth) v = kNegInf;  // ties with the k-th survive, as HF's `scores < kth` does
  }

  if (o.top_p < 1.0f) {
    double total = 0;
    std::vector<int64_t> order;
    for (int64_t i = 0; i < n; ++i)
      if (z[size_t(i)] != kNegInf) {
        order.push_back(i);
        total += std::exp(z[size_t(i)]);
      }
    // Best first, lower id first among equals. The nucleus is usually a few ids, so only a
    // growing head is sorted rather than the whole vocabulary on every step.
    const auto better = [&](int64_t a, int64_t b) {
      return z[size_t(a)] > z[size_t(b)] || (z[size_t(a)] == z[size_t(b)] && a < b);
    };
    size_t head = std::min<size_t>(64, order.size());
    size_t keep = order.size();
    while (true) {
      std::partial_sort(order.begin(), order.begin() + ptrdiff_t(head), order.end(), better);
      // Keep an id while the mass of the ids ranked above it is below top_p: the smallest
      // head whose mass reaches top_p (the best id always stays).
      double before = 0;
      size_t r = 0;
      for (; r < head && before < o.top_p; ++r) before += std::exp(z[size_t(order[r])]) / total;
      if (before >= o.top_p || head == order.size()) {
        keep = r;
        break;
      }
      head = std::min(head * 4, order.size());
    }
    for (size_t r = keep; r < order.size(); ++r) z[size_t(order[r])] = kNegInf;
  }

  if (o.min_p > 0.0f) {
    // p_i >= min_p * p_max  <=>  exp(z_i - z_max) >= min_p, and z_max = 0 survives every filter.
    for (double& v : z)
      if (v != kNegInf && std::exp(v) < double(o.min_p)) v = kNegInf;
  }

  for (int64_t i = 0; i < n; ++i) w[size_t(i)] = std::exp(z[size_t(i)]);
  return w;
}

int32_t draw(const std::vector<double>& w, SamplingRng& rng) {
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  const double target = rng.uniform() * total;
  double cumulative = 0;
  int32_t last_positive = -1;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] <= 0) continue;
    cumulative += w[i];
    last_positive = int32_t(i);
    if (target < cumulative) return int32_t(i);
  }
  return last_positive;  // only when rounding left target == total
}

int32_t argmax_one_hot(const std::vector<double>& w) {
  return int32_t(std::max_element(w.begin(), w.end()) - w.begin());
}

}  // namespace

void SamplingOptions::validate() const {
  auto fail = [](const std::string& what) { throw_error(ErrorKind::Request, what); };
  if (!std::isfinite(temperature) || temperature < 0)
    fail("temperature must be finite and >= 0, got " + std::to_string(temperature));
  if (top_k < 0) fail("top-k must be >= 0 (0 turns it off), got " + std::to_string(top_k));
  if (!(top_p > 0 && top_p <= 1))
    fail("top-p must be in (0, 1] (1 turns it off), got " + std::to_string(top_p));
  if (!(min_p >= 0 && min_p < 1))
    fail("min-p must be in [0, 1) (0 turns it off), got " + std::to_string(min_p));
  if (!std::isfinite(repetition_penalty) || !(repetition_penalty > 0))
    fail("repetition penalty must be finite and > 0 (1 turns it off), got " +
         std::to_string(repetition_penalty));
}

std::vector<double> sampling_distribution(const Tensor& logits, const SamplingOptions& options,
                                          std::span<const int32_t> previous,
                                          int32_t num_valid_ids) {
  options.validate();
  const std::vector<float> row = logits_row(logits);
  std::vector<double> w =
      weights(row, options, previous, valid_count(int64_t(row.size()), num_valid_ids));
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  for (double& v : w) v /= total;
  w.resize(row.size(), 0.0);
  return w;
}

int32_t sample(const Tensor& logits, const SamplingOptions& options, SamplingRng& rng,
               std::span<const int32_t> previous, int32_t num_valid_ids) {
  options.validate();
  const std::vector<float> row = logits_row(logits);
  const std::vector<double> w =
      weights(row, options, previous, valid_count(int64_t(row.size()), num_valid_ids));
  // Greedy consumes no randomness, so mixing greedy and sampled calls keeps streams aligned.
  return options.temperature == 0.0f ? argmax_one_hot(w) : draw(w, rng);
}

int32_t sample(const Tensor& logits, float temperature, SamplingRng& rng, int32_t num_valid_ids) {
  SamplingOptions options;
  options.temperature = temperature;
  return sample(logits, options, rng, {}, num_valid_ids);
}

Sampler::Sampler(const SamplingOptions& options, int32_t num_valid_ids)
    : options_(options), num_valid_ids_(num_valid_ids), rng_(options.seed) {
  options_.validate();
  if (num_valid_ids == 0) throw_error(ErrorKind::Request, "num_valid_ids must not be 0");
}

int32_t Sampler::operator()(const Tensor& logits, std::span<const int32_t> previous) {
  return sample(logits, options_, rng_, previous, num_valid_ids_);
}

}  // namespace moxin
