// The decoder: Mistral blocks over the fused image+text sequence, and the VLM's forward paths.
#include <algorithm>
#include <string>
#include <vector>

#include "moxin/errors.h"
#include "moxin/model.h"
#include "ops/ops.h"

namespace moxin {

namespace {

Tensor decoder_layer_forward(const DecoderLayer& layer, const Tensor& x_in, KeyValueCache& cache,
                             const MistralConfig& config) {
  const int64_t B = x_in.dim(0), L = x_in.dim(1);
  const int64_t Hq = config.num_attention_heads, Hkv = config.num_key_value_heads;
  const int64_t Dh = config.resolved_head_dim();
  const int64_t offset = cache.offset();
  Tensor x = x_in;  // [B, L, hidden]

  Tensor h = ops::rms_norm(x, layer.input_layernorm);
  const std::vector<Tensor> qkv = ops::linear_same_input(
      h, {&layer.self_attn.q_proj, &layer.self_attn.k_proj, &layer.self_attn.v_proj});
  Tensor q = qkv[0].reshape({B, L, Hq, Dh});
  Tensor k = qkv[1].reshape({B, L, Hkv, Dh});
  Tensor v = qkv[2].reshape({B, L, Hkv, Dh});
  ops::rope_inplace(q, offset, config.rope_theta);
  ops::rope_inplace(k, offset, config.rope_theta);
  const CachedKV history = cache.update_and_fetch(ops::heads_first(k), ops::heads_first(v));
  Tensor attn = ops::causal_attention(q, history, offset, config.sliding_window);  // [B, L, Hq*Dh]
  ops::add_inplace(x, ops::linear(attn, layer.self_attn.o_proj));

  h = ops::rms_norm(x, layer.post_attention_layernorm);
  Tensor gated = ops::swiglu_linear(h, layer.mlp.gate_proj, layer.mlp.up_proj);
  ops::add_inplace(x, ops::linear(gated, layer.mlp.down_proj));
  return x;
}

// [B, L] token ids of an integer dtype, or a Request error.
void check_ids(const Tensor& ids, const char* what) {
  if (ids.dtype() != DType::I32 && ids.dtype() != DType::I64)
    throw_error(ErrorKind::Request, std::string(what) + " must be I32 or I64, got " +
                                        std::string(dtype_name(ids.dtype())));
}

}  // namespace

Tensor MoxinVLM::encode_image(const Tensor& dino_image, const Tensor& siglip_image) const {
  if (dino_image.ndim() != 4 || siglip_image.ndim() != 4 || dino_image.dim(0) != siglip_image.dim(0))
    throw_error(ErrorKind::Request, "dino and siglip images must both be [B, H, W, 3] with the "
                                    "same B, got " + shape_to_string(dino_image.shape()) + " and " +
                                    shape_to_string(siglip_image.shape()));
  Tensor a = dino.forward(dino_image.to_device(device()));      // [B, N, Dd]
  Tensor b = siglip.forward(siglip_image.to_device(device()));  // [B, N, Ds]
  if (b.dim(1) != a.dim(1))
    throw_error(ErrorKind::Compute, "towers disagree on the number of patches");
  return projector.forward(ops::concat({a, b}, 2));  // [B, N, Dd + Ds] -> [B, N, hidden]
}

Tensor MoxinVLM::embed(const Tensor& input_ids) const {
  check_ids(input_ids, "input_ids");
  Shape shape = input_ids.shape();
  Tensor rows = ops::embedding(input_ids, embed_tokens);  // [n, hidden]
  shape.push_back(embed_tokens.dim(1));
  return rows.reshape(shape);
}

Tensor MoxinVLM::forward_embeddings(const Tensor& embeddings, KVCacheList& cache, int64_t last_n) {
  const MistralConfig& tc = config.text_config;
  if (embeddings.ndim() != 3 || embeddings.dim(2) != tc.hidden_size)
    throw_error(ErrorKind::Request, "decoder input must be [B, L, " +
                                        std::to_string(tc.hidden_size) + "], got " +
                                        shape_to_string(embeddings.shape()));
  if (cache.empty()) cache = make_cache();
  if (cache.size() != layers.size())
    throw_error(ErrorKind::Request, "KV cache has " + std::to_string(cache.size()) +
                                        " layers, the model " + std::to_string(layers.size()));
  const int64_t L = embeddings.dim(1);
  const int64_t offset = cache[0]->offset();
  for (const auto& layer_cache : cache)
    if (!layer_cache || layer_cache->offset() != offset)
      throw_error(ErrorKind::Request, "KV caches of different layers are out of step");
  if (offset + L > tc.max_position_embeddings)
    throw_error(ErrorKind::Request, "sequence of " + std::to_string(offset + L) +
                                        " positions exceeds the model's maximum of " +
                                        std::to_string(tc.max_position_embeddings));

  Tensor x = embeddings.clone();  // layers add their residuals in place; the caller's input stays
  for (size_t i = 0; i < layers.size(); ++i) x = decoder_layer_forward(layers[i], x, *cache[i], tc);

  const int64_t keep = last_n < 0 || last_n > L ? L : last_n;
  Tensor tail = keep == L ? x : ops::slice(x, 1, L - keep, L);
  return ops::linear(ops::rms_norm(tail, norm), lm_head);  // [B, keep, vocab]
}

Tensor MoxinVLM::forward(const Tensor& dino_image, const Tensor& siglip_image,
                         const Tensor& input_ids, KVCacheList& cache, int64_t last_n) {
  check_ids(input_ids, "input_ids");
  if (input_ids.ndim() != 2 || input_ids.dim(1) < 1)
    throw_error(ErrorKind::Request, "input_ids must be [B, L] with L >= 1 (BOS first), got " +
                                        shape_to_string(input_ids.shape()));
  const int64_t B = input_ids.dim(0), L = input_ids.dim(1);
  if (dino_image.ndim() != 4 || dino_image.dim(0) != B)
    throw_error(ErrorKind::Request, "images hold " + std::to_string(dino_image.ndim() ? dino_image.dim(0) : 0) +
                                        " sequences but input_ids " + std::to_string(B));
  Tensor visual = encode_image(dino_image, siglip_image);  // [B, N, hidden]
  Tensor text = embed(input_ids);                           // [B, L, hidden]
  // [embed(BOS), visual x N, embed(ids[1:])]
  Tensor fused = ops::concat({ops::slice(text, 1, 0, 1), visual, ops::slice(text, 1, 1, L)}, 1);
  return forward_embeddings(fused, cache, last_n);
}

Tensor MoxinVLM::decode_token(const Tensor& token, KVCacheList& cache) {
  check_ids(token, "token");
  if (!(token.ndim() == 1 || (token.ndim() == 2 && token.dim(1) == 1)))
    throw_error(ErrorKind::Request, "decode_token takes [B] or [B, 1] ids, got " +
                                        shape_to_string(token.shape()));
  return forward_embeddings(embed(token.reshape({token.dim(0), 1})), cache, 1);
}

}  // namespace moxin
