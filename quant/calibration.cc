#include "quant/calibration.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace nibble::quant {
namespace {

std::string EnvOrEmpty(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// Uniform integer in [0, bound), bound >= 1, from raw mt19937_64 outputs by rejection:
// outputs below 2^64 mod bound are discarded so that every residue is equally likely.
uint64_t UniformBelow(std::mt19937_64& gen, uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;  // == 2^64 mod bound
  while (true) {
    const uint64_t x = gen();
    if (x >= threshold) return x % bound;
  }
}

}  // namespace

std::string DefaultDatasetsDir() {
  if (std::string d = EnvOrEmpty("NIBBLE_DATASETS_DIR"); !d.empty()) return d;
  if (std::string x = EnvOrEmpty("XDG_DATA_HOME"); !x.empty()) {
    return (std::filesystem::path(x) / "nibble" / "datasets").string();
  }
  if (std::string h = EnvOrEmpty("HOME"); !h.empty()) {
    return (std::filesystem::path(h) / ".local" / "share" / "nibble" / "datasets").string();
  }
  return "nibble-datasets";
}

absl::StatusOr<std::string> ResolveCalibrationFile(std::string_view dataset,
                                                   const std::string& datasets_dir) {
  if (dataset.empty()) {
    return absl::InvalidArgumentError(
        "calibration dataset: empty name (use ptb, wikitext2, tinystories, or a text file path)");
  }
  std::filesystem::path path;
  bool named = true;
  if (dataset == "ptb") {
    path = std::filesystem::path(datasets_dir) / "ptb" / "ptb.valid.txt";
  } else if (dataset == "wikitext2") {
    path = std::filesystem::path(datasets_dir) / "wikitext-2" / "wiki.test.raw";
  } else if (dataset == "tinystories") {
    path = std::filesystem::path(datasets_dir) / "tinystories" / "train-head.txt";
  } else {
    named = false;
    path = std::filesystem::path(std::string(dataset));
  }
  std::error_code ec;
  if (std::filesystem::is_regular_file(path, ec)) return path.string();

  const std::string p = path.string();
  const std::string d(dataset);
  if (named) {
    return absl::NotFoundError(absl::StrCat(
        "calibration dataset '", d, "': no file at ", p, " (datasets directory '", datasets_dir,
        "'); point nibble at the directory holding ptb/, wikitext-2/ and tinystories/ with "
        "--datasets-dir DIR or the NIBBLE_DATASETS_DIR environment variable"));
  }
  return absl::NotFoundError(absl::StrCat(
      "calibration dataset '", d, "': not a known name (ptb, wikitext2, tinystories) and no "
      "text file at ", p, "; pass one of those names (looked up under --datasets-dir DIR or "
      "$NIBBLE_DATASETS_DIR, now '", datasets_dir, "') or the path of a text file"));
}

absl::StatusOr<CalibrationSet> DrawCalibrationSamples(const std::vector<int32_t>& ids,
                                                      const CalibrationOptions& options,
                                                      int64_t model_context) {
  if (options.samples < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calib-samples must be at least 1, got ", options.samples));
  }
  if (options.seqlen < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calib-seqlen must be at least 2, got ", options.seqlen));
  }
  if (model_context < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("model context length must be at least 1, got ", model_context));
  }
  if (options.seqlen > model_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--calib-seqlen ", options.seqlen, " exceeds the model's context length ",
        model_context, "; use --calib-seqlen ", model_context, " or less"));
  }
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t slots = n / options.seqlen;
  if (options.samples > slots) {  // samples * seqlen > n, without overflow
    return absl::InvalidArgumentError(absl::StrCat(
        "--calib-samples ", options.samples, " x --calib-seqlen ", options.seqlen,
        " needs more tokens than the calibration text has: it has ", n, " tokens, which hold ",
        slots, " non-overlapping samples of ", options.seqlen,
        " tokens; lower --calib-samples or --calib-seqlen, or use a longer text"));
  }

  // Partial Fisher-Yates over slot indices: the first `samples` entries are the draw.
  std::vector<int64_t> order(static_cast<size_t>(slots));
  for (int64_t i = 0; i < slots; ++i) order[static_cast<size_t>(i)] = i;
  std::mt19937_64 gen(options.seed);
  for (int64_t i = 0; i < options.samples; ++i) {
    const uint64_t j =
        static_cast<uint64_t>(i) + UniformBelow(gen, static_cast<uint64_t>(slots - i));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  order.resize(static_cast<size_t>(options.samples));
  std::sort(order.begin(), order.end());

  CalibrationSet set;
  set.samples.reserve(order.size());
  for (int64_t slot : order) {
    const auto begin = ids.begin() + slot * options.seqlen;
    set.samples.emplace_back(begin, begin + options.seqlen);
  }
  set.adjustments.push_back(absl::StrCat(
      "drew ", options.samples, " of ", slots, " non-overlapping windows of ", options.seqlen,
      " tokens from ", n, " tokens (seed ", options.seed, "); samples are raw windows, no BOS "
      "added per sample"));
  if (options.samples == slots) {
    set.adjustments.push_back(
        "every window of the text is used, so the seed does not change the samples");
  }
  if (const int64_t tail = n - slots * options.seqlen; tail > 0) {
    set.adjustments.push_back(absl::StrCat("the last ", tail,
                                           " tokens fall short of a full window and are "
                                           "never sampled"));
  }
  return set;
}

}  // namespace nibble::quant
