// The safetensors container format, parsed with every rule of the format enforced:
// 8-byte little-endian header length, a JSON object header within a size cap, known dtypes,
// shapes whose byte length matches data_offsets without integer overflow, offsets inside the
// file, tensors contiguous from offset 0 and non-overlapping, no trailing bytes, no duplicate
// or empty names. Errors name the source and, where one is at fault, the tensor.
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

// Shapes of higher rank are refused: no real checkpoint comes close, and the cap bounds the
// work a hostile header can ask for.
constexpr size_t kMaxRank = 32;

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
  uint64_t data_offset;  // 8 + header length: where the data section starts in the file
};

// Parses and validates a whole file image (`size` bytes). `source` names it in errors.
// Throws moxin::Error of kind FileFormat on any violation; never reads out of bounds and reads
// only the header (the data section is not touched).
Header parse(const uint8_t* bytes, size_t size, const std::string& source);

// The header a writer puts in front of the data: the JSON text padded with spaces to a multiple
// of 8 bytes so the data section starts 8-byte aligned in the file. The 8-byte length prefix is
// not included. Throws Request for names the format cannot carry (empty, "__metadata__",
// invalid UTF-8) and for metadata that is not valid UTF-8.
std::string serialize_header(const std::vector<Entry>& tensors,
                             const std::map<std::string, std::string>& metadata);

}  // namespace moxin::safetensors
