// The whole model through the CUDA backend against the parity fixtures (the float32
// reference) and against the CPU path: stage by stage, logits, and greedy tokens, eager and
// through the recorded decode graph.
//
// Tolerances (max |error| / max |reference|):
//   tiny-f32 (float32 weights: float32 cuBLASLt, float32 kernels)          1e-4, as on the CPU
//   bf16 checkpoints (activations rounded to bf16, 2^-9 relative, before
//   each cuBLASLt product, float32 accumulation): vision features and
//   projector 1e-2 (seen on an H200: <= 5.0e-3); logits 5e-2 (seen
//   <= 3.3e-2: random-weight logits amplify the rounding of ~10 products)
//   and cosine similarity >= 0.9995 (seen >= 0.99982)
// Greedy tokens must equal the reference wherever the reference's top-2 gap exceeds
// kClearGap logits (an error budget of twice the worst logit error seen on the fixtures).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/npy.h"
#include "cuda_test_util.h"
#include "moxin/errors.h"
#include "moxin/generate.h"
#include "moxin/image.h"
#include "moxin/model.h"
#include "moxin/tokenizer.h"
#include "ops/ops.h"

#if MOXIN_WITH_CUDA
#include "backend/cuda/cuda_graph.h"
#include "backend/cuda/cuda_runtime.h"
#endif

namespace moxin {
namespace {

constexpr double kClearGap = 0.1;

class CudaParity : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    MOXIN_SKIP_WITHOUT_GPU();
    fixtures_ = test::fixtures_dir() / "parity" / GetParam();
    ASSERT_TRUE(std::filesystem::exists(fixtures_ / "meta.json")) << "no fixtures in " << fixtures_;
    checkpoint_ = test::checkpoint_dir(GetParam());
    ASSERT_FALSE(checkpoint_.empty())
        << "checkpoint '" << GetParam() << "' not generated: run scripts/make_test_checkpoints.sh";
    std::ifstream in(fixtures_ / "meta.json");
    meta_ = nlohmann::json::parse(in);
  }
  double tolerance() const { return GetParam() == "tiny-f32" ? 1e-4 : 1e-2; }
  double logit_tolerance() const { return GetParam() == "tiny-f32" ? 1e-4 : 5e-2; }
  Tensor fixture(const std::string& name) const { return npy::load(fixtures_ / (name + ".npy")); }
  Tensor input_ids() const {
    const auto ids = meta_["input_ids"].get<std::vector<int32_t>>();
    Tensor t = Tensor::empty({1, int64_t(ids.size())}, DType::I32);
    std::copy(ids.begin(), ids.end(), t.data_mut<int32_t>());
    return t;
  }
  std::filesystem::path fixtures_, checkpoint_;
  nlohmann::json meta_;
};

int32_t host_argmax(const Tensor& logits) {
  const std::vector<float> v = logits.to_vector();
  const size_t V = size_t(logits.dim(-1));
  return int32_t(std::max_element(v.end() - long(V), v.end()) - (v.end() - long(V)));
}

void report(const std::string& variant, const char* stage, const test::Difference& d) {
  std::printf("[%s] cuda %-9s %s\n", variant.c_str(), stage, d.to_string().c_str());
}

TEST_P(CudaParity, EveryStageMatchesTheReference) {
  MoxinVLM model = load_model(checkpoint_, LoadOptions{Device::CUDA});
  ASSERT_EQ(model.device(), Device::CUDA);
  const Tensor pd = fixture("pixel_dino"), ps = fixture("pixel_siglip");
  const auto dino = test::compare(model.dino.forward(pd.to_device(Device::CUDA)).to_device(Device::CPU),
                                  fixture("dino_features"));
  report(GetParam(), "dino", dino);
  EXPECT_LE(dino.max_rel, tolerance());
  const auto siglip = test::compare(
      model.siglip.forward(ps.to_device(Device::CUDA)).to_device(Device::CPU), fixture("siglip_features"));
  report(GetParam(), "siglip", siglip);
  EXPECT_LE(siglip.max_rel, tolerance());
  const auto projector =
      test::compare(model.encode_image(pd, ps).to_device(Device::CPU), fixture("projector"));
  report(GetParam(), "projector", projector);
  EXPECT_LE(projector.max_rel, tolerance());
  KVCacheList cache;
  const Tensor logits = model.forward(pd, ps, input_ids(), cache).to_device(Device::CPU);
  const auto d = test::compare(logits, fixture("logits"));
  report(GetParam(), "logits", d);
  EXPECT_LE(d.max_rel, logit_tolerance());
  EXPECT_GE(d.cosine, 0.9995);
}

