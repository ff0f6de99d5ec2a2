// `moxin-vlm generate`: answers one question about an image, streaming the answer to stdout and
// a stats line to stderr (or one JSON object with --json). Also the flags and helpers the
// `chat` command shares (declared again in chat.cpp).
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "moxin/errors.h"
#include "moxin/generate.h"
#include "moxin/image.h"
#include "moxin/model.h"
#include "moxin/tokenizer.h"

namespace moxin::cli {

// The options generate and chat share.
struct GenerationFlags {
  ModelOptions model;  // --model, --quantize, --group-size, --device
  std::string image, tokenizer;
  GenerateOptions options;
};

void add_generation_flags(CLI::App* cmd, GenerationFlags& f) {
  add_model_options(*cmd, f.model);
  cmd->add_option("--image", f.image, "image file (PNG, JPEG or WebP)")->required();
  cmd->add_option("--tokenizer", f.tokenizer,
                  "directory with tokenizer.json or tokenizer.model (default: the model's)");
  SamplingOptions& s = f.options.sampling;
  cmd->add_option("--temp", s.temperature, "sampling temperature; 0 is greedy (the default)");
  cmd->add_option("--top-k", s.top_k, "keep the K most likely ids (0: off)");
  cmd->add_option("--top-p", s.top_p, "nucleus sampling mass in (0, 1] (1: off)");
  cmd->add_option("--min-p", s.min_p, "drop ids below P times the best one's probability (0: off)");
  cmd->add_option("--repetition-penalty", s.repetition_penalty,
                  "HF repetition penalty on prompt and generated ids (1: off)");
  cmd->add_option("--seed", s.seed, "sampling seed (std::mt19937_64); same seed, same answer");
  cmd->add_option("--max-tokens", f.options.max_tokens, "most ids to generate per answer")
      ->capture_default_str();
  cmd->add_option("--context-limit", f.options.context_limit,
                  "image + prompt + max tokens must fit this many positions")
      ->capture_default_str();
  cmd->add_option("--stop", f.options.stop_strings, "stop where the text reaches STR (repeatable)");
  cmd->add_flag("--allow-vocab-mismatch", f.options.allow_vocab_mismatch,
                "accept a tokenizer with more ids than the model (small test checkpoints): "
                "unknown prompt ids become <unk>");
}

// A spinner with elapsed time while `load` runs, only when stderr is a terminal: load_model
// reports no progress of its own, so the indicator is honest about being indeterminate.
MoxinVLM load_model_with_progress(const ModelOptions& options) {
  if (!::isatty(STDERR_FILENO)) return load_model_for(options);
  const std::string& dir = options.dir;
  std::atomic<bool> done{false};
  std::thread spinner([&] {
    static const char frames[] = "|/-\\";
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; !done.load(); ++i) {
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::fprintf(stderr, "\rloading model %s %c %.1fs", dir.c_str(), frames[i % 4], s);
      std::fflush(stderr);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
  });
  try {
    MoxinVLM model = load_model_for(options);
    done = true;
    spinner.join();
    return model;
  } catch (...) {
    done = true;
    spinner.join();
    throw;
  }
}

std::unique_ptr<Tokenizer> load_tokenizer_for(const GenerationFlags& f) {
  return load_tokenizer(std::filesystem::path(f.tokenizer.empty() ? f.model.dir : f.tokenizer));
}

// With --allow-vocab-mismatch the answer is computed from a partly <unk> prompt: say so.
std::string vocab_mismatch_note(const MoxinVLM& model, const Tokenizer& tokenizer,
                                const GenerateOptions& options) {
  const int64_t model_vocab = model.lm_head.out_features();
  if (!options.allow_vocab_mismatch || tokenizer.vocab_size() <= model_vocab) return "";
  return "the tokenizer has " + std::to_string(tokenizer.vocab_size()) + " ids, the model " +
         std::to_string(model_vocab) + ": prompt ids beyond the model's became <unk>, and only " +
         "ids below " + std::to_string(model_vocab) + " were sampled";
}

void print_stats(const GenerationResult& r) {
  std::fprintf(stderr,
               "prompt %lld tokens, generated %lld tokens (%s), time to first token %.3f s, "
               "decode %.2f tokens/s\n",
               (long long)r.prompt_tokens, (long long)r.generated_tokens,
               stop_reason_name(r.stop_reason), r.time_to_first_token_s, r.decode_tokens_per_s);
}

void write_text(std::string_view text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

namespace {

struct GenerateCommand {
  GenerationFlags flags;
  std::string prompt;
  bool raw = false;
  bool json = false;
};

int run_generate(GenerateCommand& c) {
  GenerateOptions& options = c.flags.options;
  options.prompt_format = c.raw ? PromptFormat::Raw : PromptFormat::Pure;
  // Everything that can be refused cheaply is refused before the model loads.
  options.validate();
  const std::string prompt_text = build_prompt(c.prompt, options.prompt_format);
  const auto tokenizer = load_tokenizer_for(c.flags);
  const Image image = load_image(c.flags.image);

  MoxinVLM model = load_model_with_progress(c.flags.model);
  const GenerationResult r = generate(model, *tokenizer, image, c.prompt, options,
                                      c.json ? TextCallback() : TextCallback(write_text));
  if (c.json) {
    nlohmann::json j;
    j["prompt"] = prompt_text;
    j["answer"] = r.text;
    j["token_ids"] = r.token_ids;
    j["prompt_tokens"] = r.prompt_tokens;
    j["generated_tokens"] = r.generated_tokens;
    j["time_to_first_token_s"] = r.time_to_first_token_s;
    j["decode_tokens_per_s"] = r.decode_tokens_per_s;
    j["stop_reason"] = stop_reason_name(r.stop_reason);
    if (const std::string note = vocab_mismatch_note(model, *tokenizer, options); !note.empty())
      j["note"] = note;
    std::printf("%s\n", j.dump().c_str());
  } else {
    write_text("\n");
    // After the answer, so that a refused request still fails with a single line.
    if (const std::string note = vocab_mismatch_note(model, *tokenizer, options); !note.empty())
      std::fprintf(stderr, "moxin-vlm: note: %s\n", note.c_str());
    print_stats(r);
  }
  return 0;
}

}  // namespace

Command add_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Answer a question about an image");
  auto c = std::make_shared<GenerateCommand>();
  add_generation_flags(cmd, c->flags);
  cmd->add_option("--prompt", c->prompt, "the question (built into `In: ...\\nOut:`)")->required();
  cmd->add_flag("--raw", c->raw, "use --prompt as the whole prompt, unchanged");
  cmd->add_flag("--json", c->json, "print one JSON object (answer, ids, stats) instead");
  return {cmd, [c] { return run_generate(*c); }};
}

}  // namespace moxin::cli
