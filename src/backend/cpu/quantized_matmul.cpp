// Dispatch, the portable kernels (every bit width) and the prefill strategy. The vector kernels
// for 4- and 8-bit weights live in quantized_matmul_avx2.cpp / quantized_matmul_avx512.cpp.
#include "backend/cpu/quantized_matmul.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "moxin/errors.h"

namespace moxin::cpu {

using qmm_detail::DecodeFn;
using qmm_detail::DequantFn;
using qmm_detail::IsaKernels;
using qmm_detail::QuantView;

namespace qmm_detail {

void load_params(const QuantView& w, int64_t row, float* scales, float* biases) {
  load_quant_group_params(*w.tensor, row, scales, biases);
}

}  // namespace qmm_detail

namespace {

QuantView make_view(const QuantizedTensor& w) {
  QuantView v;
  v.tensor = &w;
  v.packed = static_cast<const uint8_t*>(w.weight.raw());
  v.row_bytes = w.row_bytes();
  v.out = w.out_features();
  v.in = w.in_features();
  v.groups = w.groups_per_row();
  v.bits = w.bits;
  v.group_size = w.group_size;
  return v;
}

// Portable decode for any bit width: dequantize one group into a small buffer (as MLX's
// scalar kernel does, s * q + b per weight), then dot products the compiler can vectorise.
void decode_generic(const QuantView& w, int M, const float* x, const float* bias, float* y,
                    int64_t r0, int64_t r1) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  std::vector<float> weights(size_t(w.group_size));
  for (int64_t r = r0; r < r1; ++r) {
    qmm_detail::load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    float acc[kQuantDecodeMaxRows] = {};
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t k0 = g * w.group_size;
      const float s = scales[size_t(g)], b = biases[size_t(g)];
      for (int j = 0; j < w.group_size; ++j)
        weights[size_t(j)] = s * float(extract_quant_code(row, k0 + j, w.bits)) + b;
      for (int m = 0; m < M; ++m) {
        const float* xg = x + m * w.in + k0;
        float dot = 0.0f;
        for (int j = 0; j < w.group_size; ++j) dot += xg[j] * weights[size_t(j)];
        acc[m] += dot;
      }
    }
    for (int m = 0; m < M; ++m) y[m * w.out + r] = acc[m] + (bias ? bias[r] : 0.0f);
  }
}

void dequant_generic(const QuantView& w, int64_t r0, int64_t r1, float* out) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  for (int64_t r = r0; r < r1; ++r) {
    qmm_detail::load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    float* dst = out + (r - r0) * w.in;
    for (int64_t k = 0; k < w.in; ++k) {
      const int64_t g = k / w.group_size;
      // Two statements so the product is rounded before the add, as MLX does (no FMA).
      const float product = scales[size_t(g)] * float(extract_quant_code(row, k, w.bits));
      dst[k] = product + biases[size_t(g)];
    }
  }
}

// The nibble-lane reorder the float32 4-bit kernels consume: each block of 2L elements as its L
// even elements followed by its L odd ones.
template <int L>
bool prepare_nibble_lanes(const float* x, int64_t M, int64_t in, int, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * in;
    float* dst = out + m * in;
    for (int64_t b = 0; b < in; b += 2 * L) {
      for (int j = 0; j < L; ++j) {
        dst[b + j] = src[b + 2 * j];
        dst[b + L + j] = src[b + 2 * j + 1];
      }
    }
  }
  return true;
}

int64_t same_width(int64_t in, int64_t) {
  return in;
}

struct Kernels {
  DecodeFn decode;
  DequantFn dequant;
  qmm_detail::PrepareFn prepare;  // null: the decode kernel reads x as it is
  int64_t (*prep_floats)(int64_t in, int64_t groups) = same_width;
  QuantIsa fallback = QuantIsa::Scalar;  // when prepare() refuses x
};

Kernels select_kernels(QuantIsa isa, const QuantView& w) {
  Kernels k{decode_generic, dequant_generic, nullptr};
  if (isa == QuantIsa::Scalar || (w.bits != 4 && w.bits != 8)) return k;
  const IsaKernels ik =
      isa == QuantIsa::Avx2 ? qmm_detail::avx2_kernels() : qmm_detail::avx512_kernels();
  if (w.bits == 8)
    k = {ik.decode8, ik.dequant8, nullptr};
  else
    k = {ik.decode4, ik.dequant4,
         ik.nibble_lanes == 8 ? prepare_nibble_lanes<8> : prepare_nibble_lanes<16>};
  if (isa == QuantIsa::Avx512Vnni) {
    const qmm_detail::PreparedDecodeKernel vnni = qmm_detail::avx512vnni_decode(w.bits);
    if (w.in % vnni.in_multiple == 0) {
      k.decode = vnni.decode;
      k.prepare = vnni.prepare;
      k.prep_floats = vnni.prep_floats;
      k.fallback = QuantIsa::Avx512;
    }
  }
  return k;
}

// Below this many packed bytes, waking a second thread costs more than it saves.
constexpr int64_t kParallelMinBytes = 256 * 1024;

int thread_count_for(int64_t bytes) {
  return bytes < kParallelMinBytes ? 1 : omp_get_max_threads();
}

