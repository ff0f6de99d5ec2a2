// `moxin-vlm logits`: the parity interface. Writes float32 logits [N, vocab] of the last N
// positions of the fused sequence as .npy. Keep its flags stable.
#include <memory>
#include <string>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "cli/parse.h"
#include "core/npy.h"
#include "moxin/errors.h"
#include "moxin/image.h"
#include "moxin/model.h"

namespace moxin::cli {

namespace {

struct LogitsOptions {
  ModelOptions model;
  std::string image, ids, out;
  int64_t last = -1;
};

int run_logits(const LogitsOptions& o) {
  const std::vector<int32_t> ids = parse_id_list(o.ids);
  if (o.last == 0) throw_error(ErrorKind::Request, "--last must be at least 1");
  MoxinVLM model = load_model_for(o.model);
  const PreprocessedImage pixels =
      preprocess_image(load_image(o.image), model.config.image_sizes[0]);
  Tensor input = Tensor::empty({1, int64_t(ids.size())}, DType::I32);
  std::copy(ids.begin(), ids.end(), input.data_mut<int32_t>());
  KVCacheList cache;
  const Tensor logits = model.forward(pixels.dino, pixels.siglip, input, cache, o.last);
  npy::save(o.out, logits.to_device(Device::CPU).reshape({logits.dim(1), logits.dim(2)}));
  return 0;
}

}  // namespace

Command add_logits(CLI::App& app) {
  auto* cmd = app.add_subcommand("logits", "Write the logits of an image + token ids as .npy");
  auto o = std::make_shared<LogitsOptions>();
  add_model_options(*cmd, o->model);
  cmd->add_option("--image", o->image, "image file (PNG, JPEG or WebP)")->required();
  cmd->add_option("--ids", o->ids, "token ids, comma-separated, starting with BOS (1)")->required();
  cmd->add_option("--last", o->last, "keep only the last N positions (default: all)");
  cmd->add_option("--out", o->out, "output .npy file, float32 [N, vocab]")->required();
  return {cmd, [o] { return run_logits(*o); }};
}

}  // namespace moxin::cli
