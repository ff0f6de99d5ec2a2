// The options every model-running subcommand shares: where the model is, whether to quantize it
// at load, and which device runs it.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "moxin/model.h"

namespace moxin::cli {

struct ModelOptions {
  std::string dir;
  int quantize_bits = 0;  // 0: as stored
  int group_size = 64;
  std::string device = "cpu";
};

void add_model_options(CLI::App& cmd, ModelOptions& options);

// load_model, then quantize() when asked (on the host, before any move), then to the device.
MoxinVLM load_model_for(const ModelOptions& options);

}  // namespace moxin::cli
