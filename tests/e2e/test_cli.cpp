// The moxin-vlm binary as a user runs it: parity through the `logits` command, and every bad
// input ending as one line on stderr with a non-zero exit status.
#include <gtest/gtest.h>

#include <fstream>

#include "core/npy.h"
#include "test_support.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(test::cli_binary())) << test::cli_binary();
    scratch_ = test::scratch_dir("moxin-cli");
    tiny_ = test::checkpoint_dir("tiny-hf");
    ASSERT_FALSE(tiny_.empty()) << "run scripts/make_test_checkpoints.sh";
    photo_ = test::fixtures_dir() / "parity" / "photo.png";
  }
  void TearDown() override { fs::remove_all(scratch_); }

  test::CliResult run(const std::string& args) { return test::run_cli(args, scratch_); }

  // A failure: non-zero status (not a crash: no signal), and one line on stderr.
  void expect_clean_failure(const std::string& args, const std::string& mentions) {
    SCOPED_TRACE(args);
    const test::CliResult r = run(args);
    EXPECT_NE(r.status, 0);
    EXPECT_LT(r.status, 128) << "killed by a signal";
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("moxin-vlm: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(mentions), std::string::npos) << r.err;
  }

  fs::path scratch_, tiny_, photo_;
};

TEST_F(Cli, LogitsMatchTheReference) {
  const fs::path out = scratch_ / "logits.npy";
  const test::CliResult r = run("logits --model " + tiny_.string() + " --image " + photo_.string() +
                          " --ids 1,402,77,311,19,250,13,468 --last 3 --out " + out.string());
  ASSERT_EQ(r.status, 0) << r.err;
  const Tensor logits = npy::load(out);
  const Tensor reference = npy::load(test::fixtures_dir() / "parity" / "tiny-hf" / "logits.npy");
  const int64_t positions = reference.dim(1), vocab = reference.dim(2);
  ASSERT_EQ(logits.shape(), (Shape{3, vocab}));
  const auto diff = test::compare(
      logits, reference.reshape({positions, vocab}).slice_rows(positions - 3, positions));
  std::printf("logits via CLI: %s\n", diff.to_string().c_str());
  EXPECT_LE(diff.max_rel, 1e-4);
}

TEST_F(Cli, InspectDescribesTheCheckpoint) {
  const test::CliResult r = run("inspect --model " + tiny_.string());
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* needle : {"vision_backbone.featurizer.", "fused qkv", "language_model.",
                             "BF16", "attn_pool", "loads cleanly"})
    EXPECT_NE(r.out.find(needle), std::string::npos) << needle << " not in:\n" << r.out;
}

TEST_F(Cli, BadInputsFailWithOneLine) {
  const std::string model = " --model " + tiny_.string();
  const std::string out = " --out " + (scratch_ / "x.npy").string();
  expect_clean_failure("inspect --model " + (scratch_ / "absent").string(), "absent");
  expect_clean_failure("logits" + model + " --image " + photo_.string() + " --ids 1,abc" + out, "--ids");
  expect_clean_failure("logits" + model + " --image " + photo_.string() + " --ids 1,99999" + out,
                       "vocabulary");
  std::ofstream(scratch_ / "broken.png") << "\x89PNG\r\n\x1a\n not really";
  expect_clean_failure("logits" + model + " --image " + (scratch_ / "broken.png").string() +
                           " --ids 1,2" + out, "image");
  expect_clean_failure("logits" + model + " --image " + (scratch_ / "missing.jpg").string() +
                           " --ids 1,2" + out, "missing.jpg");

  // A checkpoint whose only shard is cut short.
  const fs::path cut = scratch_ / "cut";
  fs::copy(tiny_, cut, fs::copy_options::recursive);
  fs::resize_file(cut / "model.safetensors", fs::file_size(cut / "model.safetensors") / 2);
  expect_clean_failure("inspect --model " + cut.string(), "model.safetensors");
}

}  // namespace
}  // namespace moxin
