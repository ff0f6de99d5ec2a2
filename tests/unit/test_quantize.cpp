// MLX-compatible affine quantization and the CPU quantized matmul kernels, checked against
// fixtures made by MLX itself (reference/make_quant_fixtures.py; see its docstring for the
// file naming) and against the scalar path for every instruction set this CPU has.
#include <gtest/gtest.h>

#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/quantized_matmul.h"
#include "core/npy.h"
#include "moxin/errors.h"
#include "moxin/quantize.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;
using cpu::QuantIsa;
using cpu::QuantMatmulPath;

const fs::path kFixtureRoot = fs::path(MOXIN_SOURCE_DIR) / "tests/fixtures/quant";

// ---- fixtures ---------------------------------------------------------------------------------

struct Case {
  std::string name, dtype, input;
  int bits = 0, group_size = 0, m = 0;
  int64_t out = 0, in = 0;
  uint64_t seed = 0;
  bool has_deq = false;
};

std::vector<Case> load_manifest() {
  std::ifstream file(kFixtureRoot / "manifest.json");
  if (!file) return {};
  const auto doc = nlohmann::json::parse(file);
  std::vector<Case> cases;
  for (const auto& c : doc.at("cases")) {
    Case k;
    k.name = c.at("name");
    k.dtype = c.at("dtype");
    k.input = c.at("input");
    k.bits = c.at("bits");
    k.group_size = c.at("group_size");
    k.m = c.at("m");
    k.out = c.at("out");
    k.in = c.at("in");
    k.seed = c.at("seed");
    k.has_deq = c.at("deq");
    cases.push_back(k);
  }
  return cases;
}

const std::vector<Case>& all_cases() {
  static const std::vector<Case> cases = load_manifest();
  return cases;
}

DType dtype_of(const std::string& name) {
  if (name == "bf16") return DType::BF16;
  if (name == "f16") return DType::F16;
  if (name == "u32") return DType::U32;
  return DType::F32;
}

// <stem>.<dtype>.npy; bf16 files hold uint16 bits and come back retagged as BF16.
Tensor load_fixture(const fs::path& file, const std::string& dtype) {
  Tensor raw = npy::load(file);
  if (dtype != "bf16") return raw;
  EXPECT_EQ(raw.dtype(), DType::U16) << file;
  Tensor t = Tensor::empty(raw.shape(), DType::BF16);
  std::memcpy(t.raw_mut(), raw.raw(), raw.nbytes());
  return t;
}

Tensor case_tensor(const Case& c, const std::string& stem, const std::string& dtype) {
  return load_fixture(kFixtureRoot / c.name / (stem + "." + dtype + ".npy"), dtype);
}

// Mirror of synth_matrix() in reference/make_quant_fixtures.py: every step is exact in f32.
uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<float> synth_matrix(uint64_t seed, int64_t rows, int64_t cols, int mantissa_bits) {
  std::vector<float> v(size_t(rows * cols));
  for (int64_t i = 0; i < rows * cols; ++i) {
    const uint64_t h = splitmix64((seed << 32) ^ uint64_t(i));
    const int64_t u = int64_t(h >> (64 - mantissa_bits)) - (int64_t(1) << (mantissa_bits - 1));
    float value = float(u) * std::ldexp(1.0f, -(mantissa_bits - 1));
    const uint64_t hb = splitmix64(((seed + 1) << 32) ^ uint64_t(i / 32));
    value = std::ldexp(value, int(hb % 13) - 8);
    const int kind = int((hb >> 8) % 8);
    if (kind == 0) value = std::fabs(value);
    if (kind == 1) value = -std::fabs(value);
    v[size_t(i)] = value;
  }
  return v;
}

Tensor f32_tensor(Shape shape, const std::vector<float>& values) {
  return Tensor::from_vector(std::move(shape), values);
}

// The quantizer's input for a case, in the case's dtype.
Tensor case_input(const Case& c) {
  if (c.input == "stored") return case_tensor(c, "w", c.dtype);
  if (c.input.rfind("shared:", 0) == 0)
    return load_fixture(kFixtureRoot / c.input.substr(7), c.dtype);
  const auto values = synth_matrix(c.seed, c.out, c.in, c.dtype == "f32" ? 24 : 8);
  return f32_tensor({c.out, c.in}, values).to(dtype_of(c.dtype));
}

