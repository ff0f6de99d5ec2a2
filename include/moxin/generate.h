// Answering a question about an image: the crate's token-level `Generate` iterator, the
// high-level generate() that streams the answer's text, and a chat session that keeps the
// image's encoding and the KV cache between turns.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moxin/image.h"
#include "moxin/kv_cache.h"
#include "moxin/model.h"
#include "moxin/prompt.h"
#include "moxin/sampling.h"
#include "moxin/tensor.h"
#include "moxin/tokenizer.h"

namespace moxin {

// Yields token ids one at a time, without end: the caller decides when to stop. The first
// next() is the prefill (forward over the fused image + prompt sequence, logits of the last
// position only); every later next() first feeds the previously yielded id through
// decode_token, then samples. Batch size 1. The model and cache must outlive the generator.
class Generate {
 public:
  // As the crate: temperature only (0 = greedy). dino_image / siglip_image [1, H, W, 3]
  // (normalize_dino / normalize_siglip), input_ids [1, L] I32 or I64 starting with BOS. The
  // cache must be empty (or hold no positions).
  Generate(MoxinVLM& model, KVCacheList& cache, float temperature, Tensor dino_image,
           Tensor siglip_image, Tensor input_ids);
  // Every sampling option; ids >= num_valid_ids (when >= 0) are never sampled. The repetition
  // penalty sees the prompt's ids and everything generated, as HF's does.
  Generate(MoxinVLM& model, KVCacheList& cache, const SamplingOptions& options, Tensor dino_image,
           Tensor siglip_image, Tensor input_ids, int32_t num_valid_ids = -1);
  // Continues on a cache that already holds context (a chat's earlier turns): the first next()
  // runs `embeddings` [1, L, hidden] through the decoder at the cache's offset. `history` is what
  // the repetition penalty has seen so far; `sampler` carries its RNG state in and out.
  Generate(MoxinVLM& model, KVCacheList& cache, Sampler sampler, Tensor embeddings,
           std::vector<int32_t> history);

  // The next token id. Model errors propagate as moxin::Error; after one, the cache may hold a
  // partial step and the generator must not be used again.
  int32_t next();

  // Decode steps (every next() after the first) call `step(token)` for the logits [1, 1, vocab]
  // instead of model.decode_token(token, cache): e.g. a recorded CUDA graph that advances the
  // same cache. generate() installs one for models on a GPU.
  void set_decode_step(std::function<Tensor(int32_t token)> step) { step_ = std::move(step); }

  // Ids yielded so far.
  int64_t steps() const { return steps_; }
  // Prompt ids (when known) followed by every yielded id.
  const std::vector<int32_t>& history() const { return history_; }
  const Sampler& sampler() const { return sampler_; }

 private:
  MoxinVLM* model_;
  KVCacheList* cache_;
  Sampler sampler_;
  Tensor dino_image_, siglip_image_, input_ids_, embeddings_;
  std::vector<int32_t> history_;
  int64_t steps_ = 0;
  int32_t last_ = -1;
  std::function<Tensor(int32_t)> step_;
};

enum class StopReason {
  Eos,         // the model produced the tokenizer's EOS (</s> = 2)
  MaxTokens,   // max_tokens ids were generated
  StopString,  // the text reached one of the stop strings
};
const char* stop_reason_name(StopReason reason);  // "eos", "max_tokens", "stop_string"

struct GenerateOptions {
  SamplingOptions sampling;
  int32_t max_tokens = 512;
  // Generation ends where the text first contains one of these; the answer is cut before it and
  // no part of it is ever streamed. Must not be empty strings.
  std::vector<std::string> stop_strings;
  PromptFormat prompt_format = PromptFormat::Pure;
  // Image positions + prompt tokens + max_tokens must fit min(context_limit,
  // text_config.max_position_embeddings). 2048 is the length the reference was trained at.
  int64_t context_limit = 2048;
  // A tokenizer with more ids than the model's vocabulary does not belong to the model and is
  // refused (Error(Request)) unless this is set, which test checkpoints with small vocabularies
  // need: prompt ids the model has no embedding for then become <unk> (0), and sampling is
  // limited to ids both know.
  bool allow_vocab_mismatch = false;
  // Models on a GPU: decode steps replay one recorded CUDA graph (a launch per token instead of
  // one per op) over caches preallocated for the prompt + max_tokens. Off: every op is launched
  // from the host (the same kernels, the same logits).
  bool cuda_graph = true;

