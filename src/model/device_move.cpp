// Moving a loaded model between devices: every tensor field, once, at load.
#include <cstring>

#include "model/encoder_parts.h"
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

// Moves two layers whose products share an input, with b's weights placed right after a's in
// one allocation when they have the same shape and type: the GPU then runs both products as
// one batched product (prefill's k/v and gate/up). The bytes are those of the two moves.
void move_side_by_side(Linear& a, Linear& b, Device device) {
  const Tensor &wa = a.weight, &wb = b.weight;
  if (device != Device::CUDA || a.quantized || b.quantized || !wa.defined() || !wb.defined() ||
      wa.device() != Device::CPU || wb.device() != Device::CPU || wa.ndim() != 2 ||
      wa.shape() != wb.shape() || wa.dtype() != wb.dtype()) {
    move(a, device);
    move(b, device);
    return;
  }
  const int64_t N = wa.dim(0);
  Tensor both = Tensor::empty({2 * N, wa.dim(1)}, wa.dtype());
  std::memcpy(both.raw_mut(), wa.raw(), wa.nbytes());
  std::memcpy(static_cast<char*>(both.raw_mut()) + wa.nbytes(), wb.raw(), wb.nbytes());
  both = both.to_device(device);
  a.weight = both.slice_rows(0, N);
  b.weight = both.slice_rows(N, 2 * N);
  move(a.bias, device);
  move(b.bias, device);
}

void move(LayerNorm& n, Device device) {
  move(n.weight, device);
  move(n.bias, device);
}

void move(ViTEncoder& enc, Device device) {
  visit_tower_parts(enc, [device](auto& part) { move(part, device); });
}

}  // namespace

void MoxinVLM::to_device(Device device) {
  if (device == this->device()) return;
  recorded_encoder_.reset();  // its graphs and the weights they read stay on the old device
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
    for (Linear* l : {&layer.self_attn.q_proj, &layer.self_attn.o_proj, &layer.mlp.down_proj})
      move(*l, device);
    move_side_by_side(layer.self_attn.k_proj, layer.self_attn.v_proj, device);
    move_side_by_side(layer.mlp.gate_proj, layer.mlp.up_proj, device);
  }
  move(norm.weight, device);
  if (tied && !lm_head.quantized) {
    lm_head.weight = embed_tokens;  // one copy on the device, as on the host
  } else {
    move(lm_head, device);
  }
}

}  // namespace moxin