QuantizedTensor case_quantized(const Case& c) {
  QuantizedTensor q;
  q.weight = case_tensor(c, "q", "u32");
  q.scales = case_tensor(c, "scales", c.dtype);
  q.biases = case_tensor(c, "biases", c.dtype);
  q.bits = c.bits;
  q.group_size = c.group_size;
  q.validate(c.name);
  return q;
}

// Raw storage words, so NaN payloads and signed zeros compare exactly.
std::vector<uint32_t> bit_pattern(const Tensor& t) {
  std::vector<uint32_t> out(size_t(t.numel()));
  const size_t width = dtype_size(t.dtype());
  const auto* bytes = static_cast<const uint8_t*>(t.raw());
  for (size_t i = 0; i < out.size(); ++i) {
    uint32_t w = 0;
    std::memcpy(&w, bytes + i * width, width);
    out[i] = w;
  }
  return out;
}

// Index of the first element whose bits differ (any two NaNs count as equal), or -1.
int64_t first_difference(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return 0;
  const auto pa = bit_pattern(a), pb = bit_pattern(b);
  const bool floats = is_float(a.dtype());
  const auto va = floats ? a.to_vector() : std::vector<float>();
  const auto vb = floats ? b.to_vector() : std::vector<float>();
  for (size_t i = 0; i < pa.size(); ++i) {
    if (pa[i] == pb[i]) continue;
    if (floats && std::isnan(va[i]) && std::isnan(vb[i])) continue;
    return int64_t(i);
  }
  return -1;
}

std::vector<QuantIsa> supported_isas() {
  std::vector<QuantIsa> isas;
  for (QuantIsa isa : {QuantIsa::Scalar, QuantIsa::Avx2, QuantIsa::Avx512, QuantIsa::Avx512Vnni})
    if (cpu::quant_isa_supported(isa)) isas.push_back(isa);
  return isas;
}

// |y - reference| <= tol * sum_k |x_mk| * (|s q_nk| + |b_n|) for every output. The accumulation
// order differs from MLX's, and the vector kernels form s * q + b with one FMA where MLX rounds
// s * q first; when a group's bias nearly cancels s * q that rounding is relative to |s q| and
// |b|, not to the small weight, so the bound is scaled by those magnitudes.
constexpr double kMatmulRelTol = 2e-6;

// [M, out]: sum_k |x_mk| * (|s q_nk| + |b_n|).
std::vector<float> term_magnitudes(const std::vector<float>& x, const QuantizedTensor& q,
                                   int64_t M) {
  const auto w = dequantize(q).to_vector();
  const auto biases = q.biases.to_vector();
  const int64_t out = q.out_features(), in = q.in_features(), groups = q.groups_per_row();
  std::vector<float> magnitude(size_t(M * out));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < out; ++n) {
      double sum = 0.0;
      for (int64_t k = 0; k < in; ++k) {
        const double b = biases[size_t(n * groups + k / q.group_size)];
        const double wk = w[size_t(n * in + k)];
        sum += std::fabs(double(x[size_t(m * in + k)])) * (std::fabs(wk - b) + std::fabs(b));
      }
      magnitude[size_t(m * out + n)] = float(sum);
    }
  return magnitude;
}

// [M, out]: the error the 16-bit fixed-point activations of the VNNI decode kernels may add,
// 2^-16 * sum over groups of max|x_group| * sum_k |s q_k| (quantized_matmul_avx512vnni.cpp).
std::vector<float> fixed_point_bounds(const std::vector<float>& x, const QuantizedTensor& q,
                                      int64_t M) {
  const auto w = dequantize(q).to_vector();
  const auto biases = q.biases.to_vector();
  const int64_t out = q.out_features(), in = q.in_features(), groups = q.groups_per_row();
  std::vector<float> bound(size_t(M * out));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < out; ++n) {
      double sum = 0.0;
      for (int64_t g = 0; g < groups; ++g) {
        double peak = 0.0, weights = 0.0;
        for (int64_t k = g * q.group_size; k < (g + 1) * q.group_size; ++k) {
          peak = std::max(peak, std::fabs(double(x[size_t(m * in + k)])));
          weights += std::fabs(double(w[size_t(n * in + k)]) - biases[size_t(n * groups + g)]);
        }
        sum += peak * weights;
      }
      bound[size_t(m * out + n)] = float(std::ldexp(sum, -16));
    }
  return bound;
}

