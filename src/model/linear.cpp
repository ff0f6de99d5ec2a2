#include "moxin/model.h"

namespace moxin {

int64_t Linear::in_features() const { return weight.dim(1); }
int64_t Linear::out_features() const { return weight.dim(0); }

}  // namespace moxin
