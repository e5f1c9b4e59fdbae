#include "quant/manifest.h"

#include <filesystem>
#include <system_error>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/atomic_file.h"
#include "engine/chat_template.h"
#include "engine/sha256.h"
#include "engine/status_macros.h"

namespace nibble::quant {
namespace fs = std::filesystem;
using Json = nlohmann::json;
namespace {

std::string S(std::string_view v) { return std::string(v); }

// Typed access to a JSON object's keys; errors name the file and the dotted key.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  absl::Status Error(const std::string& key, std::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_, ": key '", key, "': ", S(what)));
  }

  absl::StatusOr<const Json*> Get(const Json& obj, const std::string& prefix,
                                  const std::string& name, Json::value_t type,
                                  std::string_view type_name) const {
    const std::string key = prefix.empty() ? name : absl::StrCat(prefix, ".", name);
    auto it = obj.find(name);
    if (it == obj.end()) return Error(key, "missing");
    const bool ok = type == Json::value_t::number_float ? it->is_number()
                    : type == Json::value_t::number_integer
                        ? (it->is_number_integer() || it->is_number_unsigned())
                        : it->type() == type;
    if (!ok) return Error(key, absl::StrCat("expected ", S(type_name), ", got ", it->type_name()));
    return &*it;
  }

  absl::StatusOr<std::string> String(const Json& obj, const std::string& prefix,
                                     const std::string& name) const {
    NIBBLE_ASSIGN_OR_RETURN(const Json* v, Get(obj, prefix, name, Json::value_t::string, "a string"));
    return v->get<std::string>();
  }
  absl::StatusOr<int64_t> Int(const Json& obj, const std::string& prefix,
                              const std::string& name) const {
    NIBBLE_ASSIGN_OR_RETURN(const Json* v,
                            Get(obj, prefix, name, Json::value_t::number_integer, "an integer"));
    return v->get<int64_t>();
  }
  absl::StatusOr<uint64_t> Unsigned(const Json& obj, const std::string& prefix,
                                    const std::string& name) const {
    NIBBLE_ASSIGN_OR_RETURN(const Json* v,
                            Get(obj, prefix, name, Json::value_t::number_integer, "an integer"));
    if (v->is_number_integer() && v->get<int64_t>() < 0) {
      return Error(absl::StrCat(prefix, ".", name), "must not be negative");
    }
    return v->get<uint64_t>();
  }
  absl::StatusOr<double> Double(const Json& obj, const std::string& prefix,
                                const std::string& name) const {
    NIBBLE_ASSIGN_OR_RETURN(const Json* v,
                            Get(obj, prefix, name, Json::value_t::number_float, "a number"));
    return v->get<double>();
  }
  absl::StatusOr<const Json*> Object(const Json& obj, const std::string& prefix,
                                     const std::string& name) const {
    return Get(obj, prefix, name, Json::value_t::object, "an object");
  }
  absl::StatusOr<const Json*> Array(const Json& obj, const std::string& prefix,
                                    const std::string& name) const {
    return Get(obj, prefix, name, Json::value_t::array, "an array");
  }

 private:
  std::string file_;
};

// A manifest path must stay inside the directory: relative, no "..", no empty parts.
bool IsSafeRelativePath(const std::string& path) {
  if (path.empty() || path.front() == '/' || path.back() == '/') return false;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    const std::string_view part(path.data() + start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = end + 1;
  }
  return true;
}

struct DirEntry {
  std::string relative;  // '/'-separated
  fs::file_status status;
  uint64_t size = 0;
};

// Every entry below `dir` other than directories (symlinks are not followed); the manifest
// itself is left out.
absl::StatusOr<std::vector<DirEntry>> ListFiles(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": not a directory"));
  }
  std::vector<DirEntry> entries;
  fs::recursive_directory_iterator it(dir, ec), end;
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": cannot list: ", ec.message()));
  for (; it != end; it.increment(ec)) {
    if (ec) break;
    const fs::file_status status = it->symlink_status(ec);
    if (ec) break;
    if (fs::is_directory(status)) continue;
    DirEntry entry;
    entry.relative = it->path().lexically_relative(dir).generic_string();
    if (entry.relative == kManifestFileName) continue;
    entry.status = status;
    if (fs::is_regular_file(status)) {
      entry.size = static_cast<uint64_t>(it->file_size(ec));
      if (ec) break;
    }
    entries.push_back(std::move(entry));
  }
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": cannot list: ", ec.message()));
  return entries;
}

