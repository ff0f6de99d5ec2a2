// CPU kernels against straightforward double-precision references, at awkward sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/cpu/cpu_kernels.h"
#include "backend/cpu/half_gemv.h"
#include "moxin/errors.h"
#include "moxin/kv_cache.h"
#include "ops/ops.h"
#include "test_support.h"

namespace moxin {
namespace {

constexpr uint32_t kSeed = 1234;

std::vector<float> random_vector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

Tensor random_tensor(Shape shape, uint32_t seed, float scale = 1.0f) {
  Tensor t = Tensor::empty(shape);
  const auto v = random_vector(size_t(t.numel()), seed, scale);
  std::copy(v.begin(), v.end(), t.data_mut<float>());
  return t;
}

double max_rel_error(const float* a, const std::vector<double>& ref) {
  double scale = 0, err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::fabs(ref[i]));
    err = std::max(err, std::fabs(double(a[i]) - ref[i]));
  }
  return scale > 0 ? err / scale : err;
}

class MatmulSizes : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t, DType>> {};

TEST_P(MatmulSizes, MatchesDoublePrecisionReference) {
  const auto [M, K, N, dtype] = GetParam();
  SCOPED_TRACE("seed " + std::to_string(kSeed));
  const Tensor x = random_tensor({M, K}, kSeed);
  const Tensor w32 = random_tensor({N, K}, kSeed + 1, 0.1f);
  const Tensor w = w32.to(dtype);        // the stored weight
  const auto w_exact = w.to_vector();    // its exact values, widened
  const auto bias = random_vector(size_t(N), kSeed + 2);
  std::vector<float> y(size_t(M * N));
  cpu::matmul_nt(x.data<float>(), M, K, w.raw(), dtype, N, bias.data(), y.data());
  std::vector<double> ref(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias[size_t(n)];
      for (int64_t k = 0; k < K; ++k)
        acc += double(x.data<float>()[m * K + k]) * w_exact[size_t(n * K + k)];
      ref[size_t(m * N + n)] = acc;
    }
  EXPECT_LE(max_rel_error(y.data(), ref), 1e-5) << "M=" << M << " K=" << K << " N=" << N;
}

INSTANTIATE_TEST_SUITE_P(
    AwkwardSizes, MatmulSizes,
    ::testing::Values(std::tuple{int64_t(1), int64_t(31), int64_t(33), DType::BF16},
                      std::tuple{int64_t(1), int64_t(4304), int64_t(65), DType::BF16},
                      std::tuple{int64_t(3), int64_t(32), int64_t(1000), DType::F16},
                      std::tuple{int64_t(33), int64_t(64), int64_t(31), DType::F32},
                      std::tuple{int64_t(257), int64_t(96), int64_t(130), DType::BF16},
                      std::tuple{int64_t(17), int64_t(1152), int64_t(4304), DType::BF16}));

