// Helpers shared by the tests: where fixtures live, and how two tensors are compared.
#pragma once

#include <filesystem>
#include <string>

#include "moxin/tensor.h"

namespace moxin::test {

std::filesystem::path source_dir();
std::filesystem::path fixtures_dir();  // tests/fixtures
// A generated test checkpoint (scripts/make_test_checkpoints.sh); MOXIN_TEST_CHECKPOINTS
// overrides the root. Returns "" when absent, so the caller can FAIL with a useful message.
std::filesystem::path checkpoint_dir(const std::string& variant);

// A fresh, empty directory unique to this process and the running test.
std::filesystem::path scratch_dir(const std::string& prefix);
std::string read_file(const std::filesystem::path& file);

// The moxin-vlm binary as a user runs it: `args` are shell words, stdout and stderr captured
// through files in `scratch`.
struct CliResult {
  int status = -1;  // exit status, or 128 + signal
  std::string out, err;
};
std::filesystem::path cli_binary();
CliResult run_cli(const std::string& args, const std::filesystem::path& scratch,
                  const std::string& stdin_text = "");

struct Difference {
  double max_abs = 0;      // max |a - e|
  double max_rel = 0;      // max |a - e| / max |e|: error relative to the tensor's scale
  double mean_abs = 0;
  double cosine = 1;       // cosine similarity of the flattened tensors
  std::string to_string() const;
};

// Compares same-shaped tensors of any float dtype (ADD_FAILURE on a shape mismatch).
Difference compare(const Tensor& actual, const Tensor& expected);

}  // namespace moxin::test
