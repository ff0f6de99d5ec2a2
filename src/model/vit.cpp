// The vision towers: timm's VisionTransformer as Prismatic runs it (features from block
// depth-2, no final norm, prefix tokens dropped).
#include <algorithm>
#include <cstring>
#include <string>

#include "model/weight_lookup.h"
#include "moxin/errors.h"
#include "moxin/model.h"
#include "ops/ops.h"

namespace moxin {

namespace {

// x = x + ls(y), LayerScale when present.
void residual(Tensor& x, const Tensor& y, const Tensor& layer_scale) {
  if (layer_scale.defined()) {
    ops::add_scaled_inplace(x, y, layer_scale);
  } else {
    ops::add_inplace(x, y);
  }
}

Tensor block_forward(const ViTBlock& block, const Tensor& x_in, int64_t heads) {
  Tensor x = x_in;  // [B, T, D]
  const Tensor qkv = ops::layer_norm_linear(x, block.norm1, block.attn.qkv);
  residual(x, ops::self_attention_linear(qkv, heads, block.attn.proj), block.ls1);
  Tensor hidden = ops::layer_norm_linear(x, block.norm2, block.mlp.fc1);
  residual(x, ops::gelu_linear(hidden, block.mlp.fc2), block.ls2);
  return x;
}

}  // namespace

Tensor ViTEncoder::forward(const Tensor& images) const {
  const int64_t S = config.image_size, D = config.embed_dim, N = config.num_patches();
  if (images.ndim() != 4 || images.dim(1) != S || images.dim(2) != S || images.dim(3) != 3 ||
      images.dtype() != DType::F32)
    throw_error(ErrorKind::Request, "vision tower expects float32 images [B, " +
                                        std::to_string(S) + ", " + std::to_string(S) +
                                        ", 3], got " + shape_to_string(images.shape()));
  const int64_t B = images.dim(0);
  const int64_t prefix = config.num_prefix_tokens();

  Tensor x = ops::linear(ops::patchify(images, config.patch_size), patch_embed).reshape({B, N, D});
  // Positions are added to the patches only; cls and registers go in front afterwards.
  ops::add_inplace(x, pos_embed);
  std::vector<Tensor> sequence;
  if (config.has_cls_token) sequence.push_back(ops::repeat_batch(cls_token, B));
  if (config.num_registers > 0) sequence.push_back(ops::repeat_batch(reg_token, B));
  if (!sequence.empty()) {
    sequence.push_back(x);
    x = ops::concat(sequence, 1);  // [B, prefix + N, D]
  }

  for (int64_t i = 0; i <= config.feature_block(); ++i)
    x = block_forward(blocks[size_t(i)], x, config.num_heads);

  return ops::slice(x, 1, prefix, prefix + N);  // prefix tokens dropped
}

ViTConfig infer_vit_config(const WeightMap& weights, const std::string& prefix,
                           const ViTConfig& family, int64_t image_size) {
  ViTConfig c = family;
  const Tensor& patch = weights.get(prefix + "patch_embed.proj.weight");
  if (patch.ndim() != 4 || patch.dim(1) != 3 || patch.dim(2) != patch.dim(3))
    throw_error(ErrorKind::FileFormat, "weight " + prefix + "patch_embed.proj.weight has shape " +
                                           shape_to_string(patch.shape()) +
                                           ", expected [D, 3, P, P]");
  c.embed_dim = patch.dim(0);
  c.patch_size = patch.dim(2);
  c.image_size = image_size;
  int64_t depth = 0;
  while (weights.contains(prefix + "blocks." + std::to_string(depth) + ".norm1.weight")) ++depth;
  c.depth = depth;
  if (depth < 2)
    throw_error(ErrorKind::FileFormat, "vision tower " + prefix + " has " +
                                           std::to_string(depth) + " blocks; at least 2 needed");
  const Tensor& fc1 = weights.get(prefix + "blocks.0.mlp.fc1.weight");
  if (fc1.ndim() != 2)
    throw_error(ErrorKind::FileFormat, "weight " + prefix + "blocks.0.mlp.fc1.weight is not a matrix");
  c.mlp_hidden_dim = fc1.dim(0);
  c.has_cls_token = weights.contains(prefix + "cls_token");
  const std::string reg = first_present(weights, {prefix + "reg_token", prefix + "register_tokens"});
  const Tensor* reg_tensor = reg.empty() ? nullptr : weights.find(reg);
  c.num_registers = reg_tensor && reg_tensor->ndim() == 3 ? reg_tensor->dim(1) : 0;
  c.has_layer_scale = !first_present(weights, {prefix + "blocks.0.ls1.scale_factor",
                                               prefix + "blocks.0.ls1.gamma"})
                           .empty();
  const int64_t head_dim = family.head_dim();
  if (c.embed_dim % head_dim != 0)
    throw InvalidConfigError(prefix + "embed_dim", "width " + std::to_string(c.embed_dim) +
                                                       " is not a multiple of the family's head "
                                                       "dimension " + std::to_string(head_dim));
  c.num_heads = c.embed_dim / head_dim;
  c.validate(prefix);
  return c;
}

ViTEncoder load_vit_encoder(const WeightMap& weights, const std::string& prefix,
                            const ViTConfig& config) {
  config.validate(prefix);
  const int64_t D = config.embed_dim, P = config.patch_size, N = config.num_patches();
  ViTEncoder enc;
  enc.config = config;
  enc.patch_embed.weight =
      expect_tensor(weights, prefix + "patch_embed.proj.weight", {D, 3, P, P}).reshape({D, 3 * P * P});
  enc.patch_embed.bias = expect_vector_f32(weights, prefix + "patch_embed.proj.bias", D);
  enc.pos_embed = ops::to_f32(expect_tensor(weights, prefix + "pos_embed", {1, N, D}));
  if (config.has_cls_token)
    enc.cls_token = ops::to_f32(expect_tensor(weights, prefix + "cls_token", {1, 1, D}));
  if (config.num_registers > 0) {
    std::string reg = first_present(weights, {prefix + "reg_token", prefix + "register_tokens"});
    if (reg.empty()) throw MissingWeightError(prefix + "reg_token");
    enc.reg_token = ops::to_f32(expect_tensor(weights, reg, {1, config.num_registers, D}));
  }
  for (int64_t i = 0; i < config.depth; ++i) {
    const std::string b = prefix + "blocks." + std::to_string(i) + ".";
    ViTBlock block;
    block.norm1 = {expect_vector_f32(weights, b + "norm1.weight", D),
                   expect_vector_f32(weights, b + "norm1.bias", D), config.norm_eps};
    block.norm2 = {expect_vector_f32(weights, b + "norm2.weight", D),
                   expect_vector_f32(weights, b + "norm2.bias", D), config.norm_eps};
    if (weights.contains(b + "attn.qkv.weight") || !weights.contains(b + "attn.q_proj.weight")) {
      block.attn.qkv = expect_linear(weights, b + "attn.qkv.", 3 * D, D, true);
    } else {
      // Converted towers split q/k/v: fused once here, in the stored dtype, rows q then k then v.
      Linear q = expect_linear(weights, b + "attn.q_proj.", D, D, true);
      Linear k = expect_linear(weights, b + "attn.k_proj.", D, D, true);
      Linear v = expect_linear(weights, b + "attn.v_proj.", D, D, true);
      const DType dtype = q.weight.dtype();
      if (k.weight.dtype() != dtype || v.weight.dtype() != dtype)
        throw_error(ErrorKind::FileFormat, b + "attn q/k/v weights differ in dtype");
      Tensor fused = Tensor::empty({3 * D, D}, dtype);
      Tensor fused_bias = Tensor::empty({3 * D});
      const size_t part = q.weight.nbytes();
      char* w = static_cast<char*>(fused.raw_mut());
      float* bias = fused_bias.data_mut<float>();
      int64_t at = 0;
      for (const Linear* piece : {&q, &k, &v}) {
        std::memcpy(w + part * size_t(at), piece->weight.raw(), part);
        std::copy_n(piece->bias.data<float>(), D, bias + at * D);
        ++at;
      }
      block.attn.qkv = {fused, fused_bias, nullptr};
    }
    const std::string proj = weights.contains(b + "attn.proj.weight") ? "attn.proj." : "attn.out_proj.";
    block.attn.proj = expect_linear(weights, b + proj, D, D, true);
    block.mlp.fc1 = expect_linear(weights, b + "mlp.fc1.", config.mlp_hidden_dim, D, true);
    block.mlp.fc2 = expect_linear(weights, b + "mlp.fc2.", D, config.mlp_hidden_dim, true);
    if (config.has_layer_scale) {
      for (auto [slot, name] : {std::pair{&block.ls1, "ls1"}, std::pair{&block.ls2, "ls2"}}) {
        std::string key = first_present(weights, {b + name + ".scale_factor", b + name + ".gamma"});
        if (key.empty()) throw MissingWeightError(b + name + ".scale_factor");
        *slot = expect_vector_f32(weights, key, D);
      }
    }
    enc.blocks.push_back(std::move(block));
  }
  enc.norm = {expect_vector_f32(weights, prefix + "norm.weight", D),
              expect_vector_f32(weights, prefix + "norm.bias", D), config.norm_eps};
  return enc;
}

}  // namespace moxin