// The device move places each layer's k/v and gate/up weights side by side (one batched
// product each at prefill); each still holds exactly its own rows.
TEST_P(CudaParity, PairedWeightsSitSideBySide) {
  const MoxinVLM host = load_model(checkpoint_);
  const MoxinVLM model = load_model(checkpoint_, LoadOptions{Device::CUDA});
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const DecoderLayer &layer = model.layers[i], &expected = host.layers[i];
    const std::pair<const Linear*, const Linear*> pairs[] = {
        {&layer.self_attn.k_proj, &layer.self_attn.v_proj},
        {&layer.mlp.gate_proj, &layer.mlp.up_proj}};
    for (const auto& [a, b] : pairs) {
      if (a->quantized) continue;
      EXPECT_EQ(static_cast<const char*>(a->weight.raw()) + a->weight.nbytes(), b->weight.raw());
    }
    for (const auto& [got, want] : {std::pair{&layer.self_attn.v_proj, &expected.self_attn.v_proj},
                                    {&layer.mlp.up_proj, &expected.mlp.up_proj}}) {
      if (got->quantized) continue;
      const auto d = test::compare(got->weight.to_device(Device::CPU).to(DType::F32),
                                   want->weight.to(DType::F32));
      EXPECT_EQ(d.max_abs, 0.0);
    }
  }
}

#if MOXIN_WITH_CUDA
// Greedy decoding, 32 tokens: eager CUDA, the recorded graph (teacher-forced with the
// reference's tokens, and free-running) and the CPU path, all against the reference ids.
TEST_P(CudaParity, GreedyTokensMatchWhereTheGapIsClear) {
  const auto expected = meta_["greedy_ids"].get<std::vector<int32_t>>();
  const auto gaps = meta_["greedy_top2_gap"].get<std::vector<double>>();
  ASSERT_EQ(expected.size(), gaps.size());
  const int count = int(expected.size());
  const Tensor pd = fixture("pixel_dino"), ps = fixture("pixel_siglip");

  MoxinVLM model = load_model(checkpoint_, LoadOptions{Device::CUDA});
  const int64_t capacity = meta_["sequence_length"].get<int64_t>() + count + 8;

  // Eager: ordinary caches, every step through the ops.
  std::vector<int32_t> eager;
  std::vector<Tensor> eager_logits;
  {
    KVCacheList cache;
    Tensor logits = model.forward(pd, ps, input_ids(), cache, 1);
    eager.push_back(host_argmax(logits));
    for (int i = 1; i < count; ++i) {
      Tensor t = Tensor::empty({1, 1}, DType::I32);
      t.data_mut<int32_t>()[0] = expected[size_t(i - 1)];  // teacher forcing
      logits = model.decode_token(t, cache);
      eager_logits.push_back(logits.to_device(Device::CPU));
      eager.push_back(host_argmax(logits));
    }
  }
  // Graph, teacher-forced: the same steps replayed from one recording.
  std::vector<int32_t> graphed;
  {
    cuda::DecodeGraph graph(model, capacity);
    Tensor logits = model.forward(pd, ps, input_ids(), graph.caches(), 1);
    graphed.push_back(host_argmax(logits));
    for (int i = 1; i < count; ++i) {
      const Tensor step = graph.step(expected[size_t(i - 1)]).to_device(Device::CPU);
      const auto d = test::compare(step, eager_logits[size_t(i - 1)]);
      EXPECT_LE(d.max_abs, 1e-5) << "graph step " << i << " differs from the eager step: "
                                 << d.to_string();
      graphed.push_back(host_argmax(step));
    }
    EXPECT_TRUE(graph.recorded());
  }
  // Graph, free-running greedy: the tokens never leave the device except for the result.
  std::vector<int32_t> free_running;
  {
    cuda::DecodeGraph graph(model, capacity);
    const Tensor logits = model.forward(pd, ps, input_ids(), graph.caches(), 1);
    free_running = graph.generate_greedy(logits, count);
    std::printf("[%s] host time per graph replay: %.1f us\n", GetParam().c_str(),
                graph.host_us_per_token());
  }
  // CPU path, free-running, for the same comparison.
  std::vector<int32_t> cpu_ids;
  {
    MoxinVLM cpu_model = load_model(checkpoint_);
    KVCacheList cache;
    Tensor logits = cpu_model.forward(pd, ps, input_ids(), cache, 1);
    cpu_ids.push_back(host_argmax(logits));
    for (int i = 1; i < count; ++i) {
      Tensor t = Tensor::empty({1, 1}, DType::I32);
      t.data_mut<int32_t>()[0] = cpu_ids.back();
      cpu_ids.push_back(host_argmax(cpu_model.decode_token(t, cache)));
    }
  }
  int clear = 0;
  bool free_in_step = true;  // free-running sequences agree only up to the first unclear step
  for (int i = 0; i < count; ++i) {
    const bool is_clear = gaps[size_t(i)] > kClearGap;
    if (!is_clear) {
      free_in_step = false;
      continue;
    }
    ++clear;
    EXPECT_EQ(eager[size_t(i)], expected[size_t(i)]) << "eager step " << i << " gap " << gaps[size_t(i)];
    EXPECT_EQ(graphed[size_t(i)], expected[size_t(i)]) << "graph step " << i;
    if (free_in_step) {
      EXPECT_EQ(free_running[size_t(i)], expected[size_t(i)]) << "free-running step " << i;
      EXPECT_EQ(free_running[size_t(i)], cpu_ids[size_t(i)]) << "CPU vs CUDA step " << i;
    }
  }
  std::printf("[%s] greedy: %d of %d steps have a clear gap (> %.2f)\n", GetParam().c_str(), clear,
              count, kClearGap);
  EXPECT_GT(clear, count / 2);
}
#endif

