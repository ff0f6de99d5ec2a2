#include "moxin/tensor.h"

#include <cstdlib>
#include <cstring>

#include "core/device.h"
#include "moxin/errors.h"

namespace moxin {

namespace {

int64_t checked_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw_error(ErrorKind::Request, "negative dimension in shape " + shape_to_string(shape));
    if (d != 0 && n > INT64_MAX / d)
      throw_error(ErrorKind::Request, "shape " + shape_to_string(shape) + " overflows");
    n *= d;
  }
  return n;
}

}  // namespace

std::string shape_to_string(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  Tensor t;
  t.numel_ = checked_numel(shape);
  if (t.numel_ > int64_t(1) << 40)  // 1 Ti elements: no request of ours is near; a bug or an attack
    throw_error(ErrorKind::Compute, "refusing to allocate a tensor of shape " + shape_to_string(shape));
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  auto storage = device::allocate(device, t.nbytes());
  t.data_ = storage.get();
  t.owner_ = std::move(storage);
  t.writable_ = true;
  t.defined_ = true;
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  device::fill_zero(device, t.data_, t.nbytes());
  return t;
}

Tensor Tensor::view(Shape shape, DType dtype, const void* data, std::shared_ptr<const void> owner) {
  Tensor t;
  t.numel_ = checked_numel(shape);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.data_ = const_cast<void*>(data);
  t.owner_ = std::move(owner);
  t.writable_ = false;
  t.defined_ = true;
  return t;
}

Tensor Tensor::from_vector(Shape shape, const std::vector<float>& values) {
  Tensor t = empty(std::move(shape), DType::F32);
  if (size_t(t.numel()) != values.size())
    throw_error(ErrorKind::Request, "from_vector: " + std::to_string(values.size()) +
                                        " values for shape " + shape_to_string(t.shape()));
  std::memcpy(t.data_, values.data(), t.nbytes());
  return t;
}

int64_t Tensor::dim(int axis) const {
  const int n = ndim();
  const int a = axis < 0 ? axis + n : axis;
  if (a < 0 || a >= n)
    throw_error(ErrorKind::Request, "axis " + std::to_string(axis) + " out of range for shape " +
                                        shape_to_string(shape_));
  return shape_[size_t(a)];
}

void* Tensor::raw_mut() {
  if (!writable_) throw_error(ErrorKind::Compute, "write to a read-only tensor view");
  return data_;
}

const void* Tensor::checked(size_t element_size) const {
  if (!defined_) throw_error(ErrorKind::Compute, "use of an undefined tensor");
  if (element_size != dtype_size(dtype_))
    throw_error(ErrorKind::Compute, "tensor of dtype " + std::string(dtype_name(dtype_)) +
                                        " read with an element of " + std::to_string(element_size) +
                                        " bytes");
  return data_;
}

void* Tensor::checked_mut(size_t element_size) {
  checked(element_size);
  return raw_mut();
}

Tensor Tensor::reshape(Shape shape) const {
  int64_t known = 1;
  int infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0) throw_error(ErrorKind::Request, "reshape with two inferred axes");
      infer = int(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) shape[size_t(infer)] = known ? numel_ / known : 0;
  if (checked_numel(shape) != numel_)
    throw_error(ErrorKind::Request, "cannot reshape " + shape_to_string(shape_) + " to " +
                                        shape_to_string(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  const int64_t rows = dim(0);
  if (begin < 0 || end > rows || begin > end)
    throw_error(ErrorKind::Request, "rows [" + std::to_string(begin) + ", " + std::to_string(end) +
                                        ") out of range for shape " + shape_to_string(shape_));
  Tensor t = *this;
  const int64_t row_elems = rows ? numel_ / rows : 0;
  t.shape_[0] = end - begin;
  t.numel_ = row_elems * (end - begin);
  t.data_ = static_cast<char*>(data_) + size_t(begin * row_elems) * dtype_size(dtype_);
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device_);
  if (nbytes()) device::copy(t.data_, device_, data_, device_, nbytes());
  return t;
}

Tensor Tensor::to_device(Device device) const {
  if (device == device_ || !defined_) return *this;
  Tensor t = empty(shape_, dtype_, device);
  if (nbytes()) device::copy(t.data_, device, data_, device_, nbytes());
  return t;
}

namespace {
float load_as_f32(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::F64: return float(static_cast<const double*>(base)[i]);
    default:
      throw_error(ErrorKind::Compute,
                  "cannot convert dtype " + std::string(dtype_name(dtype)) + " to float");
  }
}
}  // namespace

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  if (device_ != Device::CPU) return to_device(Device::CPU).to(dtype).to_device(device_);
  if (!is_float(dtype) || !is_float(dtype_))
    throw_error(ErrorKind::Compute, "conversion " + std::string(dtype_name(dtype_)) + " -> " +
                                        std::string(dtype_name(dtype)) + " is not supported");
  Tensor t = empty(shape_, dtype);
  for (int64_t i = 0; i < numel_; ++i) {
    const float v = load_as_f32(data_, dtype_, i);
    switch (dtype) {
      case DType::F32: static_cast<float*>(t.data_)[i] = v; break;
      case DType::BF16: static_cast<uint16_t*>(t.data_)[i] = f32_to_bf16(v); break;
      case DType::F16: static_cast<uint16_t*>(t.data_)[i] = f32_to_f16(v); break;
      case DType::F64: static_cast<double*>(t.data_)[i] = v; break;
      default: break;
    }
  }
  return t;
}

std::vector<float> Tensor::to_vector() const {
  if (device_ != Device::CPU) return to_device(Device::CPU).to_vector();
  checked(dtype_size(dtype_));
  std::vector<float> out(static_cast<size_t>(numel_));
  for (int64_t i = 0; i < numel_; ++i) out[size_t(i)] = load_as_f32(data_, dtype_, i);
  return out;
}

}  // namespace moxin
