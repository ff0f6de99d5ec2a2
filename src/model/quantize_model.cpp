// Quantizing a loaded model's linear layers into the MLX affine format (moxin/quantize.h).
#include <cstdio>

#include "moxin/errors.h"
#include "moxin/model.h"
#include "moxin/quantize.h"

namespace moxin {

namespace {

void check_options(int group_size, int bits) {
  if (!is_supported_quant_bits(bits) || bits == 1)
    throw_error(ErrorKind::Request, "quantization bits must be 2, 3, 4, 5, 6 or 8, got " +
                                        std::to_string(bits));
  if (!is_supported_quant_group_size(group_size))
    throw_error(ErrorKind::Request, "quantization group size must be 32, 64 or 128, got " +
                                        std::to_string(group_size));
}

// Quantizes `layer` in place unless it already is, or its input width does not divide into
// groups: such a layer stays dense, and the caller is told so (MLX would refuse the whole model).
void quantize_linear(Linear& layer, const std::string& name, int group_size, int bits) {
  if (layer.quantized) return;
  if (layer.weight.device() != Device::CPU)
    throw_error(ErrorKind::Request, "quantize the model before moving it to the GPU");
  if (layer.in_features() % group_size != 0) {
    std::fprintf(stderr, "moxin: %s stays dense: input width %lld is not a multiple of the group "
                         "size %d\n", name.c_str(), (long long)layer.in_features(), group_size);
    return;
  }
  layer.quantized = std::make_shared<QuantizedTensor>(quantize(layer.weight, group_size, bits));
  layer.weight = Tensor();
}

}  // namespace

void ViTEncoder::quantize(int group_size, int bits) {
  check_options(group_size, bits);
  quantize_linear(patch_embed, "patch_embed", group_size, bits);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".";
    quantize_linear(blocks[i].attn.qkv, b + "attn.qkv", group_size, bits);
    quantize_linear(blocks[i].attn.proj, b + "attn.proj", group_size, bits);
    quantize_linear(blocks[i].mlp.fc1, b + "mlp.fc1", group_size, bits);
    quantize_linear(blocks[i].mlp.fc2, b + "mlp.fc2", group_size, bits);
  }
}

void FusedMLPProjector::quantize(int group_size, int bits) {
  check_options(group_size, bits);
  quantize_linear(fc1, "projector.fc1", group_size, bits);
  quantize_linear(fc2, "projector.fc2", group_size, bits);
  quantize_linear(fc3, "projector.fc3", group_size, bits);
}

void MoxinVLM::quantize(int group_size, int bits) {
  check_options(group_size, bits);
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    DecoderLayer& l = layers[i];
    quantize_linear(l.self_attn.q_proj, p + "self_attn.q_proj", group_size, bits);
    quantize_linear(l.self_attn.k_proj, p + "self_attn.k_proj", group_size, bits);
    quantize_linear(l.self_attn.v_proj, p + "self_attn.v_proj", group_size, bits);
    quantize_linear(l.self_attn.o_proj, p + "self_attn.o_proj", group_size, bits);
    quantize_linear(l.mlp.gate_proj, p + "mlp.gate_proj", group_size, bits);
    quantize_linear(l.mlp.up_proj, p + "mlp.up_proj", group_size, bits);
    quantize_linear(l.mlp.down_proj, p + "mlp.down_proj", group_size, bits);
  }
  // With tied embeddings the head gets its own packed copy; the embedding table stays as stored.
  quantize_linear(lm_head, "lm_head", group_size, bits);
  config.quantization = QuantizationInfo{group_size, bits};
}

}  // namespace moxin
