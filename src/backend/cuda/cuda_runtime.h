// The CUDA runtime as the rest of the library sees it: device discovery, memory, copies.
// Compiled only with MOXIN_WITH_CUDA; core/device.cpp is its one caller outside the backend.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace moxin::cuda {

bool available();               // a driver and at least one device
void require_available();       // throws Error(Compute) saying why CUDA cannot be used
std::string describe();         // device name, compute capability, memory

std::shared_ptr<void> allocate(size_t bytes);  // device memory, freed when the last owner goes
void copy(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes);
void fill_zero(void* data, size_t bytes);
void synchronize();

}  // namespace moxin::cuda
