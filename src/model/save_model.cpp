// Writing a model back as a checkpoint in the HF-converted layout, quantized layers in mlx-lm's
// naming (<layer>.weight U32, .scales, .biases), so load_model reads it back bit for bit.
#include <fstream>
#include <nlohmann/json.hpp>

#include "moxin/errors.h"
#include "moxin/model.h"
#include "moxin/quantize.h"

namespace moxin {

namespace {

class CheckpointWriter {
 public:
  // Small float vectors were widened to float32 at load; they go back in the model's own
  // float dtype, which is exact for values that came from it.
  explicit CheckpointWriter(DType float_dtype) : float_dtype_(float_dtype) {}

  void tensor(const std::string& name, const Tensor& t) {
    if (!t.defined()) return;
    const Tensor host = t.to_device(Device::CPU);
    weights_.insert(name, host.dtype() == DType::F32 && float_dtype_ != DType::F32 &&
                                  host.numel() <= kSmallVector
                              ? host.to(float_dtype_)
                              : host);
  }

  void linear(const std::string& prefix, const Linear& l) {
    if (l.quantized) {
      tensor(prefix + "weight", l.quantized->weight);
      tensor(prefix + "scales", l.quantized->scales);
      tensor(prefix + "biases", l.quantized->biases);
    } else {
      tensor(prefix + "weight", l.weight);
    }
    tensor(prefix + "bias", l.bias);
  }

  void norm(const std::string& prefix, const LayerNorm& n) {
    tensor(prefix + "weight", n.weight);
    tensor(prefix + "bias", n.bias);
  }

  void tower(const std::string& p, const ViTEncoder& enc) {
    const ViTConfig& c = enc.config;
    Linear patch = enc.patch_embed;
    if (!patch.quantized)
      patch.weight = patch.weight.reshape({c.embed_dim, 3, c.patch_size, c.patch_size});
    linear(p + "patch_embed.proj.", patch);
    tensor(p + "cls_token", enc.cls_token);
    tensor(p + "reg_token", enc.reg_token);
    tensor(p + "pos_embed", enc.pos_embed);
    for (size_t i = 0; i < enc.blocks.size(); ++i) {
      const ViTBlock& b = enc.blocks[i];
      const std::string q = p + "blocks." + std::to_string(i) + ".";
      norm(q + "norm1.", b.norm1);
      linear(q + "attn.qkv.", b.attn.qkv);
      linear(q + "attn.proj.", b.attn.proj);
      tensor(q + "ls1.scale_factor", b.ls1);
      norm(q + "norm2.", b.norm2);
      linear(q + "mlp.fc1.", b.mlp.fc1);
      linear(q + "mlp.fc2.", b.mlp.fc2);
      tensor(q + "ls2.scale_factor", b.ls2);
    }
    norm(p + "norm.", enc.norm);
  }

  const WeightMap& weights() const { return weights_; }

 private:
  static constexpr int64_t kSmallVector = 1 << 20;
  DType float_dtype_;
  WeightMap weights_;
};

nlohmann::json config_json(const MoxinVLM& model) {
  nlohmann::json j;
  const auto original = model.layout.directory / "config.json";
  if (model.layout.config_found) {
    // Keep every key the original had (architectures, ids, processor settings).
    std::ifstream in(original);
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception&) {
      j = nlohmann::json::object();
    }
  }
  const MistralConfig& t = model.config.text_config;
  j["text_config"]["hidden_size"] = t.hidden_size;
  j["text_config"]["num_hidden_layers"] = t.num_hidden_layers;
  j["text_config"]["num_attention_heads"] = t.num_attention_heads;
  j["text_config"]["num_key_value_heads"] = t.num_key_value_heads;
  j["text_config"]["intermediate_size"] = t.intermediate_size;
  j["text_config"]["vocab_size"] = t.vocab_size;
  j["text_config"]["rms_norm_eps"] = t.rms_norm_eps;
  j["text_config"]["rope_theta"] = t.rope_theta;
  j["text_config"]["max_position_embeddings"] = t.max_position_embeddings;
  j["text_config"]["sliding_window"] = t.sliding_window;
  if (t.head_dim) j["text_config"]["head_dim"] = t.head_dim;
  // A separately stored (e.g. quantized) head is not tied to the embedding any more.
  const bool shares = model.lm_head.weight.defined() && model.lm_head.weight.raw() == model.embed_tokens.raw();
  j["text_config"]["tie_word_embeddings"] = shares;
  j["text_config"].erase("rope_parameters");
  j["image_sizes"] = {model.config.image_sizes[0], model.config.image_sizes[1]};
  if (!j.contains("architectures")) j["architectures"] = {"PrismaticForConditionalGeneration"};
  if (!j.contains("model_type")) j["model_type"] = "prismatic";
  if (model.config.quantization) {
    j["quantization"] = {{"group_size", model.config.quantization->group_size},
                         {"bits", model.config.quantization->bits}};
  } else {
    j.erase("quantization");
  }
  return j;
}

}  // namespace

void save_model(const MoxinVLM& model, const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw_error(ErrorKind::Io, dir.string() + ": cannot create: " + ec.message());
  if (std::filesystem::equivalent(dir, model.layout.directory, ec))
    throw_error(ErrorKind::Request, "refusing to overwrite the checkpoint the model was loaded from");

  CheckpointWriter w(model.embed_tokens.dtype());
  w.tower("vision_backbone.featurizer.", model.dino);
  w.tower("vision_backbone.fused_featurizer.", model.siglip);
  w.linear("projector.fc1.", model.projector.fc1);
  w.linear("projector.fc2.", model.projector.fc2);
  w.linear("projector.fc3.", model.projector.fc3);
  const std::string d = "language_model.";
  w.tensor(d + "model.embed_tokens.weight", model.embed_tokens);
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const DecoderLayer& l = model.layers[i];
    const std::string p = d + "model.layers." + std::to_string(i) + ".";
    w.tensor(p + "input_layernorm.weight", l.input_layernorm.weight);
    w.tensor(p + "post_attention_layernorm.weight", l.post_attention_layernorm.weight);
    w.linear(p + "self_attn.q_proj.", l.self_attn.q_proj);
    w.linear(p + "self_attn.k_proj.", l.self_attn.k_proj);
    w.linear(p + "self_attn.v_proj.", l.self_attn.v_proj);
    w.linear(p + "self_attn.o_proj.", l.self_attn.o_proj);
    w.linear(p + "mlp.gate_proj.", l.mlp.gate_proj);
    w.linear(p + "mlp.up_proj.", l.mlp.up_proj);
    w.linear(p + "mlp.down_proj.", l.mlp.down_proj);
  }
  w.tensor(d + "model.norm.weight", model.norm.weight);
  if (!(model.lm_head.weight.defined() && model.lm_head.weight.raw() == model.embed_tokens.raw()))
    w.linear(d + "lm_head.", model.lm_head);

  save_safetensors(dir / "model.safetensors", w.weights(), {{"format", "pt"}});
  const auto config_file = dir / "config.json";
  std::ofstream out(config_file, std::ios::trunc);
  out << config_json(model).dump(2) << "\n";
  if (!out) throw_error(ErrorKind::Io, config_file.string() + ": write failed");
}

}  // namespace moxin
