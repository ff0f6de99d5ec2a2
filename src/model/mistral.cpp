// The decoder: Mistral blocks over the fused image+text sequence, and the VLM's forward paths.
#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "model/encoder_parts.h"
#include "moxin/errors.h"
#include "moxin/model.h"
#include "ops/ops.h"

namespace moxin {

namespace {

// `ragged`: where each sequence's rows go and how many are real (ragged batches), or null when
// every sequence stands at the cache's offset with all L rows real.
Tensor decoder_layer_forward(const DecoderLayer& layer, const Tensor& x_in, KeyValueCache& cache,
                             const MistralConfig& config, const RaggedAppend* ragged) {
  const int64_t B = x_in.dim(0), L = x_in.dim(1);
  const int64_t Hq = config.num_attention_heads, Hkv = config.num_key_value_heads;
  const int64_t Dh = config.resolved_head_dim();
  const int64_t offset = cache.offset();
  Tensor x = x_in;  // [B, L, hidden]

  // The norms ride in the products that read them and the residual adds in the products that
  // feed them (one launch each on a GPU decode step).
  const std::vector<Tensor> qkv = ops::linear_same_input(
      x, {&layer.self_attn.q_proj, &layer.self_attn.k_proj, &layer.self_attn.v_proj},
      &layer.input_layernorm);
  Tensor q = qkv[0].reshape({B, L, Hq, Dh});
  Tensor k = qkv[1].reshape({B, L, Hkv, Dh});
  Tensor v = qkv[2].reshape({B, L, Hkv, Dh});
  // One new position per sequence (decode): RoPE, the KV store, attention and o_proj as one op
  // in the cache's own storage (on a GPU, one launch fewer: attention stores the rotated key).
  std::optional<CachedKV> slot;
  if (!ragged && L == 1) slot = cache.reserve_and_fetch(k, v);
  if (ragged) {  // each sequence at its own position, attending over its own history
    ops::rope_inplace(q, ragged->at, config.rope_theta);
    ops::rope_inplace(k, ragged->at, config.rope_theta);
    const CachedKV history =
        cache.update_and_fetch_ragged(ops::heads_first(k), ops::heads_first(v), *ragged);
    const Tensor attn = ops::causal_attention(q, history, ragged->at, config.sliding_window);
    ops::linear_accumulate(x, attn, layer.self_attn.o_proj);  // [B, L, Hq*Dh] -> residual
  } else if (slot) {
    ops::rope_attention_accumulate(x, q, k, v, *slot, offset, config.rope_theta,
                                   config.sliding_window, layer.self_attn.o_proj);
  } else {
    const CachedKV history = cache.rope_update_and_fetch(q, k, v, config.rope_theta);
    ops::causal_attention_accumulate(x, q, history, offset, config.sliding_window,
                                     layer.self_attn.o_proj);
  }

  ops::swiglu_mlp_accumulate(x, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
                             &layer.post_attention_layernorm);
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
  if (dino_image.ndim() != 4 || siglip_image.ndim() != 4 ||
      dino_image.dim(0) != siglip_image.dim(0))
    throw_error(ErrorKind::Request,
                "dino and siglip images must both be [B, H, W, 3] with the "
                "same B, got " +
                    shape_to_string(dino_image.shape()) + " and " +
                    shape_to_string(siglip_image.shape()));
  // Its shapes follow the images' alone: on a GPU it is recorded once and replayed.
  const std::vector<Tensor> inputs = {dino_image.to_device(device()),
                                      siglip_image.to_device(device())};
  return ops::run_recorded(
      device(), recorded_encoder_, inputs, encoder_tensors(*this),
      [this](const std::vector<Tensor>& images) {
        // The towers are independent and neither fills a GPU alone: they run side by side there.
        Tensor a, b;
        ops::run_concurrently(
            device(), [&] { a = dino.forward(images[0]); },  // [B, N, Dd]
            [&] { b = siglip.forward(images[1]); });        // [B, N, Ds]
        if (b.dim(1) != a.dim(1))
          throw_error(ErrorKind::Compute, "towers disagree on the number of patches");
        return projector.forward(ops::concat({a, b}, 2));  // [B, N, Dd + Ds] -> [B, N, hidden]
      });
}

Tensor MoxinVLM::embed(const Tensor& input_ids) const {
  check_ids(input_ids, "input_ids");
  Shape shape = input_ids.shape();
  Tensor rows = ops::embedding(input_ids, embed_tokens);  // [n, hidden]
  shape.push_back(embed_tokens.dim(1));
  return rows.reshape(shape);
}

namespace {

// The decoder over embeddings [B, L, hidden] -> hidden states [B, L, hidden] before the final
// norm. `valid`: real rows per sequence of a right-padded batch, or null when all L are.
//
// Ragged batches. A sequence's rows go to its own positions: the cache's per-sequence offsets
// (KeyValueCache::offsets(); all offset() while uniform). Rows past valid[b] are right padding:
// they run through the layers like any row, but attention is causal, so no real row ever reads
// them, and the cache records the sequence's offset as start + valid[b], so its next update
// overwrites the padding's keys and values. A batch whose sequences share one offset and have
// all rows real takes the uniform path, the one a recorded CUDA decode step follows.
//
// `owned`: the embeddings are the caller's scratch (a decode step's fresh lookup), so the layers
// add their residuals into them in place; otherwise a copy is made first, which in a recorded
// decode step is a copy node between the embedding and the first product, where programmatic
// dependent launch cannot overlap them.
Tensor run_decoder(MoxinVLM& model, const Tensor& embeddings, KVCacheList& cache,
                   const std::vector<int64_t>* valid, bool owned = false) {
  const MistralConfig& tc = model.config.text_config;
  if (embeddings.ndim() != 3 || embeddings.dim(2) != tc.hidden_size)
    throw_error(ErrorKind::Request, "decoder input must be [B, L, " +
                                        std::to_string(tc.hidden_size) + "], got " +
                                        shape_to_string(embeddings.shape()));
  if (cache.empty()) cache = model.make_cache();
  if (cache.size() != model.layers.size())
    throw_error(ErrorKind::Request, "KV cache has " + std::to_string(cache.size()) +
                                        " layers, the model " +
                                        std::to_string(model.layers.size()));
  const int64_t B = embeddings.dim(0), L = embeddings.dim(1);
  if (!cache[0]) throw_error(ErrorKind::Request, "KV caches of different layers are out of step");
  const int64_t offset = cache[0]->offset();
  const std::vector<int64_t> starts = cache[0]->offsets();
  for (const auto& layer_cache : cache)
    if (!layer_cache || layer_cache->offset() != offset || layer_cache->offsets() != starts)
      throw_error(ErrorKind::Request, "KV caches of different layers are out of step");

  bool ragged = !starts.empty();
  if (valid) {
    if (int64_t(valid->size()) != B)
      throw_error(ErrorKind::Request, std::to_string(valid->size()) + " lengths for " +
                                          std::to_string(B) + " sequences");
    for (const int64_t n : *valid) ragged = ragged || n != L;
  }
  if (!ragged) {
    if (offset + L > tc.max_position_embeddings)
      throw_error(ErrorKind::Request, "sequence of " + std::to_string(offset + L) +
                                          " positions exceeds the model's maximum of " +
                                          std::to_string(tc.max_position_embeddings));
    Tensor x = owned ? embeddings : embeddings.clone();  // layers add residuals in place
    for (size_t i = 0; i < model.layers.size(); ++i)
      x = decoder_layer_forward(model.layers[i], x, *cache[i], tc, nullptr);
    return x;
  }

  if (!starts.empty() && int64_t(starts.size()) != B)
    throw_error(ErrorKind::Request, "the KV cache holds " + std::to_string(starts.size()) +
                                        " sequences but the input " + std::to_string(B));
  RaggedAppend append;
  append.valid = valid ? *valid : std::vector<int64_t>(size_t(B), L);
  std::vector<int64_t> at = starts.empty() ? std::vector<int64_t>(size_t(B), offset) : starts;
  for (int64_t b = 0; b < B; ++b)
    if (at[size_t(b)] + append.valid[size_t(b)] > tc.max_position_embeddings)
      throw_error(ErrorKind::Request, "sequence " + std::to_string(b) + " of " +
                                          std::to_string(at[size_t(b)] + append.valid[size_t(b)]) +
                                          " positions exceeds the model's maximum of " +
                                          std::to_string(tc.max_position_embeddings));
  // One upload of the positions per call, read by every layer's kernels.
  append.at = ops::batch_positions(std::move(at), model.device());
  Tensor x = owned ? embeddings : embeddings.clone();
  for (size_t i = 0; i < model.layers.size(); ++i)
    x = decoder_layer_forward(model.layers[i], x, *cache[i], tc, &append);
  return x;
}

// input_ids [B, L] with BOS first, and the images -> the fused decoder input
// [embed(BOS), visual x N, embed(ids[1:])], [B, N + L, hidden].
Tensor fuse_inputs(MoxinVLM& model, const Tensor& dino_image, const Tensor& siglip_image,
                   const Tensor& input_ids) {
  const int64_t B = input_ids.dim(0), L = input_ids.dim(1);
  if (dino_image.ndim() != 4 || dino_image.dim(0) != B)
    throw_error(ErrorKind::Request, "images hold " +
                                        std::to_string(dino_image.ndim() ? dino_image.dim(0) : 0) +
                                        " sequences but input_ids " + std::to_string(B));
  Tensor visual = model.encode_image(dino_image, siglip_image);  // [B, N, hidden]
  Tensor text = model.embed(input_ids);                          // [B, L, hidden]
  return ops::concat({ops::slice(text, 1, 0, 1), visual, ops::slice(text, 1, 1, L)}, 1);
}

void check_prompt_ids(const Tensor& input_ids) {
  check_ids(input_ids, "input_ids");
  if (input_ids.ndim() != 2 || input_ids.dim(1) < 1)
    throw_error(ErrorKind::Request, "input_ids must be [B, L] with L >= 1 (BOS first), got " +
                                        shape_to_string(input_ids.shape()));
}

// The final norm and lm_head over the last `last_n` rows (all when negative) of hidden states.
Tensor last_logits(const MoxinVLM& model, const Tensor& x, int64_t last_n) {
  const int64_t L = x.dim(1);
  const int64_t keep = last_n < 0 || last_n > L ? L : last_n;
  Tensor tail = keep == L ? x : ops::slice(x, 1, L - keep, L);
  return ops::linear_same_input(tail, {&model.lm_head}, &model.norm)[0];  // [B, keep, vocab]
}

}  // namespace

Tensor MoxinVLM::forward_embeddings(const Tensor& embeddings, KVCacheList& cache, int64_t last_n) {
  return last_logits(*this, run_decoder(*this, embeddings, cache, nullptr), last_n);
}

Tensor MoxinVLM::forward(const Tensor& dino_image, const Tensor& siglip_image,
                         const Tensor& input_ids, KVCacheList& cache, int64_t last_n) {
  check_prompt_ids(input_ids);
  return forward_embeddings(fuse_inputs(*this, dino_image, siglip_image, input_ids), cache, last_n);
}

Tensor MoxinVLM::forward(const Tensor& dino_image, const Tensor& siglip_image,
                         const Tensor& input_ids, const std::vector<int64_t>& lengths,
                         KVCacheList& cache) {
  check_prompt_ids(input_ids);
  const int64_t B = input_ids.dim(0), L = input_ids.dim(1);
  if (int64_t(lengths.size()) != B)
    throw_error(ErrorKind::Request, std::to_string(lengths.size()) + " prompt lengths for " +
                                        std::to_string(B) + " sequences of input_ids");
  for (size_t b = 0; b < lengths.size(); ++b)
    if (lengths[b] < 1 || lengths[b] > L)
      throw_error(ErrorKind::Request, "prompt length " + std::to_string(lengths[b]) +
                                          " of sequence " + std::to_string(b) + " outside [1, " +
                                          std::to_string(L) + "]");
  const Tensor fused = fuse_inputs(*this, dino_image, siglip_image, input_ids);
  // Sequence b's real rows: BOS, the N image positions, then its lengths[b] - 1 text tokens.
  const int64_t image_positions = fused.dim(1) - L;
  std::vector<int64_t> valid(lengths.size()), last(lengths.size());
  for (size_t b = 0; b < lengths.size(); ++b) {
    valid[b] = image_positions + lengths[b];
    last[b] = valid[b] - 1;
  }
  Tensor x = run_decoder(*this, fused, cache, &valid);
  return ops::linear_same_input(ops::select_positions(x, last), {&lm_head}, &norm)[0];  // [B, 1, V]
}

Tensor MoxinVLM::decode_token(const Tensor& token, KVCacheList& cache) {
  check_ids(token, "token");
  if (!(token.ndim() == 1 || (token.ndim() == 2 && token.dim(1) == 1)))
    throw_error(ErrorKind::Request,
                "decode_token takes [B] or [B, 1] ids, got " + shape_to_string(token.shape()));
  // On a ragged cache run_decoder places each sequence's token at its own offset. The looked-up
  // rows are this call's own: the layers accumulate into them.
  const Tensor rows = embed(token.reshape({token.dim(0), 1}));
  return last_logits(*this, run_decoder(*this, rows, cache, nullptr, /*owned=*/true), 1);
}

}  // namespace moxin
