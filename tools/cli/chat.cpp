// `moxin-vlm chat`: a conversation about one image, one question per stdin line until EOF.
// The image is encoded once and the KV cache carries every turn, so a follow-up question costs
// only its own tokens.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "moxin/errors.h"
#include "moxin/generate.h"
#include "moxin/image.h"
#include "moxin/model.h"
#include "moxin/tokenizer.h"

namespace moxin::cli {

// Shared with `generate`, defined in generate.cpp.
struct GenerationFlags {
  ModelOptions model;
  std::string image, tokenizer;
  GenerateOptions options;
};
void add_generation_flags(CLI::App* cmd, GenerationFlags& f);
MoxinVLM load_model_with_progress(const ModelOptions& options);
std::unique_ptr<Tokenizer> load_tokenizer_for(const GenerationFlags& f);
std::string vocab_mismatch_note(const MoxinVLM& model, const Tokenizer& tokenizer,
                                const GenerateOptions& options);
void print_stats(const GenerationResult& r);
void write_text(std::string_view text);

namespace {

int run_chat(GenerationFlags& f) {
  f.options.validate();
  const auto tokenizer = load_tokenizer_for(f);
  const Image image = load_image(f.image);
  MoxinVLM model = load_model_with_progress(f.model);
  if (const std::string note = vocab_mismatch_note(model, *tokenizer, f.options); !note.empty())
    std::fprintf(stderr, "moxin-vlm: note: %s\n", note.c_str());
  ChatSession chat(model, *tokenizer, preprocess_image(image, int(model.config.image_sizes[0])),
                   f.options);

  const bool interactive = ::isatty(STDIN_FILENO);
  int status = 0;
  std::string line;
  while (true) {
    if (interactive) {
      std::fputs("> ", stderr);
      std::fflush(stderr);
    }
    if (!std::getline(std::cin, line)) break;
    if (strip_whitespace(line).empty()) continue;
    try {
      const GenerationResult r = chat.ask(line, write_text);
      write_text("\n");
      print_stats(r);
    } catch (const Error& e) {
      // A refused turn (empty, no room left) leaves the conversation intact: report, go on.
      std::fprintf(stderr, "moxin-vlm: %s: %s\n", error_kind_name(e.kind()), e.what());
      status = 1;
      if (e.kind() != ErrorKind::Request && e.kind() != ErrorKind::Tokenizer) return 1;
    }
  }
  if (interactive) std::fputs("\n", stderr);
  return status;
}

}  // namespace

Command add_chat(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "chat", "Talk about an image: one question per line on stdin, until end of input");
  auto f = std::make_shared<GenerationFlags>();
  add_generation_flags(cmd, *f);
  return {cmd, [f] { return run_chat(*f); }};
}

}  // namespace moxin::cli