// The decode kernels, each instruction set this CPU has, against the BLAS path.
TEST(HalfGemv, EveryInstructionSetMatchesBlas) {
  for (const auto isa : {cpu::HalfGemvIsa::Avx2, cpu::HalfGemvIsa::Avx512})
    for (const DType dtype : {DType::BF16, DType::F16})
      for (const auto& [M, K, N] : {std::tuple{1, 31, 33}, std::tuple{4, 4304, 9}, std::tuple{2, 17, 5}}) {
        SCOPED_TRACE("M=" + std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
        const Tensor x = random_tensor({M, K}, kSeed);
        const Tensor w = random_tensor({N, K}, kSeed + 1, 0.1f).to(dtype);
        const auto bias = random_vector(size_t(N), kSeed + 2);
        std::vector<float> y(size_t(M * N));
        if (!cpu::half_gemv(x.data<float>(), M, K, w.data<uint16_t>(), dtype, N, bias.data(),
                            y.data(), isa)) {
          std::printf("instruction set %d not available on this CPU\n", int(isa));
          continue;
        }
        const auto w_exact = w.to_vector();
        std::vector<double> ref(size_t(M * N));
        for (int m = 0; m < M; ++m)
          for (int n = 0; n < N; ++n) {
            double acc = bias[size_t(n)];
            for (int k = 0; k < K; ++k) acc += double(x.data<float>()[m * K + k]) * w_exact[size_t(n * K + k)];
            ref[size_t(m * N + n)] = acc;
          }
        EXPECT_LE(max_rel_error(y.data(), ref), 1e-5);
      }
}

// Attention against a direct evaluation of softmax(q k^T * scale + mask) v.
void check_attention(int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, int64_t Dh, bool causal,
                     int64_t window) {
  SCOPED_TRACE("Lq=" + std::to_string(Lq) + " Lk=" + std::to_string(Lk) + " Hq=" +
               std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) + " window=" +
               std::to_string(window));
  const int64_t offset = Lk - Lq;
  const auto q = random_vector(size_t(Lq * Hq * Dh), kSeed);
  const auto k = random_vector(size_t(Hkv * Lk * Dh), kSeed + 1);  // [Hkv, Lk, Dh]
  const auto v = random_vector(size_t(Hkv * Lk * Dh), kSeed + 2);
  std::vector<float> out(size_t(Lq * Hq * Dh));
  cpu::AttentionShape s{};
  s.Lq = Lq; s.Lk = Lk; s.Hq = Hq; s.Hkv = Hkv; s.Dh = Dh;
  s.q_row_stride = Hq * Dh; s.kv_row_stride = Dh; s.kv_head_stride = Lk * Dh;
  s.out_row_stride = Hq * Dh; s.causal = causal; s.q_offset = offset; s.window = window;
  s.scale = 1.0f / std::sqrt(float(Dh));
  cpu::attention(q.data(), k.data(), v.data(), out.data(), s);

  std::vector<double> ref(out.size());
  for (int64_t i = 0; i < Lq; ++i)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / (Hq / Hkv);
      std::vector<double> p(size_t(Lk), 0.0);
      double mx = -1e300, sum = 0;
      auto visible = [&](int64_t j) {
        if (!causal) return true;
        const int64_t pos = offset + i;
        return j <= pos && (window <= 0 || j > pos - window);
      };
      for (int64_t j = 0; j < Lk; ++j) {
        if (!visible(j)) continue;
        double dot = 0;
        for (int64_t d = 0; d < Dh; ++d)
          dot += double(q[size_t((i * Hq + h) * Dh + d)]) * k[size_t((g * Lk + j) * Dh + d)];
        p[size_t(j)] = dot * s.scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      for (int64_t j = 0; j < Lk; ++j) {
        p[size_t(j)] = visible(j) ? std::exp(p[size_t(j)] - mx) : 0.0;
        sum += p[size_t(j)];
      }
      for (int64_t d = 0; d < Dh; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < Lk; ++j) acc += p[size_t(j)] / sum * v[size_t((g * Lk + j) * Dh + d)];
        ref[size_t((i * Hq + h) * Dh + d)] = acc;
      }
    }
  EXPECT_LE(max_rel_error(out.data(), ref), 1e-5);
}

TEST(Attention, Bidirectional) { check_attention(33, 33, 4, 4, 64, false, 0); }
TEST(Attention, CausalGroupedQuery) { check_attention(70, 70, 8, 2, 32, true, 0); }
TEST(Attention, CausalWithOffset) { check_attention(5, 131, 4, 1, 16, true, 0); }
TEST(Attention, SingleQueryDecode) { check_attention(1, 257, 32, 8, 128, true, 0); }
TEST(Attention, SlidingWindow) { check_attention(65, 100, 4, 2, 8, true, 17); }

