// Helpers for the CUDA tests: skip without a GPU, random tensors, CPU-vs-GPU comparison.
#pragma once

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "core/device.h"
#include "moxin/tensor.h"
#include "test_support.h"

#define MOXIN_SKIP_WITHOUT_GPU()                                                     \
  do {                                                                               \
    if (!::moxin::device::available(::moxin::Device::CUDA))                          \
      GTEST_SKIP() << "no usable CUDA device: "                                      \
                   << ::moxin::device::describe(::moxin::Device::CUDA);              \
  } while (0)

namespace moxin::test {

inline Tensor random_tensor(const Shape& shape, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> values(static_cast<size_t>(n));
  for (float& v : values) v = dist(rng);
  return Tensor::from_vector(shape, values);
}

inline Tensor gpu(const Tensor& t) { return t.defined() ? t.to_device(Device::CUDA) : t; }

}  // namespace moxin::test
