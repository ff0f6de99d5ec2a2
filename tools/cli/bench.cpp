// `moxin-vlm bench`: load time, vision encode, prefill and decode speed, peak RSS, and the
// machine's measured memory bandwidth with the decode roofline it implies. Prints JSON.
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "moxin/errors.h"
#include "moxin/image.h"
#include "moxin/model.h"
#include "moxin/quantize.h"
#include "backend/cpu/bandwidth.h"
#include "ops/ops.h"

#if MOXIN_WITH_CUDA
#include "backend/cuda/cuda_graph.h"
#include "backend/cuda/cuda_runtime.h"
#endif

namespace moxin::cli {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double peak_rss_gib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is in KiB on Linux
}

// Bytes a decode step must read: every decoder matrix and the lm_head (embedding lookups and
// the KV cache are negligible at short context).
double decode_weight_bytes(const MoxinVLM& model) {
  auto bytes = [](const Linear& l) {
    if (l.quantized)
      return double(l.quantized->weight.nbytes() + l.quantized->scales.nbytes() +
                    l.quantized->biases.nbytes());
    return double(l.weight.nbytes());
  };
  double total = bytes(model.lm_head);
  for (const auto& layer : model.layers) {
    const auto& a = layer.self_attn;
    const auto& m = layer.mlp;
    total += bytes(a.q_proj) + bytes(a.k_proj) + bytes(a.v_proj) + bytes(a.o_proj) +
             bytes(m.gate_proj) + bytes(m.up_proj) + bytes(m.down_proj);
  }
  return total;
}

int32_t argmax_last(const Tensor& device_logits) {
  const Tensor logits = device_logits.to_device(Device::CPU);
  const int64_t V = logits.dim(-1);
  const float* row = logits.data<float>() + logits.numel() - V;
  return int32_t(std::max_element(row, row + V) - row);
}

struct BenchOptions {
  ModelOptions model;
  std::string image;
  int prompt_tokens = 24;
  int decode_tokens = 8;
  int batch = 1;  // sequences decoded together for decode_tok_s_aggregate
  bool json = true;
};

struct BenchInputs {
  PreprocessedImage pixels;
  Tensor ids;  // [1, prompt_tokens] I32: BOS, then fixed ids spread over the vocabulary
};

BenchInputs bench_inputs(const MoxinVLM& model, const BenchOptions& o) {
  const int64_t size = model.config.image_sizes[0];
  Image image;
  if (!o.image.empty()) {
    image = load_image(o.image);
  } else {  // content does not change the cost: a gradient stands in for a photo
    image.width = image.height = int(size);
    image.rgb.resize(size_t(size * size * 3));
    for (size_t i = 0; i < image.rgb.size(); ++i) image.rgb[i] = uint8_t(i * 7 % 251);
  }
  Tensor ids = Tensor::empty({1, o.prompt_tokens}, DType::I32);
  const int64_t vocab = std::min<int64_t>(model.config.text_config.vocab_size, 32000);
  for (int i = 0; i < o.prompt_tokens; ++i)
    ids.data_mut<int32_t>()[i] = i == 0 ? 1 : int32_t((i * 7919) % vocab);
  return {preprocess_image(image, size), ids};
}

// Greedy token of every row of logits [B, 1, vocab], picked on the host.
std::vector<int32_t> argmax_rows(const Tensor& device_logits) {
  const Tensor logits = device_logits.to_device(Device::CPU);
  const int64_t V = logits.dim(-1), B = logits.numel() / V;
  std::vector<int32_t> tokens(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const float* row = logits.data<float>() + b * V;
    tokens[size_t(b)] = int32_t(std::max_element(row, row + V) - row);
  }
  return tokens;
}

