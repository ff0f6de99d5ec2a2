// Diagnostics on the full-size checkpoint (GPU machine only; skipped unless MOXIN_FULL_CHECKPOINT
// names a checkpoint directory): the exact sequence `moxin-vlm bench` runs, 4-bit quantized,
// with the state of the logits at each step, and the time of each decode-step op at 7B shapes.
// These print numbers for GPU_NOTES.md; the checks are that nothing is non-finite and that the
// graph's tokens equal eager decoding.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "cuda_test_util.h"
#include "moxin/image.h"
#include "moxin/model.h"
#include "ops/ops.h"

#if MOXIN_WITH_CUDA
#include "backend/cuda/cuda_graph.h"
#include "backend/cuda/cuda_runtime.h"
#endif

namespace moxin {
namespace {

#if MOXIN_WITH_CUDA
struct RowStats {
  int32_t argmax = -1;
  int64_t non_finite = 0;
  float min = 0, max = 0;
};

RowStats last_row_stats(const Tensor& device_logits) {
  const Tensor logits = device_logits.to_device(Device::CPU);
  const int64_t V = logits.dim(-1);
  const float* row = logits.data<float>() + logits.numel() - V;
  RowStats s;
  s.min = s.max = row[0];
  float best = -INFINITY;
  for (int64_t i = 0; i < V; ++i) {
    if (!std::isfinite(row[i])) {
      ++s.non_finite;
      continue;
    }
    s.min = std::min(s.min, row[i]);
    s.max = std::max(s.max, row[i]);
    if (row[i] > best) {
      best = row[i];
      s.argmax = int32_t(i);
    }
  }
  return s;
}

int64_t count_non_finite(const Tensor& t) {
  int64_t n = 0;
  for (float v : t.to_device(Device::CPU).to_vector()) n += !std::isfinite(v);
  return n;
}

void print(const char* what, const RowStats& s) {
  std::printf("[full] %-34s argmax %6d  non-finite %lld  min %.4g  max %.4g\n", what, s.argmax,
              (long long)s.non_finite, s.min, s.max);
}

TEST(CudaFullCheckpoint, BenchSequenceQuantized) {
  MOXIN_SKIP_WITHOUT_GPU();
  const char* dir = std::getenv("MOXIN_FULL_CHECKPOINT");
  if (!dir) GTEST_SKIP() << "MOXIN_FULL_CHECKPOINT not set";
  const int bits = std::getenv("MOXIN_FULL_BITS") ? std::atoi(std::getenv("MOXIN_FULL_BITS")) : 4;
  MoxinVLM model = load_model(dir);
  if (bits) model.quantize(64, bits);
  model.to_device(Device::CUDA);
  const int64_t size = model.config.image_sizes[0];
  Image image;  // the bench's synthetic image and prompt
  image.width = image.height = int(size);
  image.rgb.resize(size_t(size * size * 3));
  for (size_t i = 0; i < image.rgb.size(); ++i) image.rgb[i] = uint8_t(i * 7 % 251);
  const PreprocessedImage pixels = preprocess_image(image, int(size));
  const int prompt = 24;
  Tensor ids = Tensor::empty({1, prompt}, DType::I32);
  for (int i = 0; i < prompt; ++i) ids.data_mut<int32_t>()[i] = i == 0 ? 1 : (i * 7919) % 32000;

  const Tensor visual = model.encode_image(pixels.dino, pixels.siglip);
  std::printf("[full] vision features non-finite: %lld of %lld\n",
              (long long)count_non_finite(visual), (long long)visual.numel());
  EXPECT_EQ(count_non_finite(visual), 0);

  KVCacheList cache;
  const RowStats plain = last_row_stats(model.forward(pixels.dino, pixels.siglip, ids, cache, 1));
  print("forward (fresh cache)", plain);
  EXPECT_EQ(plain.non_finite, 0);
  std::vector<int32_t> eager = {plain.argmax};
  for (int i = 0; i < 7; ++i) {
    Tensor t = Tensor::empty({1, 1}, DType::I32);
    t.data_mut<int32_t>()[0] = eager.back();
    eager.push_back(last_row_stats(model.decode_token(t, cache)).argmax);
  }
  std::printf("[full] eager tokens:");
  for (int32_t t : eager) std::printf(" %d", t);
  std::printf("\n");

  const int64_t capacity = prompt + model.dino.config.num_patches() + 128 + 16;
  cuda::DecodeGraph graph(model, capacity);
  Tensor logits = model.forward(pixels.dino, pixels.siglip, ids, graph.caches(), 1);
  print("forward into graph caches", last_row_stats(logits));
  std::vector<int32_t> warm = graph.generate_greedy(logits, 4);
  for (auto& c : graph.caches()) c->reset();
  logits = model.forward(pixels.dino, pixels.siglip, ids, graph.caches(), 1);
  const RowStats again = last_row_stats(logits);
  print("forward after reset (bench's)", again);
  const std::vector<int32_t> tokens = graph.generate_greedy(logits, 8);
  std::printf("[full] graph tokens:");
  for (int32_t t : tokens) std::printf(" %d", t);
  std::printf("  (warm-up: %d %d %d %d)\n", warm[0], warm[1], warm[2], warm[3]);
  EXPECT_EQ(again.non_finite, 0);
  EXPECT_EQ(tokens[0], plain.argmax);
}

// Decode-step ops at the 7B decoder's shapes, timed with events over 200 launches each, to see
// where a token's time goes besides the weight-streaming products.
TEST(CudaFullCheckpoint, DecodeOpTimes) {
  MOXIN_SKIP_WITHOUT_GPU();
  if (!std::getenv("MOXIN_FULL_CHECKPOINT")) GTEST_SKIP() << "MOXIN_FULL_CHECKPOINT not set";
  const int64_t D = 4096, Hq = 32, Hkv = 8, Dh = 128, cap = 424, len = 400;
  const Tensor x = test::gpu(test::random_tensor({1, 1, D}, 1));
  RMSNorm norm{test::gpu(test::random_tensor({D}, 2)), 1e-5f};
  Tensor q = test::gpu(test::random_tensor({1, 1, Hq, Dh}, 3));
  const Tensor keys = test::gpu(test::random_tensor({1, Hkv, cap, Dh}, 4));
  const Tensor values = test::gpu(test::random_tensor({1, Hkv, cap, Dh}, 5));
  Tensor k = test::gpu(test::random_tensor({1, 1, Hkv, Dh}, 6));
  Tensor acc = test::gpu(test::random_tensor({1, 1, D}, 7));
  Tensor cache_k = keys.clone();
  // Host-timed between synchronisations (the backend's stream is its own): per call, launch
  // included, as an eager decode step pays it.
  auto time_us = [](const char* what, const std::function<void()>& op) {
    op();
    cuda::synchronize();
    const int reps = 200;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) op();
    cuda::synchronize();
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    std::printf("[full] %-40s %7.2f us per call (eager, incl. launch)\n", what, us / reps);
  };
  time_us("rms_norm [1, 4096]", [&] { (void)ops::rms_norm(x, norm); });
  time_us("rope q [1, 1, 32, 128]", [&] { ops::rope_inplace(q, len, 1e6f); });
  time_us("heads_first + write_positions k", [&] {
    Tensor h = ops::heads_first(k);
    ops::write_positions(cache_k, h, len);
  });
  time_us("decode attention (400 keys, GQA 32/8)", [&] {
    (void)ops::causal_attention(q, CachedKV{keys, values, len + 1}, len, 0);
  });
  time_us("add [1, 4096]", [&] { ops::add_inplace(acc, x); });
}
#endif

}  // namespace
}  // namespace moxin