TEST(Norms, LayerNormAndRmsNorm) {
  const int64_t rows = 5, D = 1152;
  const Tensor x = random_tensor({rows, D}, kSeed, 3.0f);
  const Tensor w = random_tensor({D}, kSeed + 1);
  const Tensor b = random_tensor({D}, kSeed + 2);
  const Tensor ln = ops::layer_norm(x, LayerNorm{w, b, 1e-6f});
  const Tensor rms = ops::rms_norm(x, RMSNorm{w, 1e-5f});
  std::vector<double> ref_ln(size_t(rows * D)), ref_rms(size_t(rows * D));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data<float>() + r * D;
    double mean = 0, var = 0, sq = 0;
    for (int64_t i = 0; i < D; ++i) mean += xr[i];
    mean /= double(D);
    for (int64_t i = 0; i < D; ++i) {
      var += (xr[i] - mean) * (xr[i] - mean);
      sq += double(xr[i]) * xr[i];
    }
    var /= double(D);
    for (int64_t i = 0; i < D; ++i) {
      ref_ln[size_t(r * D + i)] = (xr[i] - mean) / std::sqrt(var + 1e-6) * w.data<float>()[i] + b.data<float>()[i];
      ref_rms[size_t(r * D + i)] = xr[i] / std::sqrt(sq / double(D) + 1e-5) * w.data<float>()[i];
    }
  }
  EXPECT_LE(max_rel_error(ln.data<float>(), ref_ln), 1e-6);
  EXPECT_LE(max_rel_error(rms.data<float>(), ref_rms), 1e-6);
}

// The fused producer-product ops are, on the CPU, exactly the ops they stand for.
TEST(FusedOps, EqualTheOpsTheyCombine) {
  const Tensor x = random_tensor({2, 5, 48}, 31, 2.0f);
  const Linear a{random_tensor({40, 48}, 32), random_tensor({40}, 33), nullptr};
  const Linear gate{random_tensor({24, 48}, 34), Tensor(), nullptr};
  const Linear up{random_tensor({24, 48}, 35), Tensor(), nullptr};
  const Linear down{random_tensor({48, 24}, 36), random_tensor({48}, 37), nullptr};
  const LayerNorm ln{random_tensor({48}, 38), random_tensor({48}, 39), 1e-6f};
  const RMSNorm rms{random_tensor({48}, 40), 1e-5f};

  EXPECT_EQ(ops::layer_norm_linear(x, ln, a).to_vector(),
            ops::linear(ops::layer_norm(x, ln), a).to_vector());
  Tensor h = x.clone(), g = x.clone();
  ops::gelu_inplace(g);
  EXPECT_EQ(ops::gelu_linear(h, a).to_vector(), ops::linear(g, a).to_vector());
  Tensor y = x.clone(), expected = x.clone();
  ops::swiglu_mlp_accumulate(y, gate, up, down, &rms);
  ops::linear_accumulate(expected, ops::swiglu_linear(x, gate, up, &rms), down);
  EXPECT_EQ(y.to_vector(), expected.to_vector());

  const Tensor qkv = random_tensor({2, 5, 3 * 48}, 41);
  const Linear proj{random_tensor({48, 48}, 42), random_tensor({48}, 43), nullptr};
  EXPECT_EQ(ops::self_attention_linear(qkv, 4, proj).to_vector(),
            ops::linear(ops::self_attention_qkv(qkv, 4), proj).to_vector());
  const Tensor q = random_tensor({2, 5, 4, 12}, 44);
  const Tensor keys = random_tensor({2, 2, 9, 12}, 45), values = random_tensor({2, 2, 9, 12}, 46);
  const CachedKV history{keys, values, 7};
  Tensor z = x.clone(), z_expected = x.clone();
  ops::causal_attention_accumulate(z, q, history, 2, 0, proj);
  ops::linear_accumulate(z_expected, ops::causal_attention(q, history, 2, 0), proj);
  EXPECT_EQ(z.to_vector(), z_expected.to_vector());
}

