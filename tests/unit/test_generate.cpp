// Generation: greedy ids identical to the reference's greedy loop (transformers, float32) on the
// parity checkpoints; seeded sampling reproducible; the streamed answer (stop strings, strip);
// context and vocabulary checks; a chat's cached follow-up equal to recomputing from scratch.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "moxin/errors.h"
#include "moxin/generate.h"
#include "test_support.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;

// The reference's greedy continuation is only defined where its top-2 logit gap is clear; below
// this, float32 summation order may legitimately pick the other id.
constexpr double kClearGap = 1e-3;

Tensor ids_tensor(const std::vector<int32_t>& ids) {
  Tensor t = Tensor::empty({1, int64_t(ids.size())}, DType::I32);
  std::copy(ids.begin(), ids.end(), t.data_mut<int32_t>());
  return t;
}

nlohmann::json read_meta(const std::string& variant) {
  std::ifstream in(test::fixtures_dir() / "parity" / variant / "meta.json");
  return nlohmann::json::parse(in);
}

PreprocessedImage photo(const MoxinVLM& model) {
  return preprocess_image(load_image(test::fixtures_dir() / "parity" / "photo.png"),
                          int(model.config.image_sizes[0]));
}

void expect_request_error(const std::function<void()>& f, const std::string& mentions) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning " << mentions;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Request) << e.what();
    EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Exactness on the parity checkpoints

class GreedyParity : public ::testing::TestWithParam<std::string> {};

TEST_P(GreedyParity, MatchesTheReferenceGreedyLoop) {
  const fs::path dir = test::checkpoint_dir(GetParam());
  ASSERT_FALSE(dir.empty()) << "run scripts/make_test_checkpoints.sh";
  const nlohmann::json meta = read_meta(GetParam());
  const auto expected = meta["greedy_ids"].get<std::vector<int32_t>>();
  const auto gaps = meta["greedy_top2_gap"].get<std::vector<double>>();
  ASSERT_EQ(expected.size(), 32u);
  ASSERT_EQ(gaps.size(), expected.size());

  MoxinVLM model = load_model(dir);
  const PreprocessedImage image = photo(model);
  KVCacheList cache;
  Generate generator(model, cache, 0.0f, image.dino, image.siglip,
                     ids_tensor(meta["input_ids"].get<std::vector<int32_t>>()));
  int matched = 0;
  double min_gap = 1e9;
  for (size_t step = 0; step < expected.size(); ++step) {
    const int32_t id = generator.next();
    if (id != expected[step]) {
      // Past a divergence the two continuations condition on different tokens: stop comparing.
      EXPECT_LE(gaps[step], kClearGap)
          << GetParam() << " step " << step << ": got " << id << ", reference " << expected[step]
          << " (top-2 gap " << gaps[step] << ")";
      std::printf("[%s] diverged at step %zu where the reference's top-2 gap is %g\n",
                  GetParam().c_str(), step, gaps[step]);
      break;
    }
    ++matched;
    min_gap = std::min(min_gap, gaps[step]);
  }
  std::printf(
      "[%s] greedy ids identical for %d/%zu steps (smallest top-2 gap among them %g); "
      "cache holds %lld positions\n",
      GetParam().c_str(), matched, expected.size(), min_gap, (long long)cache[0]->offset());
  EXPECT_EQ(cache[0]->offset(), meta["sequence_length"].get<int64_t>() + matched - 1);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, GreedyParity,
                         ::testing::Values("tiny-hf", "tiny-f32", "tiny-native", "real-towers"));

class TinyModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const fs::path dir = test::checkpoint_dir("tiny-hf");
    if (dir.empty()) return;
    model_ = new MoxinVLM(load_model(dir));
    image_ = new PreprocessedImage(photo(*model_));
    tokenizer_ = load_tokenizer(test::fixtures_dir() / "tokenizer" / "mistral").release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete image_;
    delete tokenizer_;
    model_ = nullptr;
    image_ = nullptr;
    tokenizer_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(model_, nullptr) << "run scripts/make_test_checkpoints.sh"; }

  // The tiny model knows 512 ids; the real tokenizer 32001 (see allow_vocab_mismatch).
  static GenerateOptions options(int max_tokens) {
    GenerateOptions o;
    o.max_tokens = max_tokens;
    o.allow_vocab_mismatch = true;
    return o;
  }
  static std::vector<int32_t> fit(std::vector<int32_t> ids) {
    for (auto& id : ids)
      if (id >= 512) id = 0;
    return ids;
  }
  std::vector<int32_t> sample_ids(const SamplingOptions& o, int n) {
    KVCacheList cache;
    Generate g(*model_, cache, o, image_->dino, image_->siglip,
               ids_tensor(read_meta("tiny-hf")["input_ids"].get<std::vector<int32_t>>()));
    std::vector<int32_t> ids;
    for (int i = 0; i < n; ++i) ids.push_back(g.next());
    return ids;
  }

  static MoxinVLM* model_;
  static PreprocessedImage* image_;
  static Tokenizer* tokenizer_;
};
MoxinVLM* TinyModel::model_ = nullptr;
PreprocessedImage* TinyModel::image_ = nullptr;
Tokenizer* TinyModel::tokenizer_ = nullptr;

TEST_F(TinyModel, SameSeedSameIdsOtherSeedOtherIds) {
  SamplingOptions o;
  o.temperature = 1.0f;
  o.top_p = 0.95f;
  o.seed = 2024;
  const auto a = sample_ids(o, 32), b = sample_ids(o, 32);
  EXPECT_EQ(a, b);
  o.seed = 2025;
  // Two seeds agree on 32 draws from a 512-id distribution with negligible probability.
  EXPECT_NE(sample_ids(o, 32), a);
  // And sampling is not greedy in disguise.
  EXPECT_NE(a, read_meta("tiny-hf")["greedy_ids"].get<std::vector<int32_t>>());
}

TEST_F(TinyModel, GenerateRejectsBadInputs) {
  KVCacheList cache;
  const Tensor ids = ids_tensor({1, 402, 77});
  expect_request_error(
      [&] { Generate(*model_, cache, 0.0f, image_->dino, image_->siglip, ids_tensor({})); },
      "[1, L]");
  expect_request_error(
      [&] {
        Generate(*model_, cache, 0.0f, image_->dino, image_->siglip,
                 Tensor::from_vector({2, 1}, {1, 1}).to(DType::F32));
      },
      "I32 or I64");
  SamplingOptions bad;
  bad.top_p = 0;
  expect_request_error([&] { Generate(*model_, cache, bad, image_->dino, image_->siglip, ids); },
                       "top-p");
  // A cache that already holds positions.
  Generate first(*model_, cache, 0.0f, image_->dino, image_->siglip, ids);
  first.next();
  expect_request_error([&] { Generate(*model_, cache, 0.0f, image_->dino, image_->siglip, ids); },
                       "empty KV cache");
}

TEST_F(TinyModel, AnswerIsTheStrippedDecodeAndStreamsWhole) {
  std::string streamed;
  const GenerationResult r =
      generate(*model_, *tokenizer_, *image_, "What is in the image?", options(24),
               [&](std::string_view chunk) { streamed += chunk; });
  EXPECT_EQ(r.prompt_tokens, 12);
  EXPECT_GE(r.generated_tokens, 1);
  EXPECT_EQ(r.generated_tokens, int64_t(r.token_ids.size()));
  std::vector<int32_t> answer_ids = r.token_ids;
  if (r.stop_reason == StopReason::Eos) {
    EXPECT_EQ(answer_ids.back(), 2);
    answer_ids.pop_back();
  } else {
    EXPECT_EQ(r.stop_reason, StopReason::MaxTokens);
    EXPECT_EQ(r.generated_tokens, 24);
  }
  EXPECT_EQ(r.text, std::string(strip_whitespace(tokenizer_->decode(answer_ids))));
  EXPECT_EQ(streamed, r.text);
  EXPECT_GT(r.time_to_first_token_s, 0);
  if (r.generated_tokens >= 2) {
    EXPECT_GT(r.decode_tokens_per_s, 0);
  }

  // Greedy generate() picks the ids the iterator picks from the same prompt ids.
  KVCacheList cache;
  Generate g(*model_, cache, SamplingOptions{}, image_->dino, image_->siglip,
             ids_tensor(fit(tokenizer_->encode(build_prompt("What is in the image?")))), 512);
  for (const int32_t id : r.token_ids) EXPECT_EQ(g.next(), id);
}

