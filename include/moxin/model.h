// The Moxin-VLM model: two ViT towers, the fused MLP projector and the Mistral decoder, as
// structs that mirror the reference's module tree and weight names.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moxin/config.h"
#include "moxin/kv_cache.h"
#include "moxin/tensor.h"
#include "moxin/weights.h"

namespace moxin {

struct QuantizedTensor;  // moxin/quantize.h

// y = x W^T + b. `weight` [out, in] stays in its stored dtype; when `quantized` is set it holds
// the MLX-packed form instead and `weight` is empty.
struct Linear {
  Tensor weight;
  Tensor bias;  // [out], or undefined
  std::shared_ptr<const QuantizedTensor> quantized;

  int64_t in_features() const;
  int64_t out_features() const;
};

struct LayerNorm {
  Tensor weight;
  Tensor bias;
  float eps = 1e-6f;
};

struct RMSNorm {
  Tensor weight;
  float eps = 1e-5f;
};

// ---------------------------------------------------------------------------------------------
// Vision towers

struct ViTAttention {
  Linear qkv;   // [3 * D, D], rows ordered q, k, v (split checkpoints are fused at load)
  Linear proj;  // [D, D]
};

struct ViTMlp {
  Linear fc1;
  Linear fc2;
};

struct ViTBlock {
  LayerNorm norm1;
  ViTAttention attn;
  Tensor ls1;  // LayerScale [D], undefined without LayerScale
  LayerNorm norm2;
  ViTMlp mlp;
  Tensor ls2;
};

class ViTEncoder {
 public:
  ViTConfig config;
  Linear patch_embed;  // the 14x14 stride-14 conv as a linear map over (c, kh, kw) patch pixels
  Tensor cls_token;    // [1, 1, D] or undefined
  Tensor reg_token;    // [1, R, D] or undefined
  Tensor pos_embed;    // [1, num_patches, D], added to patches before prefix tokens are prepended
  std::vector<ViTBlock> blocks;
  LayerNorm norm;  // loaded for completeness; the reference's features skip it

  // images [B, H, W, 3] float32, normalised -> patch features [B, num_patches, D], the output
  // of block depth-2 with prefix tokens dropped.
  Tensor forward(const Tensor& images) const;
  void quantize(int group_size, int bits);
};

// Reads a tower under `prefix` (e.g. "vision_backbone.featurizer."), accepting timm's names and
// the converted variants (split q/k/v + out_proj, gamma or scale_factor, reg_token or
// register_tokens). Shapes are checked against `config`.
ViTEncoder load_vit_encoder(const WeightMap& weights, const std::string& prefix,
                            const ViTConfig& config);

// The tower configuration a checkpoint holds under `prefix`: the family's fixed facts from
// `family` (dinov2_large() or siglip_so400m()) with width, depth, MLP width and register count
// read from the weights, heads = width / the family's head_dim.
ViTConfig infer_vit_config(const WeightMap& weights, const std::string& prefix,
                           const ViTConfig& family, int64_t image_size);

// ---------------------------------------------------------------------------------------------
// Projector

class FusedMLPProjector {
 public:
  Linear fc1;  // 2176 -> 8704
  Linear fc2;  // 8704 -> 4096
  Linear fc3;  // 4096 -> 4096

  // features [B, N, in] -> [B, N, out]: fc1, GELU, fc2, GELU, fc3 (exact erf GELU).
  Tensor forward(const Tensor& features) const;
  void quantize(int group_size, int bits);
};

// Reads fc1/fc2/fc3 (or Prismatic's 0/2/4) under `prefix` (e.g. "projector.").
FusedMLPProjector load_projector(const WeightMap& weights, const std::string& prefix);

// ---------------------------------------------------------------------------------------------
// Decoder

struct MistralAttention {
  Linear q_proj;
  Linear k_proj;
  Linear v_proj;
  Linear o_proj;
};

struct MistralMlp {
  Linear gate_proj;
  Linear up_proj;
  Linear down_proj;
};

struct DecoderLayer {
  RMSNorm input_layernorm;
  MistralAttention self_attn;
  RMSNorm post_attention_layernorm;
  MistralMlp mlp;
};

// What load_model found, for `moxin-vlm inspect` and diagnostics.
struct CheckpointLayout {
  std::filesystem::path directory;
  std::vector<std::string> files;  // safetensors files read
  bool sharded = false;
  bool config_found = false;
  std::string dino_prefix, siglip_prefix, projector_prefix, decoder_prefix;
  std::string projector_naming;    // "fc1/fc2/fc3" or "0/2/4"
  std::string attention_naming;    // "fused qkv" or "split q/k/v"
  std::string layer_scale_naming;  // "scale_factor" or "gamma"
  bool tied_embeddings = false;
  std::map<std::string, int64_t> parameters_by_dtype;  // "BF16" -> count
  std::vector<std::string> ignored;                    // tensors present but not used by the VLM
};

class MoxinVLM {
 public:
  ViTEncoder dino;
  ViTEncoder siglip;
  FusedMLPProjector projector;
  Tensor embed_tokens;  // [vocab, hidden]
  std::vector<DecoderLayer> layers;
  RMSNorm norm;
  Linear lm_head;  // shares embed_tokens when embeddings are tied
  VLMConfig config;
  CheckpointLayout layout;

