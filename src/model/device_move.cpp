// Moving a loaded model between devices: every tensor field, once, at load.
#include "moxin/model.h"
#include "moxin/quantize.h"

namespace moxin {

namespace {

void move(Tensor& t, Device device) {
  if (t.defined()) t = t.to_device(device);
}

void move(Linear& l, Device device) {
  move(l.weight, device);
  move(l.bias, device);
  if (l.quantized && l.quantized->weight.device() != device) {
    auto q = std::make_shared<QuantizedTensor>(*l.quantized);
    move(q->weight, device);
    move(q->scales, device);
    move(q->biases, device);
    l.quantized = std::move(q);
  }
}

void move(LayerNorm& n, Device device) {
  move(n.weight, device);
  move(n.bias, device);
}

void move(ViTEncoder& enc, Device device) {
  move(enc.patch_embed, device);
  move(enc.cls_token, device);
  move(enc.reg_token, device);
  move(enc.pos_embed, device);
  for (ViTBlock& b : enc.blocks) {
    move(b.norm1, device);
    move(b.attn.qkv, device);
    move(b.attn.proj, device);
    move(b.ls1, device);
    move(b.norm2, device);
    move(b.mlp.fc1, device);
    move(b.mlp.fc2, device);
    move(b.ls2, device);
  }
  move(enc.norm, device);
}

}  // namespace

void MoxinVLM::to_device(Device device) {
  if (device == this->device()) return;
  const bool tied = lm_head.weight.defined() && lm_head.weight.raw() == embed_tokens.raw();
  move(dino, device);
  move(siglip, device);
  move(projector.fc1, device);
  move(projector.fc2, device);
  move(projector.fc3, device);
  move(embed_tokens, device);
  for (DecoderLayer& layer : layers) {
    move(layer.input_layernorm.weight, device);
    move(layer.post_attention_layernorm.weight, device);
    for (Linear* l : {&layer.self_attn.q_proj, &layer.self_attn.k_proj, &layer.self_attn.v_proj,
                      &layer.self_attn.o_proj, &layer.mlp.gate_proj, &layer.mlp.up_proj,
                      &layer.mlp.down_proj})
      move(*l, device);
  }
  move(norm.weight, device);
  if (tied && !lm_head.quantized) {
    lm_head.weight = embed_tokens;  // one copy on the device, as on the host
  } else {
    move(lm_head, device);
  }
}

}  // namespace moxin
