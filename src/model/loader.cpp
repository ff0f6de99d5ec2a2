// load_model: a checkpoint directory in any of the layouts REFERENCE.md lists, resolved into
// one model. Constant weight transforms (q/k/v fusion, patch-conv flattening, widening of small
// vectors) happen here, once; large matrices stay memory-mapped in their stored dtype.
#include <string>

#include "core/device.h"
#include "model/weight_lookup.h"
#include "moxin/errors.h"
#include "moxin/model.h"
#include "ops/ops.h"

namespace moxin {

namespace {

// The first prefix under which `probe` exists, or "".
std::string find_prefix(const WeightMap& weights, std::initializer_list<std::string> prefixes,
                        const std::string& probe) {
  for (const auto& prefix : prefixes)
    if (weights.contains(prefix + probe)) return prefix;
  return "";
}

DecoderLayer load_decoder_layer(const WeightMap& weights, const std::string& p,
                                const MistralConfig& c) {
  const int64_t H = c.hidden_size, Dh = c.resolved_head_dim(), I = c.intermediate_size;
  const int64_t q_out = c.num_attention_heads * Dh, kv_out = c.num_key_value_heads * Dh;
  DecoderLayer layer;
  layer.input_layernorm = {expect_vector_f32(weights, p + "input_layernorm.weight", H), c.rms_norm_eps};
  layer.post_attention_layernorm = {
      expect_vector_f32(weights, p + "post_attention_layernorm.weight", H), c.rms_norm_eps};
  layer.self_attn.q_proj = expect_linear(weights, p + "self_attn.q_proj.", q_out, H, false);
  layer.self_attn.k_proj = expect_linear(weights, p + "self_attn.k_proj.", kv_out, H, false);
  layer.self_attn.v_proj = expect_linear(weights, p + "self_attn.v_proj.", kv_out, H, false);
  layer.self_attn.o_proj = expect_linear(weights, p + "self_attn.o_proj.", H, q_out, false);
  layer.mlp.gate_proj = expect_linear(weights, p + "mlp.gate_proj.", I, H, false);
  layer.mlp.up_proj = expect_linear(weights, p + "mlp.up_proj.", I, H, false);
  layer.mlp.down_proj = expect_linear(weights, p + "mlp.down_proj.", H, I, false);
  return layer;
}

}  // namespace

MoxinVLM load_model(const std::filesystem::path& dir, const LoadOptions& options) {
  // Fail before reading gigabytes when the device cannot be used at all.
  device::require(options.device);
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    throw_error(ErrorKind::Io, dir.string() + ": not a model directory");

  MoxinVLM model;
  CheckpointLayout& layout = model.layout;
  layout.directory = dir;
  const auto config_file = dir / "config.json";
  layout.config_found = std::filesystem::exists(config_file, ec);
  model.config = layout.config_found ? VLMConfig::load(config_file) : VLMConfig{};
  const MistralConfig& tc = model.config.text_config;

  const WeightMap weights = load_safetensors_dir(dir);
  layout.sharded = std::filesystem::exists(dir / "model.safetensors.index.json", ec);
  {
    std::set<std::string> files;
    for (const auto& name : weights.names()) files.insert(weights.source(name));
    layout.files.assign(files.begin(), files.end());
  }

  WeightUseRecorder recorder;

  // Vision towers: HF-converted names, or the fused backbone's numbered featurizers.
  const std::string probe = "patch_embed.proj.weight";
  layout.dino_prefix = find_prefix(
      weights, {"vision_backbone.featurizer.", "vision_backbone.featurizer.0."}, probe);
  layout.siglip_prefix = find_prefix(
      weights, {"vision_backbone.fused_featurizer.", "vision_backbone.featurizer.1."}, probe);
  if (layout.dino_prefix.empty()) throw MissingWeightError("vision_backbone.featurizer." + probe);
  if (layout.siglip_prefix.empty())
    throw MissingWeightError("vision_backbone.fused_featurizer." + probe);
  const int64_t image_size = model.config.image_sizes[0];
  model.dino = load_vit_encoder(
      weights, layout.dino_prefix,
      infer_vit_config(weights, layout.dino_prefix, ViTConfig::dinov2_large(), image_size));
  model.siglip = load_vit_encoder(
      weights, layout.siglip_prefix,
      infer_vit_config(weights, layout.siglip_prefix, ViTConfig::siglip_so400m(), image_size));
  if (model.dino.config.num_patches() != model.siglip.config.num_patches())
    throw InvalidConfigError("vision_backbone", "the towers' patch grids differ");
  const std::string block0 = layout.dino_prefix + "blocks.0.";
  layout.attention_naming = weights.contains(block0 + "attn.qkv.weight") ? "fused qkv" : "split q/k/v";
  layout.layer_scale_naming = weights.contains(block0 + "ls1.gamma") ? "gamma" : "scale_factor";

  layout.projector_prefix = "projector.";
  model.projector = load_projector(weights, layout.projector_prefix);
  layout.projector_naming = weights.contains("projector.fc1.weight") ? "fc1/fc2/fc3" : "0/2/4";
  const int64_t vision_dim = model.dino.config.embed_dim + model.siglip.config.embed_dim;
  if (model.projector.fc1.in_features() != vision_dim)
    throw_error(ErrorKind::FileFormat, "projector fc1 takes " +
                                           std::to_string(model.projector.fc1.in_features()) +
                                           " features but the towers give " +
                                           std::to_string(vision_dim));
  if (model.projector.fc3.out_features() != tc.hidden_size)
    throw_error(ErrorKind::FileFormat, "projector outputs " +
                                           std::to_string(model.projector.fc3.out_features()) +
                                           " features but the decoder's hidden size is " +
                                           std::to_string(tc.hidden_size));

  // Decoder: HF-converted `language_model.` or Prismatic's `llm_backbone.llm.`.
  const std::string d = find_prefix(weights, {"language_model.", "llm_backbone.llm."},
                                    "model.embed_tokens.weight");
  if (d.empty()) throw MissingWeightError("language_model.model.embed_tokens.weight");
  layout.decoder_prefix = d;
  model.embed_tokens =
      expect_tensor(weights, d + "model.embed_tokens.weight", {tc.vocab_size, tc.hidden_size});
  for (int64_t i = 0; i < tc.num_hidden_layers; ++i)
    model.layers.push_back(
        load_decoder_layer(weights, d + "model.layers." + std::to_string(i) + ".", tc));
  model.norm = {expect_vector_f32(weights, d + "model.norm.weight", tc.hidden_size), tc.rms_norm_eps};
  const bool has_head =
      weights.contains(d + "lm_head.weight") || weights.contains(d + "lm_head.scales");
  layout.tied_embeddings = tc.tie_word_embeddings || !has_head;
  if (layout.tied_embeddings) {
    model.lm_head.weight = model.embed_tokens;
  } else {
    model.lm_head = expect_linear(weights, d + "lm_head.", tc.vocab_size, tc.hidden_size, false);
  }

  for (const auto& name : weights.names()) {
    if (recorder.used().count(name)) {
      const Tensor& t = weights.get(name);
      layout.parameters_by_dtype[std::string(dtype_name(t.dtype()))] += t.numel();
    } else {
      layout.ignored.push_back(name);
    }
  }
  model.to_device(options.device);
  return model;
}

}  // namespace moxin
