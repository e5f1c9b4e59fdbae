#include "quant/quantize_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "engine/int4_weight.h"
#include "engine/model_config.h"
#include "engine/safetensors.h"
#include "engine/model.h"
#include "engine/perplexity.h"
#include "engine/sha256.h"
#include "engine/status_macros.h"
#include "engine/tensor_store.h"
#include "engine/tokenizer.h"
#include "kernels/cpu/half.h"
#include "quant/awq_searcher.h"
#include "quant/manifest.h"
#include "quant/rtn.h"

namespace nibble::quant {
namespace fs = std::filesystem;
namespace {

// Tokenizer and generation files travel with the weights unchanged.
constexpr const char* kCopiedFiles[] = {"tokenizer.model", "tokenizer_config.json",
                                        "special_tokens_map.json", "generation_config.json"};

// The linears inside the decoder layers are quantized; embeddings, lm_head and norms are not
// (as AutoAWQ and LMDeploy do).
bool IsDecoderLinear(const std::string& name, const engine::TensorInfo& info) {
  return absl::StartsWith(name, "model.layers.") && absl::EndsWith(name, ".weight") &&
         info.shape.size() == 2 && !absl::StrContains(name, "norm");
}

template <typename T>
std::span<const uint8_t> AsBytes(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

// Sums over fixed chunks in parallel, then the chunks' sums in order: the manifest's bits do
// not depend on the thread count.
double RelativeError(const std::vector<float>& w, const std::vector<float>& approx) {
  constexpr size_t kChunk = size_t{1} << 16;
  const size_t chunks = (w.size() + kChunk - 1) / kChunk;
  std::vector<double> diffs(chunks), norms(chunks);
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    double diff = 0, norm = 0;
    for (size_t i = c * kChunk; i < std::min(w.size(), (c + 1) * kChunk); ++i) {
      diff += (static_cast<double>(w[i]) - approx[i]) * (static_cast<double>(w[i]) - approx[i]);
      norm += static_cast<double>(w[i]) * w[i];
    }
    diffs[c] = diff;
    norms[c] = norm;
  }
  double diff = 0, norm = 0;
  for (size_t c = 0; c < chunks; ++c) {
    diff += diffs[c];
    norm += norms[c];
  }
  return norm > 0 ? std::sqrt(diff / norm) : 0.0;
}

std::string OutFile(const std::string& out_dir, const std::string& name) {
  return (fs::path(out_dir) / name).string();
}

// What makes a job the same job: the source, the settings and the calibration tokens.
std::string JobKey(const std::string& model_dir, const QuantizeOptions& options) {
  std::string calibration;
  for (const auto& sample : options.calibration_samples) {
    calibration.append(reinterpret_cast<const char*>(sample.data()), sample.size() * sizeof(int32_t));
    calibration.push_back('|');
  }
  std::error_code ec;
  const fs::path source = fs::weakly_canonical(model_dir, ec);
  nlohmann::json key = {{"source", source.string()},
                        {"method", options.method == QuantMethod::kAwq ? "awq" : "rtn"},
                        {"w_bits", options.w_bits},
                        {"group_size", options.group_size},
                        {"calibration_sha256", engine::Sha256OfString(calibration)}};
  // The GPU's search computes in fp16: its checkpoint is not the CPU's to resume, nor the
  // reverse. The device number is left out: another GPU of the same kind may resume it.
  if (options.method == QuantMethod::kAwq && options.cuda_device >= 0) key["search"] = "cuda";
  return key.dump(2);
}

// The work directory holds the artifact as it is written and, while the job runs, its
// checkpoint in .nibble-job/. Returns the checkpoint directory. A work directory with a
// manifest (a finished artifact), with another job's checkpoint, or with anything else in
// it is refused.
absl::StatusOr<std::string> PrepareWorkDirectory(const std::string& model_dir,
                                                 const std::string& out_dir,
                                                 const QuantizeOptions& options) {
  const std::string job_dir = OutFile(out_dir, ".nibble-job");
  const std::string job_file = job_dir + "/job.json";
  const std::string key = JobKey(model_dir, options);
  std::error_code ec;
  if (fs::exists(OutFile(out_dir, "nibble_manifest.json"), ec)) {
    return absl::AlreadyExistsError(
        absl::StrCat(out_dir, ": holds a finished artifact (it has a manifest)"));
  }
  if (fs::exists(job_file, ec)) {
    NIBBLE_ASSIGN_OR_RETURN(std::string existing, engine::ReadFileToString(job_file));
    if (existing != key) {
      return absl::FailedPreconditionError(absl::StrCat(
          out_dir, ": holds the checkpoint of another job (", job_file,
          "); use another --work-dir, or delete it to start over"));
    }
    return job_dir;  // the same job: resume
  }
  if (fs::exists(out_dir, ec) && !fs::is_empty(out_dir, ec)) {
    return absl::AlreadyExistsError(absl::StrCat(out_dir, ": exists and is not empty"));
  }
  fs::create_directories(job_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(job_dir, ": cannot create directory: ", ec.message()));
  }
  NIBBLE_RETURN_IF_ERROR(engine::WriteFileAtomically(job_file, key));
  return job_dir;
}

absl::StatusOr<std::vector<int32_t>> TokenizeFile(const std::string& model_dir,
                                                  const std::string& file) {
  NIBBLE_ASSIGN_OR_RETURN(std::string text, engine::ReadFileToString(file));
  engine::TokenizerLoadResult tokenizer =
      engine::LoadSentencePieceTokenizer((fs::path(model_dir) / "tokenizer.model").string());
  if (!tokenizer.tokenizer) return absl::InvalidArgumentError(tokenizer.error);
  std::vector<int32_t> ids = {tokenizer.tokenizer->BosId()};
  for (int32_t id : tokenizer.tokenizer->Encode(text)) ids.push_back(id);
  return ids;
}

// The text the report's perplexity before/after is measured on (QuantizeSettings::
// eval_dataset); empty when there is none.
absl::StatusOr<std::string> EvaluationFile(const QuantizeSettings& settings,
                                           const std::string& datasets_dir) {
  if (!settings.eval_dataset.empty()) {
    if (settings.eval_dataset == "none") return std::string();
    return ResolveCalibrationFile(settings.eval_dataset, datasets_dir);
  }
  // The default is a convenience: where its file is absent, there is no evaluation.
  std::string held_out;
  if (settings.calib_dataset == "ptb") held_out = datasets_dir + "/ptb/ptb.test.txt";
  if (settings.calib_dataset == "tinystories") held_out = datasets_dir + "/tinystories/sample.txt";
  std::error_code ec;
  return fs::is_regular_file(held_out, ec) ? held_out : std::string();
}

}  // namespace