INSTANTIATE_TEST_SUITE_P(Variants, CudaParity,
                         ::testing::Values("tiny-hf", "tiny-native", "tiny-f32", "real-towers"));

// The real-towers parity fixture's prompt and images (for tests that quantize its checkpoint).
struct RealTowersInputs {
  nlohmann::json meta;
  Tensor input, pd, ps;
  RealTowersInputs() {
    const auto fixture = test::fixtures_dir() / "parity" / "real-towers";
    meta = nlohmann::json::parse(std::ifstream(fixture / "meta.json"));
    const auto ids = meta["input_ids"].get<std::vector<int32_t>>();
    input = Tensor::empty({1, int64_t(ids.size())}, DType::I32);
    std::copy(ids.begin(), ids.end(), input.data_mut<int32_t>());
    pd = npy::load(fixture / "pixel_dino.npy");
    ps = npy::load(fixture / "pixel_siglip.npy");
  }
};

// A decoder quantized at load (MLX affine, 4 and 8 bits) gives the same logits on both paths:
// the prefill through dequantized bf16 products, the decode step through the fused GEMV; and
// the recorded decode step (programmatic dependent launch inside the graph for quantized
// decoders) gives the eager step's logits.
TEST(CudaQuantized, QuantizedModelMatchesCpu) {
  MOXIN_SKIP_WITHOUT_GPU();
  const auto dir = test::checkpoint_dir("real-towers");
  if (dir.empty()) GTEST_SKIP() << "real-towers checkpoint not generated";
  const RealTowersInputs in;
  const auto& [meta, input, pd, ps] = in;
  for (int bits : {4, 8}) {
    MoxinVLM cpu_model = load_model(dir);
    cpu_model.quantize(64, bits);
    MoxinVLM gpu_model = load_model(dir);
    gpu_model.quantize(64, bits);
    gpu_model.to_device(Device::CUDA);
    KVCacheList cpu_cache, gpu_cache;
    const Tensor a = cpu_model.forward(pd, ps, input, cpu_cache, 1);
    const Tensor b = gpu_model.forward(pd, ps, input, gpu_cache, 1).to_device(Device::CPU);
    const auto d = test::compare(b, a);
    std::printf("[q%d] prefill logits cuda vs cpu: %s\n", bits, d.to_string().c_str());
    EXPECT_LE(d.max_rel, 5e-2);
    Tensor t = Tensor::empty({1, 1}, DType::I32);
    t.data_mut<int32_t>()[0] = host_argmax(a);
    const Tensor da = cpu_model.decode_token(t, cpu_cache);
    const Tensor db = gpu_model.decode_token(t, gpu_cache).to_device(Device::CPU);
    const auto dd = test::compare(db, da);
    std::printf("[q%d] decode logits cuda vs cpu: %s\n", bits, dd.to_string().c_str());
    EXPECT_LE(dd.max_rel, 5e-2);

#if MOXIN_WITH_CUDA
    cuda::DecodeGraph graph(gpu_model, gpu_cache[0]->offset() + 4);
    (void)gpu_model.forward(pd, ps, input, graph.caches(), 1);
    const Tensor dg = graph.step(t.data<int32_t>()[0]).to_device(Device::CPU);
    EXPECT_LE(test::compare(dg, db).max_rel, 1e-5) << bits << "-bit graph step vs eager step";
#endif
  }
}