// The fixed-point bound applies to the VNNI instruction set's 4/8-bit decode kernels only.
bool uses_fixed_point(QuantIsa isa, int bits) {
  return isa == QuantIsa::Avx512Vnni && (bits == 4 || bits == 8);
}

void expect_matmul_close(const std::vector<float>& y, const std::vector<float>& reference,
                         const std::vector<float>& magnitude, const std::string& what,
                         const std::vector<float>* extra_bound = nullptr) {
  ASSERT_EQ(y.size(), reference.size());
  int reported = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double diff = std::fabs(double(y[i]) - reference[i]);
    const double bound =
        kMatmulRelTol * magnitude[i] + (extra_bound ? (*extra_bound)[i] : 0.0) + 1e-30;
    if (!(diff <= bound) && reported++ < 5)
      ADD_FAILURE() << what << ": y[" << i << "] = " << y[i] << ", reference " << reference[i]
                    << ", |diff| " << diff << " > " << bound;
  }
}

TEST(QuantFixtures, ManifestPresent) {
  ASSERT_FALSE(all_cases().empty()) << "missing " << kFixtureRoot / "manifest.json"
                                    << "; run reference/make_quant_fixtures.py";
  EXPECT_GE(all_cases().size(), 90u);
}

TEST(QuantFixtures, GeneratorReproducesStoredInputs) {
  int checked = 0;
  for (const Case& c : all_cases()) {
    if (c.input != "stored" || c.dtype == "f16") continue;
    const Tensor stored = case_tensor(c, "w", c.dtype);
    const auto values = synth_matrix(c.seed, c.out, c.in, c.dtype == "f32" ? 24 : 8);
    const Tensor mine = f32_tensor({c.out, c.in}, values).to(dtype_of(c.dtype));
    EXPECT_EQ(first_difference(mine, stored), -1) << c.name;
    ++checked;
  }
  EXPECT_GE(checked, 40);
}

// ---- quantize / dequantize against MLX --------------------------------------------------------

TEST(Quantize, PackedWordsScalesAndBiasesMatchMlx) {
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(c.name);
    const QuantizedTensor expected = case_quantized(c);
    const QuantizedTensor q = quantize(case_input(c), c.group_size, c.bits);
    ASSERT_NO_THROW(q.validate(c.name));
    EXPECT_EQ(q.scales.dtype(), expected.scales.dtype());
    EXPECT_EQ(first_difference(q.weight, expected.weight), -1) << "packed words differ";
    EXPECT_EQ(first_difference(q.scales, expected.scales), -1) << "scales differ";
    EXPECT_EQ(first_difference(q.biases, expected.biases), -1) << "biases differ";
  }
}

TEST(Quantize, DequantizeLikeMlxIsBitIdentical) {
  int checked = 0;
  for (const Case& c : all_cases()) {
    if (!c.has_deq) continue;
    SCOPED_TRACE(c.name);
    // The edge cases' 3e38 / -3e38 groups get an infinite scale, so MLX and we both produce NaN
    // (0 * inf); NaN payloads are not compared.
    const Tensor expected = case_tensor(c, "deq", c.dtype);
    const Tensor mine = dequantize_like_mlx(case_quantized(c));
    const int64_t at = first_difference(mine, expected);
    EXPECT_EQ(at, -1) << "first difference at flat index " << at;
    ++checked;
  }
  EXPECT_GE(checked, 80);
}

