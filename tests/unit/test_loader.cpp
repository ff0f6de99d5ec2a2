// load_model on the generated tiny checkpoints, and on copies of them broken in every way a
// downloaded checkpoint can be broken: each must fail with the right error kind and a message
// that names the culprit.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "moxin/errors.h"
#include "moxin/image.h"
#include "moxin/model.h"
#include "test_support.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;

class Loader : public ::testing::Test {
 protected:
  void SetUp() override {
    tiny_hf_ = test::checkpoint_dir("tiny-hf");
    tiny_native_ = test::checkpoint_dir("tiny-native");
    ASSERT_FALSE(tiny_hf_.empty() || tiny_native_.empty())
        << "test checkpoints not generated: run scripts/make_test_checkpoints.sh";
    scratch_ = test::scratch_dir("moxin-loader");
  }
  void TearDown() override { fs::remove_all(scratch_); }

  // A copy of `source` to break.
  fs::path copy_of(const fs::path& source) {
    fs::copy(source, scratch_, fs::copy_options::recursive);
    return scratch_;
  }

  static nlohmann::json read_json(const fs::path& file) {
    std::ifstream in(file);
    return nlohmann::json::parse(in);
  }
  static void write_text(const fs::path& file, const std::string& text) {
    std::ofstream(file, std::ios::trunc) << text;
  }

  // Rewrites dir/model.safetensors through `edit`.
  template <class Edit>
  static void rewrite_weights(const fs::path& dir, Edit edit) {
    const fs::path file = dir / "model.safetensors";
    WeightMap edited;
    {
      const WeightMap original = load_safetensors(file);
      for (const auto& name : original.names()) edited.insert(name, original.get(name).clone());
    }
    edit(edited);
    save_safetensors(file, edited);
  }

  template <class Fn>
  static Error expect_error(Fn fn, ErrorKind kind, const std::string& mentions) {
    try {
      fn();
    } catch (const Error& e) {
      EXPECT_EQ(error_kind_name(e.kind()), std::string(error_kind_name(kind))) << e.what();
      EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos)
          << "message '" << e.what() << "' does not mention '" << mentions << "'";
      return e;
    }
    ADD_FAILURE() << "no error thrown; expected one mentioning " << mentions;
    return Error(kind, "");
  }

  fs::path tiny_hf_, tiny_native_, scratch_;
};

TEST_F(Loader, ReadsTheHfLayout) {
  const MoxinVLM model = load_model(tiny_hf_);
  EXPECT_EQ(model.layout.dino_prefix, "vision_backbone.featurizer.");
  EXPECT_EQ(model.layout.siglip_prefix, "vision_backbone.fused_featurizer.");
  EXPECT_EQ(model.layout.decoder_prefix, "language_model.");
  EXPECT_EQ(model.layout.projector_naming, "fc1/fc2/fc3");
  EXPECT_EQ(model.layout.attention_naming, "fused qkv");
  EXPECT_FALSE(model.layout.tied_embeddings);
  EXPECT_EQ(model.dino.config.num_registers, 4);
  EXPECT_TRUE(model.dino.config.has_cls_token);
  EXPECT_FALSE(model.siglip.config.has_cls_token);
  // SigLIP's attention-pooling head is in the file but not in the VLM.
  ASSERT_FALSE(model.layout.ignored.empty());
  for (const auto& name : model.layout.ignored)
    EXPECT_NE(name.find("attn_pool"), std::string::npos) << name;
}

TEST_F(Loader, ReadsTheNativeLayout) {
  const MoxinVLM model = load_model(tiny_native_);
  EXPECT_EQ(model.layout.dino_prefix, "vision_backbone.featurizer.0.");
  EXPECT_EQ(model.layout.siglip_prefix, "vision_backbone.featurizer.1.");
  EXPECT_EQ(model.layout.decoder_prefix, "llm_backbone.llm.");
  EXPECT_EQ(model.layout.projector_naming, "0/2/4");
  EXPECT_EQ(model.layout.attention_naming, "split q/k/v");
  EXPECT_EQ(model.layout.layer_scale_naming, "gamma");
  EXPECT_TRUE(model.layout.sharded);
  EXPECT_TRUE(model.layout.tied_embeddings);
}

TEST_F(Loader, MissingWeightIsNamed) {
  const fs::path dir = copy_of(tiny_hf_);
  const std::string name = "language_model.model.layers.1.mlp.up_proj.weight";
  rewrite_weights(dir, [&](WeightMap& w) { w.erase(name); });
  try {
    load_model(dir);
    FAIL() << "loaded without " << name;
  } catch (const MissingWeightError& e) {
    EXPECT_EQ(e.name(), name);
  }
}