#if MOXIN_WITH_CUDA
// Greedy generation through recordings of several steps per launch picks the tokens of one step
// per launch: 4 bits (programmatic dependent launch inside the graphs) and bf16, counts that
// leave a remainder of single steps, and a second generation after the caches were reset and
// refilled (the device position delta set again from the host).
TEST(CudaGraph, ManyStepLaunchesPickTheTokensOfSingleSteps) {
  MOXIN_SKIP_WITHOUT_GPU();
  const auto dir = test::checkpoint_dir("real-towers");
  if (dir.empty()) GTEST_SKIP() << "real-towers checkpoint not generated";
  const RealTowersInputs in;
  const auto& [meta, input, pd, ps] = in;
  constexpr int kCount = 11;
  for (int bits : {4, 0}) {
    MoxinVLM model = load_model(dir);
    if (bits) model.quantize(64, bits);
    model.to_device(Device::CUDA);
    const int64_t capacity = meta["sequence_length"].get<int64_t>() + kCount + 2;
    auto generate = [&](int steps_per_launch, int runs) {
      cuda::DecodeGraph graph(model, capacity, steps_per_launch);
      std::vector<std::vector<int32_t>> out;
      for (int r = 0; r < runs; ++r) {
        for (auto& c : graph.caches()) c->reset();
        const Tensor logits = model.forward(pd, ps, input, graph.caches(), 1);
        out.push_back(graph.generate_greedy(logits, kCount));
      }
      return out;
    };
    const std::vector<int32_t> single = generate(1, 1)[0];
    ASSERT_EQ(single.size(), size_t(kCount));
    for (int steps : {3, 4}) {
      const auto runs = generate(steps, 2);
      EXPECT_EQ(runs[0], single) << bits << "-bit, " << steps << " steps per launch";
      EXPECT_EQ(runs[1], single) << bits << "-bit, " << steps << " steps per launch, second run";
    }
  }
}
#endif

// generate() on a GPU decodes through a recorded CUDA graph by default: the same ids as with
// every op launched from the host, greedy and seeded sampling, and greedy as on the CPU.
TEST(CudaGenerate, GraphDecodingGivesTheEagerAnswer) {
  MOXIN_SKIP_WITHOUT_GPU();
  const auto dir = test::checkpoint_dir("tiny-f32");
  if (dir.empty()) GTEST_SKIP() << "tiny-f32 checkpoint not generated";
  const auto tokenizer = load_tokenizer(test::fixtures_dir() / "tokenizer" / "mistral");
  const Image photo = load_image(test::fixtures_dir() / "parity" / "photo.png");
  MoxinVLM gpu_model = load_model(dir, LoadOptions{Device::CUDA});
  MoxinVLM cpu_model = load_model(dir);
  for (const bool sampled : {false, true}) {
    GenerateOptions o;
    o.max_tokens = 24;
    o.allow_vocab_mismatch = true;
    if (sampled) {
      o.sampling.temperature = 0.9f;
      o.sampling.top_p = 0.95f;
      o.sampling.seed = 7;
    }
    const auto graphed = generate(gpu_model, *tokenizer, photo, "What is in the image?", o);
    o.cuda_graph = false;
    const auto eager = generate(gpu_model, *tokenizer, photo, "What is in the image?", o);
    EXPECT_EQ(graphed.token_ids, eager.token_ids) << (sampled ? "sampled" : "greedy");
    EXPECT_EQ(graphed.text, eager.text);
    EXPECT_EQ(graphed.generated_tokens, 24);
    if (!sampled) {
      EXPECT_EQ(graphed.token_ids,
                generate(cpu_model, *tokenizer, photo, "What is in the image?", o).token_ids);
    }
    std::printf("[generate %s] graph %.1f tok/s, eager %.1f tok/s\n", sampled ? "sampled" : "greedy",
                graphed.decode_tokens_per_s, eager.decode_tokens_per_s);
  }
}