// The F32 dequantization: identical for F32 scales. For BF16/F16 MLX rounds the product s * q
// and then the sum to the narrow type, each to half a unit in the last place (u/2) of its
// magnitude, so ours (exact in f32) differs by at most u/2 * (|s * q| + |result|).
TEST(Quantize, DequantizeF32MatchesMlx) {
  for (const Case& c : all_cases()) {
    if (!c.has_deq) continue;
    SCOPED_TRACE(c.name);
    const QuantizedTensor q = case_quantized(c);
    const auto expected = case_tensor(c, "deq", c.dtype).to_vector();
    const Tensor mine_t = dequantize(q);
    ASSERT_EQ(mine_t.dtype(), DType::F32);
    const auto mine = mine_t.to_vector();
    const auto biases = q.biases.to_vector();
    ASSERT_EQ(mine.size(), expected.size());
    const double u = c.dtype == "f32" ? 0.0 : std::ldexp(1.0, c.dtype == "bf16" ? -7 : -10);
    int reported = 0;
    for (size_t i = 0; i < mine.size(); ++i) {
      if (std::isnan(expected[i]) && std::isnan(mine[i])) continue;
      const double bias = biases[i / size_t(c.group_size)];
      const double product = std::fabs(double(mine[i]) - bias);
      const double bound = u / 2 * (product + std::fabs(double(expected[i]))) * 1.0001 +
                           (c.dtype == "f32" ? 0 : 1e-38);
      if (!(std::fabs(double(mine[i]) - expected[i]) <= bound) && reported++ < 3)
        ADD_FAILURE() << "element " << i << ": " << mine[i] << " vs MLX " << expected[i];
    }
  }
}

TEST(Quantize, RoundTripErrorIsBounded) {
  const auto values = synth_matrix(7, 19, 256, 24);
  for (int bits : {2, 3, 4, 5, 6, 8}) {
    const QuantizedTensor q = quantize(f32_tensor({19, 256}, values), 64, bits);
    const auto deq = dequantize(q).to_vector();
    const auto scales = q.scales.to_vector();
    for (size_t i = 0; i < deq.size(); ++i) {
      const float step = std::fabs(scales[i / 64]);
      // Half a step, plus up to one more where snapping the scale to the larger edge leaves
      // the other edge just outside the code range (MLX clips it there too).
      ASSERT_LE(std::fabs(deq[i] - values[i]), 1.5f * step * 1.0001f + 1e-30f)
          << "bits " << bits << " element " << i;
    }
  }
}

TEST(Quantize, EdgeGroupsDequantizeSensibly) {
  // Constant, zero and negative-only groups at 4 bits: constants come back exactly.
  std::vector<float> w(4 * 64);
  for (int j = 0; j < 64; ++j) {
    w[size_t(j)] = 3.0f;                      // constant
    w[size_t(64 + j)] = 0.0f;                 // all zero
    w[size_t(128 + j)] = -1.0f - 0.01f * j;   // negative only
    w[size_t(192 + j)] = j == 7 ? 1e30f : 0;  // one huge outlier
  }
  const auto deq = dequantize(quantize(f32_tensor({4, 64}, w), 64, 4)).to_vector();
  for (int j = 0; j < 64; ++j) {
    EXPECT_EQ(deq[size_t(j)], 3.0f);
    EXPECT_EQ(deq[size_t(64 + j)], 0.0f);
    EXPECT_NEAR(deq[size_t(128 + j)], w[size_t(128 + j)], 0.63f / 15 / 2 * 1.001f);
    EXPECT_NEAR(deq[size_t(192 + j)], w[size_t(192 + j)], 1e30 / 15 / 2);
  }
}

// ---- errors -----------------------------------------------------------------------------------

ErrorKind kind_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.kind();
  }
  ADD_FAILURE() << "no moxin::Error thrown";
  return ErrorKind::Compute;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Quantize, RejectsBadRequests) {
  const Tensor w = f32_tensor({2, 96}, std::vector<float>(192, 1.0f));
  EXPECT_EQ(kind_of([&] { quantize(w, 64, 4); }), ErrorKind::Request);  // 96 % 64
  EXPECT_NE(message_of([&] { quantize(w, 64, 4); }).find("not divisible by group_size"),
            std::string::npos);
  EXPECT_EQ(kind_of([&] { quantize(w, 32, 7); }), ErrorKind::Request);
  EXPECT_EQ(kind_of([&] { quantize(w, 32, 0); }), ErrorKind::Request);
  EXPECT_EQ(kind_of([&] { quantize(w, 16, 4); }), ErrorKind::Request);
  EXPECT_EQ(kind_of([&] { quantize(w.reshape({192}), 32, 4); }), ErrorKind::Request);
  EXPECT_EQ(kind_of([&] { quantize(Tensor(), 32, 4); }), ErrorKind::Request);
  EXPECT_EQ(kind_of([&] {
              quantize(Tensor::zeros({2, 96}, DType::U32), 32, 4);
            }),
            ErrorKind::Request);
  std::vector<float> bad(192, 1.0f);
  bad[100] = NAN;
  EXPECT_EQ(kind_of([&] { quantize(f32_tensor({2, 96}, bad), 32, 4); }), ErrorKind::Request);
  bad[100] = -INFINITY;
  EXPECT_EQ(kind_of([&] { quantize(f32_tensor({2, 96}, bad), 32, 4); }), ErrorKind::Request);
}