absl::StatusOr<QuantizeReport> QuantizeModelDirectory(const std::string& model_dir,
                                                      const std::string& out_dir,
                                                      const QuantizeOptions& options,
                                                      const QuantizeControl& control) {
  const auto start = std::chrono::steady_clock::now();
  if (options.w_bits != 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--w-bits ", options.w_bits, " is unsupported: nibble quantizes to 4 bits (W4A16)"));
  }
  // Even: two int4 values share a byte, and a group must not split one.
  if (options.group_size < 2 || options.group_size % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--w-group-size must be a positive even number, got ", options.group_size));
  }
  const std::string config_path = (fs::path(model_dir) / "config.json").string();
  NIBBLE_ASSIGN_OR_RETURN(std::string config_text, engine::ReadFileToString(config_path));
  NIBBLE_ASSIGN_OR_RETURN(engine::ModelConfig config,
                          engine::ParseModelConfig(config_text, config_path));
  if (config.awq) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": the model is already AWQ"));
  }
  NIBBLE_ASSIGN_OR_RETURN(auto store, engine::TensorStore::Open(model_dir));
  AwqOptions awq_options;
  awq_options.group_size = options.group_size;
  awq_options.stop_requested = control.stop_requested;
  awq_options.cuda_device = options.cuda_device;
  if (options.method == QuantMethod::kAwq && options.cuda_device >= 0) {
    // Before the work directory: a job the GPU cannot take leaves nothing behind.
    NIBBLE_RETURN_IF_ERROR(CheckCudaAwqSearch(config, awq_options, options.cuda_device));
  }
  NIBBLE_ASSIGN_OR_RETURN(const std::string job_dir,
                          PrepareWorkDirectory(model_dir, out_dir, options));

  QuantizeProgress where;
  where.layers = config.num_layers;
  auto report_progress = [&] {
    if (control.progress) control.progress(where);
  };
  auto stopped = [&](const char* before) -> absl::Status {
    if (control.stop_requested && control.stop_requested()) {
      return absl::CancelledError(absl::StrCat("stopped before ", before));
    }
    return absl::OkStatus();
  };

  QuantizeReport report;
  auto phase_start = std::chrono::steady_clock::now();
  auto end_phase = [&](const char* phase) {
    const auto now = std::chrono::steady_clock::now();
    report.phase_seconds[phase] = std::chrono::duration<double>(now - phase_start).count();
    phase_start = now;
  };
  // AWQ rewrites norms and linears (folded scales, clipping) before the same RTN packing.
  std::map<std::string, std::vector<float>> searched;
  if (options.method == QuantMethod::kAwq) {
    awq_options.checkpoint_dir = job_dir;
    auto layer_progress = [&](const AwqProgress& awq) {
      where.phase = awq.step == "calibrate" ? "calibrate" : "search";
      where.layer = awq.layer;
      where.layers_done = awq.layers_done;
      where.step = awq.step;
      if (awq.step == "resumed from the checkpoint") where.resumed = true;
      report_progress();
    };
    NIBBLE_ASSIGN_OR_RETURN(AwqResult awq, SearchAwq(*store, config, options.calibration_samples,
                                                     awq_options, layer_progress));
    searched = std::move(awq.tensors);
    report.awq_scales = std::move(awq.scales);
    report.peak_device_bytes = awq.peak_device_bytes;
    end_phase("search");
  }
  engine::SafetensorsWriter writer;
  writer.SetMetadata("format", "pt");
  const std::vector<std::string> names = store->Names();
  int64_t done = 0;
  where.phase = "quantize";
  where.step.clear();
  where.tensors_total = static_cast<int64_t>(names.size());
  auto tensor_written = [&](const std::string& name) {
    where.tensors_done = ++done;
    where.step = name;
    report_progress();
  };
  for (const std::string& name : names) {
    NIBBLE_RETURN_IF_ERROR(stopped(absl::StrCat("tensor ", name).c_str()));
    NIBBLE_ASSIGN_OR_RETURN(engine::TensorRef ref, store->Get(name));
    const std::vector<int64_t>& shape = ref.info->shape;
    std::vector<float> values;
    if (auto it = searched.find(name); it != searched.end()) {
      values = std::move(it->second);
    } else {
      NIBBLE_ASSIGN_OR_RETURN(values, store->ReadF32(name, shape));
    }
    if (IsDecoderLinear(name, *ref.info)) {
      const int64_t out = shape[0], in = shape[1];
      const std::string module = name.substr(0, name.size() - 7);  // drop ".weight"
      if (out % 8 == 0) {
        engine::Int4Weight q = QuantizeRtn(values, in, out, options.group_size);
        report.layers.push_back({name, RelativeError(values, q.Dequantize())});
        NIBBLE_ASSIGN_OR_RETURN(engine::AwqGemmTensors t, engine::PackAwqGemm(q));
        const int64_t groups = q.groups();
        NIBBLE_RETURN_IF_ERROR(
            writer.Add(module + ".qweight", engine::DType::kI32, {in, out / 8}, AsBytes(t.qweight)));
        NIBBLE_RETURN_IF_ERROR(writer.Add(module + ".qzeros", engine::DType::kI32,
                                          {groups, out / 8}, AsBytes(t.qzeros)));
        NIBBLE_RETURN_IF_ERROR(writer.Add(module + ".scales", engine::DType::kF16,
                                          {groups, out}, AsBytes(t.scales)));
        tensor_written(name);
        continue;
      }
      // The format packs 8 outputs per int32: such a layer stays fp16 and is listed.
      report.not_converted.push_back(
          absl::StrCat(module, " (", out, " output features, not a multiple of 8)"));
    }
    std::vector<uint16_t> half(values.size());
    kernels::cpu::FloatToHalfBulk(values.data(), values.size(), half.data());
    NIBBLE_RETURN_IF_ERROR(writer.Add(name, engine::DType::kF16, shape, AsBytes(half)));
    tensor_written(name);
  }
  NIBBLE_RETURN_IF_ERROR(stopped("writing the files"));
  where.phase = "write";
  where.step = "model.safetensors";
  report_progress();
  NIBBLE_RETURN_IF_ERROR(writer.Write(OutFile(out_dir, "model.safetensors")));

  // The source config with its keys kept (auto_map and the like), plus the quantization.
  nlohmann::json json = nlohmann::json::parse(config_text, nullptr, false);
  std::vector<std::string> skipped_modules;
  for (const std::string& entry : report.not_converted) {
    skipped_modules.push_back(entry.substr(0, entry.find(' ')));
  }
  json["torch_dtype"] = "float16";
  json["quantization_config"] = {
      {"quant_method", "awq"},
      {"zero_point", true},
      {"group_size", options.group_size},
      {"bits", 4},
      {"version", "gemm"},
      {"modules_to_not_convert",
       skipped_modules.empty() ? nlohmann::json(nullptr) : nlohmann::json(skipped_modules)}};
  NIBBLE_RETURN_IF_ERROR(
      engine::WriteFileAtomically(OutFile(out_dir, "config.json"), json.dump(2) + "\n"));
  for (const char* file : kCopiedFiles) {
    const fs::path source = fs::path(model_dir) / file;
    std::error_code ec;
    if (!fs::exists(source, ec)) continue;
    NIBBLE_ASSIGN_OR_RETURN(std::string bytes, engine::ReadFileToString(source.string()));
    NIBBLE_RETURN_IF_ERROR(engine::WriteFileAtomically(OutFile(out_dir, file), bytes));
  }
  end_phase("quantize");

  if (!options.evaluation_ids.empty()) {
    NIBBLE_RETURN_IF_ERROR(stopped("the evaluation"));
    where.phase = "evaluate";
    where.step = "perplexity";
    report_progress();
    auto perplexity = [&](const std::string& dir) -> absl::StatusOr<double> {
      engine::ModelLoadOptions load;
      if (options.cuda_device >= 0) {
        load.device = {engine::Device::Kind::kCuda, options.cuda_device};
      }
      NIBBLE_ASSIGN_OR_RETURN(auto model, engine::Model::Load(dir, load));
      NIBBLE_ASSIGN_OR_RETURN(engine::PerplexityResult result,
                              engine::ComputePerplexity(model->backend(), options.evaluation_ids,
                                                        options.evaluation_window));
      return result.perplexity;
    };
    NIBBLE_ASSIGN_OR_RETURN(report.perplexity_before, perplexity(model_dir));
    NIBBLE_ASSIGN_OR_RETURN(report.perplexity_after, perplexity(out_dir));
    end_phase("evaluate");
  }

  // The job's checkpoint goes, then the manifest comes last (quant/manifest.h): a work
  // directory with a manifest is a complete artifact.
  {
    NIBBLE_RETURN_IF_ERROR(stopped("the manifest"));
    where.phase = "write";
    where.step = kManifestFileName;
    report_progress();
    std::error_code ec;
    fs::remove_all(job_dir, ec);
    if (ec) return absl::InternalError(absl::StrCat(job_dir, ": cannot remove: ", ec.message()));
    const ArtifactManifest manifest =
        BuildQuantizeManifest(config, options, report, report.phase_seconds);
    NIBBLE_RETURN_IF_ERROR(WriteManifest(out_dir, manifest));
  }
  report.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

