// Parity with the reference (timm + transformers + PIL, float32), stage by stage, on seeded
// random-weight checkpoints in the released layouts. Fixtures: reference/make_fixtures.py.
// Checkpoints: scripts/make_test_checkpoints.sh (regenerated bit-exactly from a seed).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/npy.h"
#include "moxin/image.h"
#include "moxin/model.h"
#include "test_support.h"

namespace moxin {
namespace {

// Float32 compute against float32 reference: differences are summation order only.
constexpr double kFeatureTolerance = 1e-4;  // max |error| / max |reference|
constexpr double kLogitTolerance = 1e-4;
// Preprocessing: our resize is meant to be bit-exact with Pillow; one 8-bit step divided by
// the smallest std (0.224) would be 0.0175, so this bound still proves near-exactness.
constexpr double kPixelTolerance = 1e-5;

class Parity : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    fixtures_ = test::fixtures_dir() / "parity" / GetParam();
    ASSERT_TRUE(std::filesystem::exists(fixtures_ / "meta.json")) << "no fixtures in " << fixtures_;
    checkpoint_ = test::checkpoint_dir(GetParam());
    ASSERT_FALSE(checkpoint_.empty())
        << "checkpoint '" << GetParam()
        << "' not generated: run scripts/make_test_checkpoints.sh (or set MOXIN_TEST_CHECKPOINTS)";
    std::ifstream in(fixtures_ / "meta.json");
    meta_ = nlohmann::json::parse(in);
  }

  Tensor fixture(const std::string& name) const { return npy::load(fixtures_ / (name + ".npy")); }

  Tensor input_ids() const {
    const auto ids = meta_["input_ids"].get<std::vector<int32_t>>();
    Tensor t = Tensor::empty({1, int64_t(ids.size())}, DType::I32);
    std::copy(ids.begin(), ids.end(), t.data_mut<int32_t>());
    return t;
  }

  std::filesystem::path fixtures_, checkpoint_;
  nlohmann::json meta_;
};

TEST_P(Parity, EveryStageMatchesTheReference) {
  MoxinVLM model = load_model(checkpoint_);
  const Tensor pixel_dino = fixture("pixel_dino");
  const Tensor pixel_siglip = fixture("pixel_siglip");

  const auto dino = test::compare(model.dino.forward(pixel_dino), fixture("dino_features"));
  std::printf("[%s] dino features:   %s\n", GetParam().c_str(), dino.to_string().c_str());
  EXPECT_LE(dino.max_rel, kFeatureTolerance);

  const auto siglip = test::compare(model.siglip.forward(pixel_siglip), fixture("siglip_features"));
  std::printf("[%s] siglip features: %s\n", GetParam().c_str(), siglip.to_string().c_str());
  EXPECT_LE(siglip.max_rel, kFeatureTolerance);

  const auto projected = test::compare(model.encode_image(pixel_dino, pixel_siglip), fixture("projector"));
  std::printf("[%s] projector:       %s\n", GetParam().c_str(), projected.to_string().c_str());
  EXPECT_LE(projected.max_rel, kFeatureTolerance);

  KVCacheList cache;
  const auto logits = test::compare(model.forward(pixel_dino, pixel_siglip, input_ids(), cache),
                                    fixture("logits"));
  std::printf("[%s] logits (all positions): %s\n", GetParam().c_str(), logits.to_string().c_str());
  EXPECT_LE(logits.max_rel, kLogitTolerance);
}

TEST_P(Parity, PreprocessingMatchesPil) {
  // meta.json names the photo relative to tests/fixtures/parity.
  const auto image = load_image(fixtures_.parent_path() / meta_["image"].get<std::string>());
  const PreprocessedImage pixels = preprocess_image(image, 224);
  const auto dino = test::compare(pixels.dino, fixture("pixel_dino"));
  const auto siglip = test::compare(pixels.siglip, fixture("pixel_siglip"));
  std::printf("[%s] pixels: dino %s; siglip %s\n", GetParam().c_str(), dino.to_string().c_str(),
              siglip.to_string().c_str());
  EXPECT_LE(dino.max_abs, kPixelTolerance);
  EXPECT_LE(siglip.max_abs, kPixelTolerance);
}

// Decoding token by token through the cache gives the logits a full forward gives.
TEST_P(Parity, CachedDecodeMatchesFullForward) {
  MoxinVLM model = load_model(checkpoint_);
  const Tensor pixel_dino = fixture("pixel_dino");
  const Tensor pixel_siglip = fixture("pixel_siglip");
  const Tensor ids = input_ids();
  const int64_t L = ids.dim(1);
  ASSERT_GE(L, 3);
  const Tensor reference = fixture("logits");  // [1, positions, vocab]
  const int64_t positions = reference.dim(1), vocab = reference.dim(2);

  // Prefill all but the last two ids, then decode them one at a time.
  Tensor prefix = Tensor::empty({1, L - 2}, DType::I32);
  std::copy_n(ids.data<int32_t>(), L - 2, prefix.data_mut<int32_t>());
  KVCacheList cache;
  model.forward(pixel_dino, pixel_siglip, prefix, cache, 1);
  for (int64_t step = 0; step < 2; ++step) {
    Tensor token = Tensor::empty({1}, DType::I32);
    token.data_mut<int32_t>()[0] = ids.data<int32_t>()[L - 2 + step];
    const Tensor logits = model.decode_token(token, cache);
    const int64_t position = positions - 2 + step;
    const Tensor expected = reference.reshape({positions, vocab}).slice_rows(position, position + 1);
    const auto diff = test::compare(logits.reshape({1, vocab}), expected);
    std::printf("[%s] cached decode step %lld: %s\n", GetParam().c_str(), (long long)step,
                diff.to_string().c_str());
    EXPECT_LE(diff.max_rel, kLogitTolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, Parity,
                         ::testing::Values("tiny-hf", "tiny-native", "tiny-f32", "real-towers"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace moxin
