// MoxinVLM::quantize, quantized checkpoints that save and load back, the mlx-rs naming, and
// how far quantized logits move from the stored-precision ones.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/npy.h"
#include "moxin/errors.h"
#include "moxin/model.h"
#include "moxin/quantize.h"
#include "test_support.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;

class QuantizedModel : public ::testing::Test {
 protected:
  void SetUp() override {
    tiny_ = test::checkpoint_dir("tiny-hf");
    ASSERT_FALSE(tiny_.empty()) << "run scripts/make_test_checkpoints.sh";
    fixtures_ = test::fixtures_dir() / "parity" / "tiny-hf";
    scratch_ = test::scratch_dir("moxin-quant");
    std::ifstream in(fixtures_ / "meta.json");
    const auto ids = nlohmann::json::parse(in)["input_ids"].get<std::vector<int32_t>>();
    ids_ = Tensor::empty({1, int64_t(ids.size())}, DType::I32);
    std::copy(ids.begin(), ids.end(), ids_.data_mut<int32_t>());
  }
  void TearDown() override { fs::remove_all(scratch_); }

  Tensor logits(MoxinVLM& model) {
    KVCacheList cache;
    return model.forward(npy::load(fixtures_ / "pixel_dino.npy"),
                         npy::load(fixtures_ / "pixel_siglip.npy"), ids_, cache);
  }

  fs::path tiny_, fixtures_, scratch_;
  Tensor ids_;
};

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

void expect_same_linear(const Linear& a, const Linear& b, const std::string& name) {
  ASSERT_EQ(bool(a.quantized), bool(b.quantized)) << name;
  if (a.quantized) {
    EXPECT_TRUE(same_bytes(a.quantized->weight, b.quantized->weight)) << name;
    EXPECT_TRUE(same_bytes(a.quantized->scales, b.quantized->scales)) << name;
    EXPECT_TRUE(same_bytes(a.quantized->biases, b.quantized->biases)) << name;
    EXPECT_EQ(a.quantized->bits, b.quantized->bits) << name;
    EXPECT_EQ(a.quantized->group_size, b.quantized->group_size) << name;
  } else {
    EXPECT_TRUE(same_bytes(a.weight, b.weight)) << name;
  }
}

TEST_F(QuantizedModel, QuantizesTheDecoderAndHeadOnly) {
  MoxinVLM model = load_model(tiny_);
  model.quantize(32, 4);
  ASSERT_TRUE(model.config.quantization.has_value());
  EXPECT_EQ(model.config.quantization->bits, 4);
  for (const auto& layer : model.layers) {
    EXPECT_TRUE(layer.self_attn.q_proj.quantized);
    EXPECT_TRUE(layer.mlp.down_proj.quantized);
  }
  EXPECT_TRUE(model.lm_head.quantized);
  EXPECT_FALSE(model.projector.fc1.quantized);
  EXPECT_FALSE(model.dino.blocks[0].attn.qkv.quantized);
  EXPECT_EQ(model.embed_tokens.dtype(), DType::BF16);
}

TEST_F(QuantizedModel, LayersThatDoNotDivideStayDense) {
  MoxinVLM model = load_model(tiny_);
  // The tiny SigLIP tower is 144 wide with an MLP of 288: 144 % 64 != 0, 288 % 64 != 0.
  model.siglip.quantize(64, 8);
  EXPECT_FALSE(model.siglip.blocks[0].attn.qkv.quantized);
  EXPECT_FALSE(model.siglip.blocks[0].mlp.fc2.quantized);
  model.dino.quantize(64, 8);  // 128 wide, MLP 512: all divide
  EXPECT_TRUE(model.dino.blocks[0].attn.qkv.quantized);
  EXPECT_TRUE(model.dino.blocks[0].mlp.fc2.quantized);
  EXPECT_FALSE(model.dino.patch_embed.quantized);  // 3 * 14 * 14 = 588 inputs
  EXPECT_THROW(model.quantize(48, 4), Error);
  EXPECT_THROW(model.quantize(64, 7), Error);
}

TEST_F(QuantizedModel, SaveAndLoadGiveIdenticalTensorsAndLogits) {
  for (int bits : {4, 8}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    MoxinVLM model = load_model(tiny_);
    model.quantize(64, bits);
    model.dino.quantize(64, bits);  // towers too, to cover quantized vision layers on disk
    const fs::path dir = scratch_ / std::to_string(bits);
    save_model(model, dir);
    MoxinVLM loaded = load_model(dir);
    ASSERT_TRUE(loaded.config.quantization.has_value());
    EXPECT_EQ(loaded.config.quantization->bits, bits);
    for (size_t i = 0; i < model.layers.size(); ++i) {
      expect_same_linear(model.layers[i].self_attn.k_proj, loaded.layers[i].self_attn.k_proj, "k_proj");
      expect_same_linear(model.layers[i].mlp.up_proj, loaded.layers[i].mlp.up_proj, "up_proj");
    }
    expect_same_linear(model.lm_head, loaded.lm_head, "lm_head");
    expect_same_linear(model.dino.blocks[1].mlp.fc1, loaded.dino.blocks[1].mlp.fc1, "dino fc1");
    const Tensor a = logits(model), b = logits(loaded);
    EXPECT_TRUE(same_bytes(a, b)) << test::compare(a, b).to_string();
  }
}