absl::StatusOr<QuantizeReport> QuantizeModelDirectory(
    const std::string& model_dir, const std::string& out_dir, const QuantizeOptions& options,
    const std::function<void(int64_t, int64_t, const std::string&)>& progress) {
  QuantizeControl control;
  if (progress) {
    control.progress = [&progress](const QuantizeProgress& p) {
      if (p.phase == "calibrate" || p.phase == "search") {
        if (p.step == "layer done") return;
        progress(p.layer, p.layers, absl::StrCat("layer ", p.layer, ": ", p.step));
      } else if (p.phase == "quantize") {
        progress(p.tensors_done, p.tensors_total, p.step);
      }
    };
  }
  return QuantizeModelDirectory(model_dir, out_dir, options, control);
}

absl::StatusOr<PreparedQuantization> PrepareQuantization(const std::string& model_dir,
                                                         const QuantizeSettings& settings) {
  const std::string datasets_dir =
      settings.datasets_dir.empty() ? DefaultDatasetsDir() : settings.datasets_dir;
  PreparedQuantization prepared;
  QuantizeOptions& q = prepared.options;
  q.method = settings.method;
  q.w_bits = settings.w_bits;
  q.group_size = settings.group_size;
  NIBBLE_ASSIGN_OR_RETURN(const engine::Device device, engine::ParseDevice(settings.device));
  q.cuda_device = device.kind == engine::Device::Kind::kCuda ? device.index : -1;
  if (q.method == QuantMethod::kAwq) {
    NIBBLE_ASSIGN_OR_RETURN(std::string file,
                            ResolveCalibrationFile(settings.calib_dataset, datasets_dir));
    const std::string model_config = (fs::path(model_dir) / "config.json").string();
    NIBBLE_ASSIGN_OR_RETURN(std::string config_text, engine::ReadFileToString(model_config));
    NIBBLE_ASSIGN_OR_RETURN(engine::ModelConfig config,
                            engine::ParseModelConfig(config_text, model_config));
    NIBBLE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, TokenizeFile(model_dir, file));
    NIBBLE_ASSIGN_OR_RETURN(CalibrationSet set,
                            DrawCalibrationSamples(ids, settings.calibration,
                                                   config.max_position_embeddings));
    prepared.notes.push_back(absl::StrCat("calibration: ", file, " (", ids.size(), " tokens), ",
                                          set.samples.size(), " samples of ",
                                          settings.calibration.seqlen, " tokens"));
    for (const std::string& note : set.adjustments) {
      prepared.notes.push_back(absl::StrCat("calibration: ", note));
    }
    q.calibration_samples = std::move(set.samples);
  }
  NIBBLE_ASSIGN_OR_RETURN(std::string evaluation, EvaluationFile(settings, datasets_dir));
  if (evaluation.empty()) {
    prepared.notes.push_back(
        "evaluation: none (pass --eval-dataset for perplexity before/after)");
    return prepared;
  }
  NIBBLE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, TokenizeFile(model_dir, evaluation));
  // Windows as long as the calibration's, at most eval_windows of them.
  q.evaluation_window = settings.calibration.seqlen;
  const size_t keep = static_cast<size_t>(settings.eval_windows * q.evaluation_window);
  if (ids.size() > keep) ids.resize(keep);
  q.evaluation_ids = std::move(ids);
  prepared.notes.push_back(absl::StrCat("evaluation: ", evaluation, ", ", q.evaluation_ids.size(),
                                        " tokens in windows of ", q.evaluation_window));
  return prepared;
}

}  // namespace nibble::quant
