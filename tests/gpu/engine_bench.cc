// End-to-end decode on the CUDA backend with a model of real shapes (a real config.json) and
// random weights made in memory (speed does not depend on the values), W4A16 (g128) and fp16:
//   gpu_engine_bench CONFIG [--batches 1,8,32,64] [--prompt 128] [--new 256] [--ttft 2048]
//                    [--storage w4,fp16] [--layers N] [--host-argmax 1]
//                    [--temperature T] [--top-k K] [--top-p P]
// For each storage and batch size: B sequences are prefilled together (prompt tokens each),
// then decoded together for `new` steps through Backend::ForwardBatch over the paged KV
// cache, greedy: the argmax found on the device (BatchSpan::sample with temperature 0, as the
// serving engine asks for every request), or with --host-argmax 1 every step's logits copied back
// and scanned on the host. With --temperature > 0 every step samples on the device instead
// (kernels/cuda/sampling.h, with --top-k / --top-p and a fresh uniform draw per token), so the
// table shows what a sampled chat costs beside greedy. Prints tokens/s, and the roofline: the
// bytes one step must read (every weight once, plus each sequence's keys and values so far,
// averaged over the steps) over the bandwidth of a device-to-device copy measured in the same
// run. Then the time to first token of one `ttft`-token prompt (one prefill pass, its last
// logits back on the host).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/cuda_backend.h"
#include "engine/int4_weight.h"
#include "engine/linear.h"
#include "engine/model_config.h"
#include "engine/model_weights.h"
#include "kernels/cpu/half.h"
#include "kernels/sample_row.h"
#include "tests/gpu/device_buffer.h"
#include "tests/gpu/timing.h"

namespace nibble {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::unique_ptr<engine::LinearWeight> RandomLinear(int64_t in, int64_t out, bool int4,
                                                   uint64_t seed) {
  if (!int4) {
    // fp16 made in parallel and used in place (a 7B model's fp32 copy and its serial
    // conversion took minutes); the shared vector stands for the file mapping.
    auto halves = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(in * out));
    uint16_t* h = halves->data();
    const size_t n = halves->size();
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
      const float u = static_cast<float>(SplitMix(seed * 0x100000001b3ull + i) >> 40) / 8388608.0f;
      h[i] = kernels::cpu::FloatToHalf(0.02f * (u - 1.0f));
    }
    return engine::MakeMappedF16Linear(in, out, halves, h);
  }
  engine::Int4Weight w;
  w.in_features = in;
  w.out_features = out;
  w.group_size = 128;
  w.q.resize(static_cast<size_t>(in * out));
  const size_t n = w.q.size();
  uint8_t* q = w.q.data();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) q[i] = static_cast<uint8_t>(SplitMix(seed + i) & 15);
  const size_t groups = static_cast<size_t>(out * w.groups());
  w.zeros.assign(groups, 8);
  w.scales.assign(groups, kernels::cpu::FloatToHalf(0.003f));
  return engine::MakeInt4Linear(w, {});
}

engine::ModelWeights RandomWeights(const engine::ModelConfig& c, bool int4) {
  engine::ModelWeights w;
  const int64_t hidden = c.hidden_size;
  std::shared_ptr<const engine::LinearWeight> table = RandomLinear(hidden, c.vocab_size, false, 1);
  w.embedding = engine::EmbeddingTable(table);
  w.lm_head = c.tie_word_embeddings ? table
                                    : std::shared_ptr<const engine::LinearWeight>(
                                          RandomLinear(hidden, c.vocab_size, false, 2));
  w.final_norm.assign(static_cast<size_t>(hidden), 1.0f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    engine::LayerWeights layer;
    const uint64_t s = 100 + 10 * static_cast<uint64_t>(l);
    layer.attention_norm.assign(static_cast<size_t>(hidden), 1.0f);
    layer.ffn_norm.assign(static_cast<size_t>(hidden), 1.0f);
    layer.q_proj = RandomLinear(hidden, c.q_dim(), int4, s + 0);
    layer.k_proj = RandomLinear(hidden, c.kv_dim(), int4, s + 1);
    layer.v_proj = RandomLinear(hidden, c.kv_dim(), int4, s + 2);
    layer.o_proj = RandomLinear(c.q_dim(), hidden, int4, s + 3);
    layer.gate_proj = RandomLinear(hidden, c.intermediate_size, int4, s + 4);
    layer.up_proj = RandomLinear(hidden, c.intermediate_size, int4, s + 5);
    layer.down_proj = RandomLinear(c.intermediate_size, hidden, int4, s + 6);
    w.layers.push_back(std::move(layer));
  }
  return w;
}

std::vector<int> ParseList(const std::string& text) {
  std::vector<int> v;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) v.push_back(std::stoi(item));
  return v;
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

#define BENCH_CHECK(status_expr)                                                   \
  do {                                                                             \
    const absl::Status s_ = (status_expr);                                         \
    if (!s_.ok()) {                                                                \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(2);                                                                \
    }                                                                              \
  } while (0)

