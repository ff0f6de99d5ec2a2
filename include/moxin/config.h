// Model configurations. Defaults are the original crate's (Moxin-7B); load_config reads the
// Prismatic HF `config.json` and falls back to these where a key is absent.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace moxin {

struct MistralConfig {
  int64_t hidden_size = 4096;
  int64_t num_hidden_layers = 36;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 8;
  int64_t intermediate_size = 14336;
  int64_t vocab_size = 32064;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  bool tie_word_embeddings = false;
  int64_t head_dim = 0;                      // 0: hidden_size / num_attention_heads
  int64_t max_position_embeddings = 32768;
  int64_t sliding_window = 4096;             // 0: full causal attention at every length

  int64_t resolved_head_dim() const { return head_dim ? head_dim : hidden_size / num_attention_heads; }
  // Throws InvalidConfigError naming the first field that is nonsensical.
  void validate() const;
};

// A Vision Transformer tower as timm builds it (pre-norm blocks, LayerNorm eps 1e-6, exact GELU).
struct ViTConfig {
  int64_t embed_dim = 1024;
  int64_t depth = 24;
  int64_t num_heads = 16;
  int64_t mlp_hidden_dim = 4096;
  int64_t patch_size = 14;
  int64_t image_size = 224;
  bool has_cls_token = true;
  int64_t num_registers = 4;
  bool has_layer_scale = true;
  float norm_eps = 1e-6f;

  static ViTConfig dinov2_large();   // ViT-L/14 with 4 registers and LayerScale
  static ViTConfig siglip_so400m();  // ViT-SO400M/14, no prefix tokens, no LayerScale

  int64_t head_dim() const { return embed_dim / num_heads; }
  int64_t grid_size() const { return image_size / patch_size; }
  int64_t num_patches() const { return grid_size() * grid_size(); }
  int64_t num_prefix_tokens() const { return (has_cls_token ? 1 : 0) + num_registers; }
  // The reference takes the output of this block (the second to last), before the final norm.
  int64_t feature_block() const { return depth - 2; }
  void validate(const std::string& name) const;
};

// MLX affine quantization of the decoder's linear layers: config.json's "quantization" block.
struct QuantizationInfo {
  int group_size = 64;
  int bits = 4;
};

struct VLMConfig {
  MistralConfig text_config;
  std::array<int64_t, 2> image_sizes = {224, 224};
  int64_t image_token_index = 32000;
  int64_t pad_token_id = 32000;
  std::vector<std::string> timm_model_ids;
  // Present when the checkpoint's (or the model's, after quantize()) linear layers are packed.
  std::optional<QuantizationInfo> quantization;

  // Parses config.json text; `source` names the file in errors (Json / InvalidConfig).
  static VLMConfig parse(const std::string& json_text, const std::string& source = "config.json");
  static VLMConfig load(const std::filesystem::path& file);
  void validate() const;
};

}  // namespace moxin