void run_decode(const Kernels& k, const QuantView& w, const float* x, int64_t M, const float* bias,
                float* y) {
  // x in the form the kernel consumes, prepared once for all threads.
  const int64_t prep_stride = k.prep_floats(w.in, w.groups);
  std::vector<float> x_prep;
  if (k.prepare) {
    x_prep.resize(size_t(M * prep_stride));
    if (!k.prepare(x, M, w.in, w.group_size, x_prep.data()))
      return run_decode(select_kernels(k.fallback, w), w, x, M, bias, y);
  }
  const float* xk = k.prepare ? x_prep.data() : x;
  const int threads = thread_count_for(w.out * w.row_bytes);
  // Dynamic blocks of rows rather than one static range per thread: on a shared machine a
  // descheduled thread would otherwise hold the whole product back. 64 rows (a multiple of 16,
  // so threads never share a cache line of y) is >= 64 KB of weights per block at 4096 inputs.
  constexpr int64_t kBlockRows = 64;
  const int64_t blocks = (w.out + kBlockRows - 1) / kBlockRows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kBlockRows;
    const int64_t r1 = std::min(w.out, r0 + kBlockRows);
    for (int64_t m0 = 0; m0 < M; m0 += kQuantDecodeMaxRows) {
      const int chunk = int(std::min<int64_t>(kQuantDecodeMaxRows, M - m0));
      k.decode(w, chunk, xk + m0 * prep_stride, bias, y + m0 * w.out, r0, r1);
    }
  }
}

void run_prefill(const Kernels& k, const QuantView& w, const float* x, int64_t M, const float* bias,
                 float* y) {
  // A tile of dequantized rows (about 1-2 MB) stays in the thread's cache between being
  // written and being read by sgemm; tall enough that re-packing x per tile is amortised.
  const int64_t tile_rows = std::clamp<int64_t>(((int64_t(1) << 19) / w.in) / 16 * 16, 16, 128);
  const int64_t tiles = (w.out + tile_rows - 1) / tile_rows;
  const int threads = thread_count_for(w.out * w.row_bytes + M * w.in * 4);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tile(size_t(tile_rows * w.in));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * tile_rows;
      const int64_t rows = std::min(tile_rows, w.out - r0);
      k.dequant(w, r0, r0 + rows, tile.data());
      // Inside our parallel region the OpenMP build of OpenBLAS runs on this thread alone.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(rows), int(w.in), 1.0f, x,
                  int(w.in), tile.data(), int(w.in), 0.0f, y + r0, int(w.out));
    }
  }
  if (bias) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < w.out; ++r) y[m * w.out + r] += bias[r];
  }
}

}  // namespace

const char* quant_isa_name(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::Avx512Vnni:
      return "avx512vnni";
    case QuantIsa::Avx512:
      return "avx512";
    case QuantIsa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool quant_isa_supported(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::Avx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    case QuantIsa::Avx512:
      return __builtin_cpu_supports("avx512f");
    case QuantIsa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
}

QuantIsa quant_best_isa() {
  static const QuantIsa best = quant_isa_supported(QuantIsa::Avx512Vnni) ? QuantIsa::Avx512Vnni
                               : quant_isa_supported(QuantIsa::Avx512)   ? QuantIsa::Avx512
                               : quant_isa_supported(QuantIsa::Avx2)     ? QuantIsa::Avx2
                                                                         : QuantIsa::Scalar;
  return best;
}

void quantized_matmul(QuantIsa isa, QuantMatmulPath path, const float* x, int64_t M,
                      const QuantizedTensor& w, const float* bias_or_null, float* y) {
  if (!quant_isa_supported(isa))
    throw_error(ErrorKind::Request,
                std::string("quantized_matmul: this CPU lacks ") + quant_isa_name(isa));
  // Cheap next to the product, and it keeps a malformed tensor from reaching the kernels.
  w.validate("quantized_matmul weight");
  if (M < 0) throw_error(ErrorKind::Request, "quantized_matmul: negative row count");
  if (M > INT32_MAX || w.out_features() > INT32_MAX || w.in_features() > INT32_MAX)
    throw_error(ErrorKind::Request, "quantized_matmul: dimensions exceed the BLAS int range");
  if (M == 0) return;
  if (!x || !y) throw_error(ErrorKind::Request, "quantized_matmul: null x or y");
  const QuantView view = make_view(w);
  const Kernels kernels = select_kernels(isa, view);
  if (path == QuantMatmulPath::Auto)
    path = M <= kQuantDecodeMaxRows ? QuantMatmulPath::Decode : QuantMatmulPath::Prefill;
  if (path == QuantMatmulPath::Decode)
    run_decode(kernels, view, x, M, bias_or_null, y);
  else
    run_prefill(kernels, view, x, M, bias_or_null, y);
}

void quantized_matmul(const float* x, int64_t M, const QuantizedTensor& w,
                      const float* bias_or_null, float* y) {
  quantized_matmul(quant_best_isa(), QuantMatmulPath::Auto, x, M, w, bias_or_null, y);
}

void dequantize_rows(QuantIsa isa, const QuantizedTensor& w, int64_t row_begin, int64_t row_end,
                     float* out) {
  if (!quant_isa_supported(isa))
    throw_error(ErrorKind::Request,
                std::string("dequantize_rows: this CPU lacks ") + quant_isa_name(isa));
  if (row_begin < 0 || row_end > w.out_features() || row_begin > row_end)
    throw_error(ErrorKind::Request, "dequantize_rows: rows [" + std::to_string(row_begin) + ", " +
                                        std::to_string(row_end) + ") out of range for " +
                                        std::to_string(w.out_features()) + " rows");
  w.validate("dequantize_rows weight");
  const QuantView view = make_view(w);
  const Kernels kernels = select_kernels(isa, view);
  kernels.dequant(view, row_begin, row_end, out);
}

}  // namespace moxin::cpu