// Batched decoding: `batch` sequences (the bench image and prompt repeated; content does not
// change the cost) prefilled together, then `steps` eager decode_token steps for the whole
// batch, each picking every sequence's greedy token on the host as generation would. Two
// untimed steps first (a GPU picks its kernels for the new row count). Adds batch,
// batch_prefill_ms, decode_batch_steps and decode_tok_s_aggregate (batch * steps / seconds).
void bench_batch_decode(MoxinVLM& model, const BenchInputs& in, int64_t batch, int steps,
                        nlohmann::json& report) {
  const int64_t L = in.ids.dim(1);
  Tensor ids = Tensor::empty({batch, L}, DType::I32);
  for (int64_t b = 0; b < batch; ++b)
    std::copy(in.ids.data<int32_t>(), in.ids.data<int32_t>() + L, ids.data_mut<int32_t>() + b * L);
  const Tensor dino = ops::repeat_batch(in.pixels.dino, batch);
  const Tensor siglip = ops::repeat_batch(in.pixels.siglip, batch);
  KVCacheList cache;
  auto start = Clock::now();
  std::vector<int32_t> tokens = argmax_rows(model.forward(dino, siglip, ids, cache, 1));
  report["batch_prefill_ms"] = seconds_since(start) * 1e3;
  auto step = [&] {
    Tensor t = Tensor::empty({batch}, DType::I32);
    std::copy(tokens.begin(), tokens.end(), t.data_mut<int32_t>());
    tokens = argmax_rows(model.decode_token(t, cache));
  };
  for (int i = 0; i < 2; ++i) step();
  start = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  const double s = seconds_since(start);
  report["batch"] = batch;
  report["decode_batch_steps"] = steps;
  report["decode_tok_s_aggregate"] = double(batch) * steps / s;
}