// The image encoder runs as it is on its first call with given image shapes, is recorded on
// the second and replayed after (ops::run_recorded): every call must give what a fresh model's
// first call gives for the same images, and a result must survive later replays.
TEST(CudaRecorded, EncoderReplaysGiveTheEagerAnswer) {
  MOXIN_SKIP_WITHOUT_GPU();
  const auto dir = test::checkpoint_dir("real-towers");
  if (dir.empty()) GTEST_SKIP() << "real-towers checkpoint not generated";
  MoxinVLM model = load_model(dir, LoadOptions{Device::CUDA});
  const int64_t Sd = model.dino.config.image_size, Ss = model.siglip.config.image_size;
  auto images = [&](int64_t batch, uint32_t seed) {
    return std::pair{test::random_tensor({batch, Sd, Sd, 3}, seed),
                     test::random_tensor({batch, Ss, Ss, 3}, seed + 1)};
  };
  // What a model that never recorded gives: its first call with these shapes.
  auto fresh = [&](const std::pair<Tensor, Tensor>& im) {
    MoxinVLM m = load_model(dir, LoadOptions{Device::CUDA});
    return m.encode_image(im.first, im.second).to_device(Device::CPU);
  };
  auto expect_same = [](const Tensor& got, const Tensor& want, const std::string& what) {
    const auto d = test::compare(got.to_device(Device::CPU), want);
    std::printf("[recorded encoder] %s: %s\n", what.c_str(), d.to_string().c_str());
    EXPECT_LE(d.max_rel, 1e-6) << what;
  };
  const auto a = images(1, 11), b = images(1, 21), c = images(1, 31);
  const Tensor first = model.encode_image(a.first, a.second);     // as it is
#if MOXIN_WITH_CUDA
  const cuda::MemoryStats before = cuda::memory_stats();
#endif
  const Tensor second = model.encode_image(b.first, b.second);    // recorded, then replayed
#if MOXIN_WITH_CUDA
  // The recording's intermediates come from the graph memory pool, reused within the graph
  // (earlier recordings of this process may have reserved them already): far less than one
  // intermediate per op would take.
  const cuda::MemoryStats after = cuda::memory_stats();
  std::printf("[recorded encoder] other GPU memory %.1f -> %.1f MB, device use %.1f -> %.1f MB\n",
              double(before.other_bytes) / 1e6, double(after.other_bytes) / 1e6,
              double(before.device_used) / 1e6, double(after.device_used) / 1e6);
  EXPECT_LT(double(after.device_used) - double(before.device_used), 128e6);
#endif
  const Tensor third = model.encode_image(c.first, c.second);     // replayed
  const Tensor again = model.encode_image(a.first, a.second);     // replayed
  expect_same(first, fresh(a), "first call");
  expect_same(second, fresh(b), "recording call");
  expect_same(third, fresh(c), "replay");
  expect_same(again, first.to_device(Device::CPU), "replay of the first images");
  expect_same(second, fresh(b), "recording call's result after later replays");
  // Another batch size is another recording, kept beside the first.
  const auto pair = images(2, 41);
  const Tensor batch_first = model.encode_image(pair.first, pair.second);
  const Tensor batch_replayed = model.encode_image(pair.first, pair.second);
  expect_same(batch_replayed, batch_first.to_device(Device::CPU), "batch of two, replayed");
  expect_same(model.encode_image(c.first, c.second), third.to_device(Device::CPU),
              "batch of one after the batch of two");
  // A weight replaced after recording: the recordings are redone, never replayed stale.
  const Linear& fc3 = model.projector.fc3;
  const Tensor new_weight =
      test::random_tensor(fc3.weight.shape(), 51, 0.02f).to(fc3.weight.dtype());
  model.projector.fc3.weight = new_weight.to_device(Device::CUDA);
  MoxinVLM other = load_model(dir, LoadOptions{Device::CUDA});
  other.projector.fc3.weight = new_weight.to_device(Device::CUDA);
  const Tensor changed = other.encode_image(c.first, c.second).to_device(Device::CPU);
  EXPECT_GT(test::compare(changed, third.to_device(Device::CPU)).max_abs, 0.0);
  for (int call = 0; call < 3; ++call)  // as it is, recorded, replayed
    expect_same(model.encode_image(c.first, c.second), changed,
                "after a weight change, call " + std::to_string(call + 1));
}

TEST(CudaDevice, CpuPathStillWorksAndModelsMove) {
  MOXIN_SKIP_WITHOUT_GPU();
  const auto dir = test::checkpoint_dir("tiny-hf");
  if (dir.empty()) GTEST_SKIP() << "tiny-hf checkpoint not generated";
  MoxinVLM model = load_model(dir);
  model.to_device(Device::CUDA);
  EXPECT_EQ(model.device(), Device::CUDA);
  model.to_device(Device::CPU);
  EXPECT_EQ(model.device(), Device::CPU);
}

TEST(CudaDevice, UnavailableDeviceFailsWithOneClearError) {
  if (device::available(Device::CUDA)) GTEST_SKIP() << "a GPU is present: nothing to refuse";
  try {
    device::require(Device::CUDA);
    FAIL() << "require(CUDA) succeeded without a GPU";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    EXPECT_NE(what.find("CUDA"), std::string::npos) << what;
  }
  EXPECT_THROW(Tensor::empty({4}, DType::F32, Device::CUDA), Error);
}

}  // namespace
}  // namespace moxin
