// The Generate iterator, the streaming answer (stop strings, the reference's strip) and the
// high-level generate() / ChatSession built on them.
#include "moxin/generate.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "moxin/errors.h"
#include "ops/ops.h"
#if MOXIN_WITH_CUDA
#include "backend/cuda/cuda_graph.h"
#endif

namespace moxin {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::vector<int32_t> read_ids(const Tensor& ids) {
  if (ids.dtype() != DType::I32 && ids.dtype() != DType::I64)
    throw_error(ErrorKind::Request,
                "input_ids must be I32 or I64, got " + std::string(dtype_name(ids.dtype())));
  if (ids.ndim() != 2 || ids.dim(0) != 1 || ids.dim(1) < 1)
    throw_error(ErrorKind::Request,
                "Generate takes input_ids [1, L] with L >= 1, got " + shape_to_string(ids.shape()));
  const Tensor host = ids.to_device(Device::CPU);
  std::vector<int32_t> out(size_t(ids.numel()));
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = ids.dtype() == DType::I64 ? int32_t(host.data<int64_t>()[i]) : host.data<int32_t>()[i];
  return out;
}

Tensor ids_tensor(const std::vector<int32_t>& ids) {
  Tensor t = Tensor::empty({1, int64_t(ids.size())}, DType::I32);
  std::copy(ids.begin(), ids.end(), t.data_mut<int32_t>());
  return t;
}

int64_t cache_offset(const KVCacheList& cache) {
  return cache.empty() || !cache[0] ? 0 : cache[0]->offset();
}

int64_t context_capacity(const MoxinVLM& model, int64_t context_limit) {
  return std::min(context_limit, model.config.text_config.max_position_embeddings);
}

// Runs `generator` to a stop and collects the answer and its timings; `start` is when the
// caller's request began.
GenerationResult run_to_stop(Generate& generator, const Tokenizer& tokenizer,
                             const GenerateOptions& options, const TextCallback& on_text,
                             Clock::time_point start) {
  GenerationResult result;
  AnswerText answer(options.stop_strings, on_text);
  StreamingDetokenizer detokenizer(tokenizer, /*skip_special_tokens=*/true);
  Clock::time_point first{}, last{};
  while (true) {
    const int32_t id = generator.next();
    last = Clock::now();
    if (result.token_ids.empty()) first = last;
    result.token_ids.push_back(id);
    if (id == tokenizer.eos_id()) {
      result.stop_reason = StopReason::Eos;
      break;
    }
    if (answer.append(detokenizer.feed(id))) {
      result.stop_reason = StopReason::StopString;
      break;
    }
    if (int64_t(result.token_ids.size()) >= options.max_tokens) {
      result.stop_reason = StopReason::MaxTokens;
      break;
    }
  }
  if (result.stop_reason != StopReason::StopString) {
    // What the detokenizer held back (an unfinished byte run) may still complete a stop string.
    answer.append(detokenizer.finish());
    if (answer.finish()) result.stop_reason = StopReason::StopString;
  }
  result.text = answer.text();
  result.generated_tokens = int64_t(result.token_ids.size());
  result.time_to_first_token_s = seconds_between(start, first);
  const double decode_s = seconds_between(first, last);
  if (result.generated_tokens >= 2 && decode_s > 0)
    result.decode_tokens_per_s = double(result.generated_tokens - 1) / decode_s;
  return result;
}

// Ids the model has no embedding row for become <unk> (0) when the mismatch is allowed.
void fit_prompt_to_model(std::vector<int32_t>& ids, const MoxinVLM& model) {
  const int64_t rows = model.embed_tokens.dim(0);
  for (int32_t& id : ids)
    if (id >= rows) id = 0;
}

void check_context(const MoxinVLM& model, const GenerateOptions& options, int64_t cached,
                   int64_t image_positions, int64_t new_tokens) {
  const int64_t capacity = context_capacity(model, options.context_limit);
  const int64_t needed = cached + image_positions + new_tokens + options.max_tokens;
  if (needed > capacity) {
    std::string what = std::to_string(new_tokens) + " prompt tokens";
    if (image_positions) what += " + " + std::to_string(image_positions) + " image positions";
    if (cached) what = std::to_string(cached) + " earlier positions + " + what;
    throw_error(ErrorKind::Request,
                "the prompt does not fit the context: " + what + " + max tokens " +
                    std::to_string(options.max_tokens) + " = " + std::to_string(needed) + " > " +
                    std::to_string(capacity) +
                    " (shorten the prompt, lower the max tokens or raise the context limit)");
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// AnswerText

AnswerText::AnswerText(std::vector<std::string> stop_strings, TextCallback on_text)
    : stops_(std::move(stop_strings)), on_text_(std::move(on_text)) {
  for (const auto& s : stops_)
    if (s.empty()) throw_error(ErrorKind::Request, "stop strings must not be empty");
}

bool AnswerText::append(std::string_view chunk) {
  if (stopped_) return true;
  raw_ += chunk;
  // Text before consumed_ was checked already and no stop string straddles consumed_ (its start
  // would have been held back), so a new match starts at consumed_ or later.
  size_t hit = std::string::npos;
  for (const auto& s : stops_) hit = std::min(hit, raw_.find(s, consumed_));
  if (hit != std::string::npos) {
    consume(hit);
    held_space_.clear();  // the answer ends here: trailing whitespace is stripped
    stopped_ = true;
    return true;
  }
  // Hold back the longest tail that could still grow into a stop string.
  size_t hold = 0;
  for (const auto& s : stops_)
    for (size_t n = std::min(s.size() - 1, raw_.size() - consumed_); n > hold; --n)
      if (raw_.compare(raw_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  consume(raw_.size() - hold);
  return false;
}

bool AnswerText::finish() {
  if (!stopped_) consume(raw_.size());
  held_space_.clear();
  return stopped_;
}

// Moves raw_[consumed_, end) into the answer: the answer's leading whitespace dropped, trailing
// whitespace held until something follows it.
void AnswerText::consume(size_t end) {
  if (end <= consumed_) return;
  std::string_view piece(raw_.data() + consumed_, end - consumed_);
  consumed_ = end;
  if (!started_) {
    piece = lstrip_whitespace(piece);
    if (piece.empty()) return;
    started_ = true;
  }
  const std::string_view body = rstrip_whitespace(piece);
  if (body.empty()) {
    held_space_ += piece;
    return;
  }
  std::string out = std::move(held_space_);
  out += body;
  held_space_.assign(piece.substr(body.size()));
  text_ += out;
  if (on_text_) on_text_(out);
}

// ---------------------------------------------------------------------------------------------
// Generate

Generate::Generate(MoxinVLM& model, KVCacheList& cache, float temperature, Tensor dino_image,
                   Tensor siglip_image, Tensor input_ids)
    : Generate(
          model, cache,
          [&] {
            SamplingOptions o;
            o.temperature = temperature;
            return o;
          }(),
          std::move(dino_image), std::move(siglip_image), std::move(input_ids)) {}

Generate::Generate(MoxinVLM& model, KVCacheList& cache, const SamplingOptions& options,
                   Tensor dino_image, Tensor siglip_image, Tensor input_ids, int32_t num_valid_ids)
    : model_(&model),
      cache_(&cache),
      sampler_(options, num_valid_ids),
      dino_image_(std::move(dino_image)),
      siglip_image_(std::move(siglip_image)),
      input_ids_(std::move(input_ids)),
      history_(read_ids(input_ids_)) {
  if (cache_offset(cache) != 0)
    throw_error(ErrorKind::Request,
                "Generate from an image needs an empty KV cache, this one holds " +
                    std::to_string(cache_offset(cache)) + " positions");
}

Generate::Generate(MoxinVLM& model, KVCacheList& cache, Sampler sampler, Tensor embeddings,
                   std::vector<int32_t> history)
    : model_(&model),
      cache_(&cache),
      sampler_(std::move(sampler)),
      embeddings_(std::move(embeddings)),
      history_(std::move(history)) {
  if (!embeddings_.defined() || embeddings_.ndim() != 3 || embeddings_.dim(0) != 1 ||
      embeddings_.dim(1) < 1)
    throw_error(ErrorKind::Request, "Generate takes embeddings [1, L, hidden] with L >= 1");
}

int32_t Generate::next() {
  Tensor logits;  // [1, 1, vocab]
  if (steps_ == 0) {
    logits = embeddings_.defined()
                 ? model_->forward_embeddings(embeddings_, *cache_, 1)
                 : model_->forward(dino_image_, siglip_image_, input_ids_, *cache_, 1);
    // The prefill inputs are no longer needed; drop them so they can be freed.
    dino_image_ = siglip_image_ = input_ids_ = embeddings_ = Tensor();
  } else if (step_) {
    logits = step_(last_);
  } else {
    Tensor token = Tensor::empty({1}, DType::I32);
    token.data_mut<int32_t>()[0] = last_;
    logits = model_->decode_token(token, *cache_);
  }
  last_ = sampler_(logits, history_);
  history_.push_back(last_);
  ++steps_;
  return last_;
}

// ---------------------------------------------------------------------------------------------
// generate()

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::Eos:
      return "eos";
    case StopReason::MaxTokens:
      return "max_tokens";
    case StopReason::StopString:
      return "stop_string";
  }
  return "?";
}

void GenerateOptions::validate() const {
  sampling.validate();
  if (max_tokens < 1)
    throw_error(ErrorKind::Request,
                "max tokens must be at least 1, got " + std::to_string(max_tokens));
  if (context_limit < 1) throw_error(ErrorKind::Request, "the context limit must be at least 1");
  for (const auto& s : stop_strings)
    if (s.empty()) throw_error(ErrorKind::Request, "stop strings must not be empty");
}

int32_t sampling_vocab_size(const MoxinVLM& model, const Tokenizer& tokenizer,
                            bool allow_vocab_mismatch) {
  const int64_t model_vocab = model.lm_head.out_features();
  const int64_t tokenizer_vocab = tokenizer.vocab_size();
  if (tokenizer_vocab > model_vocab && !allow_vocab_mismatch)
    throw_error(ErrorKind::Request,
                "the tokenizer has " + std::to_string(tokenizer_vocab) +
                    " ids but the model's vocabulary only " + std::to_string(model_vocab) +
                    ": they do not belong together (for a small test checkpoint, allow the "
                    "mismatch: --allow-vocab-mismatch)");
  return int32_t(std::min(model_vocab, tokenizer_vocab));
}

GenerationResult generate(MoxinVLM& model, const Tokenizer& tokenizer,
                          const PreprocessedImage& image, std::string_view question,
                          const GenerateOptions& options, const TextCallback& on_text) {
  const auto start = Clock::now();
  options.validate();
  const int32_t num_valid_ids = sampling_vocab_size(model, tokenizer, options.allow_vocab_mismatch);
  std::vector<int32_t> ids = tokenizer.encode(build_prompt(question, options.prompt_format));
  if (ids.empty() || ids[0] != tokenizer.bos_id())
    throw_error(ErrorKind::Tokenizer,
                "the tokenizer did not prepend BOS (" + std::to_string(tokenizer.bos_id()) + ")");
  if (options.allow_vocab_mismatch) fit_prompt_to_model(ids, model);
  check_context(model, options, 0, model.dino.config.num_patches(), int64_t(ids.size()));

  KVCacheList cache = model.make_cache();
  KVCacheList* caches = &cache;
#if MOXIN_WITH_CUDA
  std::unique_ptr<cuda::DecodeGraph> graph;
  if (options.cuda_graph && model.device() == Device::CUDA) {
    const int64_t positions = model.dino.config.num_patches() + int64_t(ids.size());
    graph = std::make_unique<cuda::DecodeGraph>(model, positions + options.max_tokens);
    caches = &graph->caches();
  }
#endif
  Generate generator(model, *caches, options.sampling, image.dino, image.siglip, ids_tensor(ids),
                     num_valid_ids);
#if MOXIN_WITH_CUDA
  if (graph) generator.set_decode_step([&graph](int32_t token) { return graph->step(token); });
#endif
  GenerationResult result = run_to_stop(generator, tokenizer, options, on_text, start);
  result.prompt_tokens = int64_t(ids.size());
  return result;
}

GenerationResult generate(MoxinVLM& model, const Tokenizer& tokenizer, const Image& image,
                          std::string_view question, const GenerateOptions& options,
                          const TextCallback& on_text) {
  // Cheap checks first, so a bad request costs no preprocessing.
  options.validate();
  build_prompt(question, options.prompt_format);
  return generate(model, tokenizer, preprocess_image(image, int(model.config.image_sizes[0])),
                  question, options, on_text);
}

// ---------------------------------------------------------------------------------------------
// ChatSession

ChatSession::ChatSession(MoxinVLM& model, const Tokenizer& tokenizer, PreprocessedImage image,
                         GenerateOptions options)
    : model_(&model),
      tokenizer_(&tokenizer),
      image_(std::move(image)),
      options_(std::move(options)),
      num_valid_ids_(sampling_vocab_size(model, tokenizer, options_.allow_vocab_mismatch)),
      sampler_(options_.sampling, num_valid_ids_) {
  options_.validate();
  if (options_.prompt_format != PromptFormat::Pure)
    throw_error(ErrorKind::Request, "a chat uses the pure prompt format, not raw prompts");
}

int64_t ChatSession::cached_positions() const {
  return cache_offset(cache_);
}

void ChatSession::reset() {
  cache_.clear();
  conversation_ = PurePromptBuilder();
  context_ids_.clear();
  unfed_.reset();
  sampler_ = Sampler(options_.sampling, num_valid_ids_);
  turns_ = 0;
  broken_ = false;
}

GenerationResult ChatSession::ask(std::string_view question, const TextCallback& on_text) {
  const auto start = Clock::now();
  if (broken_)
    throw_error(ErrorKind::Request, "the chat session failed during an earlier turn; reset it");
  const Tokenizer& tok = *tokenizer_;
  PurePromptBuilder conversation = conversation_;
  conversation.add_human(question);

  const bool first = turns_ == 0;
  std::vector<int32_t> new_ids;
  if (first) {
    new_ids = tok.encode(conversation.prompt());
    if (new_ids.empty() || new_ids[0] != tok.bos_id())
      throw_error(ErrorKind::Tokenizer, "the tokenizer did not prepend BOS");
  } else {
    // The new turn's ids as the whole prompt tokenizes them: "</s>" is an added special token in
    // tokenizer.json, so the text after the last one tokenizes independently of what precedes.
    const std::vector<int32_t> full = tok.encode(conversation.prompt());
    const auto last_eos = std::find(full.rbegin(), full.rend(), tok.eos_id());
    std::vector<int32_t> suffix;
    if (last_eos != full.rend()) {
      suffix.assign(last_eos.base(), full.end());
    } else {  // tokenizer.model: "</s>" in text is not special; tokenize the turn on its own
      suffix = tok.encode(rstrip_whitespace(conversation.last_turn()), /*add_bos=*/false);
    }
    if (unfed_ && *unfed_ != tok.eos_id()) new_ids.push_back(*unfed_);
    new_ids.push_back(tok.eos_id());
    new_ids.insert(new_ids.end(), suffix.begin(), suffix.end());
  }
  if (options_.allow_vocab_mismatch) fit_prompt_to_model(new_ids, *model_);
  check_context(*model_, options_, cached_positions(),
                first ? model_->dino.config.num_patches() : 0, int64_t(new_ids.size()));

  GenerationResult result;
  try {
    if (!visual_.defined()) visual_ = model_->encode_image(image_.dino, image_.siglip);
    Tensor embeddings = model_->embed(ids_tensor(new_ids));  // [1, L, hidden]
    if (first) {  // [embed(BOS), visual x N, embed(ids[1:])], as MoxinVLM::forward builds it
      const int64_t L = embeddings.dim(1);
      embeddings = ops::concat(
          {ops::slice(embeddings, 1, 0, 1), visual_, ops::slice(embeddings, 1, 1, L)}, 1);
    }
    std::vector<int32_t> history = context_ids_;
    history.insert(history.end(), new_ids.begin(), new_ids.end());
    Generate generator(*model_, cache_, sampler_, embeddings, std::move(history));
    result = run_to_stop(generator, tok, options_, on_text, start);
    sampler_ = generator.sampler();
    context_ids_ = generator.history();
  } catch (...) {
    broken_ = true;
    throw;
  }
  result.prompt_tokens = int64_t(new_ids.size());
  unfed_ = result.token_ids.back();
  conversation.add_model(result.text);
  conversation_ = std::move(conversation);
  ++turns_;
  return result;
}

}  // namespace moxin