#if MOXIN_WITH_CUDA
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The GPU bench: every timed region ends with a stream synchronisation; each number is the
// median of several runs after a warm-up; decode runs through the recorded CUDA graph.
int run_bench_cuda(const BenchOptions& o) {
  nlohmann::json report;
  report["device"] = "cuda";
  report["gpu"] = cuda::describe();
  std::fprintf(stderr, "measuring GPU copy bandwidth...\n");
  const double bandwidth = cuda::measure_copy_bandwidth_gbs();
  report["gpu_copy_bandwidth_gbs"] = bandwidth;

  cuda::reset_peak_memory();
  auto start = Clock::now();
  MoxinVLM model = load_model_for(o.model);
  cuda::synchronize();
  report["load_s"] = seconds_since(start);
  if (model.config.quantization) {
    report["quantization_bits"] = model.config.quantization->bits;
    report["quantization_group_size"] = model.config.quantization->group_size;
  }
  const double weights_gb = double(cuda::memory_stats().pool_used_peak) / 1e9;
  report["weights_on_gpu_gb"] = weights_gb;

  const BenchInputs inputs = bench_inputs(model, o);
  const auto& [pixels, ids] = inputs;
  // The preprocessed image is uploaded once; TTFT below includes the upload.

  const int repeats = 7;
  // *_host_ms: when the host had issued the work, before waiting for the GPU. Close to the
  // full time, the host's launches, not the GPU, set the pace.
  std::vector<double> vision, vision_host, ttft, prefill, prefill_host;
  Tensor visual;
  for (int r = 0; r < repeats + 1; ++r) {
    start = Clock::now();
    visual = model.encode_image(pixels.dino, pixels.siglip);
    const double issued_ms = seconds_since(start) * 1e3;
    cuda::synchronize();
    if (r) vision.push_back(seconds_since(start) * 1e3);
    if (r) vision_host.push_back(issued_ms);
    KVCacheList cache;
    start = Clock::now();
    Tensor logits = model.forward(pixels.dino, pixels.siglip, ids, cache, 1);
    const int32_t first = cuda::argmax_last(logits);  // the first token on the host
    if (r) ttft.push_back(seconds_since(start) * 1e3);
    (void)first;
  }
  report["vision_ms"] = median(vision);
  report["vision_host_ms"] = median(vision_host);
  report["ttft_ms"] = median(ttft);
  {
    Tensor text = model.embed(ids);
    const int64_t L = ids.dim(1);
    Tensor fused = ops::concat({ops::slice(text, 1, 0, 1), visual, ops::slice(text, 1, 1, L)}, 1);
    for (int r = 0; r < repeats + 1; ++r) {
      KVCacheList fresh;
      start = Clock::now();
      model.forward_embeddings(fused, fresh, 1);
      const double issued = seconds_since(start);
      cuda::synchronize();
      if (r) prefill.push_back(seconds_since(start));
      if (r) prefill_host.push_back(issued);
    }
    report["prefill_positions"] = fused.dim(1);
    report["prefill_ms"] = median(prefill) * 1e3;
    report["prefill_host_ms"] = median(prefill_host) * 1e3;
    report["prefill_tok_s"] = double(fused.dim(1)) / median(prefill);
  }

  // Decode: eager (every op launched from the host) and the recorded graph.
  const int n = o.decode_tokens;
  const int64_t capacity = o.prompt_tokens + model.dino.config.num_patches() + n + 16;
  {
    KVCacheList cache;
    Tensor logits = model.forward(pixels.dino, pixels.siglip, ids, cache, 1);
    int32_t token = cuda::argmax_last(logits);
    const int eager_n = std::min(n, 32);
    auto step = [&] {
      Tensor t = Tensor::empty({1, 1}, DType::I32);
      t.data_mut<int32_t>()[0] = token;
      token = cuda::argmax_last(model.decode_token(t, cache));
    };
    // The first step of a process times the decode products' variants and loads their kernels:
    // one-time costs, kept out of the timing (as in the batched and recorded measurements).
    step();
    start = Clock::now();
    for (int i = 0; i < eager_n; ++i) step();
    report["decode_eager_tok_s"] = eager_n / seconds_since(start);
    if (o.batch == 1) {  // batch 1's aggregate is the eager speed, the path batches take
      report["batch"] = 1;
      report["decode_batch_steps"] = eager_n;
      report["decode_tok_s_aggregate"] = report["decode_eager_tok_s"];
    }
  }
  if (o.batch > 1) {
    std::fprintf(stderr, "decode, batch of %d...\n", o.batch);
    bench_batch_decode(model, inputs, o.batch, std::min(n, 32), report);
  }
  cuda::DecodeGraph graph(model, capacity);
  Tensor logits = model.forward(pixels.dino, pixels.siglip, ids, graph.caches(), 1);
  graph.generate_greedy(logits, 4);  // records the graph and warms it up
  for (auto& c : graph.caches()) c->reset();
  logits = model.forward(pixels.dino, pixels.siglip, ids, graph.caches(), 1);
  cuda::synchronize();
  start = Clock::now();
  const std::vector<int32_t> tokens = graph.generate_greedy(logits, n + 1);
  const double decode_s = seconds_since(start);
  const double tok_s = n / decode_s;
  const double weight_bytes = decode_weight_bytes(model);
  report["decode_tokens"] = n;
  report["decode_tok_s"] = tok_s;
  report["decode_ms_per_token"] = decode_s / n * 1e3;
  report["host_us_per_token"] = graph.host_us_per_token();
  report["decode_weight_gb"] = weight_bytes / 1e9;
  report["decode_roofline_tok_s"] = bandwidth * 1e9 / weight_bytes;
  report["decode_fraction_of_roofline"] = tok_s / (bandwidth * 1e9 / weight_bytes);
  const auto& tc = model.config.text_config;
  const double kv_gb = double(model.layers.size()) * 2.0 * double(tc.num_key_value_heads) *
                       double(capacity) * double(tc.resolved_head_dim()) * 4.0 / 1e9;
  report["kv_cache_gb"] = kv_gb;
  const cuda::MemoryStats mem = cuda::memory_stats();
  const double peak = double(mem.pool_reserved_peak + mem.other_bytes) / 1e9;
  report["peak_gpu_mem_gb"] = peak;
  report["peak_gpu_mem_over_weights_kv_gb"] = peak - weights_gb - kv_gb;
  report["device_used_gb"] = double(mem.device_used) / 1e9;
  report["peak_rss_gb"] = peak_rss_gib() * 1.073741824;
  report["first_tokens"] =
      std::vector<int32_t>(tokens.begin(), tokens.begin() + std::min<size_t>(8, tokens.size()));
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}
#endif