  void validate() const;  // Error(Request)
};

struct GenerationResult {
  std::string text;                // the answer: decoded without special tokens, stripped
  std::vector<int32_t> token_ids;  // every sampled id, a final EOS included
  int64_t prompt_tokens = 0;       // text tokens fed this turn, BOS included (not image positions)
  int64_t generated_tokens = 0;    // token_ids.size()
  double time_to_first_token_s = 0;  // call start (preprocessing, image encode, prefill) -> 1st id
  double decode_tokens_per_s = 0;    // ids after the first / time after the first (0 if < 2)
  StopReason stop_reason = StopReason::MaxTokens;
};

// Receives the answer as it is generated. The chunks concatenate to GenerationResult::text:
// leading whitespace is never sent, trailing whitespace is held until more text follows, and
// text that might begin a stop string is held until it is known not to.
using TextCallback = std::function<void(std::string_view)>;

// The answer's text as decoded chunks arrive: cut before the first stop string, stripped as
// the reference strips it (Python's str.strip()), and handed to on_text in final pieces only
// (see TextCallback). Chunks must be whole UTF-8 characters (StreamingDetokenizer's are).
class AnswerText {
 public:
  explicit AnswerText(std::vector<std::string> stop_strings = {}, TextCallback on_text = {});
  // Adds generated text; returns true once a stop string has been reached (the text is then
  // final and later chunks are ignored).
  bool append(std::string_view chunk);
  // End of generation: releases what was held for a possible stop string (trailing whitespace
  // is dropped). Returns whether a stop string ended the text.
  bool finish();
  const std::string& text() const { return text_; }
  bool stopped() const { return stopped_; }

 private:
  void consume(size_t end);

  std::vector<std::string> stops_;
  TextCallback on_text_;
  std::string raw_;      // everything appended, unstripped
  size_t consumed_ = 0;  // raw_[0, consumed_) is in text_ or dropped as whitespace
  std::string held_space_;
  std::string text_;
  bool started_ = false;
  bool stopped_ = false;
};

// Builds the prompt (options.prompt_format), tokenizes it with BOS, checks the context and
// vocabulary before any compute (Error(Request)), and generates.
GenerationResult generate(MoxinVLM& model, const Tokenizer& tokenizer,
                          const PreprocessedImage& image, std::string_view question,
                          const GenerateOptions& options = {}, const TextCallback& on_text = {});
// As above, preprocessing `image` at the model's image size first (timed as part of TTFT).
GenerationResult generate(MoxinVLM& model, const Tokenizer& tokenizer, const Image& image,
                          std::string_view question, const GenerateOptions& options = {},
                          const TextCallback& on_text = {});

// How many logits ids may be sampled for this model/tokenizer pair, enforcing
// GenerateOptions::allow_vocab_mismatch (Error(Request) when refused).
int32_t sampling_vocab_size(const MoxinVLM& model, const Tokenizer& tokenizer,
                            bool allow_vocab_mismatch);

// A conversation about one image. The image is encoded once; the KV cache keeps every earlier
// turn, so a follow-up only runs its new tokens: the previous answer's unfed last id (unless it
// was EOS), `</s>`, and `In: {question}\nOut:` tokenized as in the whole multi-turn prompt.
// The cache holds the ids the model generated, not a re-tokenization of the answer's text (the
// reference, rebuilding the prompt from text each turn, would re-tokenize; the two agree unless
// the tokenizer would split the answer differently, or a stop string cut it).
class ChatSession {
 public:
  // options.prompt_format must be Pure. Sampling state (the seed's stream) runs on across turns.
  ChatSession(MoxinVLM& model, const Tokenizer& tokenizer, PreprocessedImage image,
              GenerateOptions options = {});

  // One turn. Request errors (empty question, no room left in the context) leave the session
  // as it was; an error during compute leaves it unusable until reset().
  GenerationResult ask(std::string_view question, const TextCallback& on_text = {});

  // Forgets the conversation (and the cache), keeps the image's encoding.
  void reset();

  int64_t cached_positions() const;  // positions in the KV cache (image + every turn)
  int turns() const { return turns_; }
  const PurePromptBuilder& conversation() const { return conversation_; }
  bool image_encoded() const { return visual_.defined(); }

 private:
  MoxinVLM* model_;
  const Tokenizer* tokenizer_;
  PreprocessedImage image_;
  GenerateOptions options_;
  int32_t num_valid_ids_;
  Sampler sampler_;
  Tensor visual_;  // [1, N, hidden], the projector's output
  KVCacheList cache_;
  PurePromptBuilder conversation_;
  std::vector<int32_t> context_ids_;  // text ids the model has seen or produced (for penalty)
  std::optional<int32_t> unfed_;      // the last sampled id, not yet in the cache
  int turns_ = 0;
  bool broken_ = false;
};

}  // namespace moxin