TEST(Rope, RotateHalfAtPositions) {
  const int64_t B = 2, L = 3, H = 2, Dh = 8;
  const float theta = 10000.0f;
  Tensor x = random_tensor({B, L, H, Dh}, kSeed);
  const Tensor original = x.clone();
  ops::rope_inplace(x, 5, theta);
  std::vector<double> ref(size_t(x.numel()));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Dh / 2; ++i) {
          const double angle = double(5 + l) * std::pow(double(theta), -2.0 * double(i) / double(Dh));
          const size_t base = size_t(((b * L + l) * H + h) * Dh);
          const double a = original.data<float>()[base + size_t(i)];
          const double c = original.data<float>()[base + size_t(i + Dh / 2)];
          ref[base + size_t(i)] = a * std::cos(angle) - c * std::sin(angle);
          ref[base + size_t(i + Dh / 2)] = c * std::cos(angle) + a * std::sin(angle);
        }
  EXPECT_LE(max_rel_error(x.data<float>(), ref), 1e-6);
}

TEST(Activations, GeluIsTheErfForm) {
  Tensor x = Tensor::from_vector({4}, {-3.0f, -0.5f, 0.0f, 2.0f});
  ops::gelu_inplace(x);
  const double expected[] = {-0.0040496, -0.1542687, 0.0, 1.9544997};  // x * Phi(x)
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(x.data<float>()[i], expected[i], 1e-6);
}

TEST(Embedding, RejectsIdsOutsideTheVocabulary) {
  const Tensor table = random_tensor({10, 4}, kSeed).to(DType::BF16);
  Tensor ids = Tensor::empty({2}, DType::I32);
  ids.data_mut<int32_t>()[0] = 3;
  ids.data_mut<int32_t>()[1] = 10;
  EXPECT_THROW(ops::embedding(ids, table), Error);
  ids.data_mut<int32_t>()[1] = -1;
  EXPECT_THROW(ops::embedding(ids, table), Error);
}

// Two histories [B, H, capacity, D] hold the same valid positions, value for value (their
// capacities may differ).
void expect_same_history(const CachedKV& a, const CachedKV& b) {
  ASSERT_EQ(a.length, b.length);
  ASSERT_EQ(a.keys.dim(0) * a.keys.dim(1), b.keys.dim(0) * b.keys.dim(1));
  const int64_t heads = a.keys.dim(0) * a.keys.dim(1), D = a.keys.dim(3);
  for (int64_t bh = 0; bh < heads; ++bh)
    for (int64_t j = 0; j < a.length; ++j)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t ia = (bh * a.keys.dim(2) + j) * D + d;
        const int64_t ib = (bh * b.keys.dim(2) + j) * D + d;
        ASSERT_EQ(a.keys.data<float>()[ia], b.keys.data<float>()[ib]) << "position " << j;
        ASSERT_EQ(a.values.data<float>()[ia], b.values.data<float>()[ib]) << "position " << j;
      }
}

TEST(KVCaches, PreallocatedAndConcatenatingAgree) {
  KVCache prealloc(4);
  ConcatKeyValueCache concat;
  uint32_t seed = kSeed;
  for (int64_t step : {3, 1, 1, 5, 1}) {
    const Tensor k = random_tensor({2, 3, step, 8}, seed++);
    const Tensor v = random_tensor({2, 3, step, 8}, seed++);
    const CachedKV a = prealloc.update_and_fetch(k, v);
    const CachedKV b = concat.update_and_fetch(k, v);
    ASSERT_EQ(prealloc.offset(), concat.offset());
    expect_same_history(a, b);
  }
  EXPECT_EQ(prealloc.offset(), 11);
  EXPECT_EQ(prealloc.capacity(), 12);  // grown in whole steps of 4
  prealloc.reset();
  concat.reset();
  EXPECT_EQ(prealloc.offset(), 0);
  EXPECT_EQ(concat.offset(), 0);
}

