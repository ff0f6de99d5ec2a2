// Reading model tensors out of a WeightMap with their expected shapes checked, and the name
// variants of the layouts in the wild resolved in one place.
#pragma once

#include <initializer_list>
#include <set>
#include <string>

#include "moxin/model.h"
#include "moxin/weights.h"

namespace moxin {

// While one is alive on a thread, every tensor read through expect_tensor on that thread is
// recorded: the loader's way of knowing which checkpoint tensors the model did not use.
class WeightUseRecorder {
 public:
  WeightUseRecorder();
  ~WeightUseRecorder();
  WeightUseRecorder(const WeightUseRecorder&) = delete;
  WeightUseRecorder& operator=(const WeightUseRecorder&) = delete;
  const std::set<std::string>& used() const { return used_; }
  static void record(const std::string& name);

 private:
  std::set<std::string> used_;
  WeightUseRecorder* previous_;
};

// The first of `names` present in `weights`, or "" when none is.
std::string first_present(const WeightMap& weights, std::initializer_list<std::string> names);

// The tensor `name`, which must have `shape` (FileFormat error naming the tensor otherwise) and
// a float dtype. Throws MissingWeightError when absent.
Tensor expect_tensor(const WeightMap& weights, const std::string& name, const Shape& shape);

// `prefix + "weight"` [out, in] and, when `with_bias`, `prefix + "bias"` [out]; the bias is
// widened to float32 at load (it is tiny and added in float32).
Linear expect_linear(const WeightMap& weights, const std::string& prefix, int64_t out, int64_t in,
                     bool with_bias);

// Small per-channel vectors (norm weights, LayerScale) are widened to float32 at load.
Tensor expect_vector_f32(const WeightMap& weights, const std::string& name, int64_t size);

}  // namespace moxin
