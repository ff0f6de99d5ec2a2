// `moxin-vlm generate` and `moxin-vlm chat` as a user runs them, on the tiny-hf checkpoint with
// the real Mistral tokenizer copied beside it. The tiny model knows 512 ids and the tokenizer
// 32001, so these runs pass --allow-vocab-mismatch; without it the CLI refuses the pair.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "moxin/generate.h"
#include "test_support.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;

class GenerateCli : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(test::cli_binary())) << test::cli_binary();
    scratch_ = test::scratch_dir("moxin-gen-cli");
    const fs::path tiny = test::checkpoint_dir("tiny-hf");
    ASSERT_FALSE(tiny.empty()) << "run scripts/make_test_checkpoints.sh";
    bare_ = tiny;
    model_ = scratch_ / "model";
    fs::copy(tiny, model_, fs::copy_options::recursive);
    fs::copy(test::fixtures_dir() / "tokenizer" / "mistral", model_, fs::copy_options::recursive);
    photo_ = test::fixtures_dir() / "parity" / "photo.png";
    base_ =
        "--model " + model_.string() + " --image " + photo_.string() + " --allow-vocab-mismatch";
  }
  void TearDown() override { fs::remove_all(scratch_); }

  test::CliResult run(const std::string& args, const std::string& stdin_text = "") {
    return test::run_cli(args, scratch_, stdin_text);
  }

  // A shell word that is exactly `text` (for /bin/sh).
  static std::string quoted(const std::string& text) {
    std::string out = "'";
    for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
  }

  nlohmann::json run_json(const std::string& args) {
    const test::CliResult r = run("generate " + base_ + " --json " + args);
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.err, "") << "--json writes no stats line";
    return r.status == 0 ? nlohmann::json::parse(r.out) : nlohmann::json();
  }

  void expect_clean_failure(const std::string& args, const std::string& mentions,
                            const std::string& stdin_text = "") {
    SCOPED_TRACE(args);
    const test::CliResult r = run(args, stdin_text);
    EXPECT_NE(r.status, 0);
    EXPECT_LT(r.status, 128) << "killed by a signal";
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("moxin-vlm: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(mentions), std::string::npos) << r.err;
    EXPECT_EQ(r.out, "");
  }

  fs::path scratch_, bare_, model_, photo_;
  std::string base_;
};

TEST_F(GenerateCli, StreamsTheAnswerAndAStatsLine) {
  const test::CliResult r =
      run("generate " + base_ + " --prompt 'What is in the image?' --max-tokens 16");
  ASSERT_EQ(r.status, 0) << r.err;
  // stderr is not a terminal here: no progress indicator; the vocabulary note, the stats line.
  const std::regex stats(
      "moxin-vlm: note: the tokenizer has 32001 ids, the model 512: [^\n]*\n"
      "prompt 12 tokens, generated ([0-9]+) tokens \\((eos|max_tokens)\\), time to first token "
      "[0-9.]+ s, decode [0-9.]+ tokens/s\n");
  std::smatch m;
  ASSERT_TRUE(std::regex_match(r.err, m, stats)) << r.err;

  // The same answer and ids as the library computes in-process.
  const nlohmann::json j = run_json("--prompt 'What is in the image?' --max-tokens 16");
  EXPECT_EQ(r.out, j["answer"].get<std::string>() + "\n");
  EXPECT_EQ(j["prompt"], "In: What is in the image?\nOut:");
  EXPECT_EQ(j["prompt_tokens"], 12);
  EXPECT_NE(j["note"].get<std::string>().find("<unk>"), std::string::npos);
  EXPECT_EQ(std::to_string(j["generated_tokens"].get<int>()), m[1].str());
  EXPECT_EQ(j["stop_reason"], m[2].str());

  MoxinVLM model = load_model(model_);
  const auto tokenizer = load_tokenizer(model_);
  GenerateOptions o;
  o.max_tokens = 16;
  o.allow_vocab_mismatch = true;
  const GenerationResult lib =
      generate(model, *tokenizer, load_image(photo_), "What is in the image?", o);
  EXPECT_EQ(j["token_ids"].get<std::vector<int32_t>>(), lib.token_ids);
  EXPECT_EQ(j["answer"].get<std::string>(), lib.text);
  // Greedy is the default and --temp 0 is greedy.
  EXPECT_EQ(run_json("--prompt 'What is in the image?' --max-tokens 16 --temp 0")["token_ids"],
            j["token_ids"]);
}

TEST_F(GenerateCli, SeedsReproduceSampling) {
  const std::string args =
      "--prompt 'Describe the picture.' --max-tokens 24 --temp 0.9 --top-p 0.95 "
      "--top-k 200 --min-p 0.01 --repetition-penalty 1.1 ";
  const auto a = run_json(args + "--seed 11")["token_ids"];
  EXPECT_EQ(run_json(args + "--seed 11")["token_ids"], a);
  EXPECT_NE(run_json(args + "--seed 12")["token_ids"], a);
}

