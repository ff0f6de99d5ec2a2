// Batched decoding with sequences of different lengths (right-padded ragged batches): each
// sequence of a batch must get the logits and greedy tokens it gets when run alone.
//
// Tolerance: 1e-5 of the largest |logit| (tiny-f32, float32 weights). A sequence run alone and
// run in a batch differ only in how BLAS blocks products of different row counts (summation
// order), ~1e-7 relative here; any mix-up of positions, caches or padding moves logits by
// O(1).
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>

#include "batch_scenario.h"
#include "moxin/errors.h"
#include "moxin/kv_cache.h"
#include "moxin/model.h"
#include "ops/ops.h"
#include "test_support.h"

namespace moxin {
namespace {

constexpr double kTolerance = 1e-5;
constexpr int kDecodeSteps = 8;

class Batch : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto dir = test::checkpoint_dir("tiny-f32");
    if (dir.empty()) return;
    model_ = std::make_unique<MoxinVLM>(load_model(dir));
  }
  static void TearDownTestSuite() { model_.reset(); }
  void SetUp() override {
    ASSERT_TRUE(model_) << "checkpoint 'tiny-f32' not generated: run "
                           "scripts/make_test_checkpoints.sh";
  }
  int64_t image_positions() const { return model_->dino.config.num_patches(); }

  static std::unique_ptr<MoxinVLM> model_;
};

std::unique_ptr<MoxinVLM> Batch::model_;

void expect_request_error(const std::function<void()>& f, const std::string& mentions) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning " << mentions;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Request) << e.what();
    EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
  }
}

template <class Cache, class... Args>
KVCacheList caches_of(const MoxinVLM& model, Args... args) {
  KVCacheList caches;
  for (size_t i = 0; i < model.layers.size(); ++i)
    caches.push_back(std::make_unique<Cache>(args...));
  return caches;
}

TEST_F(Batch, RaggedBatchMatchesEachSequenceAlone) {
  const test::BatchInputs in = test::make_batch_inputs(*model_, {8, 3, 6}, 7);
  const test::GreedyRun alone = test::run_one_by_one(*model_, in, kDecodeSteps);

  KVCacheList cache;
  const test::GreedyRun batched = test::run_batched(*model_, in, cache, kDecodeSteps);
  const double worst = test::expect_same_run(batched, alone, kTolerance);
  std::printf("ragged batch (KVCache) vs alone: worst relative logit error %.3g\n", worst);

  // Each sequence stands after its own prompt and the tokens decoded since.
  const int64_t N = image_positions();
  const std::vector<int64_t> expected = {N + 8 + kDecodeSteps, N + 3 + kDecodeSteps,
                                         N + 6 + kDecodeSteps};
  for (const auto& c : cache) {
    EXPECT_EQ(c->offsets(), expected);
    EXPECT_EQ(c->offset(), N + 8 + kDecodeSteps);
  }
  // The sequences really differ (different images and prompts), so a mix-up would show.
  EXPECT_GT(test::relative_error(alone.logits[0][0], alone.logits[1][0]), 1e-2);
}

TEST_F(Batch, RaggedBatchThroughEveryCacheKind) {
  const test::BatchInputs in = test::make_batch_inputs(*model_, {2, 7, 5}, 11);
  const test::GreedyRun alone = test::run_one_by_one(*model_, in, kDecodeSteps);
  {
    KVCacheList cache = caches_of<ConcatKeyValueCache>(*model_);
    const double worst = test::expect_same_run(test::run_batched(*model_, in, cache, kDecodeSteps),
                                               alone, kTolerance);
    std::printf("ragged batch (ConcatKeyValueCache) vs alone: %.3g\n", worst);
  }
  {
    // A step of 5 positions: the caches grow during the prefill and again while decoding,
    // moving each sequence's history to the new buffer.
    KVCacheList cache = caches_of<KVCache>(*model_, int64_t(5));
    const double worst = test::expect_same_run(test::run_batched(*model_, in, cache, kDecodeSteps),
                                               alone, kTolerance);
    std::printf("ragged batch (KVCache step 5) vs alone: %.3g\n", worst);
    auto* first = static_cast<KVCache*>(cache[0].get());
    EXPECT_GE(first->capacity(), first->offset());
    // After reset the caches serve a new batch from position 0.
    for (auto& c : cache) c->reset();
    EXPECT_TRUE(cache[0]->offsets().empty());
    EXPECT_EQ(cache[0]->offset(), 0);
    test::expect_same_run(test::run_batched(*model_, in, cache, kDecodeSteps), alone, kTolerance);
  }
}

