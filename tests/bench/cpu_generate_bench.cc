// CPU generation speed of a model directory, single thread and all threads, beside the peer
// that bounds it: the time to stream the weights once through memory (a plain copy of as
// many bytes), which is the floor of a decode step that reads every weight.
//
//   nibble_bench_cpu --model DIR [--tokens 200] [--repeats 5] [--prefill 512]
//                    [--dtype float32|float16]   (dense weights as stored in memory)
//
// Memory: the weights' resident bytes as the engine counts them, the process's resident set
// growth across the load as the kernel measures it (VmRSS), and the same parameters in fp16.
//
// Prints one table; numbers go to tests/bench/RESULTS.md with the machine, date and commit.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "engine/generator.h"
#include "engine/model.h"
#include "engine/model_weights.h"
#include "kernels/cpu/ops.h"

namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  int threads;
  double decode_tokens_per_second;   // backend forward, one token at a time
  double generate_tokens_per_second;  // engine::Generate: sampling and text streaming included
  double prefill_tokens_per_second;  // one forward over a long prompt
};

// A line of /proc/self/status in bytes ("VmRSS", "VmHWM"); 0 where there is none.
double ProcStatusBytes(const char* key) {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  double kib = 0;
  const size_t key_length = std::strlen(key);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, key_length) == 0 && line[key_length] == ':') {
      kib = std::atof(line + key_length + 1);
    }
  }
  std::fclose(f);
  return kib * 1024;
}

Row Measure(nibble::engine::Model& model, int threads, int tokens, int repeats,
            int64_t prefill_tokens) {
  nibble::kernels::cpu::SetCpuThreads(threads);
  auto& backend = model.backend();
  std::vector<double> decode, generate, prefill;
  std::vector<float> logits;
  for (int r = 0; r < repeats; ++r) {
    // Decode: greedy chain from BOS through the backend alone.
    auto sequence = backend.NewSequence(tokens + 1).value();
    int32_t token = model.tokenizer().BosId();
    const auto start = Clock::now();
    for (int t = 0; t < tokens; ++t) {
      const int32_t one[1] = {token};
      if (!backend.Forward(*sequence, one, nibble::engine::LogitsFor::kLastPosition, logits).ok()) {
        std::fprintf(stderr, "forward failed\n");
        std::exit(1);
      }
      token = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    }
    decode.push_back(tokens / std::chrono::duration<double>(Clock::now() - start).count());

    nibble::engine::GenerateRequest request;
    request.prompt_ids = {model.tokenizer().BosId()};
    request.max_tokens = tokens;
    auto result = nibble::engine::Generate(model, request, nullptr).value();
    generate.push_back(result.output_ids.size() / result.decode_seconds);

    // Prefill: the longest prompt the context allows, in one call.
    const int64_t prompt =
        std::min<int64_t>(model.config().max_position_embeddings, prefill_tokens);
    std::vector<int32_t> ids(prompt);
    for (int64_t i = 0; i < prompt; ++i) ids[i] = static_cast<int32_t>(3 + i % 250);
    auto long_sequence = backend.NewSequence(prompt).value();
    const auto prefill_start = Clock::now();
    if (!backend.Forward(*long_sequence, ids, nibble::engine::LogitsFor::kLastPosition, logits).ok()) {
      std::exit(1);
    }
    prefill.push_back(prompt / std::chrono::duration<double>(Clock::now() - prefill_start).count());
  }
  return {threads, Median(decode), Median(generate), Median(prefill)};
}

// Bytes per second of memcpy over a buffer of `bytes` (the peer: what streaming the weights
// once per token costs at best).
double CopyBandwidth(size_t bytes, int repeats) {
  std::vector<char> src(bytes, 1), dst(bytes);
  std::vector<double> rates;
  for (int r = 0; r < repeats * 20; ++r) {
    const auto start = Clock::now();
    std::memcpy(dst.data(), src.data(), bytes);
    rates.push_back(bytes / std::chrono::duration<double>(Clock::now() - start).count());
    src[r % bytes] = dst[(r * 7) % bytes];  // keep the copies observable
  }
  return Median(rates);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  int tokens = 200, repeats = 5;
  int64_t prefill = 512;
  nibble::engine::ModelLoadOptions load_options;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--model") dir = argv[i + 1];
    else if (flag == "--tokens") tokens = std::atoi(argv[i + 1]);
    else if (flag == "--repeats") repeats = std::atoi(argv[i + 1]);
    else if (flag == "--prefill") prefill = std::atoll(argv[i + 1]);
    else if (flag == "--dtype") {
      const std::string dtype = argv[i + 1];
      if (dtype != "float32" && dtype != "float16") {
        std::fprintf(stderr, "--dtype must be float32 or float16, got %s\n", dtype.c_str());
        return 2;
      }
      load_options.weight_storage = dtype == "float16" ? nibble::engine::WeightStorage::kF16
                                                       : nibble::engine::WeightStorage::kF32;
    }
  }
  if (dir.empty() || tokens <= 0 || repeats <= 0 || prefill <= 0) {
    std::fprintf(stderr, "usage: %s --model DIR [--tokens N] [--repeats R] [--prefill N]\n",
                 argv[0]);
    return 2;
  }
  const double rss_before = ProcStatusBytes("VmRSS");
  auto model = nibble::engine::Model::Load(dir, load_options);
  const double rss_growth = ProcStatusBytes("VmRSS") - rss_before;
  const double load_peak = ProcStatusBytes("VmHWM");
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  const size_t weight_bytes = (*model)->weight_bytes();
  const double bandwidth = CopyBandwidth(weight_bytes, repeats);
  const int all = omp_get_num_procs();

  // The same parameters held as fp16: the yardstick for what W4A16 saves in memory.
  double parameters = 0;
  for (const auto& tensor : nibble::engine::CheckpointTensors((*model)->config())) {
    double n = 1;
    for (int64_t d : tensor.shape) n *= static_cast<double>(d);
    parameters += n;
  }
  std::printf("model %s: %.3f MB of resident weights, %.3fx the %.3f MB of its parameters "
              "in fp16; %d decode tokens, median of %d runs\n",
              dir.c_str(), weight_bytes / 1e6, weight_bytes / (2.0 * parameters),
              2.0 * parameters / 1e6, tokens, repeats);
  std::printf("process: resident set grew %.3f MB over the load (%.3fx fp16), peak %.3f MB\n",
              rss_growth / 1e6, rss_growth / (2.0 * parameters), load_peak / 1e6);
  std::printf("peer: memcpy of the weight bytes %.1f GB/s -> floor %.1f us/token (%.0f tokens/s)\n",
              bandwidth / 1e9, weight_bytes / bandwidth * 1e6, bandwidth / weight_bytes);
  std::printf("%-8s %18s %20s %18s\n", "threads", "decode tokens/s", "generate tokens/s",
              "prefill tokens/s");
  for (int threads : {1, all}) {
    const Row row = Measure(**model, threads, tokens, repeats, prefill);
    std::printf("%-8d %18.1f %20.1f %18.1f\n", row.threads, row.decode_tokens_per_second,
                row.generate_tokens_per_second, row.prefill_tokens_per_second);
    if (all == 1) break;
  }
  return 0;
}
