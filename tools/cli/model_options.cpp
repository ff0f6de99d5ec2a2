#include "cli/model_options.h"

#include "core/device.h"

namespace moxin::cli {

void add_model_options(CLI::App& cmd, ModelOptions& options) {
  cmd.add_option("--model", options.dir, "model directory")->required();
  cmd.add_option("--quantize", options.quantize_bits,
                 "quantize the decoder at load to this many bits (MLX affine: 2-6 or 8)");
  cmd.add_option("--group-size", options.group_size, "quantization group size (32, 64, 128)")
      ->capture_default_str();
  cmd.add_option("--device", options.device, "cpu or cuda")->capture_default_str();
}

MoxinVLM load_model_for(const ModelOptions& options) {
  const Device device = device::parse(options.device);
  device::require(device);  // before reading gigabytes
  MoxinVLM model = load_model(options.dir);
  if (options.quantize_bits != 0) model.quantize(options.group_size, options.quantize_bits);
  model.to_device(device);
  return model;
}

}  // namespace moxin::cli
