// moxin-kernel-bench: the CPU decode kernels alone, on the decoder's real matrix shapes, next to
// the machine's read bandwidth measured in the same process. Prints JSON.
//
// Each product is one decode-step matrix-vector product (M = 1 by default): the figure that
// matters is bytes of weights streamed per second, against what the memory system delivers.
// Every timed call reads the next of several copies of the matrix, about 1 GB in all, so the
// weights come from memory as in a real decode step and not from the (large) last-level cache.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/bandwidth.h"
#include "backend/cpu/cpu_kernels.h"
#include "backend/cpu/quantized_matmul.h"
#include "moxin/quantize.h"
#include "moxin/tensor.h"

namespace {

using Clock = std::chrono::steady_clock;

template <class F>
double median_seconds(int reps, F&& f) {
  std::vector<double> times;
  f();  // warm-up: page faults, thread start
  for (int i = 0; i < reps; ++i) {
    const auto start = Clock::now();
    f();
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

constexpr double kWorkingSetBytes = 1.0e9;
// MOXIN_BENCH_CACHED=1 times one copy over and over instead (cache-resident: the kernels'
// arithmetic limit rather than memory's).
const bool kCached = std::getenv("MOXIN_BENCH_CACHED") != nullptr;

int copies_for(double bytes) {
  return kCached ? 1 : std::max(1, int(kWorkingSetBytes / bytes + 0.999));
}

moxin::Tensor random_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> values(size_t(rows * cols));
  for (float& v : values) v = dist(rng);
  return moxin::Tensor::from_vector({rows, cols}, values);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace moxin;
  const int reps = argc > 1 ? std::atoi(argv[1]) : 15;
  const int64_t M = argc > 2 ? std::atoi(argv[2]) : 1;
  nlohmann::json report;
  report["threads"] = omp_get_max_threads();
  report["rows_of_x"] = M;
  report["isa"] = cpu::quant_isa_name(cpu::quant_best_isa());
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{14336, 4096}, {4096, 14336}};
  for (const auto& [out, in] : shapes) {
    const std::string name = std::to_string(out) + "x" + std::to_string(in);
    const Tensor w32 = random_matrix(out, in, 7);
    const Tensor x = random_matrix(M, in, 8);
    std::vector<float> y(size_t(M * out));
    nlohmann::json entry;

    std::vector<Tensor> w16(size_t(copies_for(double(w32.nbytes()) / 2)));
    for (Tensor& w : w16) w = w32.to(DType::BF16);
    const double bf16_bytes = double(w16[0].nbytes());
    size_t next = 0;
    const double t16 = median_seconds(reps, [&] {
      const Tensor& w = w16[next++ % w16.size()];
      cpu::matmul_nt(x.data<float>(), M, in, w.raw(), DType::BF16, out, nullptr, y.data());
    });
    entry["bf16_gb_s"] = bf16_bytes / t16 / 1e9;
    w16.clear();

    for (int bits : {8, 4}) {
      const QuantizedTensor q = quantize(w32, 64, bits);
      const double bytes = double(q.weight.nbytes() + q.scales.nbytes() + q.biases.nbytes());
      std::vector<QuantizedTensor> qs(size_t(copies_for(bytes)), q);
      for (QuantizedTensor& c : qs) {
        c.weight = q.weight.clone();
        c.scales = q.scales.clone();
        c.biases = q.biases.clone();
      }
      for (cpu::QuantIsa isa :
           {cpu::QuantIsa::Avx512Vnni, cpu::QuantIsa::Avx512, cpu::QuantIsa::Avx2}) {
        if (!cpu::quant_isa_supported(isa)) continue;
        const double t = median_seconds(reps, [&] {
          cpu::quantized_matmul(isa, cpu::QuantMatmulPath::Decode, x.data<float>(), M,
                                qs[next++ % qs.size()], nullptr, y.data());
        });
        entry["q" + std::to_string(bits) + "_" + cpu::quant_isa_name(isa) + "_gb_s"] =
            bytes / t / 1e9;
      }
    }
    report[name] = entry;
  }
  report["read_gb_s"] = cpu::measure_read_bandwidth_gbs(size_t(kWorkingSetBytes));
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}
