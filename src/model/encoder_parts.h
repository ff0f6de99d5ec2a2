// The image encoder's parts: each tensor-holding field of a vision tower, for the code that
// must reach every one of them (moving a model between devices, listing the weights a
// recording of the encoder reads).
#pragma once

#include <vector>

#include "moxin/model.h"
#include "moxin/quantize.h"

namespace moxin {

// visit(part) for every Linear, LayerNorm and Tensor field of `tower` (ViTEncoder, const or
// not), in a fixed order.
template <class Tower, class Visit>
void visit_tower_parts(Tower& tower, Visit&& visit) {
  visit(tower.patch_embed);
  visit(tower.cls_token);
  visit(tower.reg_token);
  visit(tower.pos_embed);
  for (auto& b : tower.blocks) {
    visit(b.norm1);
    visit(b.attn.qkv);
    visit(b.attn.proj);
    visit(b.ls1);
    visit(b.norm2);
    visit(b.mlp.fc1);
    visit(b.mlp.fc2);
    visit(b.ls2);
  }
  visit(tower.norm);
}

// Every tensor the image encoder (both towers and the projector) reads, quantized parts
// included: what a recording of it depends on.
inline std::vector<Tensor> encoder_tensors(const MoxinVLM& model) {
  std::vector<Tensor> out;
  struct Collect {
    std::vector<Tensor>& out;
    void operator()(const Tensor& t) const { out.push_back(t); }
    void operator()(const LayerNorm& n) const {
      out.push_back(n.weight);
      out.push_back(n.bias);
    }
    void operator()(const Linear& l) const {
      out.push_back(l.weight);
      out.push_back(l.bias);
      if (l.quantized) {
        out.push_back(l.quantized->weight);
        out.push_back(l.quantized->scales);
        out.push_back(l.quantized->biases);
      }
    }
  } collect{out};
  visit_tower_parts(model.dino, collect);
  visit_tower_parts(model.siglip, collect);
  for (const Linear* l : {&model.projector.fc1, &model.projector.fc2, &model.projector.fc3})
    collect(*l);
  return out;
}

}  // namespace moxin