TEST(QuantizedTensorValidate, RejectsInconsistentLayouts) {
  const QuantizedTensor good = quantize(f32_tensor({3, 128}, synth_matrix(3, 3, 128, 24)), 32, 4);
  ASSERT_NO_THROW(good.validate("good"));
  EXPECT_EQ(good.in_features(), 128);
  EXPECT_EQ(good.out_features(), 3);

  auto expect_rejected = [](QuantizedTensor q, const std::string& why) {
    try {
      q.validate("model.layers.0.mlp.up_proj");
      ADD_FAILURE() << why << ": accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::FileFormat) << why;
      EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.up_proj"), std::string::npos)
          << why << ": " << e.what();
    }
  };
  QuantizedTensor q = good;
  q.bits = 8;  // packed width now wrong
  expect_rejected(q, "bits/width mismatch");
  q = good;
  q.bits = 7;
  expect_rejected(q, "bits 7");
  q = good;
  q.group_size = 48;
  expect_rejected(q, "group size 48");
  q = good;
  q.group_size = 64;  // in would be 256, packed width is for 128
  expect_rejected(q, "group size vs width");
  q = good;
  q.weight = good.weight.reshape({3, 4, 4});
  expect_rejected(q, "3-D weight");
  q = good;
  q.weight = good.weight.slice_rows(0, 2);
  expect_rejected(q, "row count");
  q = good;
  q.weight = Tensor::zeros({3, 16}, DType::F32);
  expect_rejected(q, "float weight");
  q = good;
  q.scales = good.scales.to(DType::BF16);
  expect_rejected(q, "scales/biases dtype mismatch");
  q = good;
  q.biases = good.biases.slice_rows(0, 2);
  expect_rejected(q, "biases shape");
  q = good;
  q.scales = Tensor::zeros({3, 4}, DType::U32);
  q.biases = Tensor::zeros({3, 4}, DType::U32);
  expect_rejected(q, "integer scales");
  q = good;
  q.scales = Tensor();
  expect_rejected(q, "missing scales");
  q = good;
  q.weight = Tensor::zeros({0, 16}, DType::U32);
  q.scales = Tensor::zeros({0, 4});
  q.biases = Tensor::zeros({0, 4});
  expect_rejected(q, "empty");
}

TEST(QuantizedMatmul, RejectsBadCalls) {
  const QuantizedTensor q = quantize(f32_tensor({3, 64}, synth_matrix(4, 3, 64, 24)), 32, 4);
  std::vector<float> x(64), y(3);
  EXPECT_EQ(kind_of([&] { cpu::quantized_matmul(x.data(), -1, q, nullptr, y.data()); }),
            ErrorKind::Request);
  EXPECT_EQ(kind_of([&] { cpu::quantized_matmul(nullptr, 1, q, nullptr, y.data()); }),
            ErrorKind::Request);
  QuantizedTensor broken = q;
  broken.bits = 8;
  EXPECT_EQ(kind_of([&] { cpu::quantized_matmul(x.data(), 1, broken, nullptr, y.data()); }),
            ErrorKind::FileFormat);
  EXPECT_EQ(kind_of([&] { cpu::dequantize_rows(QuantIsa::Scalar, q, 2, 4, y.data()); }),
            ErrorKind::Request);
}

// ---- kernels ----------------------------------------------------------------------------------

