// The moxin-vlm subcommands. Each registers its flags on the shared CLI11 app and returns the
// function that runs it once the command line is parsed.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace moxin::cli {

struct Command {
  CLI::App* subcommand;
  std::function<int()> run;  // the exit status
};

Command add_inspect(CLI::App& app);
Command add_logits(CLI::App& app);
Command add_bench(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_chat(CLI::App& app);
Command add_quantize(CLI::App& app);

}  // namespace moxin::cli