int run_bench(const BenchOptions& o) {
  if (o.prompt_tokens < 1 || o.decode_tokens < 1)
    throw_error(ErrorKind::Request, "--prompt-tokens and --decode-tokens must be at least 1");
  if (o.batch < 1 || o.batch > 4096)
    throw_error(ErrorKind::Request, "--batch must be in [1, 4096]");
#if MOXIN_WITH_CUDA
  if (o.model.device == "cuda") return run_bench_cuda(o);
#endif
  nlohmann::json report;
  report["threads"] = omp_get_max_threads();
  report["hardware_threads"] = std::thread::hardware_concurrency();

  std::fprintf(stderr, "measuring memory bandwidth...\n");
  const double bandwidth = cpu::measure_read_bandwidth_gbs(size_t(1) << 30);
  report["mem_read_bandwidth_gbs"] = bandwidth;

  auto start = Clock::now();
  MoxinVLM model = load_model_for(o.model);
  if (model.config.quantization) {
    report["quantization_bits"] = model.config.quantization->bits;
    report["quantization_group_size"] = model.config.quantization->group_size;
  }
  report["device"] = o.model.device;
  report["load_s"] = seconds_since(start);

  const BenchInputs inputs = bench_inputs(model, o);
  const auto& [pixels, ids] = inputs;

  // Warm-up: the image encode and one decoder step page every memory-mapped weight in (a
  // decode step reads each matrix once) at a fraction of a prefill's arithmetic. Reported, not
  // mixed into the timings below.
  std::fprintf(stderr, "warm-up (pages weights in)...\n");
  start = Clock::now();
  model.encode_image(pixels.dino, pixels.siglip);
  {
    KVCacheList cache;
    Tensor bos = Tensor::empty({1}, DType::I32);
    bos.data_mut<int32_t>()[0] = 1;
    model.decode_token(bos, cache);
  }
  report["warmup_s"] = seconds_since(start);

  std::fprintf(stderr, "vision...\n");
  start = Clock::now();
  const Tensor visual = model.encode_image(pixels.dino, pixels.siglip);
  const double vision_s = seconds_since(start);
  report["vision_ms"] = vision_s * 1e3;
  report["image_tokens"] = visual.dim(1);

  // Time to first token: image encode + prefill over the fused sequence + the first logits.
  std::fprintf(stderr, "prefill...\n");
  KVCacheList cache;
  start = Clock::now();
  Tensor logits = model.forward(pixels.dino, pixels.siglip, ids, cache, 1);
  const double ttft = seconds_since(start);
  const int64_t prefill_positions = cache[0]->offset();
  report["ttft_ms"] = ttft * 1e3;
  report["prefill_positions"] = prefill_positions;
  report["prefill_tok_s"] = double(prefill_positions) / std::max(ttft - vision_s, 1e-9);

  std::fprintf(stderr, "decode...\n");
  int32_t token = argmax_last(logits);
  start = Clock::now();
  for (int i = 0; i < o.decode_tokens; ++i) {
    Tensor t = Tensor::empty({1, 1}, DType::I32);
    t.data_mut<int32_t>()[0] = token;
    token = argmax_last(model.decode_token(t, cache));
  }
  const double decode_s = seconds_since(start);
  const double tok_s = o.decode_tokens / decode_s;
  const double weight_bytes = decode_weight_bytes(model);
  report["decode_tokens"] = o.decode_tokens;
  report["decode_tok_s"] = tok_s;
  report["decode_weight_gb"] = weight_bytes / 1e9;
  report["decode_roofline_tok_s"] = bandwidth * 1e9 / weight_bytes;
  report["decode_fraction_of_roofline"] = tok_s / (bandwidth * 1e9 / weight_bytes);
  if (o.batch > 1) {
    std::fprintf(stderr, "decode, batch of %d...\n", o.batch);
    bench_batch_decode(model, inputs, o.batch, o.decode_tokens, report);
  } else {  // the loop above is the batch-1 eager decode
    report["batch"] = 1;
    report["decode_batch_steps"] = o.decode_tokens;
    report["decode_tok_s_aggregate"] = tok_s;
  }
  report["peak_rss_gb"] = peak_rss_gib() * 1.073741824;
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}

}  // namespace

Command add_bench(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Measure load, vision, prefill and decode; prints JSON");
  auto o = std::make_shared<BenchOptions>();
  add_model_options(*cmd, o->model);
  cmd->add_option("--image", o->image, "image file (default: a synthetic 224x224 image)");
  cmd->add_option("--prompt-tokens", o->prompt_tokens, "text tokens in the prompt, BOS included")
      ->capture_default_str();
  cmd->add_option("--decode-tokens", o->decode_tokens, "tokens to decode")->capture_default_str();
  cmd->add_option("--batch", o->batch,
                  "sequences decoded together (eager) for decode_tok_s_aggregate")
      ->capture_default_str();
  cmd->add_flag("--json", o->json, "print JSON (the default; kept for symmetry with other tools)");
  return {cmd, [o] { return run_bench(*o); }};
}

}  // namespace moxin::cli
