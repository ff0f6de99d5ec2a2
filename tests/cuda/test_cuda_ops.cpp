// CUDA ops against the CPU ops at awkward sizes. Every GPU result is poisoned-free by
// construction (fresh allocations are compared element by element against the CPU result).
// Tolerances (max |gpu - cpu| / max |cpu|):
//   float32 paths (norms, element-wise, attention, decode GEMV)  1e-5 .. 1e-4 (summation order)
//   single-row 4/8-bit products (fixed-point activations)        5e-4 (and their stated bound)
//   cuBLASLt with bf16 weights: activations rounded to bf16      1e-2 (8-bit mantissa: ~2^-9
//                                                                 per operand, averaged by K)
//   f16 weights (activations rounded to f16)                     2e-3
#include <gtest/gtest.h>

#include <cmath>

#include "cuda_test_util.h"
#include "moxin/errors.h"
#include "moxin/model.h"
#include "moxin/quantize.h"
#include "ops/ops.h"
#if MOXIN_WITH_CUDA
#include "backend/cuda/cuda_graph.h"
#include "backend/cuda/cuda_ops.h"
#endif

namespace moxin {
namespace {

using test::compare;
using test::gpu;
using test::random_tensor;

// Single-row 4/8-bit products (16-bit fixed-point activations): 5e-4 of the largest output here;
// the stated per-output bound itself is checked by FixedPointProductsStayWithinTheirBound.
constexpr double kFixedPointTol = 5e-4;

void expect_close(const Tensor& actual_gpu, const Tensor& expected, double tol,
                  const std::string& what) {
  ASSERT_EQ(actual_gpu.device(), Device::CUDA) << what;
  const Tensor actual = actual_gpu.to_device(Device::CPU);
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  const auto d = compare(actual, expected);
  for (float v : actual.to_vector()) ASSERT_TRUE(std::isfinite(v)) << what << ": non-finite output";
  EXPECT_LE(d.max_rel, tol) << what << ": " << d.to_string();
}

// A quantized layer with its codes, scales, biases (and bias, when given) on the GPU.
Linear gpu_quantized(const QuantizedTensor& q, const Tensor& bias = Tensor()) {
  auto on_gpu = std::make_shared<QuantizedTensor>(q);
  on_gpu->weight = gpu(q.weight);
  on_gpu->scales = gpu(q.scales);
  on_gpu->biases = gpu(q.biases);
  return Linear{Tensor(), gpu(bias), on_gpu};
}

// A random bf16 layer [N, K] (4/8-bit when bits is set) as the CPU reference sees it (the
// exactly dequantized weight) and on the GPU.
void random_layer_pair(int64_t N, int64_t K, int bits, uint32_t& seed, Linear& reference,
                       Linear& layer, bool biased = true) {
  const Tensor w = random_tensor({N, K}, ++seed, 0.05f).to(DType::BF16);
  const Tensor b = biased ? random_tensor({N}, ++seed) : Tensor();
  if (bits == 0) {
    reference = Linear{w, b, nullptr};
    layer = Linear{gpu(w), gpu(b), nullptr};
  } else {
    const QuantizedTensor q = quantize(w, 64, bits);
    reference = Linear{dequantize(q), b, nullptr};
    layer = gpu_quantized(q, b);
  }
}

TEST(CudaRuntime, CopiesRoundTripAndZeros) {
  MOXIN_SKIP_WITHOUT_GPU();
  const Tensor host = random_tensor({33, 31}, 1);
  const Tensor back = gpu(host).to_device(Device::CPU);
  EXPECT_EQ(back.to_vector(), host.to_vector());
  const Tensor z = Tensor::zeros({4304}, DType::F32, Device::CUDA).to_device(Device::CPU);
  for (float v : z.to_vector()) ASSERT_EQ(v, 0.0f);
  const Tensor copy = gpu(host).clone().to_device(Device::CPU);
  EXPECT_EQ(copy.to_vector(), host.to_vector());
}

struct LinearCase {
  int64_t M, K, N;
  DType dtype;
  bool bias;
};

TEST(CudaOps, LinearMatchesCpuForEveryPathAndAwkwardSizes) {
  MOXIN_SKIP_WITHOUT_GPU();
  const LinearCase cases[] = {
      {1, 32, 33, DType::BF16, true},    {1, 31, 31, DType::BF16, false},
      {3, 4304, 33, DType::BF16, true},  {8, 64, 4304, DType::BF16, false},
      {9, 33, 32, DType::BF16, true},    {33, 4304, 31, DType::BF16, true},
      {261, 1024, 1152, DType::BF16, true}, {1, 4304, 64, DType::F16, true},
      {33, 64, 33, DType::F16, false},   {1, 33, 31, DType::F32, true},
      {40, 96, 72, DType::F32, true},
  };
  uint32_t seed = 10;
  for (const LinearCase& c : cases) {
    const Tensor x = random_tensor({c.M, c.K}, ++seed);
    Linear cpu_layer;
    cpu_layer.weight = random_tensor({c.N, c.K}, ++seed, 0.05f).to(c.dtype);
    if (c.bias) cpu_layer.bias = random_tensor({c.N}, ++seed);
    Linear gpu_layer{gpu(cpu_layer.weight), gpu(cpu_layer.bias), nullptr};
    const Tensor expected = ops::linear(x, cpu_layer);
    const bool gemv = c.M <= 8;
    const double tol = gemv ? 1e-5 : (c.dtype == DType::BF16 ? 1e-2 : c.dtype == DType::F16 ? 2e-3 : 1e-5);
    expect_close(ops::linear(gpu(x), gpu_layer), expected, tol,
                 "linear M=" + std::to_string(c.M) + " K=" + std::to_string(c.K) +
                     " N=" + std::to_string(c.N) + " " + std::string(dtype_name(c.dtype)));
  }
}

TEST(CudaOps, QuantizedLinearMatchesDequantizedReference) {
  MOXIN_SKIP_WITHOUT_GPU();
  struct Case { int64_t M, K, N; int bits, group; };
  const Case cases[] = {{1, 4352, 33, 4, 64}, {4, 4352, 31, 8, 64}, {8, 256, 4304, 4, 32},
                        {1, 512, 33, 8, 128}, {33, 4352, 32, 4, 64}, {1, 192, 31, 3, 64},
                        {2, 256, 33, 6, 64},
                        // lm_head and down_proj of the 7B decoder
                        {1, 4096, 32064, 4, 64}, {1, 4096, 32064, 8, 64}, {1, 14336, 4096, 4, 64},
                        // prefill (word-wise dequantization + cuBLASLt) at awkward sizes
                        {9, 4352, 33, 8, 64}, {261, 256, 4304, 4, 32}, {31, 512, 31, 8, 128}};
  uint32_t seed = 100;
  for (const Case& c : cases) {
    const Tensor w = random_tensor({c.N, c.K}, ++seed, 0.05f).to(DType::BF16);
    const QuantizedTensor q = quantize(w, c.group, c.bits);
    Linear reference{dequantize(q), random_tensor({c.N}, ++seed), nullptr};
    const Linear layer = gpu_quantized(q, reference.bias);
    const Tensor x = random_tensor({c.M, c.K}, ++seed);
    const bool gemv = c.M <= 8 && (c.bits == 4 || c.bits == 8);
    const double tol = !gemv ? 1e-2 : c.M == 1 ? kFixedPointTol : 1e-4;
    expect_close(ops::linear(gpu(x), layer), ops::linear(x, reference), tol,
                 "quantized linear M=" + std::to_string(c.M) + " bits=" + std::to_string(c.bits) +
                     " group=" + std::to_string(c.group));
  }
  // Scales and biases stored as float32 or float16 (the decode kernels read bf16 ones on a
  // path of their own), one row (fixed point) and many (expanded to bf16 for cuBLASLt).
  for (const DType params : {DType::F32, DType::F16})
    for (const int bits : {4, 8})
      for (const int64_t M : {1, 33}) {
        const Tensor w = random_tensor({33, 4352}, ++seed, 0.05f).to(DType::BF16);
        QuantizedTensor q = quantize(w, 64, bits);
        q.scales = q.scales.to(params);
        q.biases = q.biases.to(params);
        const Linear reference{dequantize(q), Tensor(), nullptr};
        const Tensor x = random_tensor({M, 4352}, ++seed);
        expect_close(ops::linear(gpu(x), gpu_quantized(q)), ops::linear(x, reference),
                     M == 1 ? kFixedPointTol : 1e-2,
                     "quantized linear, " + std::string(dtype_name(params)) +
                         " parameters, bits=" + std::to_string(bits) + " M=" + std::to_string(M));
      }
}

#if MOXIN_WITH_CUDA
// Every single-row kernel variant the tuner may pick, at awkward widths (rows that do not fill
// a block, K that leaves threads idle), bf16 and 4/8-bit.
TEST(CudaOps, EverySingleRowGemvVariantMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  struct Case { int64_t K, N; int bits; };  // bits 0: bf16
  const Case cases[] = {{4352, 33, 0}, {64, 4304, 0}, {14336, 31, 0}, {4096, 1025, 0},
                        {4352, 33, 4}, {256, 4304, 4}, {14336, 31, 4}, {4096, 1025, 4},
                        {4352, 33, 8}, {256, 4304, 8}, {14336, 31, 8}, {4096, 1025, 8},
                        // wider than the fixed-point kernel's shared memory on any card: float
                        {65536, 33, 4}, {65536, 31, 8}};
  uint32_t seed = 300;
  for (int variant = 0; variant < 5; ++variant) {  // fixed point 5, the others fewer
    cuda::set_gemv_variant_for_testing(variant);
    for (const Case& c : cases) {
      const Tensor w = random_tensor({c.N, c.K}, ++seed, 0.05f).to(DType::BF16);
      const Tensor bias = random_tensor({c.N}, ++seed);
      const Tensor x = random_tensor({1, c.K}, ++seed);
      Linear reference, layer;
      if (c.bits == 0) {
        reference = Linear{w, bias, nullptr};
        layer = Linear{gpu(w), gpu(bias), nullptr};
      } else {
        const QuantizedTensor q = quantize(w, 64, c.bits);
        reference = Linear{dequantize(q), bias, nullptr};
        layer = gpu_quantized(q, bias);
      }
      expect_close(ops::linear(gpu(x), layer), ops::linear(x, reference),
                   c.bits ? kFixedPointTol : 1e-5,
                   "variant " + std::to_string(variant) + " K=" + std::to_string(c.K) +
                       " N=" + std::to_string(c.N) + " bits=" + std::to_string(c.bits));
    }
  }
  cuda::set_gemv_variant_for_testing(-1);
}

// The fused single-row launches (q/k/v segments, gate/up with SwiGLU) against separate CPU
// products, for every variant, bf16 and 4/8-bit, with segment widths that do not fill a block;
// with several rows they fall back to separate products and must agree too.
TEST(CudaOps, FusedSameInputProductsMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 500;
  auto make = [&](int64_t N, int64_t K, int bits, bool bias, Linear* cpu_layer, Linear* gpu_layer) {
    random_layer_pair(N, K, bits, seed, *cpu_layer, *gpu_layer, bias);
  };
  for (int variant = 0; variant < 4; ++variant) {  // fixed point: 4 (3 gated), float: 3
    cuda::set_gemv_variant_for_testing(variant);
    for (int bits : {0, 4, 8}) {
      for (int64_t M : {1, 3}) {
        const int64_t K = bits == 8 ? 4352 : 576;
        const double tol = bits ? (M == 1 ? kFixedPointTol : 1e-4) : 1e-5;
        const std::string what = "variant " + std::to_string(variant) + " bits " +
                                 std::to_string(bits) + " M " + std::to_string(M);
        Linear c[3], g[3];
        make(33, K, bits, true, &c[0], &g[0]);
        make(31, K, bits, false, &c[1], &g[1]);
        make(1025, K, bits, true, &c[2], &g[2]);
        const Tensor x = random_tensor({1, M, K}, ++seed);
        const std::vector<Tensor> got = ops::linear_same_input(gpu(x), {&g[0], &g[1], &g[2]});
        ASSERT_EQ(got.size(), 3u);
        for (int i = 0; i < 3; ++i)
          expect_close(got[size_t(i)], ops::linear(x, c[i]), tol, what + " segment " + std::to_string(i));
        Linear cg, gg, cu, gu;
        make(4305, K, bits, false, &cg, &gg);
        make(4305, K, bits, true, &cu, &gu);
        expect_close(ops::swiglu_linear(gpu(x), gg, gu),
                     ops::silu_mul(ops::linear(x, cg), ops::linear(x, cu)), tol, what + " swiglu");
        // The RMSNorm folded into the same launches (the decoder's input and post-attention
        // norms): against a separate CPU norm, then the products.
        const RMSNorm norm{random_tensor({K}, ++seed, 0.5f), 1e-5f};
        const RMSNorm gnorm{gpu(norm.weight), norm.eps};
        const Tensor h = ops::rms_norm(x, norm);
        const std::vector<Tensor> normed =
            ops::linear_same_input(gpu(x), {&g[0], &g[1], &g[2]}, &gnorm);
        for (int i = 0; i < 3; ++i)
          expect_close(normed[size_t(i)], ops::linear(h, c[i]), tol,
                       what + " normed segment " + std::to_string(i));
        expect_close(ops::swiglu_linear(gpu(x), gg, gu, &gnorm),
                     ops::silu_mul(ops::linear(h, cg), ops::linear(h, cu)), tol,
                     what + " normed swiglu");
      }
    }
  }
  cuda::set_gemv_variant_for_testing(-1);
}

// Quantized rows too wide for the fixed-point kernel's shared memory (on any card) take the
// float kernels, fused launches included: every variant against separate CPU products.
TEST(CudaOps, WideQuantizedFusedProductsMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 800;
  const int64_t K = 65536;
  auto make = [&](int64_t N, int bits, Linear* cpu_layer, Linear* gpu_layer) {
    random_layer_pair(N, K, bits, seed, *cpu_layer, *gpu_layer);
  };
  for (int bits : {4, 8}) {
    Linear c[3], g[3];
    make(33, bits, &c[0], &g[0]);
    make(31, bits, &c[1], &g[1]);
    make(65, bits, &c[2], &g[2]);
    const Tensor x = random_tensor({1, K}, ++seed);
    const RMSNorm norm{random_tensor({K}, ++seed, 0.5f), 1e-5f};
    const RMSNorm gnorm{gpu(norm.weight), norm.eps};
    const Tensor h = ops::rms_norm(x, norm);
    for (int variant = 0; variant < 3; ++variant) {
      cuda::set_gemv_variant_for_testing(variant);
      const std::string what = "variant " + std::to_string(variant) + " bits " + std::to_string(bits);
      const std::vector<Tensor> got = ops::linear_same_input(gpu(x), {&g[0], &g[1], &g[2]}, &gnorm);
      for (int i = 0; i < 3; ++i)
        expect_close(got[size_t(i)], ops::linear(h, c[i]), 1e-4, what + " segment " + std::to_string(i));
      expect_close(ops::swiglu_linear(gpu(x), g[0], g[0]),
                   ops::silu_mul(ops::linear(x, c[0]), ops::linear(x, c[0])), 1e-4, what + " swiglu");
    }
  }
  cuda::set_gemv_variant_for_testing(-1);
}

// Single-row 4/8-bit products run on activations in 16-bit fixed point per 16-byte chunk of
// codes (128 / bits activations). Each output must lie within float rounding plus the stated
// bound 2^-16 sum_c max|x_c| sum_k |s q_k| of the exact product (double precision, from the
// dequantized weights), for every variant and group size, with and without the folded RMSNorm,
// and with one large outlier per group (the worst case for the chunk that holds it), a chunk
// of zeros and one of values near the float's smallest normal. A non-finite activation makes
// the outputs NaN. The wide rows take more than one pass of the activation conversion and
// shallower staging rings (every ring depth is reached by some variant at one of the two
// widths).
TEST(CudaOps, FixedPointProductsStayWithinTheirBound) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 900;
  int64_t K = 0, N = 0;
  auto check = [&](const Tensor& gpu_y, const std::vector<float>& xn, const QuantizedTensor& q,
                   const std::string& what) {
    const std::vector<float> y = gpu_y.to_device(Device::CPU).to_vector();
    const std::vector<float> w = dequantize(q).to_vector();
    const std::vector<float> b = q.biases.to_vector();
    const int64_t groups = K / q.group_size, chunk = 128 / q.bits;
    int reported = 0;
    for (int64_t n = 0; n < N; ++n) {
      double exact = 0.0, magnitude = 0.0, bound = 0.0;
      for (int64_t c = 0; c < K / chunk; ++c) {
        const int64_t g = c * chunk / q.group_size;  // chunks lie within one group
        double peak = 0.0, weights = 0.0;
        for (int64_t k = c * chunk; k < (c + 1) * chunk; ++k) {
          const double wk = w[size_t(n * K + k)];
          exact += wk * xn[size_t(k)];
          magnitude += std::fabs(wk * xn[size_t(k)]);
          peak = std::max(peak, std::fabs(double(xn[size_t(k)])));
          weights += std::fabs(wk - b[size_t(n * groups + g)]);
        }
        bound += peak * weights;
      }
      const double limit = 4e-6 * magnitude + std::ldexp(bound, -16) * (1.0 + 1e-3);
      if (!(std::fabs(y[size_t(n)] - exact) <= limit) && reported++ < 5)
        ADD_FAILURE() << what << ": y[" << n << "] = " << y[size_t(n)] << ", exact " << exact
                      << ", limit " << limit;
    }
  };
  for (const auto& [width, rows] : {std::pair<int64_t, int64_t>{1536, 129}, {20736, 67}}) {
    K = width;
    N = rows;
    for (int variant = 0; variant < 5; ++variant) {
      cuda::set_gemv_variant_for_testing(variant);
      for (int bits : {4, 8}) {
        for (int group : {32, 64, 128}) {
          const std::string what = "K " + std::to_string(K) + " variant " +
                                   std::to_string(variant) + " bits " + std::to_string(bits) +
                                   " group " + std::to_string(group);
          const Tensor wt = random_tensor({N, K}, ++seed, 0.05f).to(DType::BF16);
          const QuantizedTensor q = quantize(wt, group, bits);
          const Linear layer = gpu_quantized(q);
          std::vector<float> xv = random_tensor({K}, ++seed).to_vector();
          for (int64_t g = 0; g < K / group; ++g)
            xv[size_t(g * group + (g * 7) % group)] *= 100.0f;
          // A chunk of zeros and one of values whose step's reciprocal overflows a float.
          for (int64_t k = 0; k < 64; ++k) xv[size_t(k)] = k < 32 ? 0.0f : xv[size_t(k)] * 1e-37f;
          const Tensor x = Tensor::from_vector({1, K}, xv);
          check(ops::linear(gpu(x), layer), xv, q, what);
          // Folded norm (one segment through the fused launch): the bound is on the normed
          // input.
          const RMSNorm norm{random_tensor({K}, ++seed, 0.5f), 1e-5f};
          const RMSNorm gnorm{gpu(norm.weight), norm.eps};
          const std::vector<Tensor> normed = ops::linear_same_input(gpu(x), {&layer}, &gnorm);
          check(normed[0], ops::rms_norm(x, norm).to_vector(), q, what + " normed");
        }
      }
    }
  }
  cuda::set_gemv_variant_for_testing(-1);
  K = 1536;
  N = 129;
  const Tensor wt = random_tensor({N, K}, ++seed, 0.05f).to(DType::BF16);
  const Linear layer = gpu_quantized(quantize(wt, 64, 4));
  for (float bad : {NAN, INFINITY}) {
    std::vector<float> xv = random_tensor({K}, ++seed).to_vector();
    xv[100] = bad;
    const Tensor y = ops::linear(gpu(Tensor::from_vector({1, K}, xv)), layer);
    for (float v : y.to_device(Device::CPU).to_vector()) ASSERT_TRUE(std::isnan(v)) << bad;
  }
}

// Residual products (o_proj, down_proj): y += x W^T in the product's epilogue for few rows,
// through a temporary for many, for every variant; then once more with tuning on for a fresh
// shape, whose timing launches must not add into y.
TEST(CudaOps, AccumulatingProductsMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 700;
  auto check = [&](int64_t N, int64_t K, int bits, int64_t M, const std::string& what) {
    Linear reference, layer;
    random_layer_pair(N, K, bits, seed, reference, layer);
    const Tensor x = random_tensor({1, M, K}, ++seed);
    const Tensor y0 = random_tensor({1, M, N}, ++seed);
    Tensor expected = y0.clone();
    ops::add_inplace(expected, ops::linear(x, reference));
    Tensor y = gpu(y0);
    ops::linear_accumulate(y, gpu(x), layer);
    const bool gemv = M <= 8;
    expect_close(y, expected, gemv ? (bits ? (M == 1 ? kFixedPointTol : 1e-4) : 1e-5) : 1e-2, what);
  };
  for (int variant = 0; variant < 5; ++variant) {
    cuda::set_gemv_variant_for_testing(variant);
    for (int bits : {0, 4, 8})
      for (int64_t M : {1, 3, 17})
        check(1025, 4352, bits, M,
              "variant " + std::to_string(variant) + " bits " + std::to_string(bits) + " M " +
                  std::to_string(M));
  }
  cuda::set_gemv_variant_for_testing(-1);
  for (int bits : {0, 4, 8}) check(777, 1088, bits, 1, "tuned bits " + std::to_string(bits));
}
#endif

// Ops whose producer writes the next product's bf16 input itself (many rows) or falls back to
// the separate ops (few rows: the float32 decode kernels), against the CPU's composition.
TEST(CudaOps, ProducersWritingBf16InputsMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 900;
  auto layers = [&](int64_t N, int64_t K, int bits, Linear& reference, Linear& layer,
                    bool biased = true) {
    random_layer_pair(N, K, bits, seed, reference, layer, biased);
  };
  for (int bits : {0, 4})
    for (int64_t M : {3, 17, 261}) {
      const std::string what = "bits " + std::to_string(bits) + " M " + std::to_string(M);
      const double tol = M <= 8 ? 1e-4 : 1e-2;  // float32 decode kernels, or bf16 rows
      Linear ref1, gpu1, ref2, gpu2, ref3, gpu3;
      layers(1152, 1088, bits, ref1, gpu1);
      const Tensor x = random_tensor({1, M, 1088}, ++seed, 2.0f);
      LayerNorm ln{random_tensor({1088}, ++seed), random_tensor({1088}, ++seed), 1e-6f};
      expect_close(ops::layer_norm_linear(gpu(x), LayerNorm{gpu(ln.weight), gpu(ln.bias), ln.eps},
                                          gpu1),
                   ops::layer_norm_linear(x, ln, ref1), tol, "layer_norm_linear " + what);
      Tensor h = x.clone(), hg = gpu(x);
      expect_close(ops::gelu_linear(hg, gpu1), ops::gelu_linear(h, ref1), tol,
                   "gelu_linear " + what);

      // Attention writing the bf16 input of the product after it: a tower's (16 heads of 72)
      // and the decoder's (grouped queries over a cache, 5 positions already in it).
      layers(1088, 1152, bits, ref1, gpu1);
      const Tensor qkv = random_tensor({1, M, 3 * 1152}, ++seed);
      expect_close(ops::self_attention_linear(gpu(qkv), 16, gpu1),
                   ops::self_attention_linear(qkv, 16, ref1), tol, "self_attention_linear " + what);
      layers(1088, 1024, bits, ref1, gpu1);
      const Tensor q = random_tensor({1, M, 8, 128}, ++seed);
      const Tensor keys = random_tensor({1, 2, M + 8, 128}, ++seed);
      const Tensor values = random_tensor({1, 2, M + 8, 128}, ++seed);
      Tensor attended = x.clone(), attended_gpu = gpu(x);
      ops::causal_attention_accumulate(attended, q, CachedKV{keys, values, M + 5}, 5, 0, ref1);
      ops::causal_attention_accumulate(attended_gpu, gpu(q),
                                       CachedKV{gpu(keys), gpu(values), M + 5}, 5, 0, gpu1);
      expect_close(attended_gpu, attended, tol, "causal_attention_accumulate " + what);

      // Bias-free gate and up (the decoder's: their products write bf16; an inner width of 700,
      // bf16 only as it is no multiple of the group size, leaves the 8-wide SiLU kernel a
      // remainder), then biased ones.
      for (const auto& [inner, biased] : {std::pair{704, false}, {700, false}, {704, true}}) {
        if (bits && inner % 64) continue;
        layers(inner, 1088, bits, ref1, gpu1, biased);  // gate
        layers(inner, 1088, bits, ref2, gpu2, biased);  // up
        layers(1088, inner, bits, ref3, gpu3);          // down
        const RMSNorm rms{random_tensor({1088}, ++seed), 1e-5f};
        const RMSNorm rms_gpu{gpu(rms.weight), rms.eps};
        Tensor expected = x.clone(), y = gpu(x);
        ops::swiglu_mlp_accumulate(expected, ref1, ref2, ref3, &rms);
        ops::swiglu_mlp_accumulate(y, gpu1, gpu2, gpu3, &rms_gpu);
        expect_close(y, expected, tol,
                     "swiglu_mlp_accumulate " + what + " inner " + std::to_string(inner) +
                         (biased ? " biased" : ""));
      }
    }
}

// Two bf16 layers whose weights share one allocation, b's right after a's (as the model's
// device move places k/v and gate/up): their products of one input run as one batched product
// at many rows. Against the CPU, beside a third layer and with the norm folded in.
TEST(CudaOps, SideBySideLayersMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 1300;
  const int64_t N = 1000, K = 1088;
  const Tensor w = random_tensor({2 * N, K}, ++seed, 0.05f).to(DType::BF16);
  const Tensor wa = w.slice_rows(0, N), wb = w.slice_rows(N, 2 * N);
  const Tensor wq = random_tensor({33, K}, ++seed, 0.05f).to(DType::BF16);
  const Tensor both = gpu(w);
  const Linear ca{wa, Tensor(), nullptr}, cb{wb, Tensor(), nullptr}, cq{wq, Tensor(), nullptr};
  const Linear ga{both.slice_rows(0, N), Tensor(), nullptr};
  const Linear gb{both.slice_rows(N, 2 * N), Tensor(), nullptr};
  const Linear gq{gpu(wq), Tensor(), nullptr};
  const RMSNorm norm{random_tensor({K}, ++seed, 0.5f), 1e-5f};
  const RMSNorm gnorm{gpu(norm.weight), norm.eps};
  Linear down_ref, down;
  random_layer_pair(K, N, 0, seed, down_ref, down);
  for (int64_t M : {3, 17, 261}) {
    const std::string what = "M " + std::to_string(M);
    const double tol = M <= 8 ? 1e-5 : 1e-2;
    const Tensor x = random_tensor({1, M, K}, ++seed);
    const Tensor h = ops::rms_norm(x, norm);
    const std::vector<Tensor> got = ops::linear_same_input(gpu(x), {&gq, &ga, &gb}, &gnorm);
    ASSERT_EQ(got.size(), 3u);
    expect_close(got[0], ops::linear(h, cq), tol, "q " + what);
    expect_close(got[1], ops::linear(h, ca), tol, "a " + what);
    expect_close(got[2], ops::linear(h, cb), tol, "b " + what);
    Tensor expected = x.clone(), y = gpu(x);
    ops::swiglu_mlp_accumulate(expected, ca, cb, down_ref, &norm);
    ops::swiglu_mlp_accumulate(y, ga, gb, down, &gnorm);
    expect_close(y, expected, tol, "swiglu_mlp_accumulate " + what);
  }
}

TEST(CudaOps, NormsMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 200;
  for (int64_t D : {31, 32, 33, 1024, 1152, 4096, 4304}) {  // 32..4096: the vectorised kernels
    for (int64_t rows : {1, 7, 261}) {
      const Tensor x = random_tensor({rows, D}, ++seed, 3.0f);
      RMSNorm rms{random_tensor({D}, ++seed), 1e-5f};
      LayerNorm ln{random_tensor({D}, ++seed), random_tensor({D}, ++seed), 1e-6f};
      expect_close(ops::rms_norm(gpu(x), RMSNorm{gpu(rms.weight), rms.eps}), ops::rms_norm(x, rms),
                   1e-5, "rms_norm D=" + std::to_string(D));
      expect_close(ops::layer_norm(gpu(x), LayerNorm{gpu(ln.weight), gpu(ln.bias), ln.eps}),
                   ops::layer_norm(x, ln), 1e-5, "layer_norm D=" + std::to_string(D));
    }
  }
}

TEST(CudaOps, ElementwiseMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  for (int64_t n : {31, 33, 4304, 100003}) {
    const Tensor a = random_tensor({n}, uint32_t(n), 2.0f), b = random_tensor({n}, uint32_t(n + 1));
    Tensor g = gpu(a).clone();
    ops::gelu_inplace(g);
    Tensor c = a.clone();
    ops::gelu_inplace(c);
    expect_close(g, c, 1e-6, "gelu");
    expect_close(ops::silu_mul(gpu(a), gpu(b)), ops::silu_mul(a, b), 1e-6, "silu_mul");
    Tensor x = gpu(a).clone();
    ops::add_inplace(x, gpu(b));
    Tensor xc = a.clone();
    ops::add_inplace(xc, b);
    expect_close(x, xc, 0, "add");
  }
  // Broadcast add ([1, N, D] over [B, N, D]) and LayerScale add.
  const Tensor x = random_tensor({3, 33, 31}, 7), pos = random_tensor({1, 33, 31}, 8);
  const Tensor y = random_tensor({3, 33, 31}, 9), scale = random_tensor({31}, 10);
  Tensor xg = gpu(x).clone(), xc = x.clone();
  ops::add_inplace(xg, gpu(pos));
  ops::add_inplace(xc, pos);
  expect_close(xg, xc, 0, "broadcast add");
  ops::add_scaled_inplace(xg, gpu(y), gpu(scale));
  ops::add_scaled_inplace(xc, y, scale);
  expect_close(xg, xc, 1e-6, "add_scaled");
  for (DType dt : {DType::BF16, DType::F16}) {
    const Tensor t = random_tensor({33, 31}, 11).to(dt);
    expect_close(ops::to_f32(gpu(t)), ops::to_f32(t), 0, "to_f32");
  }
}

TEST(CudaOps, EmbeddingChecksIdsAndMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  const Tensor table = random_tensor({33, 31}, 12).to(DType::BF16);
  Tensor ids = Tensor::empty({5}, DType::I64);
  const int64_t values[] = {0, 32, 7, 7, 31};
  std::copy(values, values + 5, ids.data_mut<int64_t>());
  expect_close(ops::embedding(ids, gpu(table)), ops::embedding(ids, table), 0, "embedding I64");
  expect_close(ops::embedding(gpu(ids), gpu(table)), ops::embedding(ids, table), 0,
               "embedding, ids on the GPU");
  Tensor bad = Tensor::empty({2}, DType::I32);
  bad.data_mut<int32_t>()[0] = 3;
  bad.data_mut<int32_t>()[1] = 33;
  try {
    ops::embedding(bad, gpu(table));
    FAIL() << "an out-of-range id was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Request) << e.what();
  }
}

TEST(CudaOps, ShapePlumbingMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  const Tensor a = random_tensor({2, 5, 33}, 20), b = random_tensor({2, 3, 33}, 21);
  for (int axis : {1, -2}) {
    expect_close(ops::concat({gpu(a), gpu(b)}, axis), ops::concat({a, b}, axis), 0, "concat");
  }
  const Tensor c = random_tensor({2, 5, 31}, 22);
  expect_close(ops::concat({gpu(a), gpu(c)}, 2), ops::concat({a, c}, 2), 0, "concat last");
  expect_close(ops::slice(gpu(a), 1, 1, 4), ops::slice(a, 1, 1, 4), 0, "slice");
  expect_close(ops::slice(gpu(a), 2, 31, 33), ops::slice(a, 2, 31, 33), 0, "slice last");
  const Tensor one = random_tensor({1, 5, 31}, 23);
  expect_close(ops::repeat_batch(gpu(one), 3), ops::repeat_batch(one, 3), 0, "repeat_batch");
  const Tensor images = random_tensor({2, 28, 28, 3}, 24);
  expect_close(ops::patchify(gpu(images), 14), ops::patchify(images, 14), 0, "patchify");
  const Tensor x = random_tensor({2, 33, 3, 16}, 25);
  expect_close(ops::heads_first(gpu(x)), ops::heads_first(x), 0, "heads_first");
  Tensor dst_g = Tensor::zeros({2, 3, 40, 16}, DType::F32, Device::CUDA);
  Tensor dst_c = Tensor::zeros({2, 3, 40, 16});
  const Tensor src = random_tensor({2, 3, 7, 16}, 26);
  ops::write_positions(dst_g, gpu(src), 31);
  ops::write_positions(dst_c, src, 31);
  expect_close(dst_g, dst_c, 0, "write_positions");
  EXPECT_THROW(ops::write_positions(dst_g, gpu(src), 34), Error);
}

TEST(CudaOps, RopeMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  for (int64_t offset : {0, 37, 4000}) {
    for (int64_t Dh : {16, 72, 128}) {
      const Tensor x = random_tensor({2, 33, 3, Dh}, uint32_t(offset + Dh));
      Tensor g = gpu(x).clone(), c = x.clone();
      ops::rope_inplace(g, offset, 10000.0f);
      ops::rope_inplace(c, offset, 10000.0f);
      // The same float angles on both sides (inv_freq comes from the host); what remains is
      // sincosf against glibc (a few ulp).
      expect_close(g, c, 2e-5, "rope offset=" + std::to_string(offset));
      // Queries and keys (different head counts) in one launch.
      const Tensor k = random_tensor({2, 33, 5, Dh}, uint32_t(offset + Dh + 1));
      Tensor gq = gpu(x).clone(), gk = gpu(k).clone(), ck = k.clone();
      ops::rope_inplace_pair(gq, gk, offset, 10000.0f);
      ops::rope_inplace(ck, offset, 10000.0f);
      expect_close(gq, c, 2e-5, "rope pair q offset=" + std::to_string(offset));
      expect_close(gk, ck, 2e-5, "rope pair k offset=" + std::to_string(offset));
    }
  }
}

// A KV append of keys and values in one launch, at a position inside a larger cache.
TEST(CudaOps, PairedKvWriteMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  for (int64_t L : {1, 7}) {
    const Tensor keys = random_tensor({2, 3, 40, 72}, uint32_t(L)),
                 values = random_tensor({2, 3, 40, 72}, uint32_t(L + 10));
    const Tensor nk = random_tensor({2, 3, L, 72}, uint32_t(L + 20)),
                 nv = random_tensor({2, 3, L, 72}, uint32_t(L + 30));
    Tensor ck = keys.clone(), cv = values.clone(), gk = gpu(keys), gv = gpu(values);
    ops::write_positions_pair(ck, nk, cv, nv, 31);
    ops::write_positions_pair(gk, gpu(nk), gv, gpu(nv), 31);
    expect_close(gk, ck, 0.0, "paired KV write keys L=" + std::to_string(L));
    expect_close(gv, cv, 0.0, "paired KV write values L=" + std::to_string(L));
  }
}

// RoPE and the KV append of one (decode) or several (prefill) positions in one launch, against
// the CPU op (itself checked against rotating first), at odd head counts and positions inside
// a larger cache.
TEST(CudaOps, RopeFoldedIntoTheKvAppendMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  uint32_t seed = 1100;
  for (int64_t Dh : {6, 128}) {
    for (int64_t L : {1, 5}) {
      for (int64_t at : {int64_t(0), 36 - L + 1}) {
        const Tensor q = random_tensor({2, L, 11, Dh}, ++seed);  // 14 heads: groups of 8 and 6
        const Tensor k = random_tensor({2, L, 3, Dh}, ++seed);
        const Tensor v = random_tensor({2, L, 3, Dh}, ++seed);
        const Tensor keys0 = random_tensor({2, 3, 41, Dh}, ++seed);
        const Tensor values0 = random_tensor({2, 3, 41, Dh}, ++seed);
        Tensor qc = q.clone(), kc = keys0.clone(), vc = values0.clone();
        ops::rope_write_pair(qc, kc, k, vc, v, at, 10000.0f);
        Tensor qg = gpu(q), kg = gpu(keys0), vg = gpu(values0);
        ops::rope_write_pair(qg, kg, gpu(k), vg, gpu(v), at, 10000.0f);
        const std::string what =
            "Dh " + std::to_string(Dh) + " L " + std::to_string(L) + " at " + std::to_string(at);
        expect_close(qg, qc, 1e-6, what + " queries");
        expect_close(kg, kc, 1e-6, what + " keys");
        expect_close(vg, vc, 0.0, what + " values");
      }
    }
  }
  Tensor q = gpu(random_tensor({1, 1, 4, 8}, 1)), keys = gpu(random_tensor({1, 2, 4, 8}, 2));
  Tensor values = keys.clone();
  const Tensor k = gpu(random_tensor({1, 1, 2, 8}, 3));
  EXPECT_THROW(ops::rope_write_pair(q, keys, k, values, k, 4, 10000.0f), Error);  // past the end
}

TEST(CudaOps, BidirectionalAttentionMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  struct Case { int64_t B, T, heads, Dh; };
  const Case cases[] = {{1, 1, 2, 64}, {2, 31, 2, 64}, {1, 33, 3, 72}, {1, 261, 16, 64},
                        {1, 256, 16, 72}, {2, 32, 1, 128}, {1, 40, 4, 18}, {1, 70, 3, 96},
                        {5, 257, 16, 64}};  // enough blocks for four warps per block
  uint32_t seed = 300;
  for (const Case& c : cases) {
    const Tensor qkv = random_tensor({c.B, c.T, 3 * c.heads * c.Dh}, ++seed, 1.5f);
    expect_close(ops::self_attention_qkv(gpu(qkv), c.heads), ops::self_attention_qkv(qkv, c.heads),
                 1e-4, "self_attention T=" + std::to_string(c.T) + " Dh=" + std::to_string(c.Dh));
  }
}

TEST(CudaOps, CausalAttentionMatchesCpuForPrefillAndDecode) {
  MOXIN_SKIP_WITHOUT_GPU();
  struct Case { int64_t B, Lq, offset, Hq, Hkv, Dh, capacity, window; };
  const Case cases[] = {
      {1, 33, 0, 8, 2, 128, 40, 0},   {2, 31, 9, 4, 2, 16, 64, 0},  {1, 33, 40, 8, 8, 64, 80, 7},
      {1, 1, 299, 32, 8, 128, 512, 0}, {2, 1, 32, 4, 2, 16, 33, 0},  {1, 1, 300, 8, 2, 128, 320, 64},
      {1, 280, 0, 32, 8, 128, 300, 0}, {1, 1, 0, 4, 4, 72, 8, 0},
      // long prefills after cached positions, one with a window
      {1, 200, 100, 8, 2, 128, 320, 50}, {1, 250, 60, 4, 2, 128, 320, 0},
      {3, 300, 0, 32, 8, 128, 320, 0},  // enough blocks for four warps per block
      // decode split over many key blocks (flash-decoding), with a window and two sequences
      {2, 1, 700, 8, 4, 72, 1000, 100}, {1, 1, 63, 32, 8, 128, 1000, 0},
  };
  uint32_t seed = 400;
  for (const Case& c : cases) {
    const int64_t length = c.offset + c.Lq;
    const Tensor q = random_tensor({c.B, c.Lq, c.Hq, c.Dh}, ++seed);
    const Tensor k = random_tensor({c.B, c.Hkv, c.capacity, c.Dh}, ++seed);
    const Tensor v = random_tensor({c.B, c.Hkv, c.capacity, c.Dh}, ++seed);
    const Tensor expected = ops::causal_attention(q, CachedKV{k, v, length}, c.offset, c.window);
    expect_close(ops::causal_attention(gpu(q), CachedKV{gpu(k), gpu(v), length}, c.offset, c.window),
                 expected, 1e-4,
                 "causal_attention Lq=" + std::to_string(c.Lq) + " offset=" +
                     std::to_string(c.offset) + " window=" + std::to_string(c.window));
  }
}

// A decode step's RoPE, KV store, attention and o_proj in one op (on the GPU the split attention
// kernel rotates the query and the new key itself and one block per KV head stores the key and
// value; grids over one wave take the separate RoPE launch) against the CPU op (rope_write_pair,
// then attention): the outputs and the whole cache, with the new position first in, last in and
// alone in its key block, windows, grouped heads, both GPU paths.
TEST(CudaOps, RopeFoldedIntoDecodeAttentionMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  struct Case { int64_t B, Hq, Hkv, Dh, capacity, at, window; };
  const Case cases[] = {
      {1, 32, 8, 128, 424, 299, 0}, {2, 4, 2, 16, 33, 32, 0},      {1, 8, 2, 128, 320, 300, 64},
      {1, 4, 4, 72, 8, 0, 0},       {2, 8, 4, 72, 1000, 700, 100}, {1, 32, 8, 128, 1000, 63, 0},
      {1, 32, 8, 128, 1000, 64, 0}, {1, 3, 1, 6, 70, 65, 0},       {3, 6, 3, 32, 64, 10, 4},
      {1, 4, 2, 128, 1000, 63, 0},  {1, 4, 2, 128, 1000, 64, 0},   {8, 32, 8, 128, 512, 300, 0},
  };
  uint32_t seed = 1200;
  for (const Case& c : cases) {
    const int64_t D = c.Hq * c.Dh;
    Linear reference, o_proj;
    random_layer_pair(D, D, 0, seed, reference, o_proj, false);
    const Tensor q = random_tensor({c.B, 1, c.Hq, c.Dh}, ++seed);
    const Tensor k = random_tensor({c.B, 1, c.Hkv, c.Dh}, ++seed);
    const Tensor v = random_tensor({c.B, 1, c.Hkv, c.Dh}, ++seed);
    const Tensor x = random_tensor({c.B, 1, D}, ++seed);
    const Tensor keys = random_tensor({c.B, c.Hkv, c.capacity, c.Dh}, ++seed);
    const Tensor values = random_tensor({c.B, c.Hkv, c.capacity, c.Dh}, ++seed);
    Tensor xc = x.clone(), qc = q.clone(), kc = keys.clone(), vc = values.clone();
    ops::rope_attention_accumulate(xc, qc, k, v, CachedKV{kc, vc, c.at + 1}, c.at, 10000.0f,
                                   c.window, reference);
    Tensor xg = gpu(x), qg = gpu(q), kg = gpu(keys), vg = gpu(values);
    ops::rope_attention_accumulate(xg, qg, gpu(k), gpu(v), CachedKV{kg, vg, c.at + 1}, c.at,
                                   10000.0f, c.window, o_proj);
    const std::string what = "B " + std::to_string(c.B) + " Dh " + std::to_string(c.Dh) +
                             " at " + std::to_string(c.at) + " window " +
                             std::to_string(c.window);
    expect_close(xg, xc, 1e-4, what + " output");
    expect_close(kg, kc, 1e-6, what + " keys");
    expect_close(vg, vc, 0.0, what + " values");
  }
  Tensor x = gpu(random_tensor({1, 1, 32}, 1)), q = gpu(random_tensor({1, 1, 4, 8}, 2));
  Tensor keys = gpu(random_tensor({1, 2, 4, 8}, 3)), values = keys.clone();
  const Tensor k = gpu(random_tensor({1, 1, 2, 8}, 4));
  Linear reference, o_proj;
  uint32_t layer_seed = 5;
  random_layer_pair(32, 32, 0, layer_seed, reference, o_proj, false);
  EXPECT_THROW(ops::rope_attention_accumulate(x, q, k, k, CachedKV{keys, values, 5}, 4, 1e4f, 0,
                                              o_proj),
               Error);  // past the end of the cache
  const Tensor two = gpu(random_tensor({1, 2, 2, 8}, 6));
  EXPECT_THROW(ops::rope_attention_accumulate(x, q, two, two, CachedKV{keys, values, 2}, 1, 1e4f,
                                              0, o_proj),
               Error);  // two positions
}

#if MOXIN_WITH_CUDA
// The greedy token picked on the GPU (argmax of the last row of logits): the first index among
// equal maxima, NaN never picked, token 0 for a row without a number. Checked against a plain
// host scan at widths of one element, one partial warp, one pass of the kernel's loads and
// several passes, with maxima that tie across threads, warps and passes.
TEST(CudaOps, GreedyArgmaxTakesTheFirstMaximumAndSkipsNaN) {
  MOXIN_SKIP_WITHOUT_GPU();
  auto host_rule = [](const std::vector<float>& row) {
    int32_t best = -1;
    for (size_t i = 0; i < row.size(); ++i)
      if (!std::isnan(row[i]) && (best < 0 || row[i] > row[size_t(best)])) best = int32_t(i);
    return best < 0 ? 0 : best;
  };
  uint32_t seed = 1500;
  for (int64_t n : {1, 33, 1024, 32064, 32768, 100003}) {
    const std::vector<float> base = random_tensor({n}, ++seed).to_vector();
    std::vector<std::vector<float>> rows = {base};
    std::vector<float> tied = base;  // the maximum three times, across passes at 100003
    for (int64_t i : {n - 1, n / 2, n / 3}) tied[size_t(i)] = 7.0f;
    rows.push_back(tied);
    std::vector<float> with_nan = tied;  // NaN first and at every 97th element
    for (int64_t i = 0; i < n; i += 97) with_nan[size_t(i)] = NAN;
    rows.push_back(with_nan);
    rows.push_back(std::vector<float>(size_t(n), NAN));
    rows.push_back(std::vector<float>(size_t(n), -INFINITY));
    std::vector<float> infinite = base;
    infinite[size_t(n - 1)] = INFINITY;
    rows.push_back(infinite);
    for (size_t r = 0; r < rows.size(); ++r) {
      // Two rows of logits: only the last one counts.
      std::vector<float> two(rows[r]);
      two.insert(two.begin(), rows[r].rbegin(), rows[r].rend());
      const Tensor logits = gpu(Tensor::from_vector({1, 2, n}, two));
      EXPECT_EQ(cuda::argmax_last(logits), host_rule(rows[r]))
          << "width " << n << ", row kind " << r;
    }
  }
}
#endif

TEST(CudaOps, BadInputsFailWithErrors) {
  MOXIN_SKIP_WITHOUT_GPU();
  const Tensor x = gpu(random_tensor({2, 33}, 1));
  Linear layer{gpu(random_tensor({4, 32}, 2).to(DType::BF16)), Tensor(), nullptr};
  EXPECT_THROW(ops::linear(x, layer), Error);
  EXPECT_THROW(ops::silu_mul(x, gpu(random_tensor({2, 32}, 3))), Error);
  const Tensor qkv = gpu(random_tensor({1, 4, 3 * 2 * 160}, 4));
  EXPECT_THROW(ops::self_attention_qkv(qkv, 2), Error);  // head dim 160 > 128
  Linear host_weights{random_tensor({4, 33}, 5), Tensor(), nullptr};
  EXPECT_THROW(ops::linear(x, host_weights), Error);
}

}  // namespace
}  // namespace moxin