std::string KindOf(const fs::file_status& status) {
  if (fs::is_symlink(status)) return "a symbolic link";
  if (fs::is_fifo(status)) return "a FIFO";
  if (fs::is_socket(status)) return "a socket";
  if (fs::is_block_file(status) || fs::is_character_file(status)) return "a device file";
  return "not a regular file";
}

Json ToJson(const ArtifactManifest& m) {
  Json quant = {{"method", m.quantization.method},
                {"bits", m.quantization.bits},
                {"group_size", m.quantization.group_size}};
  if (m.quantization.calibration_dataset || m.quantization.calibration_samples ||
      m.quantization.calibration_seqlen) {
    Json calibration = Json::object();
    if (m.quantization.calibration_dataset) {
      calibration["dataset"] = *m.quantization.calibration_dataset;
    }
    if (m.quantization.calibration_samples) {
      calibration["samples"] = *m.quantization.calibration_samples;
    }
    if (m.quantization.calibration_seqlen) {
      calibration["seqlen"] = *m.quantization.calibration_seqlen;
    }
    quant["calibration"] = std::move(calibration);
  }
  Json files = Json::object();
  for (const auto& [path, file] : m.files) {
    files[path] = {{"size", file.size}, {"sha256", file.sha256}};
  }
  Json layers = Json::array();
  for (const ManifestLayerError& layer : m.report.layers) {
    layers.push_back({{"name", layer.name}, {"relative_error", layer.relative_error}});
  }
  Json seconds = Json::object();
  for (const auto& [phase, s] : m.report.seconds) seconds[phase] = s;
  Json report = {{"layers", std::move(layers)},
                 {"not_converted", m.report.not_converted},
                 {"seconds", std::move(seconds)}};
  if (m.report.perplexity_before) report["perplexity_before"] = *m.report.perplexity_before;
  if (m.report.perplexity_after) report["perplexity_after"] = *m.report.perplexity_after;
  return {{"format_version", m.format_version},
          {"architecture", m.architecture},
          {"quantization", std::move(quant)},
          {"engine",
           {{"cache_max_entry_count", m.engine.cache_max_entry_count},
            {"cache_block_seq_len", m.engine.cache_block_seq_len},
            {"cache_chunk_size", m.engine.cache_chunk_size},
            {"session_len", m.engine.session_len},
            {"max_batch_size", m.engine.max_batch_size}}},
          {"chat_template", m.chat_template},
          {"files", std::move(files)},
          {"report", std::move(report)}};
}