// RoPE folded into the append (KVCache: one position at a time in one pass) against the default
// (rotate, then append) of a concatenating cache: the same rotated queries and history, for a
// prefill of several positions followed by single-position steps.
TEST(KVCaches, RopeFoldedIntoTheAppendMatchesRotatingFirst) {
  KVCache fused(4);
  ConcatKeyValueCache plain;
  uint32_t seed = kSeed + 40;
  for (int64_t step : {3, 1, 1, 2, 1}) {
    const Tensor q = random_tensor({2, step, 6, 8}, seed++);
    const Tensor k = random_tensor({2, step, 3, 8}, seed++);
    const Tensor v = random_tensor({2, step, 3, 8}, seed++);
    Tensor qa = q.clone(), ka = k.clone(), qb = q.clone(), kb = k.clone();
    const CachedKV a = fused.rope_update_and_fetch(qa, ka, v, 10000.0f);
    const CachedKV b = plain.rope_update_and_fetch(qb, kb, v, 10000.0f);
    EXPECT_EQ(qa.to_vector(), qb.to_vector());
    expect_same_history(a, b);
  }
  EXPECT_EQ(fused.offset(), 8);
}

// A decode step's slot: reserve_and_fetch advances the offset and lends the storage, and the
// fused decode op stores the rotated key and value there, as rope_update_and_fetch would have,
// with the same attention output. A cache that cannot lend its storage declines.
TEST(KVCaches, ReservedSlotTakesTheFusedDecodeStep) {
  KVCache lending(4);
  KVCache plain(4);
  uint32_t seed = kSeed + 60;
  const int64_t Hq = 6, Hkv = 3, Dh = 8;
  const Linear o_proj{random_tensor({Hq * Dh, Hq * Dh}, seed++), Tensor(), nullptr};
  for (int64_t step : {3, 1, 1, 1}) {  // a prefill, then decode steps across a growth
    const Tensor q = random_tensor({2, step, Hq, Dh}, seed++);
    const Tensor k = random_tensor({2, step, Hkv, Dh}, seed++);
    const Tensor v = random_tensor({2, step, Hkv, Dh}, seed++);
    const Tensor x = random_tensor({2, step, Hq * Dh}, seed++);
    Tensor qb = q.clone(), kb = k.clone(), xb = x.clone();
    const int64_t at = plain.offset();
    const CachedKV b = plain.rope_update_and_fetch(qb, kb, v, 10000.0f);
    ops::causal_attention_accumulate(xb, qb, b, at, 0, o_proj);
    if (step > 1) {
      Tensor qa = q.clone(), ka = k.clone();
      lending.rope_update_and_fetch(qa, ka, v, 10000.0f);
      continue;
    }
    Tensor qa = q.clone(), xa = x.clone();
    const std::optional<CachedKV> a = lending.reserve_and_fetch(k, v);
    ASSERT_TRUE(a.has_value());
    EXPECT_EQ(lending.offset(), at + 1);
    ops::rope_attention_accumulate(xa, qa, k, v, *a, at, 10000.0f, 0, o_proj);
    expect_same_history(*a, b);
    EXPECT_EQ(xa.to_vector(), xb.to_vector());
  }
  EXPECT_EQ(lending.offset(), 6);
  ConcatKeyValueCache concat;
  EXPECT_FALSE(concat.reserve_and_fetch(Tensor::zeros({1, 1, 2, 4}), Tensor::zeros({1, 1, 2, 4})));
  EXPECT_EQ(concat.offset(), 0);
}

TEST(KVCaches, RejectMismatchedUpdates) {
  KVCache cache;
  cache.update_and_fetch(Tensor::zeros({1, 2, 1, 4}), Tensor::zeros({1, 2, 1, 4}));
  EXPECT_THROW(cache.update_and_fetch(Tensor::zeros({1, 3, 1, 4}), Tensor::zeros({1, 3, 1, 4})), Error);
  EXPECT_THROW(cache.update_and_fetch(Tensor::zeros({1, 2, 1, 4}), Tensor::zeros({1, 2, 2, 4})), Error);
}

}  // namespace
}  // namespace moxin