  // Full pass: encode the image, build [embed(BOS), visual x num_patches, embed(ids[1:])] and
  // run the decoder over it. dino_image / siglip_image [B, H, W, 3] (normalize_dino /
  // normalize_siglip), input_ids [B, L] (I32 or I64) starting with BOS. Returns logits
  // [B, last_n, vocab] for the last `last_n` positions of the fused sequence (all when < 0).
  Tensor forward(const Tensor& dino_image, const Tensor& siglip_image, const Tensor& input_ids,
                 KVCacheList& cache, int64_t last_n = -1);

  // A batch of prompts of different lengths, right-padded: input_ids [B, L] where sequence b's
  // prompt is its first lengths[b] ids (1 <= lengths[b] <= L; the padding ids after them must
  // be valid token ids, 0 will do, and never affect the results). Each sequence has its own
  // image. Returns logits [B, 1, vocab] at each sequence's last prompt token. The caches then
  // hold each sequence at its own offset (KeyValueCache::offsets()), which decode_token
  // continues from. Equal lengths behave exactly as forward() with last_n = 1.
  Tensor forward(const Tensor& dino_image, const Tensor& siglip_image, const Tensor& input_ids,
                 const std::vector<int64_t>& lengths, KVCacheList& cache);

  // One text token per sequence, token [B] or [B, 1], attending over the cache; each sequence
  // at its own position when the cache holds a ragged batch. Returns logits [B, 1, vocab].
  Tensor decode_token(const Tensor& token, KVCacheList& cache);

  // Stages, exposed for parity tests and for reusing an image's encoding.
  Tensor encode_image(const Tensor& dino_image,
                      const Tensor& siglip_image) const;  // [B, N, hidden]
  Tensor embed(const Tensor& input_ids) const;            // [B, L, hidden]
  // Runs the decoder on embeddings [B, L, hidden] at positions cache offset.. and returns logits
  // for the last `last_n` positions (all when < 0).
  Tensor forward_embeddings(const Tensor& embeddings, KVCacheList& cache, int64_t last_n = -1);

  // Quantizes the decoder's linear layers and lm_head (MLX affine, on the CPU, before moving to
  // a GPU); towers and projector stay in their stored dtype, as the original crate does.
  // Layers whose input width does not divide by group_size stay dense, with a line on stderr.
  void quantize(int group_size, int bits);

  KVCacheList make_cache() const { return make_kv_caches(int64_t(layers.size())); }

  // Moves every weight to `device` (bf16 and packed weights keep their dtype). Inputs given to
  // forward() may live anywhere; they are moved to the model's device.
  void to_device(Device device);
  Device device() const { return embed_tokens.device(); }

 private:
  // The image encoder as recorded on the GPU (ops::run_recorded): made by encode_image, redone
  // when any of the encoder's weights changes, dropped when the model moves.
  mutable std::shared_ptr<void> recorded_encoder_;
};

struct LoadOptions {
  Device device = Device::CPU;
};

// Writes `model` to `dir` as config.json + model.safetensors in the HF-converted layout, with
// quantized layers as mlx-lm stores them and a "quantization" block in config.json; load_model
// reads it back to identical tensors. Tokenizer files are the caller's to copy.
void save_model(const MoxinVLM& model, const std::filesystem::path& dir);

// Loads a model directory: config.json (defaults where absent) and model.safetensors or the
// shards of model.safetensors.index.json, in any of the layouts REFERENCE.md lists.
MoxinVLM load_model(const std::filesystem::path& dir, const LoadOptions& options = {});

}  // namespace moxin
