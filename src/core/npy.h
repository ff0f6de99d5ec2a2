// NumPy .npy files (format versions 1-3, little-endian, C order): the parity fixtures' and the
// `logits` command's interchange format.
#pragma once

#include <filesystem>

#include "moxin/tensor.h"

namespace moxin::npy {

// Supports f2/f4/f8, u1/u2/u4/u8, i1/i2/i4/i8 and bool. BF16 has no NumPy dtype: fixtures store
// it as uint16 bits. Throws FileFormat on anything malformed.
Tensor load(const std::filesystem::path& file);
// Writes F32/F16/F64/U8/U16/U32/I32/I64 tensors (BF16 is written as uint16 bits).
void save(const std::filesystem::path& file, const Tensor& tensor);

}  // namespace moxin::npy