absl::StatusOr<ArtifactManifest> FromJson(const Json& j, const Reader& r) {
  ArtifactManifest m;
  if (!j.is_object()) return r.Error("(top level)", "expected an object");
  NIBBLE_ASSIGN_OR_RETURN(int64_t version, r.Int(j, "", "format_version"));
  if (version != kManifestFormatVersion) {
    return r.Error("format_version", absl::StrCat("unsupported version ", version,
                                                  " (this nibble reads version ",
                                                  kManifestFormatVersion, ")"));
  }
  m.format_version = static_cast<int>(version);
  NIBBLE_ASSIGN_OR_RETURN(m.architecture, r.String(j, "", "architecture"));

  NIBBLE_ASSIGN_OR_RETURN(const Json* q, r.Object(j, "", "quantization"));
  NIBBLE_ASSIGN_OR_RETURN(m.quantization.method, r.String(*q, "quantization", "method"));
  NIBBLE_ASSIGN_OR_RETURN(m.quantization.bits, r.Int(*q, "quantization", "bits"));
  NIBBLE_ASSIGN_OR_RETURN(m.quantization.group_size, r.Int(*q, "quantization", "group_size"));
  if (q->contains("calibration")) {
    NIBBLE_ASSIGN_OR_RETURN(const Json* c, r.Object(*q, "quantization", "calibration"));
    const std::string p = "quantization.calibration";
    if (c->contains("dataset")) {
      NIBBLE_ASSIGN_OR_RETURN(m.quantization.calibration_dataset, r.String(*c, p, "dataset"));
    }
    if (c->contains("samples")) {
      NIBBLE_ASSIGN_OR_RETURN(m.quantization.calibration_samples, r.Int(*c, p, "samples"));
    }
    if (c->contains("seqlen")) {
      NIBBLE_ASSIGN_OR_RETURN(m.quantization.calibration_seqlen, r.Int(*c, p, "seqlen"));
    }
  }

  NIBBLE_ASSIGN_OR_RETURN(const Json* e, r.Object(j, "", "engine"));
  NIBBLE_ASSIGN_OR_RETURN(m.engine.cache_max_entry_count,
                          r.Double(*e, "engine", "cache_max_entry_count"));
  NIBBLE_ASSIGN_OR_RETURN(m.engine.cache_block_seq_len,
                          r.Int(*e, "engine", "cache_block_seq_len"));
  NIBBLE_ASSIGN_OR_RETURN(m.engine.cache_chunk_size, r.Int(*e, "engine", "cache_chunk_size"));
  NIBBLE_ASSIGN_OR_RETURN(m.engine.session_len, r.Int(*e, "engine", "session_len"));
  NIBBLE_ASSIGN_OR_RETURN(m.engine.max_batch_size, r.Int(*e, "engine", "max_batch_size"));

  NIBBLE_ASSIGN_OR_RETURN(m.chat_template, r.String(j, "", "chat_template"));

  NIBBLE_ASSIGN_OR_RETURN(const Json* files, r.Object(j, "", "files"));
  for (const auto& [path, entry] : files->items()) {
    const std::string key = absl::StrCat("files.", path);
    if (!IsSafeRelativePath(path)) {
      return r.Error(key, "not a relative path inside the artifact directory");
    }
    if (!entry.is_object()) return r.Error(key, "expected an object");
    ManifestFile file;
    NIBBLE_ASSIGN_OR_RETURN(file.size, r.Unsigned(entry, key, "size"));
    NIBBLE_ASSIGN_OR_RETURN(file.sha256, r.String(entry, key, "sha256"));
    if (file.sha256.size() != 64 ||
        file.sha256.find_first_not_of("0123456789abcdef") != std::string::npos) {
      return r.Error(absl::StrCat(key, ".sha256"), "expected 64 lower-case hex digits");
    }
    m.files.emplace(path, std::move(file));
  }

  NIBBLE_ASSIGN_OR_RETURN(const Json* report, r.Object(j, "", "report"));
  NIBBLE_ASSIGN_OR_RETURN(const Json* layers, r.Array(*report, "report", "layers"));
  for (size_t i = 0; i < layers->size(); ++i) {
    const std::string key = absl::StrCat("report.layers[", i, "]");
    const Json& layer = (*layers)[i];
    if (!layer.is_object()) return r.Error(key, "expected an object");
    ManifestLayerError out;
    NIBBLE_ASSIGN_OR_RETURN(out.name, r.String(layer, key, "name"));
    NIBBLE_ASSIGN_OR_RETURN(out.relative_error, r.Double(layer, key, "relative_error"));
    m.report.layers.push_back(std::move(out));
  }
  if (report->contains("not_converted")) {
    NIBBLE_ASSIGN_OR_RETURN(const Json* list, r.Array(*report, "report", "not_converted"));
    for (size_t i = 0; i < list->size(); ++i) {
      if (!(*list)[i].is_string()) {
        return r.Error(absl::StrCat("report.not_converted[", i, "]"), "expected a string");
      }
      m.report.not_converted.push_back((*list)[i].get<std::string>());
    }
  }
  NIBBLE_ASSIGN_OR_RETURN(const Json* seconds, r.Object(*report, "report", "seconds"));
  for (const auto& [phase, value] : seconds->items()) {
    if (!value.is_number()) {
      return r.Error(absl::StrCat("report.seconds.", phase), "expected a number");
    }
    m.report.seconds[phase] = value.get<double>();
  }
  if (report->contains("perplexity_before")) {
    NIBBLE_ASSIGN_OR_RETURN(m.report.perplexity_before,
                            r.Double(*report, "report", "perplexity_before"));
  }
  if (report->contains("perplexity_after")) {
    NIBBLE_ASSIGN_OR_RETURN(m.report.perplexity_after,
                            r.Double(*report, "report", "perplexity_after"));
  }
  return m;
}

}  // namespace

std::string_view QuantMethodName(QuantMethod method) {
  switch (method) {
    case QuantMethod::kRtn:
      return "rtn";
    case QuantMethod::kAwq:
      return "awq";
  }
  return "unknown";
}

