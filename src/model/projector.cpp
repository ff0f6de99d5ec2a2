#include "model/weight_lookup.h"
#include "moxin/errors.h"
#include "moxin/model.h"
#include "ops/ops.h"

namespace moxin {

Tensor FusedMLPProjector::forward(const Tensor& features) const {
  Tensor x = ops::linear(features, fc1);
  x = ops::gelu_linear(x, fc2);
  return ops::gelu_linear(x, fc3);
}

FusedMLPProjector load_projector(const WeightMap& weights, const std::string& prefix) {
  // HF-converted checkpoints name the layers fc1/fc2/fc3; Prismatic's nn.Sequential names them
  // by index, with the GELUs at 1 and 3.
  const bool by_index = !weights.contains(prefix + "fc1.weight") && weights.contains(prefix + "0.weight");
  const std::string n1 = prefix + (by_index ? "0." : "fc1.");
  const std::string n2 = prefix + (by_index ? "2." : "fc2.");
  const std::string n3 = prefix + (by_index ? "4." : "fc3.");
  const Tensor& w1 = weights.get(n1 + "weight");
  const Tensor& w2 = weights.get(n2 + "weight");
  const Tensor& w3 = weights.get(n3 + "weight");
  for (const auto* w : {&w1, &w2, &w3})
    if (w->ndim() != 2)
      throw_error(ErrorKind::FileFormat, "projector weight has shape " +
                                             shape_to_string(w->shape()) + ", expected a matrix");
  FusedMLPProjector p;
  p.fc1 = expect_linear(weights, n1, w1.dim(0), w1.dim(1), true);
  p.fc2 = expect_linear(weights, n2, w2.dim(0), w1.dim(0), true);
  p.fc3 = expect_linear(weights, n3, w3.dim(0), w2.dim(0), true);
  return p;
}

}  // namespace moxin