TEST_F(QuantizedModel, ReadsTheMlxRsNaming) {
  MoxinVLM model = load_model(tiny_);
  model.quantize(64, 4);
  const fs::path dir = scratch_ / "mlx-rs";
  save_model(model, dir);
  // mlx-rs keeps the packed matrix of a QuantizedLinear under `inner`.
  WeightMap renamed;
  {
    const WeightMap saved = load_safetensors(dir / "model.safetensors");
    for (const auto& name : saved.names()) {
      std::string out = name;
      const std::string stem = name.substr(0, name.size() - std::string("weight").size());
      if (name.size() > 7 && name.ends_with(".weight") && saved.contains(stem + "scales"))
        out = stem + "inner.weight";
      renamed.insert(out, saved.get(name).clone());
    }
  }
  save_safetensors(dir / "model.safetensors", renamed);
  MoxinVLM loaded = load_model(dir);
  const Tensor a = logits(model), b = logits(loaded);
  EXPECT_TRUE(same_bytes(a, b)) << test::compare(a, b).to_string();
}

TEST_F(QuantizedModel, InconsistentPackedLayersAreRefused) {
  MoxinVLM model = load_model(tiny_);
  model.quantize(64, 4);
  const fs::path dir = scratch_ / "broken";
  save_model(model, dir);
  const std::string scales = "language_model.model.layers.0.mlp.gate_proj.scales";
  WeightMap edited;
  {
    const WeightMap saved = load_safetensors(dir / "model.safetensors");
    for (const auto& name : saved.names()) edited.insert(name, saved.get(name).clone());
  }
  const Tensor s = edited.get(scales);
  edited.erase(scales);
  edited.insert(scales, Tensor::zeros({s.dim(0) - 1, s.dim(1)}, s.dtype()));
  save_safetensors(dir / "model.safetensors", edited);
  try {
    load_model(dir);
    FAIL() << "loaded an inconsistent quantized layer";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::FileFormat) << e.what();
    EXPECT_NE(std::string(e.what()).find("gate_proj"), std::string::npos) << e.what();
  }
}

// A quantized model computes exactly what the same model with its weights dequantized to
// float32 computes: the packed kernels add no error of their own.
TEST_F(QuantizedModel, EqualsTheDequantizedDenseModel) {
  MoxinVLM model = load_model(tiny_);
  model.quantize(64, 4);
  MoxinVLM dense = load_model(tiny_);
  dense.quantize(64, 4);
  auto densify = [](Linear& l) {
    if (!l.quantized) return;
    l.weight = dequantize(*l.quantized);
    l.quantized.reset();
  };
  for (auto& layer : dense.layers)
    for (Linear* l : {&layer.self_attn.q_proj, &layer.self_attn.k_proj, &layer.self_attn.v_proj,
                      &layer.self_attn.o_proj, &layer.mlp.gate_proj, &layer.mlp.up_proj,
                      &layer.mlp.down_proj})
      densify(*l);
  densify(dense.lm_head);
  const auto diff = test::compare(logits(model), logits(dense));
  std::printf("4-bit kernels vs dequantized float32 weights: %s\n", diff.to_string().c_str());
  EXPECT_LE(diff.max_rel, 1e-4);
}

// How far 8- and 4-bit logits move from the checkpoint's own precision. The figures are
// reported (bench/NOTES.md); the bounds only catch a broken quantizer, since random tiny
// models with sharpened attention are far more fragile than trained ones.
TEST_F(QuantizedModel, AccuracyAgainstStoredPrecision) {
  MoxinVLM dense = load_model(tiny_);
  const Tensor reference = logits(dense);
  const int64_t V = reference.dim(2), L = reference.dim(1);
  for (int bits : {8, 4}) {
    MoxinVLM model = load_model(tiny_);
    model.quantize(64, bits);
    const Tensor q = logits(model);
    int64_t agree = 0;
    double kl_sum = 0;
    for (int64_t t = 0; t < L; ++t) {
      const float* p = reference.data<float>() + t * V;
      const float* r = q.data<float>() + t * V;
      agree += std::max_element(p, p + V) - p == std::max_element(r, r + V) - r;
      const double mp = *std::max_element(p, p + V), mr = *std::max_element(r, r + V);
      double zp = 0, zr = 0;
      for (int64_t v = 0; v < V; ++v) {
        zp += std::exp(p[v] - mp);
        zr += std::exp(r[v] - mr);
      }
      for (int64_t v = 0; v < V; ++v) {
        const double lp = p[v] - mp - std::log(zp), lr = r[v] - mr - std::log(zr);
        kl_sum += std::exp(lp) * (lp - lr);
      }
    }
    const double top1 = double(agree) / double(L), kl = kl_sum / double(L);
    const auto diff = test::compare(q, reference);
    std::printf("[tiny-hf] %d-bit g64 vs bf16: top-1 agreement %.4f, mean KL %.3g, cosine %.6f\n",
                bits, top1, kl, diff.cosine);
    EXPECT_GE(diff.cosine, bits == 8 ? 0.999 : 0.9);
    EXPECT_GE(top1, bits == 8 ? 0.9 : 0.4);
  }
}

}  // namespace
}  // namespace moxin
