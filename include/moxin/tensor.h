// A dense, row-major, contiguous n-dimensional array in host memory. Storage is shared:
// copies of a Tensor alias the same bytes (as torch tensors and MLX arrays do); clone() copies.
// Weights are usually views into a memory-mapped checkpoint, kept alive by the storage owner.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moxin/dtype.h"

namespace moxin {

using Shape = std::vector<int64_t>;

// Where a tensor's bytes live. CUDA tensors hold device pointers: data<T>() is for kernels,
// not for host code; to_device(Device::CPU) brings them back.
enum class Device : uint8_t { CPU, CUDA };

std::string shape_to_string(const Shape& shape);  // "[2, 3]"

class Tensor {
 public:
  Tensor() = default;

  // Fresh storage, uninitialised (empty) or zero-filled (zeros).
  static Tensor empty(Shape shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor zeros(Shape shape, DType dtype = DType::F32, Device device = Device::CPU);
  // A view of bytes someone else owns; `owner` keeps them alive for as long as the view lives.
  static Tensor view(Shape shape, DType dtype, const void* data, std::shared_ptr<const void> owner);
  static Tensor from_vector(Shape shape, const std::vector<float>& values);

  bool defined() const { return defined_; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return int(shape_.size()); }
  int64_t dim(int axis) const;  // negative axes count from the end
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t nbytes() const { return size_t(numel_) * dtype_size(dtype_); }

  const void* raw() const { return data_; }
  void* raw_mut();  // fails for read-only views (memory-mapped weights)
  template <class T> const T* data() const { return static_cast<const T*>(checked(sizeof(T))); }
  template <class T> T* data_mut() { return static_cast<T*>(checked_mut(sizeof(T))); }

  // Same storage, new shape (numel must match); -1 in one place is inferred.
  Tensor reshape(Shape shape) const;
  // Rows [begin, end) of the first axis, sharing storage.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  Tensor clone() const;
  // Converted copy (any float type to any float type, on the host); same dtype returns *this.
  Tensor to(DType dtype) const;
  // Copy on another device; the same device returns *this.
  Tensor to_device(Device device) const;
  std::vector<float> to_vector() const;  // values as f32 (copied to the host), for tests

 private:
  const void* checked(size_t element_size) const;
  void* checked_mut(size_t element_size);

  std::shared_ptr<const void> owner_;
  void* data_ = nullptr;
  bool writable_ = false;
  bool defined_ = false;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
};

}  // namespace moxin
