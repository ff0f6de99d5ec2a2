// `moxin-vlm quantize`: writes an MLX-quantized copy of a checkpoint that every command loads.
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "moxin/errors.h"
#include "moxin/model.h"

namespace moxin::cli {

namespace {

struct QuantizeOptions {
  std::string model, out;
  int bits = 4;
  int group_size = 64;
};

// Files beside the weights that the quantized checkpoint needs to be used the same way.
constexpr const char* kCompanionFiles[] = {
    "tokenizer.json",          "tokenizer.model",    "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",  "generation_config.json",
    "preprocessor_config.json"};

int run_quantize(const QuantizeOptions& o) {
  MoxinVLM model = load_model(o.model);
  model.quantize(o.group_size, o.bits);
  save_model(model, o.out);
  for (const char* name : kCompanionFiles) {
    const auto from = std::filesystem::path(o.model) / name;
    std::error_code ec;
    if (!std::filesystem::exists(from, ec)) continue;
    std::filesystem::copy_file(from, std::filesystem::path(o.out) / name,
                               std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) throw_error(ErrorKind::Io, "copying " + from.string() + ": " + ec.message());
  }
  std::fprintf(stderr, "moxin-vlm: wrote %d-bit (group %d) checkpoint to %s\n", o.bits,
               o.group_size, o.out.c_str());
  return 0;
}

}  // namespace

Command add_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize", "Write an MLX-quantized (affine) copy of a checkpoint");
  auto o = std::make_shared<QuantizeOptions>();
  cmd->add_option("--model", o->model, "model directory to read")->required();
  cmd->add_option("--bits", o->bits, "bits per weight: 2, 3, 4, 5, 6 or 8")->capture_default_str();
  cmd->add_option("--group-size", o->group_size, "weights per scale/bias: 32, 64 or 128")
      ->capture_default_str();
  cmd->add_option("--out", o->out, "directory to write")->required();
  return {cmd, [o] { return run_quantize(*o); }};
}

}  // namespace moxin::cli