TEST_F(Loader, WrongWeightShapeIsNamed) {
  const fs::path dir = copy_of(tiny_hf_);
  const std::string name = "vision_backbone.fused_featurizer.blocks.1.mlp.fc2.weight";
  rewrite_weights(dir, [&](WeightMap& w) {
    const Tensor t = w.get(name);
    w.erase(name);
    w.insert(name, Tensor::zeros({t.dim(0), t.dim(1) - 1}, t.dtype()));
  });
  expect_error([&] { load_model(dir); }, ErrorKind::FileFormat, name);
}

TEST_F(Loader, NonsenseConfigValuesAreRefused) {
  const fs::path dir = copy_of(tiny_hf_);
  const auto original = read_json(dir / "config.json");
  const std::pair<const char*, nlohmann::json> cases[] = {
      {"num_attention_heads", 0},  {"num_key_value_heads", 3}, {"hidden_size", -64},
      {"rms_norm_eps", 0.0},       {"vocab_size", "many"},     {"num_hidden_layers", 1e12},
  };
  for (const auto& [field, value] : cases) {
    auto config = original;
    config["text_config"][field] = value;
    write_text(dir / "config.json", config.dump());
    expect_error([&] { load_model(dir); }, ErrorKind::InvalidConfig, field);
  }
}

TEST_F(Loader, ConfigContradictingTheWeightsIsRefused) {
  const fs::path dir = copy_of(tiny_hf_);
  auto config = read_json(dir / "config.json");
  config["text_config"]["intermediate_size"] = config["text_config"]["intermediate_size"].get<int>() * 2;
  write_text(dir / "config.json", config.dump());
  expect_error([&] { load_model(dir); }, ErrorKind::FileFormat, "mlp.gate_proj.weight");
}

TEST_F(Loader, BrokenConfigJson) {
  const fs::path dir = copy_of(tiny_hf_);
  write_text(dir / "config.json", "{\"text_config\": {\"hidden_size\": 64,");
  expect_error([&] { load_model(dir); }, ErrorKind::Json, "config.json");
  write_text(dir / "config.json", "[1, 2]");
  expect_error([&] { load_model(dir); }, ErrorKind::Json, "config.json");
}

TEST_F(Loader, MissingShardIsNamed) {
  const fs::path dir = copy_of(tiny_native_);
  const auto index = read_json(dir / "model.safetensors.index.json");
  const std::string shard = index["weight_map"].begin().value().get<std::string>();
  fs::remove(dir / shard);
  expect_error([&] { load_model(dir); }, ErrorKind::Io, shard);
}

TEST_F(Loader, BrokenIndex) {
  const fs::path dir = copy_of(tiny_native_);
  write_text(dir / "model.safetensors.index.json", "{\"weight_map\": 7}");
  EXPECT_THROW(load_model(dir), Error);
}

TEST_F(Loader, NotAModelDirectory) {
  expect_error([&] { load_model(scratch_ / "nowhere"); }, ErrorKind::Io, "nowhere");
  fs::create_directories(scratch_);
  expect_error([&] { load_model(scratch_); }, ErrorKind::Io, scratch_.string());
}

TEST_F(Loader, BadRequestsAreRefusedWithoutHarm) {
  MoxinVLM model = load_model(tiny_hf_);
  const Tensor good = Tensor::zeros({1, 224, 224, 3});
  Tensor ids = Tensor::empty({1, 3}, DType::I32);
  ids.data_mut<int32_t>()[0] = 1;
  ids.data_mut<int32_t>()[1] = 5;
  ids.data_mut<int32_t>()[2] = int32_t(model.config.text_config.vocab_size);  // one past the end
  KVCacheList cache;
  expect_error([&] { model.forward(good, good, ids, cache); }, ErrorKind::Request, "vocabulary");
  ids.data_mut<int32_t>()[2] = 7;
  cache.clear();
  expect_error([&] { model.forward(Tensor::zeros({1, 100, 100, 3}), good, ids, cache); },
               ErrorKind::Request, "224");
  cache.clear();
  expect_error([&] { model.forward(good, good, Tensor::empty({1, 0}, DType::I32), cache); },
               ErrorKind::Request, "input_ids");
  cache.clear();
  expect_error([&] { model.forward(good, good, Tensor::zeros({1, 3}), cache); },
               ErrorKind::Request, "I32");
  // After all that the model still answers.
  cache.clear();
  const Tensor logits = model.forward(good, good, ids, cache, 1);
  EXPECT_EQ(logits.dim(2), model.config.text_config.vocab_size);
}

}  // namespace
}  // namespace moxin