TEST_F(TinyModel, StopStringCutsTheAnswerAndIsNeverStreamed) {
  const GenerationResult full = generate(*model_, *tokenizer_, *image_, "Describe it", options(24));
  ASSERT_EQ(full.stop_reason, StopReason::MaxTokens)
      << "the tiny model stopped early; pick another prompt";
  const std::string raw = tokenizer_->decode(full.token_ids);
  // Two whole characters from the middle of the untrimmed text as the stop string.
  size_t begin = raw.size() / 2;
  while (begin < raw.size() && (static_cast<unsigned char>(raw[begin]) & 0xC0) == 0x80) ++begin;
  size_t end = begin;
  for (int chars = 0; chars < 2 && end < raw.size(); ++chars) do
      ++end;
    while (end < raw.size() && (static_cast<unsigned char>(raw[end]) & 0xC0) == 0x80);
  const std::string stop = raw.substr(begin, end - begin);
  ASSERT_FALSE(stop.empty());

  GenerateOptions o = options(24);
  o.stop_strings = {"never appears \x01", stop};
  std::string streamed;
  const GenerationResult cut = generate(*model_, *tokenizer_, *image_, "Describe it", o,
                                        [&](std::string_view chunk) { streamed += chunk; });
  EXPECT_EQ(cut.stop_reason, StopReason::StopString);
  EXPECT_EQ(cut.text, std::string(strip_whitespace(raw.substr(0, raw.find(stop)))));
  EXPECT_EQ(streamed, cut.text);
  EXPECT_LE(cut.generated_tokens, full.generated_tokens);
  EXPECT_TRUE(std::equal(cut.token_ids.begin(), cut.token_ids.end(), full.token_ids.begin()));
  std::printf("stop string \"%s\" cut %lld ids to %lld\n", stop.c_str(),
              (long long)full.generated_tokens, (long long)cut.generated_tokens);
}

TEST_F(TinyModel, ContextAndVocabularyAreCheckedBeforeCompute) {
  GenerateOptions o = options(64);
  o.context_limit = 300;  // 256 image positions + 12 prompt tokens + 64 > 300
  expect_request_error([&] { generate(*model_, *tokenizer_, *image_, "What is in the image?", o); },
                       "does not fit");
  o.context_limit = 332;  // exactly fits
  EXPECT_NO_THROW(generate(*model_, *tokenizer_, *image_, "What is in the image?", o));
  // The model's own maximum applies as well.
  const int64_t saved = model_->config.text_config.max_position_embeddings;
  model_->config.text_config.max_position_embeddings = 331;
  o.context_limit = 2048;
  expect_request_error([&] { generate(*model_, *tokenizer_, *image_, "What is in the image?", o); },
                       "> 331");
  model_->config.text_config.max_position_embeddings = saved;

  o.allow_vocab_mismatch = false;
  expect_request_error([&] { generate(*model_, *tokenizer_, *image_, "What is in the image?", o); },
                       "32001");
  o.allow_vocab_mismatch = true;
  expect_request_error([&] { generate(*model_, *tokenizer_, *image_, "  <image> ", o); }, "empty");
  o.max_tokens = 0;
  expect_request_error([&] { generate(*model_, *tokenizer_, *image_, "q", o); }, "max tokens");
  o.max_tokens = 4;
  o.stop_strings = {""};
  expect_request_error([&] { generate(*model_, *tokenizer_, *image_, "q", o); }, "stop strings");
}

