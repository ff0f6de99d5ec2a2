#include "moxin/model.h"
#include "moxin/quantize.h"

namespace moxin {

int64_t Linear::in_features() const {
  return quantized ? quantized->in_features() : weight.dim(1);
}
int64_t Linear::out_features() const {
  return quantized ? quantized->out_features() : weight.dim(0);
}

}  // namespace moxin