TEST_F(Batch, UniformBatchMatchesEachSequenceAlone) {
  const test::BatchInputs in = test::make_batch_inputs(*model_, {5, 5, 5}, 3);
  const test::GreedyRun alone = test::run_one_by_one(*model_, in, kDecodeSteps);

  KVCacheList cache;
  const double worst =
      test::expect_same_run(test::run_batched(*model_, in, cache, kDecodeSteps), alone, kTolerance);
  std::printf("uniform batch (lengths overload) vs alone: %.3g\n", worst);
  EXPECT_TRUE(cache[0]->offsets().empty());  // equal lengths: the uniform path throughout
  EXPECT_EQ(cache[0]->offset(), image_positions() + 5 + kDecodeSteps);

  // The original signature (one length for all) gives the same.
  KVCacheList plain;
  Tensor logits = model_->forward(in.dino, in.siglip, in.ids, plain, 1);
  test::GreedyRun run;
  run.logits.resize(3);
  run.tokens.resize(3);
  std::vector<int32_t> next = test::record_step(logits, 0, run);
  for (int s = 0; s < kDecodeSteps; ++s)
    next = test::record_step(model_->decode_token(test::token_batch(next), plain), 0, run);
  test::expect_same_run(run, alone, kTolerance);
}

TEST_F(Batch, SecondPromptOnARaggedCacheContinuesEachSequence) {
  // A ragged prefill followed by a multi-token uniform-width update (forward_embeddings with
  // L = 2) on the ragged cache: every sequence appends both rows at its own offset.
  const test::BatchInputs in = test::make_batch_inputs(*model_, {4, 1}, 5);
  KVCacheList cache;
  model_->forward(in.dino, in.siglip, in.ids, in.lengths, cache);
  Tensor more = Tensor::empty({2, 2}, DType::I32);
  for (int i = 0; i < 4; ++i) more.data_mut<int32_t>()[i] = 40 + i;
  const Tensor batched = model_->forward_embeddings(model_->embed(more), cache, 1);  // [2, 1, V]

  for (int64_t b = 0; b < 2; ++b) {
    KVCacheList alone;
    model_->forward(in.dino_each[size_t(b)], in.siglip_each[size_t(b)], in.ids_each[size_t(b)],
                    alone, 1);
    const Tensor row_ids = ops::slice(model_->embed(more), 0, b, b + 1);
    const std::vector<float> expected = model_->forward_embeddings(row_ids, alone, 1).to_vector();
    const std::vector<float> all = batched.to_vector();
    const int64_t V = batched.dim(-1);
    const std::vector<float> actual(all.begin() + b * V, all.begin() + (b + 1) * V);
    EXPECT_LE(test::relative_error(actual, expected), kTolerance) << "sequence " << b;
  }
  const int64_t N = image_positions();
  EXPECT_EQ(cache[0]->offsets(), (std::vector<int64_t>{N + 4 + 2, N + 1 + 2}));
}

TEST_F(Batch, BadLengthsAreRequestErrors) {
  const test::BatchInputs in = test::make_batch_inputs(*model_, {4, 2}, 9);
  KVCacheList cache;
  expect_request_error(
      [&] { model_->forward(in.dino, in.siglip, in.ids, std::vector<int64_t>{4}, cache); },
      "prompt lengths");
  expect_request_error(
      [&] {
        model_->forward(in.dino, in.siglip, in.ids, std::vector<int64_t>{4, 2, 1}, cache);
      },
      "prompt lengths");
  expect_request_error(
      [&] {
        model_->forward(in.dino, in.siglip, in.ids, std::vector<int64_t>{4, 0}, cache);
      },
      "prompt length 0");
  expect_request_error(
      [&] {
        model_->forward(in.dino, in.siglip, in.ids, std::vector<int64_t>{5, 2}, cache);
      },
      "prompt length 5");
  expect_request_error(
      [&] {
        model_->forward(in.dino, in.siglip, in.ids, std::vector<int64_t>{-1, 2}, cache);
      },
      "prompt length -1");
  // Nothing above touched the caches.
  for (const auto& c : cache) EXPECT_EQ(c->offset(), 0);

  // Images for another number of sequences.
  expect_request_error(
      [&] { model_->forward(in.dino_each[0], in.siglip_each[0], in.ids, in.lengths, cache); },
      "images hold 1");

  // A ragged cache continued with the wrong number of sequences.
  model_->forward(in.dino, in.siglip, in.ids, in.lengths, cache);
  expect_request_error(
      [&] {
        model_->decode_token(test::token_batch({1, 2, 3}), cache);
      },
      "holds 2 sequences");
}

