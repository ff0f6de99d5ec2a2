#include "model/weight_lookup.h"

#include "moxin/errors.h"
#include "ops/ops.h"

namespace moxin {

namespace {
thread_local WeightUseRecorder* current_recorder = nullptr;
}

WeightUseRecorder::WeightUseRecorder() : previous_(current_recorder) { current_recorder = this; }
WeightUseRecorder::~WeightUseRecorder() { current_recorder = previous_; }
void WeightUseRecorder::record(const std::string& name) {
  if (current_recorder) current_recorder->used_.insert(name);
}

std::string first_present(const WeightMap& weights, std::initializer_list<std::string> names) {
  for (const auto& name : names)
    if (weights.contains(name)) return name;
  return "";
}

Tensor expect_tensor(const WeightMap& weights, const std::string& name, const Shape& shape) {
  const Tensor& t = weights.get(name);
  WeightUseRecorder::record(name);
  if (t.shape() != shape)
    throw_error(ErrorKind::FileFormat, "weight " + name + " has shape " +
                                           shape_to_string(t.shape()) + ", expected " +
                                           shape_to_string(shape));
  if (!is_float(t.dtype()) || t.dtype() == DType::F64)
    throw_error(ErrorKind::FileFormat, "weight " + name + " has dtype " +
                                           std::string(dtype_name(t.dtype())) +
                                           ", expected F32, F16 or BF16");
  return t;
}

Linear expect_linear(const WeightMap& weights, const std::string& prefix, int64_t out, int64_t in,
                     bool with_bias) {
  Linear layer;
  layer.weight = expect_tensor(weights, prefix + "weight", {out, in});
  if (with_bias) layer.bias = ops::to_f32(expect_tensor(weights, prefix + "bias", {out}));
  return layer;
}

Tensor expect_vector_f32(const WeightMap& weights, const std::string& name, int64_t size) {
  return ops::to_f32(expect_tensor(weights, name, {size}));
}

}  // namespace moxin
