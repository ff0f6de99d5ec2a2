#include "test_support.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace moxin::test {

std::filesystem::path source_dir() { return MOXIN_SOURCE_DIR; }
std::filesystem::path fixtures_dir() { return source_dir() / "tests" / "fixtures"; }

std::filesystem::path checkpoint_dir(const std::string& variant) {
  const char* root = std::getenv("MOXIN_TEST_CHECKPOINTS");
  const std::filesystem::path dir =
      (root ? std::filesystem::path(root) : fixtures_dir() / "checkpoints") / variant;
  return std::filesystem::exists(dir / "config.json") ? dir : std::filesystem::path();
}

std::filesystem::path scratch_dir(const std::string& prefix) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() /
      (prefix + "-" + std::to_string(::getpid()) + "-" + (info ? info->name() : "global"));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::string read_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::filesystem::path cli_binary() { return std::filesystem::path(MOXIN_BINARY_DIR) / "moxin-vlm"; }

CliResult run_cli(const std::string& args, const std::filesystem::path& scratch,
                  const std::string& stdin_text) {
  const auto out = scratch / "stdout", err = scratch / "stderr", in = scratch / "stdin";
  std::ofstream(in, std::ios::binary) << stdin_text;
  const std::string command = cli_binary().string() + " " + args + " >" + out.string() + " 2>" +
                              err.string() + " <" + in.string();
  const int raw = std::system(command.c_str());
  CliResult r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  r.out = read_file(out);
  r.err = read_file(err);
  return r;
}

std::string Difference::to_string() const {
  std::ostringstream s;
  s << "max_abs=" << max_abs << " max_rel=" << max_rel << " mean_abs=" << mean_abs
    << " cosine=" << cosine;
  return s.str();
}

Difference compare(const Tensor& actual, const Tensor& expected) {
  Difference d;
  if (actual.shape() != expected.shape()) {
    ADD_FAILURE() << "shape " << shape_to_string(actual.shape()) << " vs expected "
                  << shape_to_string(expected.shape());
    d.max_abs = d.max_rel = INFINITY;
    return d;
  }
  const auto a = actual.to_vector();
  const auto e = expected.to_vector();
  double scale = 0, sum = 0, dot = 0, na = 0, ne = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(double(a[i]) - double(e[i]));
    if (!(diff <= d.max_abs)) d.max_abs = diff;  // NaN propagates
    scale = std::max(scale, std::fabs(double(e[i])));
    sum += diff;
    dot += double(a[i]) * e[i];
    na += double(a[i]) * a[i];
    ne += double(e[i]) * e[i];
  }
  d.max_rel = scale > 0 ? d.max_abs / scale : d.max_abs;
  d.mean_abs = a.empty() ? 0 : sum / double(a.size());
  d.cosine = na > 0 && ne > 0 ? dot / std::sqrt(na * ne) : (na == ne ? 1 : 0);
  return d;
}

}  // namespace moxin::test
