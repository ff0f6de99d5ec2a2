// Ragged batches (sequences of different lengths and images, right-padded) on the GPU: the
// same batch through the CUDA backend must give what the CPU gives, and what each sequence
// gives alone on the GPU. Skips without a GPU.
//
// Tolerance: 1e-4 of the largest |logit| (tiny-f32: float32 weights, float32 cuBLASLt and
// kernels; the bound CudaParity uses for this checkpoint). Greedy tokens must match.
#include <gtest/gtest.h>

#include "../unit/batch_scenario.h"
#include "cuda_test_util.h"
#include "moxin/errors.h"
#include "moxin/model.h"
#include "ops/ops.h"

namespace moxin {
namespace {

constexpr double kTolerance = 1e-4;
constexpr int kDecodeSteps = 8;

class CudaBatch : public ::testing::Test {
 protected:
  void SetUp() override {
    MOXIN_SKIP_WITHOUT_GPU();
    checkpoint_ = test::checkpoint_dir("tiny-f32");
    ASSERT_FALSE(checkpoint_.empty())
        << "checkpoint 'tiny-f32' not generated: run scripts/make_test_checkpoints.sh";
  }
  std::filesystem::path checkpoint_;
};

TEST_F(CudaBatch, RaggedBatchMatchesTheCpuAndEachSequenceAlone) {
  MoxinVLM cpu = load_model(checkpoint_);
  MoxinVLM gpu = load_model(checkpoint_, LoadOptions{Device::CUDA});
  ASSERT_EQ(gpu.device(), Device::CUDA);
  const test::BatchInputs in = test::make_batch_inputs(cpu, {8, 3, 6}, 7);

  KVCacheList cpu_cache, gpu_cache;
  const test::GreedyRun on_cpu = test::run_batched(cpu, in, cpu_cache, kDecodeSteps);
  const test::GreedyRun on_gpu = test::run_batched(gpu, in, gpu_cache, kDecodeSteps);
  const double vs_cpu = test::expect_same_run(on_gpu, on_cpu, kTolerance);
  std::printf("ragged batch, GPU vs CPU: worst relative logit error %.3g\n", vs_cpu);
  EXPECT_EQ(gpu_cache[0]->offsets(), cpu_cache[0]->offsets());

  const test::GreedyRun alone = test::run_one_by_one(gpu, in, kDecodeSteps);
  const double vs_alone = test::expect_same_run(on_gpu, alone, kTolerance);
  std::printf("ragged batch vs each alone, GPU: %.3g\n", vs_alone);
}

TEST_F(CudaBatch, UniformBatchMatchesTheCpu) {
  MoxinVLM cpu = load_model(checkpoint_);
  MoxinVLM gpu = load_model(checkpoint_, LoadOptions{Device::CUDA});
  const test::BatchInputs in = test::make_batch_inputs(cpu, {5, 5, 5, 5}, 3);
  KVCacheList cpu_cache, gpu_cache;
  const double worst =
      test::expect_same_run(test::run_batched(gpu, in, gpu_cache, kDecodeSteps),
                            test::run_batched(cpu, in, cpu_cache, kDecodeSteps), kTolerance);
  std::printf("uniform batch, GPU vs CPU: %.3g\n", worst);
  EXPECT_TRUE(gpu_cache[0]->offsets().empty());
}

// The three per-sequence ops alone against the CPU: prefill-sized (flash kernel) and
// one-token (split decode kernel) queries, sequences far apart in one cache, with and without
// a sliding window, and with positions the op must upload itself.
TEST(CudaBatchOps, RaggedOpsMatchCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  const int64_t B = 3, Hq = 4, Hkv = 2, Dh = 64, capacity = 200;
  const std::vector<int64_t> starts = {0, 70, 131};
  const BatchPositions on_cpu = ops::batch_positions(starts, Device::CPU);
  const BatchPositions on_gpu = ops::batch_positions(starts, Device::CUDA);
  const BatchPositions host_only{starts, Tensor()};  // no device copy: the op uploads it
  for (const int64_t Lq : {int64_t(1), int64_t(5)}) {
    SCOPED_TRACE("Lq " + std::to_string(Lq));
    const Tensor q = test::random_tensor({B, Lq, Hq, Dh}, 1);
    const Tensor keys = test::random_tensor({B, Hkv, capacity, Dh}, 2);
    const Tensor values = test::random_tensor({B, Hkv, capacity, Dh}, 3);
    const int64_t length = 131 + Lq;
    const CachedKV cpu_kv{keys, values, length};
    const CachedKV gpu_kv{test::gpu(keys), test::gpu(values), length};
    for (const int64_t window : {int64_t(0), int64_t(16)}) {
      const Tensor expected = ops::causal_attention(q, cpu_kv, on_cpu, window);
      for (const BatchPositions* p : {&on_gpu, &host_only}) {
        const auto d = test::compare(
            ops::causal_attention(test::gpu(q), gpu_kv, *p, window).to_device(Device::CPU),
            expected);
        EXPECT_LE(d.max_rel, 1e-5) << "window " << window << ": " << d.to_string();
      }
    }

    Tensor x_cpu = test::random_tensor({B, Lq, Hq, Dh}, 4);
    Tensor x_gpu = test::gpu(x_cpu);
    ops::rope_inplace(x_cpu, on_cpu, 1e6f);
    ops::rope_inplace(x_gpu, on_gpu, 1e6f);
    const auto rope = test::compare(x_gpu.to_device(Device::CPU), x_cpu);
    EXPECT_LE(rope.max_rel, 1e-5) << rope.to_string();

    const Tensor src = test::random_tensor({B, Hkv, Lq, Dh}, 5);
    Tensor dst_cpu = Tensor::zeros({B, Hkv, capacity, Dh});
    Tensor dst_gpu = Tensor::zeros({B, Hkv, capacity, Dh}, DType::F32, Device::CUDA);
    ops::write_positions(dst_cpu, src, on_cpu);
    ops::write_positions(dst_gpu, test::gpu(src), on_gpu);
    EXPECT_EQ(dst_gpu.to_vector(), dst_cpu.to_vector());
  }
  // Positions past the cache are refused before any kernel runs.
  Tensor dst = Tensor::zeros({B, Hkv, 8, Dh}, DType::F32, Device::CUDA);
  EXPECT_THROW(
      ops::write_positions(dst, test::gpu(test::random_tensor({B, Hkv, 1, Dh}, 6)), on_gpu), Error);
}

}  // namespace
}  // namespace moxin
