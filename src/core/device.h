// Memory on each device: allocation, copies between devices, zero fill. The CPU side is plain
// aligned host memory; the CUDA side exists when the library is built with MOXIN_WITH_CUDA and
// otherwise answers with a clear error.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "moxin/tensor.h"

namespace moxin::device {

// Whether `device` can be used in this process (compiled in, driver and a GPU present).
bool available(Device device);
// Throws Error(Compute) saying why `device` cannot be used, if it cannot.
void require(Device device);
std::string describe(Device device);  // e.g. "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)"

std::shared_ptr<void> allocate(Device device, size_t bytes);
void copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes);
void fill_zero(Device device, void* data, size_t bytes);

Device parse(const std::string& name);  // "cpu" or "cuda"; Request error otherwise

}  // namespace moxin::device