TEST(QuantizedMatmul, MatchesMlxOnEveryPath) {
  int checked = 0;
  for (const Case& c : all_cases()) {
    if (c.m == 0) continue;
    const QuantizedTensor q = case_quantized(c);
    const auto x = case_tensor(c, "x", "f32").to_vector();
    const auto y_mlx = case_tensor(c, "y", "f32").to_vector();
    const auto magnitude = term_magnitudes(x, q, c.m);
    const auto fixed_point = fixed_point_bounds(x, q, c.m);
    for (QuantIsa isa : supported_isas()) {
      for (QuantMatmulPath path :
           {QuantMatmulPath::Auto, QuantMatmulPath::Decode, QuantMatmulPath::Prefill}) {
        const std::string what =
            c.name + "/" + cpu::quant_isa_name(isa) + "/path" + std::to_string(int(path));
        std::vector<float> y(size_t(c.m * c.out), NAN);
        cpu::quantized_matmul(isa, path, x.data(), c.m, q, nullptr, y.data());
        expect_matmul_close(y, y_mlx, magnitude, what,
                            uses_fixed_point(isa, q.bits) ? &fixed_point : nullptr);
        ++checked;
      }
    }
  }
  EXPECT_GE(checked, 3 * 50);
}

struct KernelShape {
  int64_t out, in;
  int bits, group_size;
  DType dtype;
};

// Each vector kernel against the scalar path at awkward sizes, every M from 1 to 6 (6 runs the
// decode kernel as 4 + 2), with and without a bias, for all three parameter dtypes.
TEST(QuantizedMatmul, VectorKernelsMatchScalar) {
  const std::vector<KernelShape> shapes = {
      {33, 4352, 4, 32, DType::BF16}, {31, 320, 4, 64, DType::F32},
      {129, 256, 4, 128, DType::F16}, {33, 4352, 8, 128, DType::F32},
      {17, 192, 8, 32, DType::BF16},  {40, 512, 8, 64, DType::F16},
      {33, 256, 2, 64, DType::F32},   {31, 384, 5, 128, DType::BF16},
      {600, 512, 4, 64, DType::BF16},  // large enough to run on several threads
  };
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  for (const KernelShape& s : shapes) {
    const auto wv = synth_matrix(50 + s.out, s.out, s.in, 24);
    const QuantizedTensor q =
        quantize(f32_tensor({s.out, s.in}, wv).to(s.dtype), s.group_size, s.bits);
    const auto w = dequantize(q).to_vector();
    std::vector<float> x(size_t(6 * s.in)), bias(size_t(s.out));
    for (float& v : x) v = normal(rng);
    for (float& v : bias) v = normal(rng);
    const auto magnitude_all = term_magnitudes(x, q, 6);
    const auto fixed_point_all = fixed_point_bounds(x, q, 6);
    for (int64_t M = 1; M <= 6; ++M) {
      const std::vector<float> magnitude(magnitude_all.begin(), magnitude_all.begin() + M * s.out);
      const std::vector<float> fixed_point(fixed_point_all.begin(),
                                           fixed_point_all.begin() + M * s.out);
      for (const float* b : std::vector<const float*>{nullptr, bias.data()}) {
        std::vector<float> reference(size_t(M * s.out));
        cpu::quantized_matmul(QuantIsa::Scalar, QuantMatmulPath::Decode, x.data(), M, q, b,
                              reference.data());
        // The scalar reference itself against a double-precision product.
        std::vector<float> exact(size_t(M * s.out));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < s.out; ++n) {
            double sum = b ? b[n] : 0.0;
            for (int64_t k = 0; k < s.in; ++k)
              sum += double(x[size_t(m * s.in + k)]) * w[size_t(n * s.in + k)];
            exact[size_t(m * s.out + n)] = float(sum);
          }
        expect_matmul_close(reference, exact, magnitude, "scalar vs double");
        for (QuantIsa isa : supported_isas()) {
          for (QuantMatmulPath path :
               {QuantMatmulPath::Auto, QuantMatmulPath::Decode, QuantMatmulPath::Prefill}) {
            const std::string what = std::string(cpu::quant_isa_name(isa)) + " bits " +
                                     std::to_string(s.bits) + " [" + std::to_string(s.out) + ", " +
                                     std::to_string(s.in) + "] M=" + std::to_string(M) +
                                     (b ? " +bias" : "") + " path" + std::to_string(int(path));
            std::vector<float> y(size_t(M * s.out), NAN);
            cpu::quantized_matmul(isa, path, x.data(), M, q, b, y.data());
            expect_matmul_close(y, reference, magnitude, what,
                                uses_fixed_point(isa, s.bits) ? &fixed_point : nullptr);
          }
        }
      }
    }
  }
}

