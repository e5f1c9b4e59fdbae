// nibble's artifact manifest, `nibble_manifest.json`: what a quantized model directory holds
// and how it was made — the architecture, the quantization settings, the engine settings the
// LMDeploy tutorial tunes (with their defaults), the chat template, the size and sha256 of
// every file, and a quality report (relative error per layer, seconds per phase, perplexity
// when measured). The manifest is written last and atomically, so a directory that has one
// is complete; VerifyArtifact checks a directory against it.
//
// Thread safety: the functions may be called from any thread; concurrent writers of the same
// directory are not supported.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "quant/quantize_model.h"

namespace nibble::quant {

inline constexpr const char* kManifestFileName = "nibble_manifest.json";
inline constexpr int kManifestFormatVersion = 1;

struct ManifestQuantization {
  std::string method = "rtn";  // "rtn", "awq"
  int64_t bits = 4;
  int64_t group_size = 128;
  // Calibration (AWQ); absent for methods without one.
  std::optional<std::string> calibration_dataset;
  std::optional<int64_t> calibration_samples;
  std::optional<int64_t> calibration_seqlen;
  bool operator==(const ManifestQuantization&) const = default;
};

// The serving settings LMDeploy's tutorial tunes, with its defaults.
struct ManifestEngineSettings {
  double cache_max_entry_count = 0.5;  // fraction of free GPU memory for the KV cache
  int64_t cache_block_seq_len = 128;   // tokens per KV cache block
  int64_t cache_chunk_size = 1;        // blocks allocated at a time
  int64_t session_len = 0;             // default: the model's max_position_embeddings
  int64_t max_batch_size = 64;
  bool operator==(const ManifestEngineSettings&) const = default;
};

struct ManifestFile {
  uint64_t size = 0;
  std::string sha256;  // lower-case hex
  bool operator==(const ManifestFile&) const = default;
};

struct ManifestLayerError {
  std::string name;            // the linear's weight tensor
  double relative_error = 0;   // ||W - dequant(quant(W))||_F / ||W||_F
  bool operator==(const ManifestLayerError&) const = default;
};

struct ManifestReport {
  std::vector<ManifestLayerError> layers;
  std::vector<std::string> not_converted;  // linears kept fp16, with the reason
  std::map<std::string, double> seconds;   // phase -> wall seconds
  std::optional<double> perplexity_before;
  std::optional<double> perplexity_after;
  bool operator==(const ManifestReport&) const = default;
};

struct ArtifactManifest {
  int format_version = kManifestFormatVersion;
  std::string architecture;  // the HF "architectures" spelling
  ManifestQuantization quantization;
  ManifestEngineSettings engine;
  std::string chat_template;  // engine::ChatTemplateName spelling
  std::map<std::string, ManifestFile> files;  // relative path ('/'-separated) -> size, sha256
  ManifestReport report;
  bool operator==(const ArtifactManifest&) const = default;
};

std::string_view QuantMethodName(QuantMethod method);

// The manifest of a model quantized from `config` with `options` (files left empty:
// WriteManifest fills them): engine defaults with session_len = max_position_embeddings,
// the architecture's default chat template, the report's layers, and `seconds` as phases.
ArtifactManifest BuildQuantizeManifest(const engine::ModelConfig& config,
                                       const QuantizeOptions& options,
                                       const QuantizeReport& report,
                                       const std::map<std::string, double>& seconds);

// Hashes every regular file under `dir` (recursively; paths relative to `dir`, the manifest
// itself excluded), replaces `manifest.files` with the result, and writes
// `dir/nibble_manifest.json` atomically (temporary name, fsync, rename). Call it after every
// other file is in place. Errors: a symbolic link or special file in `dir` (named), an
// unreadable file, a failed write.
absl::Status WriteManifest(const std::string& dir, const ArtifactManifest& manifest);

// Reads and checks `dir/nibble_manifest.json`. Errors name the file and the key: NotFound
// without a manifest, InvalidArgument for malformed JSON, a missing or mistyped key, an
// unsupported format_version, or a file path that is absolute or leaves the directory.
absl::StatusOr<ArtifactManifest> ReadManifest(const std::string& dir);

// Checks `dir` against its manifest: every listed file exists with the listed size and
// sha256, no regular file is unlisted (the manifest excepted), no symbolic links or special
// files. DataLoss naming each offending file and what differs; ReadManifest's errors.
absl::Status VerifyArtifact(const std::string& dir);

}  // namespace nibble::quant
