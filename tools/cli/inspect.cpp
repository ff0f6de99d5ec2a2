// `moxin-vlm inspect --model DIR`: what a checkpoint holds and whether it loads.
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

#include "cli/commands.h"
#include "moxin/errors.h"
#include "moxin/model.h"

namespace moxin::cli {

namespace {

void print_tower(const char* name, const ViTEncoder& tower, const std::string& prefix) {
  const ViTConfig& c = tower.config;
  std::printf("  %-8s %s  width %lld, depth %lld, heads %lld, mlp %lld, patch %lld, image %lld, "
              "prefix tokens %lld (cls %s, registers %lld), LayerScale %s, features from block %lld\n",
              name, prefix.c_str(), (long long)c.embed_dim, (long long)c.depth,
              (long long)c.num_heads, (long long)c.mlp_hidden_dim, (long long)c.patch_size,
              (long long)c.image_size, (long long)c.num_prefix_tokens(),
              c.has_cls_token ? "yes" : "no", (long long)c.num_registers,
              c.has_layer_scale ? "yes" : "no", (long long)c.feature_block());
}

// When the model does not load: what the directory holds, so the problem can be located.
void print_partial(const std::string& dir) {
  std::printf("checkpoint  %s\n", dir.c_str());
  std::error_code ec;
  std::printf("  config.json %s\n",
              std::filesystem::exists(std::filesystem::path(dir) / "config.json", ec) ? "found" : "absent");
  try {
    const WeightMap weights = load_safetensors_dir(dir);
    std::map<std::string, std::pair<int64_t, int64_t>> by_root;  // first name part -> tensors, elements
    for (const auto& name : weights.names()) {
      auto& entry = by_root[name.substr(0, name.find('.'))];
      entry.first += 1;
      entry.second += weights.get(name).numel();
    }
    std::printf("  %zu tensors:\n", weights.size());
    for (const auto& [root, counts] : by_root)
      std::printf("    %-20s %lld tensors, %lld parameters\n", root.c_str(),
                  (long long)counts.first, (long long)counts.second);
  } catch (const Error& e) {
    std::printf("  weights unreadable: %s\n", e.what());
  }
}

int run_inspect(const std::string& dir) {
  MoxinVLM model;
  try {
    model = load_model(dir);
  } catch (const Error& e) {
    print_partial(dir);
    std::printf("status      does not load: %s: %s\n", error_kind_name(e.kind()), e.what());
    throw;
  }
  const CheckpointLayout& l = model.layout;
  const MistralConfig& tc = model.config.text_config;
  std::printf("checkpoint  %s\n", l.directory.c_str());
  std::printf("  config.json %s; %s, %zu file(s):\n", l.config_found ? "found" : "absent (defaults used)",
              l.sharded ? "sharded with model.safetensors.index.json" : "single file",
              l.files.size());
  for (const auto& f : l.files) std::printf("    %s\n", f.c_str());
  std::printf("vision\n");
  print_tower("dinov2", model.dino, l.dino_prefix);
  print_tower("siglip", model.siglip, l.siglip_prefix);
  std::printf("  attention %s, LayerScale named %s\n", l.attention_naming.c_str(),
              l.layer_scale_naming.c_str());
  std::printf("projector   %s (%s): %lld -> %lld -> %lld -> %lld\n", l.projector_prefix.c_str(),
              l.projector_naming.c_str(), (long long)model.projector.fc1.in_features(),
              (long long)model.projector.fc1.out_features(),
              (long long)model.projector.fc2.out_features(),
              (long long)model.projector.fc3.out_features());
  std::printf("decoder     %s: hidden %lld, layers %lld, heads %lld, kv heads %lld, head dim %lld, "
              "mlp %lld, vocab %lld, rms eps %g, rope theta %g, sliding window %lld, %s embeddings\n",
              l.decoder_prefix.c_str(), (long long)tc.hidden_size, (long long)tc.num_hidden_layers,
              (long long)tc.num_attention_heads, (long long)tc.num_key_value_heads,
              (long long)tc.resolved_head_dim(), (long long)tc.intermediate_size,
              (long long)tc.vocab_size, double(tc.rms_norm_eps), double(tc.rope_theta),
              (long long)tc.sliding_window, l.tied_embeddings ? "tied" : "untied");
  if (model.config.quantization)
    std::printf("quantized   MLX affine, %d bits, group size %d\n", model.config.quantization->bits,
                model.config.quantization->group_size);
  int64_t total = 0;
  std::printf("parameters\n");
  for (const auto& [dtype, count] : l.parameters_by_dtype) {
    std::printf("  %-5s %lld (%.3f B)\n", dtype.c_str(), (long long)count, double(count) / 1e9);
    total += count;
  }
  std::printf("  total %lld (%.3f B)\n", (long long)total, double(total) / 1e9);
  if (!l.ignored.empty()) {
    std::printf("ignored tensors (%zu, not used by the VLM)\n", l.ignored.size());
    for (const auto& name : l.ignored) std::printf("  %s\n", name.c_str());
  }
  std::printf("status      loads cleanly\n");
  return 0;
}

}  // namespace

Command add_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Describe a checkpoint: layout, dims, dtypes, "
                                            "parameter counts, and what is wrong with it");
  auto dir = std::make_shared<std::string>();
  cmd->add_option("--model", *dir, "model directory")->required();
  return {cmd, [dir] { return run_inspect(*dir); }};
}

}  // namespace moxin::cli