// Non-finite activations have no fixed-point form: the VNNI kernels hand such x to the float
// kernels, so inf and NaN propagate exactly as they do there (never a finite wrong answer).
TEST(QuantizedMatmul, NonFiniteActivationsPropagateOnEveryIsa) {
  for (int bits : {4, 8}) {
    const QuantizedTensor q = quantize(
        f32_tensor({24, 256}, synth_matrix(7 + bits, 24, 256, 24)).to(DType::BF16), 64, bits);
    std::vector<float> x(2 * 256, 0.5f);
    x[3] = INFINITY;     // row 0: inf times weights of both signs -> inf or NaN
    x[256 + 100] = NAN;  // row 1: NaN everywhere
    for (QuantIsa isa : supported_isas()) {
      std::vector<float> y(2 * 24, 0.0f);
      cpu::quantized_matmul(isa, QuantMatmulPath::Decode, x.data(), 2, q, nullptr, y.data());
      for (int n = 0; n < 24; ++n) {
        EXPECT_FALSE(std::isfinite(y[size_t(n)])) << cpu::quant_isa_name(isa) << " bits " << bits;
        EXPECT_TRUE(std::isnan(y[size_t(24 + n)])) << cpu::quant_isa_name(isa) << " bits " << bits;
      }
    }
  }
}

TEST(QuantizedMatmul, DequantizeRowsIsBitIdenticalAcrossIsas) {
  for (int bits : {4, 8, 3}) {
    for (int gs : {32, 64, 128}) {
      const QuantizedTensor q =
          quantize(f32_tensor({9, 512}, synth_matrix(bits * 100 + gs, 9, 512, 24)).to(DType::BF16),
                   gs, bits);
      const Tensor reference = dequantize(q);
      for (QuantIsa isa : supported_isas()) {
        Tensor rows = Tensor::empty({7, 512});
        cpu::dequantize_rows(isa, q, 2, 9, rows.data_mut<float>());
        EXPECT_EQ(first_difference(rows, reference.slice_rows(2, 9)), -1)
            << cpu::quant_isa_name(isa) << " bits " << bits << " gs " << gs;
      }
    }
  }
}

TEST(QuantizedMatmul, ReportsAvailableIsas) {
  std::string names;
  for (QuantIsa isa : supported_isas()) names += std::string(cpu::quant_isa_name(isa)) + " ";
  RecordProperty("isas", names);
  std::cout << "[ quant    ] instruction sets exercised: " << names
            << "(best: " << cpu::quant_isa_name(cpu::quant_best_isa()) << ")\n";
  EXPECT_TRUE(cpu::quant_isa_supported(QuantIsa::Scalar));
}

// ---- bandwidth benchmark (not run by default) -------------------------------------------------
// ./test_quantize --gtest_also_run_disabled_tests --gtest_filter='*Bandwidth*'
// Streams the decode (M = 1) kernel over [out, in] = [4096, 14336] and [14336, 4096] at 4 and 8
// bits (group 64, BF16 scales) and compares with a plain read of a 1 GB buffer in the same run.
// "cold" cycles through enough copies of the weights (> 600 MB) that none stays in the L3.
namespace bench {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double read_bandwidth_gbs(size_t bytes) {
  const size_t n = bytes / sizeof(uint64_t);
  std::vector<uint64_t> buffer(n);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) buffer[i] = i * 0x9E3779B97F4A7C15ull;
  double best = 1e30;
  uint64_t checksum = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    uint64_t sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (size_t i = 0; i < n; ++i) sum += buffer[i];
    best = std::min(best, seconds_since(t0));
    checksum += sum;
  }
  EXPECT_NE(checksum, 0u);
  return double(n * sizeof(uint64_t)) / best / 1e9;
}

