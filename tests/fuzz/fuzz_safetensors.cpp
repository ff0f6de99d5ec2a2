// libFuzzer target for the safetensors parser. Any input must either parse into a header whose
// every tensor lies inside the input (touching its first and last byte proves it to ASan), or
// be refused with a moxin::Error. Anything else (a crash, another exception, a sanitizer
// report) is a finding.
//
//   CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DMOXIN_FUZZ=ON \
//       -DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link,address,undefined
//   ninja -C build-fuzz fuzz_safetensors && build-fuzz/tests/fuzz_safetensors -max_total_time=120
//   CORPUS
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "core/safetensors.h"
#include "moxin/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // An exactly sized heap copy, so a read one byte past the input is an ASan report.
  std::unique_ptr<uint8_t[]> bytes(new uint8_t[size ? size : 1]);
  if (size) std::memcpy(bytes.get(), data, size);
  try {
    const auto header = moxin::safetensors::parse(bytes.get(), size, "fuzz-input");
    volatile uint8_t sink = 0;
    for (const auto& tensor : header.tensors) {
      if (tensor.end < tensor.begin || header.data_offset + tensor.end > size) std::abort();
      if (tensor.end == tensor.begin) continue;
      sink = sink ^ bytes[header.data_offset + tensor.begin];
      sink = sink ^ bytes[header.data_offset + tensor.end - 1];
    }
    (void)sink;
  } catch (const moxin::Error&) {
  }
  return 0;
}