ArtifactManifest BuildQuantizeManifest(const engine::ModelConfig& config,
                                       const QuantizeOptions& options,
                                       const QuantizeReport& report,
                                       const std::map<std::string, double>& seconds) {
  ArtifactManifest m;
  const std::string_view arch = engine::ArchitectureName(config.architecture);
  m.architecture = std::string(arch);
  m.quantization.method = std::string(QuantMethodName(options.method));
  m.quantization.bits = options.w_bits;
  m.quantization.group_size = options.group_size;
  if (options.method == QuantMethod::kAwq && !options.calibration_samples.empty()) {
    m.quantization.calibration_samples = static_cast<int64_t>(options.calibration_samples.size());
    m.quantization.calibration_seqlen =
        static_cast<int64_t>(options.calibration_samples.front().size());
  }
  m.engine.session_len = config.max_position_embeddings;
  m.chat_template = std::string(engine::ChatTemplateName(
      engine::DefaultChatTemplateFor(arch, static_cast<int>(config.vocab_size))));
  for (const LayerQuantizationError& layer : report.layers) {
    m.report.layers.push_back({layer.name, layer.relative_error});
  }
  m.report.not_converted = report.not_converted;
  m.report.seconds = seconds;
  m.report.perplexity_before = report.perplexity_before;
  m.report.perplexity_after = report.perplexity_after;
  return m;
}

absl::Status WriteManifest(const std::string& dir, const ArtifactManifest& manifest) {
  NIBBLE_ASSIGN_OR_RETURN(std::vector<DirEntry> entries, ListFiles(dir));
  ArtifactManifest out = manifest;
  out.files.clear();
  for (const DirEntry& entry : entries) {
    const std::string path = (fs::path(dir) / entry.relative).string();
    if (!fs::is_regular_file(entry.status)) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": ", KindOf(entry.status), "; an artifact holds only regular files"));
    }
    NIBBLE_ASSIGN_OR_RETURN(std::string sha256, engine::Sha256OfFile(path));
    out.files[entry.relative] = {entry.size, std::move(sha256)};
  }
  return engine::WriteFileAtomically((fs::path(dir) / kManifestFileName).string(),
                                     ToJson(out).dump(2) + "\n");
}

absl::StatusOr<ArtifactManifest> ReadManifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / kManifestFileName).string();
  absl::StatusOr<std::string> text = engine::ReadFileToString(path);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return absl::NotFoundError(absl::StrCat(
          path, ": no manifest (not a nibble artifact, or one whose writing did not finish)"));
    }
    return text.status();
  }
  Json j = Json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return FromJson(j, Reader(path));
}

absl::Status VerifyArtifact(const std::string& dir) {
  NIBBLE_ASSIGN_OR_RETURN(ArtifactManifest manifest, ReadManifest(dir));
  NIBBLE_ASSIGN_OR_RETURN(std::vector<DirEntry> entries, ListFiles(dir));
  std::vector<std::string> problems;
  std::map<std::string, bool> seen;
  for (const DirEntry& entry : entries) {
    const std::string path = (fs::path(dir) / entry.relative).string();
    if (!fs::is_regular_file(entry.status)) {
      problems.push_back(absl::StrCat(entry.relative, ": ", KindOf(entry.status),
                                      ", not allowed in an artifact"));
      continue;
    }
    auto it = manifest.files.find(entry.relative);
    if (it == manifest.files.end()) {
      problems.push_back(absl::StrCat(entry.relative, ": not listed in the manifest"));
      continue;
    }
    seen[entry.relative] = true;
    if (entry.size != it->second.size) {
      problems.push_back(absl::StrCat(entry.relative, ": size ", entry.size,
                                      " bytes, the manifest says ", it->second.size));
      continue;
    }
    NIBBLE_ASSIGN_OR_RETURN(std::string sha256, engine::Sha256OfFile(path));
    if (sha256 != it->second.sha256) {
      problems.push_back(absl::StrCat(entry.relative, ": sha256 ", sha256,
                                      ", the manifest says ", it->second.sha256));
    }
  }
  for (const auto& [path, file] : manifest.files) {
    if (!seen.count(path)) {
      // A listed path that exists as something other than a regular file is reported above.
      bool reported = false;
      for (const DirEntry& entry : entries) reported |= entry.relative == path;
      if (!reported) problems.push_back(absl::StrCat(path, ": missing"));
    }
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::DataLossError(absl::StrCat(dir, ": the artifact does not match its manifest: ",
                                          absl::StrJoin(problems, "; ")));
}

}  // namespace nibble::quant
