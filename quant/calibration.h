// Calibration input for `nibble quantize` (AWQ): where the calibration text lives, and how
// token windows are drawn from it. The flags mirror `lmdeploy lite auto_awq`:
//   --calib-dataset ptb   --calib-samples 128   --calib-seqlen 2048   --seed 0
//   --datasets-dir DIR
// Nothing here changes a request silently: a request the text or the model cannot honour is
// an error that says why, and anything worth knowing about the draw is in `adjustments`.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble::quant {

// The directory the named datasets are looked up in when --datasets-dir is not given:
//   1. $NIBBLE_DATASETS_DIR, if set and non-empty;
//   2. else $XDG_DATA_HOME/nibble/datasets, if XDG_DATA_HOME is set and non-empty;
//   3. else $HOME/.local/share/nibble/datasets;
//   4. else (no HOME) the relative path "nibble-datasets".
// The directory is not required to exist; ResolveCalibrationFile reports a missing file.
std::string DefaultDatasetsDir();

// Maps a --calib-dataset value to a text file:
//   "ptb"         -> DIR/ptb/ptb.valid.txt   (validation split; ptb.test.txt stays free
//                                             for evaluation)
//   "wikitext2"   -> DIR/wikitext-2/wiki.test.raw
//   "tinystories" -> DIR/tinystories/train-head.txt
//   anything else -> taken as a path to a text file (DIR is not used).
// Errors: NotFound naming the dataset, the path looked at, and how to point nibble at the
// datasets directory (--datasets-dir or $NIBBLE_DATASETS_DIR); InvalidArgument for an
// empty name. A path that exists but is a directory is NotFound too.
absl::StatusOr<std::string> ResolveCalibrationFile(std::string_view dataset,
                                                   const std::string& datasets_dir);

struct CalibrationOptions {
  int64_t samples = 128;  // --calib-samples
  int64_t seqlen = 2048;  // --calib-seqlen: tokens per sample
  uint64_t seed = 0;      // --seed
};

struct CalibrationSet {
  std::vector<std::vector<int32_t>> samples;  // each exactly `seqlen` tokens
  std::vector<std::string> adjustments;       // human-readable notes about the draw
};

// Draws `options.samples` non-overlapping windows of `options.seqlen` tokens from `ids`.
//
// `ids` is the whole calibration text tokenized once, BOS first if the model uses one (the
// caller's tokenizer decides). Samples are raw windows of that stream: no BOS is added per
// sample, matching AWQ's calibration (AutoAWQ / LMDeploy concatenate the tokenized text and
// cut it into blocks without inserting BOS). Only the first window of the text can start
// with the BOS that the caller put there.
//
// Draw: the ids are cut into S = floor(n / seqlen) consecutive slots [k*seqlen, (k+1)*seqlen);
// a partial Fisher-Yates shuffle driven by std::mt19937_64(seed) picks `samples` distinct
// slots (each index uniform via rejection sampling on the raw 64-bit outputs, not
// std::uniform_int_distribution, so the draw is the same on every standard library), and
// the chosen windows are returned in slot (text) order. Same ids + options -> same samples.
//
// Errors (InvalidArgument, each naming the numbers involved):
//   samples < 1, seqlen < 2, model_context < 1;
//   seqlen > model_context;
//   samples * seqlen > ids.size() — the message says how many tokens the text has and how
//   many samples of that length it holds.
absl::StatusOr<CalibrationSet> DrawCalibrationSamples(const std::vector<int32_t>& ids,
                                                      const CalibrationOptions& options,
                                                      int64_t model_context);

}  // namespace nibble::quant