TEST_F(TinyModel, RawPromptIsTokenizedUnchanged) {
  GenerateOptions o = options(4);
  o.prompt_format = PromptFormat::Raw;
  const GenerationResult raw =
      generate(*model_, *tokenizer_, *image_, "In: What is in the image?\nOut:", o);
  const GenerationResult pure =
      generate(*model_, *tokenizer_, *image_, "What is in the image?", options(4));
  EXPECT_EQ(raw.token_ids, pure.token_ids);
  EXPECT_EQ(raw.prompt_tokens, pure.prompt_tokens);
}

TEST_F(TinyModel, ChatFollowUpEqualsRecomputingTheWholeConversation) {
  ChatSession chat(*model_, *tokenizer_, *image_, options(6));
  const GenerationResult r1 = chat.ask("What is in the image?");
  EXPECT_TRUE(chat.image_encoded());
  EXPECT_EQ(r1.prompt_tokens, 12);
  EXPECT_EQ(chat.cached_positions(), 256 + r1.prompt_tokens + r1.generated_tokens - 1);

  // Empty questions are refused and leave the conversation as it was.
  expect_request_error([&] { chat.ask(" "); }, "empty");
  EXPECT_EQ(chat.turns(), 1);

  const int64_t before = chat.cached_positions();
  const GenerationResult r2 = chat.ask("And the colour?");
  EXPECT_EQ(chat.turns(), 2);
  // Only the new tokens ran: the unfed last id (unless EOS), </s>, the new turn.
  EXPECT_EQ(chat.cached_positions(), before + r2.prompt_tokens + r2.generated_tokens - 1);

  // The new turn's ids as the whole multi-turn prompt tokenizes them.
  const std::vector<int32_t> whole = tokenizer_->encode(chat.conversation().prompt());
  PurePromptBuilder up_to_turn2;
  up_to_turn2.add_human("What is in the image?");
  up_to_turn2.add_model(r1.text);
  up_to_turn2.add_human("And the colour?");
  const std::vector<int32_t> prompt2 = tokenizer_->encode(up_to_turn2.prompt());
  const auto eos = std::find(prompt2.rbegin(), prompt2.rend(), 2);
  ASSERT_NE(eos, prompt2.rend());
  std::vector<int32_t> suffix(eos.base(), prompt2.end());
  EXPECT_EQ(suffix, (std::vector<int32_t>{560, 28747, 1015, 272, 11474, 28804, 13, 2919, 28747}));
  EXPECT_GT(whole.size(), prompt2.size());

  // From scratch: prompt 1, answer 1's ids, </s>, the new turn, through a fresh cache.
  std::vector<int32_t> conversation =
      fit(tokenizer_->encode(build_prompt("What is in the image?")));
  for (const int32_t id : r1.token_ids)
    if (id != 2) conversation.push_back(id);
  conversation.push_back(2);
  for (const int32_t id : fit(suffix)) conversation.push_back(id);
  EXPECT_EQ(int64_t(conversation.size()) + 256, before + r2.prompt_tokens);
  KVCacheList cache;
  Generate fresh(*model_, cache, SamplingOptions{}, image_->dino, image_->siglip,
                 ids_tensor(conversation), 512);
  for (const int32_t id : r2.token_ids) EXPECT_EQ(fresh.next(), id);

  // reset() forgets the conversation but not the image: the first answer comes back.
  chat.reset();
  EXPECT_TRUE(chat.image_encoded());
  EXPECT_EQ(chat.cached_positions(), 0);
  EXPECT_EQ(chat.ask("What is in the image?").token_ids, r1.token_ids);
}

TEST_F(TinyModel, ChatRefusesATurnThatDoesNotFit) {
  GenerateOptions o = options(8);
  o.context_limit = 256 + 12 + 8 + 10;  // room for the first turn, not for a second
  ChatSession chat(*model_, *tokenizer_, *image_, o);
  chat.ask("What is in the image?");
  const int64_t positions = chat.cached_positions();
  expect_request_error([&] { chat.ask("And the colour of the sky?"); }, "does not fit");
  EXPECT_EQ(chat.cached_positions(), positions);
  EXPECT_EQ(chat.turns(), 1);
  o.prompt_format = PromptFormat::Raw;
  expect_request_error([&] { ChatSession(*model_, *tokenizer_, *image_, o); }, "pure");
}

