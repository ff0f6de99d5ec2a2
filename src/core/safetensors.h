// The safetensors container format, parsed with every rule of the format enforced:
// 8-byte little-endian header length, a JSON object header within a size cap, known dtypes,
// shapes whose byte length matches data_offsets without integer overflow, offsets inside the
// file, tensors contiguous from offset 0 and non-overlapping. Errors name the source and tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moxin/tensor.h"

namespace moxin::safetensors {

// Headers larger than this are refused before they are read (the format's reference
// implementation uses the same 100 MB cap).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin;  // byte offsets relative to the start of the data section
  uint64_t end;
};

struct Header {
  std::vector<Entry> tensors;  // in data order
  std::map<std::string, std::string> metadata;
  uint64_t data_offset;        // 8 + header length: where the data section starts in the file
};

// Parses and validates a whole file image (`size` bytes). `source` names it in errors.
// Throws moxin::Error of kind FileFormat on any violation; never reads out of bounds.
Header parse(const uint8_t* bytes, size_t size, const std::string& source);

}  // namespace moxin::safetensors
