// The CUDA runtime as the rest of the library sees it: device discovery, memory, copies.
// Compiled only with MOXIN_WITH_CUDA; core/device.cpp is its one caller outside the backend
// (the bench and the tests also read the memory statistics and the copy bandwidth).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moxin/tensor.h"

namespace moxin::cuda {

bool available();               // a driver and at least one device
void require_available();       // throws Error(Compute) saying why CUDA cannot be used
std::string describe();         // device name, compute capability, memory

std::shared_ptr<void> allocate(size_t bytes);  // device memory, freed when the last owner goes
void copy(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes);
void fill_zero(void* data, size_t bytes);
void synchronize();

// Two independent pieces of work: `second` is enqueued on a side stream, then `first` on the
// main one, so they overlap on the card (the two vision towers: neither fills it alone).
// Whatever either produced is ordered before the main stream's later work. Nested calls and
// calls inside a decode-graph recording run the two in turn.
void run_concurrently(const std::function<void()>& first, const std::function<void()>& second);

// ops::run_recorded on the GPU (cuda_graph.cu).
Tensor run_recorded(std::shared_ptr<void>& state, const std::vector<Tensor>& inputs,
                    const std::vector<Tensor>& weights,
                    const std::function<Tensor(const std::vector<Tensor>&)>& body);

struct MemoryStats {
  size_t pool_reserved_peak = 0;  // high-water mark of the stream-ordered pool (weights too)
  size_t pool_used_peak = 0;      // high-water mark of live pool allocations
  size_t other_bytes = 0;         // cuBLASLt workspace, decode-graph arenas, recorded graphs'
                                  // intermediates (their pool's high-water mark)
  size_t device_used = 0;         // total - free as the driver reports it (context included)
  size_t device_total = 0;
};
MemoryStats memory_stats();
void reset_peak_memory();  // restarts the pool's high-water marks at the current use

// Median device-to-device copy rate of a buffer far larger than L2, counting bytes read plus bytes
// written (the convention of the card's datasheet and of METHOD.md), GB/s.
double measure_copy_bandwidth_gbs(size_t bytes = size_t(2) << 30);

}  // namespace moxin::cuda
