// CPU matrix products with MLX-style affine-quantized weights (see moxin/quantize.h).
//
// y [M, out] = x [M, in] @ dequantize(w)^T (+ bias [out]), f32 accumulation.
// Two strategies:
//  - decode (small M): one pass over the packed weights; each byte is read once. The float32
//    kernels expand each code in registers to s * q + b (as MLX's CPU path does) and feed it
//    straight into the dot products for all M rows of x. On AVX512-VNNI CPUs the 4/8-bit
//    decode runs on integer dot products instead, with x in 16-bit fixed point per group and
//    the affine map factored out (s * dx * sum(q xq) + b * sum(x)): about 1.5-2x the float
//    kernels' rate, within 2^-16 of the group's largest |x| per activation (see
//    quantized_matmul_avx512vnni.cpp); non-finite x falls back to the float kernels.
//  - prefill (large M): each thread dequantizes a tile of weight rows into an f32 buffer that
//    stays in its cache and multiplies it with cblas_sgemm (single-threaded inside our region).
// Instruction sets are picked at run time: AVX512-VNNI, AVX-512F, AVX2+FMA+F16C, or portable
// scalar code.
// 4- and 8-bit weights have vector kernels; other widths use a generic unpack-then-dot path.
#pragma once

#include <cstdint>

#include "moxin/quantize.h"

namespace moxin::cpu {

// Avx512Vnni: 4/8-bit decode on integer dot products with 16-bit fixed-point activations
// (quantized_matmul_avx512vnni.cpp states the precision); everything else as Avx512.
enum class QuantIsa { Scalar, Avx2, Avx512, Avx512Vnni };
enum class QuantMatmulPath { Auto, Decode, Prefill };

const char* quant_isa_name(QuantIsa isa);
bool quant_isa_supported(QuantIsa isa);  // by this CPU (Scalar always)
QuantIsa quant_best_isa();

// Largest M that Auto sends to the decode kernel.
constexpr int64_t kQuantDecodeMaxRows = 4;

// `w` must have passed validate(); throws Request if M < 0 or pointers are null where data
// is needed. x, y and bias must not alias.
void quantized_matmul(const float* x, int64_t M, const QuantizedTensor& w,
                      const float* bias_or_null, float* y);

// The same with the instruction set and strategy forced (tests and benchmarks). Throws Request
// when `isa` is not supported by this CPU.
void quantized_matmul(QuantIsa isa, QuantMatmulPath path, const float* x, int64_t M,
                      const QuantizedTensor& w, const float* bias_or_null, float* y);

// Rows [row_begin, row_end) of dequantize(w) into out (row-major, in_features() per row),
// with the given instruction set; results are bit-identical across instruction sets.
void dequantize_rows(QuantIsa isa, const QuantizedTensor& w, int64_t row_begin, int64_t row_end,
                     float* out);

}  // namespace moxin::cpu

// Shared between the dispatcher and the per-instruction-set kernel files; not for other callers.
namespace moxin::cpu::qmm_detail {

// The raw view every kernel works on (w already validated).
struct QuantView {
  const QuantizedTensor* tensor;
  const uint8_t* packed;  // [out, row_bytes]
  int64_t row_bytes;
  int64_t out, in, groups;
  int bits, group_size;
};

// Scales and biases of `row` as f32 (groups values each).
void load_params(const QuantView& w, int64_t row, float* scales, float* biases);

// Rows [r0, r1) of y for M <= kQuantDecodeMaxRows rows of x. x_prep [M, in] is x in the element
// order the kernel consumes (see nibble_lanes), y has row stride w.out; bias may be null.
using DecodeFn = void (*)(const QuantView& w, int M, const float* x_prep, const float* bias,
                          float* y, int64_t r0, int64_t r1);
// Rows [r0, r1) of the dequantized matrix into out (row stride w.in).
using DequantFn = void (*)(const QuantView& w, int64_t r0, int64_t r1, float* out);

struct IsaKernels {
  DecodeFn decode4;  // 4-bit decode; expects 4-bit x_prep with nibble_lanes
  DecodeFn decode8;  // 8-bit decode; natural x order
  DequantFn dequant4;
  DequantFn dequant8;
  // The 4-bit decode kernels expand a run of L bytes into their L low nibbles (even elements)
  // and L high nibbles (odd elements); x_prep holds each block of 2L elements as its L even
  // elements followed by its L odd ones.
  int nibble_lanes;
};

IsaKernels avx2_kernels();
IsaKernels avx512_kernels();

// x [M, in] into the form a decode kernel consumes (out: M * prep_floats(in, groups) floats).
// False when this x cannot take that form (non-finite values): use another kernel.
using PrepareFn = bool (*)(const float* x, int64_t M, int64_t in, int group_size, float* out);
struct PreparedDecodeKernel {
  DecodeFn decode;
  PrepareFn prepare;
  int64_t (*prep_floats)(int64_t in, int64_t groups);  // per row of x
  int64_t in_multiple;                                 // in must divide by this
};
PreparedDecodeKernel avx512vnni_decode(int bits);  // bits 4 or 8

}  // namespace moxin::cpu::qmm_detail
