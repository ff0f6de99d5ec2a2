// moxin-vlm: the command-line front end. Every failure ends as one line on stderr and a
// non-zero exit status; no exception escapes main.
#include <cstdio>
#include <exception>
#include <vector>

#include "cli/commands.h"
#include "moxin/errors.h"

int main(int argc, char** argv) {
  CLI::App app{"moxin-vlm: Moxin-7B vision-language model inference"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moxin-vlm 0.1.0");
  const std::vector<moxin::cli::Command> commands = {
      moxin::cli::add_inspect(app),
      moxin::cli::add_logits(app),
      moxin::cli::add_bench(app),
      moxin::cli::add_generate(app),
      moxin::cli::add_chat(app),
      moxin::cli::add_quantize(app),
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (const auto& command : commands)
      if (command.subcommand->parsed()) return command.run();
    return 1;
  } catch (const moxin::Error& e) {
    std::fprintf(stderr, "moxin-vlm: %s: %s\n", moxin::error_kind_name(e.kind()), e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moxin-vlm: error: %s\n", e.what());
    return 1;
  }
}
