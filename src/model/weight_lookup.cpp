#include "model/weight_lookup.h"

#include "moxin/errors.h"
#include "moxin/quantize.h"
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

namespace {

// An MLX-packed layer: `weight` (mlx-lm) or `inner.weight` (mlx-rs) U32 [out, in * bits / 32]
// with `scales` and `biases` [out, in / group_size]. Bits and group size follow from the shapes.
std::shared_ptr<const QuantizedTensor> expect_quantized(const WeightMap& weights,
                                                        const std::string& prefix, int64_t out,
                                                        int64_t in) {
  const std::string packed =
      weights.contains(prefix + "inner.weight") ? prefix + "inner.weight" : prefix + "weight";
  auto q = std::make_shared<QuantizedTensor>();
  q->weight = weights.get(packed);
  q->scales = weights.get(prefix + "scales");
  q->biases = weights.get(prefix + "biases");
  for (const auto& name : {packed, prefix + "scales", prefix + "biases"}) WeightUseRecorder::record(name);
  auto fail = [&](const std::string& why) {
    throw_error(ErrorKind::FileFormat, "quantized weight " + packed + ": " + why);
  };
  if (q->weight.ndim() != 2 || q->scales.ndim() != 2 || q->scales.dim(1) <= 0)
    fail("weight and scales must be matrices");
  if (q->weight.dim(0) != out || q->scales.dim(0) != out)
    fail("has " + std::to_string(q->weight.dim(0)) + " rows, expected " + std::to_string(out));
  if (in % q->scales.dim(1) != 0)
    fail(std::to_string(q->scales.dim(1)) + " groups do not divide the input width " + std::to_string(in));
  q->group_size = int(in / q->scales.dim(1));
  if ((q->weight.dim(1) * 32) % in != 0)
    fail("packed width " + std::to_string(q->weight.dim(1)) + " fits no bit width for input width " +
         std::to_string(in));
  q->bits = int(q->weight.dim(1) * 32 / in);
  q->validate(packed);
  return q;
}

}  // namespace

Linear expect_linear(const WeightMap& weights, const std::string& prefix, int64_t out, int64_t in,
                     bool with_bias) {
  Linear layer;
  if (weights.contains(prefix + "scales")) {
    layer.quantized = expect_quantized(weights, prefix, out, in);
  } else {
    layer.weight = expect_tensor(weights, prefix + "weight", {out, in});
  }
  if (with_bias) {
    const std::string bias =
        weights.contains(prefix + "inner.bias") ? prefix + "inner.bias" : prefix + "bias";
    layer.bias = ops::to_f32(expect_tensor(weights, bias, {out}));
  }
  return layer;
}

Tensor expect_vector_f32(const WeightMap& weights, const std::string& name, int64_t size) {
  return ops::to_f32(expect_tensor(weights, name, {size}));
}

}  // namespace moxin
