// Matrix-vector products for decode (a handful of rows) with bf16/f16 weights read once and
// widened in registers: the weight stream is the whole cost of a decode step, and widening
// through a scratch buffer for BLAS costs more than the product itself.
#pragma once

#include <cstdint>

#include "moxin/dtype.h"

namespace moxin::cpu {

// Largest M the vector kernels take; larger batches go through matmul_nt's BLAS path.
constexpr int64_t kHalfGemvMaxRows = 4;

enum class HalfGemvIsa { Best, Avx2, Avx512 };

// y[M, N] = x[M, K] @ w[N, K]^T (+ bias), w BF16 or F16, M <= kHalfGemvMaxRows. Returns false
// (computing nothing) when this CPU lacks the instruction set (AVX2+FMA+F16C at least), so the
// caller falls back. `isa` forces one path, for tests.
bool half_gemv(const float* x, int64_t M, int64_t K, const uint16_t* w, DType w_dtype, int64_t N,
               const float* bias, float* y, HalfGemvIsa isa = HalfGemvIsa::Best);

}  // namespace moxin::cpu
