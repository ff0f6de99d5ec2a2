// Memory read bandwidth of this machine, measured.
#pragma once

#include <cstddef>

namespace moxin::cpu {

// GB/s: the best of 5 passes summing a buffer of `bytes` (make it far larger than the caches)
// on all threads with the widest loads the CPU has: the access pattern of a decode step
// streaming its weights.
double measure_read_bandwidth_gbs(size_t bytes);

}  // namespace moxin::cpu