// ---------------------------------------------------------------------------------------------
// The streamed answer, without a model

struct Streamed {
  std::string text;
  std::vector<std::string> chunks;
  bool stopped = false;
};

Streamed stream(const std::vector<std::string>& pieces, std::vector<std::string> stops) {
  Streamed s;
  AnswerText answer(std::move(stops), [&](std::string_view c) { s.chunks.emplace_back(c); });
  for (const auto& p : pieces)
    if (answer.append(p)) break;
  s.stopped = answer.finish();
  s.text = answer.text();
  return s;
}

std::string joined(const std::vector<std::string>& chunks) {
  std::string out;
  for (const auto& c : chunks) out += c;
  return out;
}

TEST(AnswerText, StripsLikePythonWhileStreaming) {
  const Streamed s = stream({" ", "\n", " Hello", " world", " \n", " "}, {});
  EXPECT_EQ(s.text, "Hello world");
  EXPECT_EQ(s.chunks, (std::vector<std::string>{"Hello", " world"}));
  EXPECT_FALSE(s.stopped);
  // Inner whitespace arrives once something follows it.
  EXPECT_EQ(stream({"a ", " ", "b"}, {}).chunks, (std::vector<std::string>{"a", "  b"}));
  EXPECT_EQ(stream({"\xE3\x80\x80", "x", "\xC2\xA0"}, {}).text, "x");  // U+3000, U+00A0
  EXPECT_EQ(stream({" ", " "}, {}).text, "");
}

TEST(AnswerText, StopStringsCutAndArePreserved) {
  EXPECT_EQ(stream({"The cat</an", "swer> more"}, {"</answer>"}).text, "The cat");
  // A prefix that turns out not to be the stop is released.
  const Streamed s = stream({"a </an", "other"}, {"</answer>"});
  EXPECT_EQ(s.text, "a </another");
  EXPECT_EQ(joined(s.chunks), s.text);
  EXPECT_FALSE(s.stopped);
  // The earliest of several stops wins; whitespace before it is stripped.
  const Streamed t = stream({"x ## y ### z"}, {"###", "##"});
  EXPECT_EQ(t.text, "x");
  EXPECT_TRUE(t.stopped);
  // A stop at the very start gives an empty answer.
  EXPECT_EQ(stream({"STOP here"}, {"STOP"}).text, "");
  // A held prefix at the end of generation is part of the answer.
  EXPECT_EQ(stream({"tail <"}, {"<stop>"}).text, "tail <");
  EXPECT_THROW(AnswerText({""}), Error);
}

TEST(AnswerText, EveryChunkingGivesTheSameAnswer) {
  // Every split of the text into three chunks: the answer is strip(text up to the first stop),
  // the chunks concatenate to it, and what was emitted is always a prefix of it.
  const std::string text = "  Yes, a cat \xE6\x97\xA5 END! then </s>more";
  const std::vector<std::string> stops = {"END!", "</s>", "cat dog"};
  const std::string expected(strip_whitespace(text.substr(0, text.find("END!"))));
  for (size_t i = 0; i <= text.size(); ++i)
    for (size_t j = i; j <= text.size(); ++j) {
      // Chunks from a detokenizer are whole characters; skip splits inside 日.
      auto inside = [&](size_t k) {
        return k < text.size() && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80;
      };
      if (inside(i) || inside(j)) continue;
      std::string emitted;
      bool prefix_ok = true;
      AnswerText answer(stops, [&](std::string_view c) {
        emitted += c;
        prefix_ok = prefix_ok && expected.compare(0, emitted.size(), emitted) == 0;
      });
      for (const std::string& chunk : {text.substr(0, i), text.substr(i, j - i), text.substr(j)})
        if (answer.append(chunk)) break;
      EXPECT_TRUE(answer.finish());
      ASSERT_EQ(answer.text(), expected) << "split " << i << ", " << j;
      ASSERT_EQ(emitted, expected) << "split " << i << ", " << j;
      ASSERT_TRUE(prefix_ok) << "split " << i << ", " << j;
    }
}

}  // namespace
}  // namespace moxin