TEST_F(GenerateCli, RawPromptAndStopString) {
  const auto pure = run_json("--prompt 'What is in the image?' --max-tokens 8");
  const auto raw =
      run_json("--raw --prompt \"$(printf 'In: What is in the image?\\nOut:')\" --max-tokens 8");
  EXPECT_EQ(raw["token_ids"], pure["token_ids"]);
  EXPECT_EQ(raw["prompt"], pure["prompt"]);
  // Stopping at the answer's first character leaves nothing (only whitespace precedes it).
  const std::string answer = pure["answer"];
  ASSERT_FALSE(answer.empty());
  size_t first_char = 1;
  while (first_char < answer.size() &&
         (static_cast<unsigned char>(answer[first_char]) & 0xC0) == 0x80)
    ++first_char;
  const auto cut = run_json("--prompt 'What is in the image?' --max-tokens 8 --stop " +
                            quoted(answer.substr(0, first_char)));
  EXPECT_EQ(cut["stop_reason"], "stop_string");
  EXPECT_EQ(cut["answer"], "");
  const auto ids = cut["token_ids"].get<std::vector<int32_t>>();
  const auto all = pure["token_ids"].get<std::vector<int32_t>>();
  EXPECT_TRUE(std::equal(ids.begin(), ids.end(), all.begin()));
}

TEST_F(GenerateCli, ChatReusesTheCacheAcrossTurns) {
  const test::CliResult r =
      run("chat " + base_ + " --max-tokens 6", "What is in the image?\n\n   \nAnd the colour?\n");
  ASSERT_EQ(r.status, 0) << r.err;
  // Two answers on stdout, one per line; blank lines are skipped; two stats lines.
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 2) << r.out;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 3) << r.err;  // the note + 2 stats
  // The follow-up ran only its own tokens: the unfed last id or none, </s>, and 9 for
  // "In: And the colour?\nOut:" (not the 12 + 256 of a fresh start).
  EXPECT_NE(r.err.find("prompt 12 tokens"), std::string::npos) << r.err;
  EXPECT_TRUE(r.err.find("prompt 11 tokens") != std::string::npos ||
              r.err.find("prompt 10 tokens") != std::string::npos)
      << r.err;

  // The same conversation in-process.
  MoxinVLM model = load_model(model_);
  const auto tokenizer = load_tokenizer(model_);
  GenerateOptions o;
  o.max_tokens = 6;
  o.allow_vocab_mismatch = true;
  ChatSession chat(model, *tokenizer, preprocess_image(load_image(photo_)), o);
  const std::string a1 = chat.ask("What is in the image?").text;
  const std::string a2 = chat.ask("And the colour?").text;
  EXPECT_EQ(r.out, a1 + "\n" + a2 + "\n");

  // A refused turn is reported, the conversation goes on, and the exit status says so.
  const test::CliResult bad = run("chat " + base_ + " --max-tokens 6 --context-limit 290",
                            "What is in the image?\nAnd the colour of it?\n");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("does not fit"), std::string::npos) << bad.err;
  EXPECT_EQ(std::count(bad.out.begin(), bad.out.end(), '\n'), 1) << bad.out;
}

TEST_F(GenerateCli, BadInputsFailWithOneLine) {
  const std::string q = " --prompt 'What is in the image?'";
  // The pairing of a 32001-id tokenizer with a 512-id model is refused unless allowed.
  expect_clean_failure("generate --model " + model_.string() + " --image " + photo_.string() + q,
                       "--allow-vocab-mismatch");
  // No tokenizer beside the model, or one that is not a directory of tokenizer files.
  expect_clean_failure("generate --model " + bare_.string() + " --image " + photo_.string() +
                           " --allow-vocab-mismatch" + q,
                       "tokenizer");
  expect_clean_failure("generate " + base_ + " --tokenizer " + (scratch_ / "none").string() + q,
                       "tokenizer");
  const fs::path corrupt = scratch_ / "corrupt";
  fs::create_directories(corrupt);
  std::ofstream(corrupt / "tokenizer.json") << "{\"model\": {\"type\": \"BPE\", \"vocab\": [1, 2";
  expect_clean_failure("generate " + base_ + " --tokenizer " + corrupt.string() + q,
                       "tokenizer.json");
  // Prompts.
  expect_clean_failure("generate " + base_ + " --prompt ''", "empty");
  expect_clean_failure("generate " + base_ + " --prompt ' <image> '", "empty");
  expect_clean_failure("generate " + base_ + " --prompt \"$(printf 'caf\\351?')\"", "UTF-8");
  // Images.
  std::ofstream(scratch_ / "broken.png") << "\x89PNG\r\n\x1a\n not really";
  expect_clean_failure("generate --model " + model_.string() + " --allow-vocab-mismatch --image " +
                           (scratch_ / "broken.png").string() + q,
                       "broken.png");
  expect_clean_failure("generate --model " + model_.string() + " --allow-vocab-mismatch --image " +
                           (scratch_ / "missing.jpg").string() + q,
                       "missing.jpg");
  // A prompt longer than the context (256 image positions + 12 + 512 > 600).
  expect_clean_failure("generate " + base_ + q + " --context-limit 600", "does not fit");
  std::string long_prompt;
  for (int i = 0; i < 1400; ++i) long_prompt += " word";  // 1402 tokens + 256 + 512 > 2048
  expect_clean_failure("generate " + base_ + " --prompt '" + long_prompt + "'", "does not fit");
  // Options.
  expect_clean_failure("generate " + base_ + q + " --temp -1", "temperature");
  expect_clean_failure("generate " + base_ + q + " --top-p 0", "top-p");
  expect_clean_failure("generate " + base_ + q + " --max-tokens 0", "max tokens");
  expect_clean_failure("chat " + base_ + " --min-p 2", "min-p", "hello\n");
}

}  // namespace
}  // namespace moxin