// A user's cache that implements only the uniform interface.
class UniformOnlyCache final : public KeyValueCache {
 public:
  int64_t offset() const override { return inner_.offset(); }
  CachedKV update_and_fetch(const Tensor& keys, const Tensor& values) override {
    return inner_.update_and_fetch(keys, values);
  }
  void reset() override { inner_.reset(); }

 private:
  ConcatKeyValueCache inner_;
};

TEST_F(Batch, CachesWithoutRaggedSupportServeUniformBatchesOnly) {
  const test::BatchInputs uniform = test::make_batch_inputs(*model_, {3, 3}, 13);
  KVCacheList cache = caches_of<UniformOnlyCache>(*model_);
  EXPECT_NO_THROW(
      model_->forward(uniform.dino, uniform.siglip, uniform.ids, uniform.lengths, cache));
  for (auto& c : cache) c->reset();

  const test::BatchInputs ragged = test::make_batch_inputs(*model_, {3, 2}, 13);
  expect_request_error(
      [&] { model_->forward(ragged.dino, ragged.siglip, ragged.ids, ragged.lengths, cache); },
      "different lengths");
}

TEST(KVCacheRagged, OffsetsFollowEachSequence) {
  KVCache cache(4);
  const Tensor k = Tensor::zeros({3, 2, 5, 8});
  RaggedAppend append;
  append.at.host = {0, 0, 0};
  append.valid = {5, 2, 3};
  const CachedKV first = cache.update_and_fetch_ragged(k, k, append);
  EXPECT_EQ(first.length, 5);
  EXPECT_EQ(cache.offsets(), (std::vector<int64_t>{5, 2, 3}));
  EXPECT_EQ(cache.offset(), 5);

  // A uniform update on a ragged cache appends at each sequence's own offset.
  const Tensor one = Tensor::from_vector({3, 2, 1, 8}, std::vector<float>(48, 1.0f));
  const CachedKV second = cache.update_and_fetch(one, one);
  EXPECT_EQ(second.length, 6);
  EXPECT_EQ(cache.offsets(), (std::vector<int64_t>{6, 3, 4}));
  const std::vector<float> keys = second.keys.to_vector();
  const int64_t capacity = second.keys.dim(2);
  auto at = [&](int64_t b, int64_t h, int64_t pos) {
    return keys[size_t(((b * 2 + h) * capacity + pos) * 8)];
  };
  EXPECT_EQ(at(0, 1, 5), 1.0f);
  EXPECT_EQ(at(1, 1, 2), 1.0f);
  EXPECT_EQ(at(1, 1, 3), 0.0f);
  EXPECT_EQ(at(2, 0, 3), 1.0f);

  // Updates that start elsewhere than the cache's sequences are refused.
  append.at.host = {6, 3, 3};
  append.valid = {1, 1, 1};
  EXPECT_THROW(cache.update_and_fetch_ragged(one, one, append), Error);
  // Rows past `valid` are padding: bringing every sequence level makes the cache uniform.
  const Tensor three = Tensor::zeros({3, 2, 3, 8});
  append.at.host = {6, 3, 4};
  append.valid = {0, 3, 2};
  EXPECT_EQ(cache.update_and_fetch_ragged(three, three, append).length, 9);
  EXPECT_TRUE(cache.offsets().empty());
  EXPECT_EQ(cache.offset(), 6);
  EXPECT_EQ(cache.update_and_fetch(one, one).length, 7);

  cache.reset();
  EXPECT_TRUE(cache.offsets().empty());
  EXPECT_EQ(cache.offset(), 0);
}

}  // namespace
}  // namespace moxin