// Sum of a tensor's bytes as 64-bit words, threaded like the kernels.
uint64_t sum_words(const Tensor& t) {
  const auto* words = static_cast<const uint64_t*>(t.raw());
  const int64_t n = int64_t(t.nbytes() / sizeof(uint64_t));
  uint64_t sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(dynamic, 8192)
  for (int64_t i = 0; i < n; ++i) sum += words[i];
  return sum;
}

}  // namespace bench

TEST(QuantizedMatmul, DISABLED_Bandwidth) {
  std::cout << "threads: " << omp_get_max_threads()
            << ", isa: " << cpu::quant_isa_name(cpu::quant_best_isa()) << "\n";
  std::cout << "plain read of 1 GB: " << bench::read_bandwidth_gbs(size_t(1) << 30) << " GB/s\n";
  for (auto [out, in] : {std::pair<int64_t, int64_t>{4096, 14336}, {14336, 4096}}) {
    std::vector<float> w(size_t(out * in));
    uint64_t state = 42;
    for (float& v : w) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      v = float(int64_t(state >> 40) - (1 << 23)) * 1e-8f;
    }
    const Tensor wt = f32_tensor({out, in}, w).to(DType::BF16);
    std::vector<float> x(size_t(4 * in)), y(size_t(4 * out));
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(i % 17) * 0.01f - 0.08f;
    for (int bits : {4, 8}) {
      const QuantizedTensor q = quantize(wt, 64, bits);
      const double packed = double(q.weight.nbytes());
      const double params = double(q.scales.nbytes() + q.biases.nbytes());
      const int copies = int(std::ceil(600e6 / (packed + params)));
      std::vector<QuantizedTensor> cold(size_t(copies), q);
      for (auto& c : cold) {
        c.weight = q.weight.clone();
        c.scales = q.scales.clone();
        c.biases = q.biases.clone();
      }
      // Kernel and a plain read of the same bytes, alternated so both see the same share of a
      // busy machine; best and median over all repetitions.
      for (int M : {1, 4}) {
        std::vector<double> kernel_s, read_s;
        uint64_t checksum = 0;
        for (int rep = 0; rep < 2 * copies; ++rep) {
          const QuantizedTensor& c = cold[size_t(rep % copies)];
          auto t0 = bench::Clock::now();
          cpu::quantized_matmul(x.data(), M, c, nullptr, y.data());
          kernel_s.push_back(bench::seconds_since(t0));
          const QuantizedTensor& d = cold[size_t((rep + copies / 2) % copies)];
          t0 = bench::Clock::now();
          checksum +=
              bench::sum_words(d.weight) + bench::sum_words(d.scales) + bench::sum_words(d.biases);
          read_s.push_back(bench::seconds_since(t0));
        }
        EXPECT_NE(checksum, 0u);
        std::sort(kernel_s.begin(), kernel_s.end());
        std::sort(read_s.begin(), read_s.end());
        const double all = packed + params;
        const double k_best = kernel_s.front(), k_med = kernel_s[kernel_s.size() / 2];
        const double r_best = read_s.front(), r_med = read_s[read_s.size() / 2];
        std::cout << "[" << out << ", " << in << "] " << bits << "-bit M=" << M << ": packed "
                  << packed / 1e6 << " MB + " << params / 1e6 << " MB scales/biases; kernel best "
                  << k_best * 1e3 << " ms = " << packed / k_best / 1e9 << " GB/s packed ("
                  << all / k_best / 1e9 << " all bytes), median " << packed / k_med / 1e9
                  << " GB/s packed (" << all / k_med / 1e9 << " all); plain read of the same "
                  << "bytes best " << all / r_best / 1e9 << " GB/s, median " << all / r_med / 1e9
                  << " GB/s\n";
      }
      // Prefill for reference: M = 128 through dequantize + sgemm.
      std::vector<float> xp(size_t(128 * in), 0.01f), yp(size_t(128 * out));
      const auto t0 = bench::Clock::now();
      cpu::quantized_matmul(xp.data(), 128, q, nullptr, yp.data());
      const double t = bench::seconds_since(t0);
      std::cout << "    prefill M=128: " << t * 1e3
                << " ms = " << 2.0 * 128 * double(out) * double(in) / t / 1e9 << " GFLOP/s\n";
    }
  }
}

}  // namespace
}  // namespace moxin