int Main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: gpu_engine_bench CONFIG [--batches 1,8,32,64] [--prompt 128] "
                         "[--new 256] [--ttft 2048] [--storage w4,fp16] [--layers N] "
                         "[--host-argmax 1] [--temperature T] [--top-k K] [--top-p P]\n");
    return 2;
  }
  std::vector<int> batches = {1, 8, 32, 64};
  int prompt = 128, new_tokens = 256, ttft_tokens = 2048, layers = 0;
  bool host_argmax = false;  // --host-argmax 1: every step's logits to the host, argmax there
  kernels::SampleRowParams sampling;  // temperature 0: greedy
  std::vector<std::string> storages = {"w4", "fp16"};
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--batches") batches = ParseList(value);
    else if (flag == "--prompt") prompt = std::stoi(value);
    else if (flag == "--new") new_tokens = std::stoi(value);
    else if (flag == "--ttft") ttft_tokens = std::stoi(value);
    else if (flag == "--layers") layers = std::stoi(value);
    else if (flag == "--host-argmax") host_argmax = value == "1";
    else if (flag == "--temperature") sampling.temperature = std::stof(value);
    else if (flag == "--top-k") sampling.top_k = std::stoi(value);
    else if (flag == "--top-p") sampling.top_p = std::stof(value);
    else if (flag == "--storage") {
      storages.clear();
      std::stringstream ss(value);
      for (std::string s; std::getline(ss, s, ',');) storages.push_back(s);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const bool sampled = sampling.temperature > 0;
  if (!std::isfinite(sampling.temperature) || sampling.temperature < 0 || sampling.top_k < 0 ||
      !(sampling.top_p > 0 && sampling.top_p <= 1) || (host_argmax && sampled) ||
      (!sampled && (sampling.top_k != 0 || sampling.top_p != 1.0f))) {
    std::fprintf(stderr, "bad sampling flags: a finite temperature >= 0, top-k >= 0, top-p in "
                         "(0, 1]; --top-k / --top-p only with --temperature > 0, --host-argmax "
                         "only without\n");
    return 2;
  }
  std::ifstream file(argv[1]);
  std::stringstream text;
  text << file.rdbuf();
  auto parsed = engine::ParseModelConfig(text.str(), argv[1]);
  BENCH_CHECK(parsed.status());
  engine::ModelConfig config = *parsed;
  if (layers > 0) config.num_layers = layers;

  cudaDeviceProp prop;
  NIBBLE_TEST_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  // The ceiling every benchmark here measures the same way (tests/gpu/timing.h; until run 26
  // this one timed a synchronous copy on the host clock, ~1 % lower).
  const double copy_gbs = testing::CopyBandwidth(nullptr);
  std::printf("device: %s; model: %s, %lld layers; copy bandwidth %.0f GB/s (read + write)\n",
              prop.name, argv[1], static_cast<long long>(config.num_layers), copy_gbs);
  if (sampled) {
    std::printf("decode samples on the device: temperature %g, top-k %d, top-p %g\n",
                sampling.temperature, sampling.top_k, sampling.top_p);
  }

  std::printf("\n| weights | batch | prompt | new | decode tok/s | ms/step | roofline tok/s | "
              "%% of roofline | prefill s |\n|---|---|---|---|---|---|---|---|---|\n");
  std::vector<std::string> ttft_lines;
  for (const std::string& storage : storages) {
    const bool int4 = storage == "w4";
    const auto t_make = Clock::now();
    engine::ModelWeights weights = RandomWeights(config, int4);
    // What one decode step reads of the weights: every linear once (lm_head included), the
    // embedding rows negligible.
    int64_t weight_bytes = static_cast<int64_t>(weights.lm_head->StorageBytes());
    for (const auto& layer : weights.layers) {
      for (const auto* w : {layer.q_proj.get(), layer.k_proj.get(), layer.v_proj.get(),
                            layer.o_proj.get(), layer.gate_proj.get(), layer.up_proj.get(),
                            layer.down_proj.get()}) {
        weight_bytes += static_cast<int64_t>(w->StorageBytes());
      }
    }
    auto made = engine::MakeCudaBackend(config, std::move(weights), 0);
    BENCH_CHECK(made.status());
    std::unique_ptr<engine::Backend> backend = std::move(made).value();
    std::fprintf(stderr, "%s: weights made and uploaded in %.1f s (%.2f GB read per step)\n",
                 storage.c_str(), Seconds(t_make, Clock::now()), weight_bytes / 1e9);
    const int32_t block = 64;
    const int max_batch = *std::max_element(batches.begin(), batches.end());
    const int64_t blocks_per_seq = (prompt + new_tokens + block - 1) / block;
    const int64_t pool = std::max<int64_t>(max_batch * blocks_per_seq, (ttft_tokens + block - 1) / block);
    BENCH_CHECK(backend->ConfigureKvCache(pool, block));
    BENCH_CHECK(backend->GrowKvCache(pool));
    const int64_t vocab = config.vocab_size;
    const int64_t kv_bytes_per_token = 2 * config.num_layers * config.kv_dim() * 2;

    for (int batch : batches) {
      std::vector<std::vector<int32_t>> tables(batch), tokens(batch);
      for (int s = 0; s < batch; ++s) {
        for (int64_t b = 0; b < blocks_per_seq; ++b) tables[s].push_back(static_cast<int32_t>(s * blocks_per_seq + b));
        for (int t = 0; t < prompt; ++t) tokens[s].push_back(static_cast<int32_t>((SplitMix(s * 1000 + t) % 30000) + 3));
      }
      std::vector<float> logits;
      std::vector<engine::BatchSpan> spans(batch);
      for (int s = 0; s < batch; ++s) {
        spans[s].tokens = tokens[s];
        spans[s].start = 0;
        spans[s].block_table = tables[s];
        spans[s].logits = true;
      }
      const auto t_prefill = Clock::now();
      BENCH_CHECK(backend->ForwardBatch(spans, logits));
      const double prefill_s = Seconds(t_prefill, Clock::now());
      std::vector<int32_t> next(batch), sampled;
      auto greedy = [&] {  // the prefill's logits (and --host-argmax steps'), on the host
        for (int s = 0; s < batch; ++s) {
          const float* row = logits.data() + s * vocab;
          next[s] = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
        }
      };
      greedy();
      for (int s = 0; s < batch; ++s) {
        spans[s].sample = !host_argmax;  // on the device: greedy, or sampled with --temperature
        spans[s].sampling = sampling;
      }
      // Two warm-up steps (cuBLAS heuristics, first-touch of the scratch buffers).
      int64_t length = prompt;
      const auto step = [&] {
        for (int s = 0; s < batch; ++s) {
          spans[s].tokens = std::span<const int32_t>(&next[s], 1);
          spans[s].start = length;
          // A fresh draw in [0, 1) per token (53 bits), as the engine's Sampler takes one.
          spans[s].sampling.u = static_cast<double>(SplitMix(length * 4096 + s) >> 11) * 0x1p-53;
        }
        BENCH_CHECK(backend->ForwardBatch(spans, logits, sampled));
        if (host_argmax) {
          greedy();
        } else {
          next = sampled;
        }
        ++length;
      };
      step();
      step();
      const auto t0 = Clock::now();
      const int steps = new_tokens - 2;
      double kv_bytes = 0;
      for (int i = 0; i < steps; ++i) {
        kv_bytes += static_cast<double>(batch) * (length + 1) * kv_bytes_per_token;
        step();
      }
      const double seconds = Seconds(t0, Clock::now());
      const double tok_s = batch * steps / seconds;
      const double bytes_per_step = weight_bytes + kv_bytes / steps;
      const double roofline = batch / (bytes_per_step / (copy_gbs * 1e9));
      std::printf("| %s | %d | %d | %d | %.1f | %.3f | %.1f | %.1f %% | %.3f |\n", storage.c_str(),
                  batch, prompt, new_tokens, tok_s, 1e3 * seconds / steps, roofline,
                  100.0 * tok_s / roofline, prefill_s);
      std::fflush(stdout);
    }

    // Time to first token: one prompt of ttft_tokens in one prefill pass.
    if (ttft_tokens > 0) {
      std::vector<int32_t> ids(ttft_tokens), table((ttft_tokens + block - 1) / block);
      for (int t = 0; t < ttft_tokens; ++t) ids[t] = static_cast<int32_t>(SplitMix(t) % 30000 + 3);
      for (size_t b = 0; b < table.size(); ++b) table[b] = static_cast<int32_t>(b);
      engine::BatchSpan span;
      span.tokens = ids;
      span.block_table = table;
      span.logits = true;
      std::vector<float> logits;
      std::vector<double> times;
      for (int r = 0; r < 4; ++r) {
        const auto t0 = Clock::now();
        BENCH_CHECK(backend->ForwardBatch(std::span<const engine::BatchSpan>(&span, 1), logits));
        if (r > 0) times.push_back(Seconds(t0, Clock::now()));  // run 0 warms up
      }
      std::sort(times.begin(), times.end());
      char line[256];
      std::snprintf(line, sizeof line, "| %s | %d | %.1f ms (median of 3 after a warm-up: %.1f / %.1f) |",
                    storage.c_str(), ttft_tokens, 1e3 * times[1], 1e3 * times[0], 1e3 * times[2]);
      ttft_lines.push_back(line);
    }
  }
  if (!ttft_lines.empty()) {  // --ttft 0: no prompt timed, no table
    std::printf("\n| weights | prompt tokens | time to first token |\n|---|---|---|\n");
    for (const std::string& line : ttft_lines) std::printf("%s\n", line.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace nibble

int main(int argc, char** argv) { return nibble::Main(argc, argv); }
