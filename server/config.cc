#include "server/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <yaml-cpp/yaml.h>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace nibble::server {
namespace {

// yaml-cpp reports problems by throwing; everything below catches at this file's edge and
// turns them into statuses that name the key.
class KeyError {
 public:
  KeyError(const std::string& source) : source_(source) {}
  absl::Status operator()(const std::string& key, const std::string& problem) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": key '", key, "': ", problem));
  }

 private:
  std::string source_;
};

std::string Describe(const YAML::Node& node) {
  if (node.IsScalar()) return absl::StrCat("\"", node.Scalar(), "\"");
  if (node.IsMap()) return "a mapping";
  if (node.IsSequence()) return "a list";
  return "nothing";
}

absl::Status CheckKeys(const YAML::Node& map, const std::string& path,
                       const std::set<std::string>& known, const KeyError& error) {
  for (const auto& entry : map) {
    const std::string key = entry.first.Scalar();
    if (!known.count(key)) {
      const std::string full = path.empty() ? key : absl::StrCat(path, ".", key);
      return error(full, absl::StrCat("unknown key (known here: ", absl::StrJoin(known, ", "),
                                      ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> GetString(const YAML::Node& node, const std::string& key,
                                      const KeyError& error) {
  if (!node.IsScalar()) return error(key, absl::StrCat("expected a string, got ", Describe(node)));
  return node.Scalar();
}

absl::StatusOr<int64_t> GetInt(const YAML::Node& node, const std::string& key, int64_t min,
                               int64_t max, const KeyError& error) {
  int64_t value = 0;
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), &value)) {
    return error(key, absl::StrCat("expected an integer, got ", Describe(node)));
  }
  if (value < min || value > max) {
    return error(key, absl::StrCat("must be in [", min, ", ", max, "], got ", value));
  }
  return value;
}

absl::StatusOr<double> GetDouble(const YAML::Node& node, const std::string& key,
                                 const KeyError& error) {
  double value = 0;
  if (!node.IsScalar() || !absl::SimpleAtod(node.Scalar(), &value) || !std::isfinite(value)) {
    return error(key, absl::StrCat("expected a finite number, got ", Describe(node)));
  }
  return value;
}

absl::Status ParseModel(const YAML::Node& node, const std::string& path, const std::string& base_dir,
                        const KeyError& error, ModelSpec& spec) {
  if (!node.IsMap()) return error(path, absl::StrCat("expected a mapping, got ", Describe(node)));
  NIBBLE_RETURN_IF_ERROR(
      CheckKeys(node, path, {"name", "path", "device", "dtype", "cpu_threads"}, error));
  if (!node["name"]) return error(path + ".name", "missing (every model needs a name)");
  NIBBLE_ASSIGN_OR_RETURN(spec.name, GetString(node["name"], path + ".name", error));
  if (spec.name.empty() || spec.name.size() > 64 ||
      spec.name.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                  "0123456789._-") != std::string::npos) {
    return error(path + ".name",
                 absl::StrCat("\"", spec.name, "\" is not 1..64 characters of [A-Za-z0-9._-]"));
  }
  if (!node["path"]) return error(path + ".path", "missing (the model directory)");
  NIBBLE_ASSIGN_OR_RETURN(std::string dir, GetString(node["path"], path + ".path", error));
  if (dir.empty()) return error(path + ".path", "is empty");
  std::filesystem::path model_path(dir);
  if (model_path.is_relative() && !base_dir.empty()) model_path = std::filesystem::path(base_dir) / model_path;
  spec.path = model_path.lexically_normal().string();
  if (node["device"]) {
    NIBBLE_ASSIGN_OR_RETURN(spec.device, GetString(node["device"], path + ".device", error));
    // Whether this build has CUDA is the model load's to say (it names the device).
    auto device = engine::ParseDevice(spec.device);
    if (!device.ok()) return error(path + ".device", std::string(device.status().message()));
    spec.load.device = *device;
  }
  if (node["dtype"]) {
    NIBBLE_ASSIGN_OR_RETURN(std::string dtype, GetString(node["dtype"], path + ".dtype", error));
    if (dtype == "float32") {
      spec.load.weight_storage = engine::WeightStorage::kF32;
    } else if (dtype == "float16") {
      spec.load.weight_storage = engine::WeightStorage::kF16;
    } else {
      return error(path + ".dtype",
                   absl::StrCat("\"", dtype, "\" is not float32 or float16 (dense weight storage)"));
    }
  }
  if (node["cpu_threads"]) {
    NIBBLE_ASSIGN_OR_RETURN(int64_t threads,
                            GetInt(node["cpu_threads"], path + ".cpu_threads", 0, 1024, error));
    spec.load.cpu_threads = static_cast<int>(threads);
  }
  return absl::OkStatus();
}

absl::Status ParseEngine(const YAML::Node& node, const KeyError& error,
                         engine::EngineOptions& options) {
  if (!node.IsMap()) return error("engine", absl::StrCat("expected a mapping, got ", Describe(node)));
  NIBBLE_RETURN_IF_ERROR(CheckKeys(
      node, "engine",
      {"cache_max_entry_count", "cache_block_seq_len", "cache_chunk_size", "session_len",
       "max_batch_size", "max_queued_requests", "max_prefill_tokens_per_step",
       "cpu_memory_budget", "max_sessions"},
      error));
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  if (node["cache_max_entry_count"]) {
    NIBBLE_ASSIGN_OR_RETURN(
        double fraction,
        GetDouble(node["cache_max_entry_count"], "engine.cache_max_entry_count", error));
    if (!(fraction > 0 && fraction <= 1)) {
      return error("engine.cache_max_entry_count",
                   absl::StrCat("must be in (0, 1] (a fraction of free memory), got ", fraction));
    }
    options.cache_max_entry_count = fraction;
  }
  struct IntKey {
    const char* name;
    int64_t min;
    int64_t max;
    std::function<void(int64_t)> set;
  };
  const IntKey keys[] = {
      {"cache_block_seq_len", 1, 1 << 16,
       [&](int64_t v) { options.cache_block_seq_len = static_cast<int32_t>(v); }},
      {"cache_chunk_size", -1, 1 << 16,
       [&](int64_t v) { options.cache_chunk_size = static_cast<int32_t>(v); }},
      {"session_len", 0, int64_t{1} << 32, [&](int64_t v) { options.session_len = v; }},
      {"max_batch_size", 1, 1 << 16,
       [&](int64_t v) { options.max_batch_size = static_cast<int32_t>(v); }},
      {"max_queued_requests", 0, kInt32Max,
       [&](int64_t v) { options.max_queued_requests = static_cast<int32_t>(v); }},
      {"max_prefill_tokens_per_step", 1, kInt32Max,
       [&](int64_t v) { options.max_prefill_tokens_per_step = static_cast<int32_t>(v); }},
      {"max_sessions", 0, kInt32Max,
       [&](int64_t v) { options.max_sessions = static_cast<int32_t>(v); }},
  };
  for (const IntKey& key : keys) {
    if (!node[key.name]) continue;
    const std::string full = absl::StrCat("engine.", key.name);
    NIBBLE_ASSIGN_OR_RETURN(int64_t value, GetInt(node[key.name], full, key.min, key.max, error));
    if (full == "engine.cache_chunk_size" && value == 0) {
      return error(full, "must be -1 (the whole cache at once) or a number of blocks >= 1");
    }
    key.set(value);
  }
  if (node["cpu_memory_budget"]) {
    const YAML::Node& budget = node["cpu_memory_budget"];
    if (!budget.IsScalar()) {
      return error("engine.cpu_memory_budget",
                   absl::StrCat("expected a size such as \"1GiB\", got ", Describe(budget)));
    }
    auto bytes = ParseByteSize(budget.Scalar());
    if (!bytes.ok()) return error("engine.cpu_memory_budget", std::string(bytes.status().message()));
    if (*bytes <= 0) return error("engine.cpu_memory_budget", "must be more than 0 bytes");
    options.cpu_memory_budget_bytes = *bytes;
  }
  return absl::OkStatus();
}

std::string ResolvePath(const std::string& path, const std::string& base_dir) {
  std::filesystem::path resolved(path);
  if (resolved.is_relative() && !base_dir.empty()) resolved = std::filesystem::path(base_dir) / resolved;
  return resolved.lexically_normal().string();
}

absl::Status ParseRoles(const YAML::Node& node, const KeyError& error, Roles& roles) {
  if (!node.IsSequence() || node.size() == 0) {
    return error("roles", absl::StrCat("expected a non-empty list of inference, quantizer; got ",
                                       Describe(node)));
  }
  roles = Roles{false, false};
  for (size_t i = 0; i < node.size(); ++i) {
    const std::string key = absl::StrCat("roles[", i, "]");
    NIBBLE_ASSIGN_OR_RETURN(std::string role, GetString(node[i], key, error));
    if (role == "inference") {
      roles.inference = true;
    } else if (role == "quantizer") {
      roles.quantizer = true;
    } else {
      return error(key, absl::StrCat("\"", role, "\" is not a role (inference, quantizer)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseQuantizer(const YAML::Node& node, const std::string& base_dir,
                            const KeyError& error, QuantizerConfig& quantizer) {
  if (!node.IsMap()) {
    return error("quantizer", absl::StrCat("expected a mapping, got ", Describe(node)));
  }
  NIBBLE_RETURN_IF_ERROR(CheckKeys(node, "quantizer",
                                   {"model_roots", "max_concurrent_jobs", "max_queued_jobs",
                                    "device", "datasets_dir"},
                                   error));
  if (node["model_roots"]) {
    const YAML::Node& roots = node["model_roots"];
    if (!roots.IsSequence()) {
      return error("quantizer.model_roots",
                   absl::StrCat("expected a list of directories, got ", Describe(roots)));
    }
    for (size_t i = 0; i < roots.size(); ++i) {
      const std::string key = absl::StrCat("quantizer.model_roots[", i, "]");
      NIBBLE_ASSIGN_OR_RETURN(std::string root, GetString(roots[i], key, error));
      if (root.empty()) return error(key, "is empty");
      quantizer.model_roots.push_back(ResolvePath(root, base_dir));
    }
  }
  if (node["max_concurrent_jobs"]) {
    NIBBLE_ASSIGN_OR_RETURN(int64_t jobs, GetInt(node["max_concurrent_jobs"],
                                                 "quantizer.max_concurrent_jobs", 1, 64, error));
    quantizer.max_concurrent_jobs = static_cast<int>(jobs);
  }
  if (node["max_queued_jobs"]) {
    NIBBLE_ASSIGN_OR_RETURN(int64_t jobs, GetInt(node["max_queued_jobs"],
                                                 "quantizer.max_queued_jobs", 1, 100000, error));
    quantizer.max_queued_jobs = static_cast<int>(jobs);
  }
  if (node["device"]) {
    NIBBLE_ASSIGN_OR_RETURN(quantizer.device,
                            GetString(node["device"], "quantizer.device", error));
    if (absl::StatusOr<engine::Device> device = engine::ParseDevice(quantizer.device);
        !device.ok()) {
      return error("quantizer.device", std::string(device.status().message()));
    }
  }
  if (node["datasets_dir"]) {
    NIBBLE_ASSIGN_OR_RETURN(std::string dir,
                            GetString(node["datasets_dir"], "quantizer.datasets_dir", error));
    if (dir.empty()) return error("quantizer.datasets_dir", "is empty");
    quantizer.datasets_dir = ResolvePath(dir, base_dir);
  }
  return absl::OkStatus();
}

absl::Status ParseArtifacts(const YAML::Node& node, const std::string& base_dir,
                            const KeyError& error, ArtifactsConfig& artifacts) {
  if (!node.IsMap()) {
    return error("artifacts", absl::StrCat("expected a mapping, got ", Describe(node)));
  }
  NIBBLE_RETURN_IF_ERROR(CheckKeys(
      node, "artifacts", {"max_upload_bytes", "model_roots", "peers", "pull_max_bytes_per_second"},
      error));
  if (node["max_upload_bytes"]) {
    const YAML::Node& size = node["max_upload_bytes"];
    auto bytes = size.IsScalar() ? ParseByteSize(size.Scalar())
                                 : absl::InvalidArgumentError(absl::StrCat(
                                       "expected a size such as \"4GiB\", got ", Describe(size)));
    if (!bytes.ok()) return error("artifacts.max_upload_bytes", std::string(bytes.status().message()));
    if (*bytes <= 0) return error("artifacts.max_upload_bytes", "must be more than 0 bytes");
    artifacts.max_upload_bytes = *bytes;
  }
  if (node["model_roots"]) {
    const YAML::Node& roots = node["model_roots"];
    if (!roots.IsSequence()) {
      return error("artifacts.model_roots",
                   absl::StrCat("expected a list of directories, got ", Describe(roots)));
    }
    for (size_t i = 0; i < roots.size(); ++i) {
      const std::string key = absl::StrCat("artifacts.model_roots[", i, "]");
      NIBBLE_ASSIGN_OR_RETURN(std::string root, GetString(roots[i], key, error));
      if (root.empty()) return error(key, "is empty");
      artifacts.model_roots.push_back(ResolvePath(root, base_dir));
    }
  }
  if (node["peers"]) {
    const YAML::Node& peers = node["peers"];
    if (!peers.IsSequence()) {
      return error("artifacts.peers", absl::StrCat("expected a list of peers, got ", Describe(peers)));
    }
    for (size_t i = 0; i < peers.size(); ++i) {
      const std::string path = absl::StrCat("artifacts.peers[", i, "]");
      const YAML::Node& peer = peers[i];
      if (!peer.IsMap()) return error(path, absl::StrCat("expected a mapping, got ", Describe(peer)));
      NIBBLE_RETURN_IF_ERROR(CheckKeys(
          peer, path, {"address", "tls", "tls_ca", "tls_cert", "tls_key", "token_file"}, error));
      ArtifactPeer out;
      if (!peer["address"]) return error(path + ".address", "missing (host:port)");
      NIBBLE_ASSIGN_OR_RETURN(out.address, GetString(peer["address"], path + ".address", error));
      if (out.address.empty()) return error(path + ".address", "is empty (host:port)");
      if (peer["tls"]) {
        NIBBLE_ASSIGN_OR_RETURN(std::string tls, GetString(peer["tls"], path + ".tls", error));
        if (tls != "true" && tls != "false") {
          return error(path + ".tls", absl::StrCat("expected true or false, got \"", tls, "\""));
        }
        out.tls = tls == "true";
      }
      for (auto [key, field] : {std::pair{"tls_ca", &out.tls_ca}, std::pair{"tls_cert", &out.tls_cert},
                                std::pair{"tls_key", &out.tls_key},
                                std::pair{"token_file", &out.token_file}}) {
        if (!peer[key]) continue;
        NIBBLE_ASSIGN_OR_RETURN(std::string file, GetString(peer[key], path + "." + key, error));
        if (file.empty()) return error(path + "." + key, "is empty");
        *field = ResolvePath(file, base_dir);
      }
      if (!out.tls_ca.empty() || !out.tls_cert.empty() || !out.tls_key.empty()) out.tls = true;
      if (out.tls_cert.empty() != out.tls_key.empty()) {
        return error(path, "tls_cert and tls_key come together (the client certificate)");
      }
      artifacts.peers.push_back(std::move(out));
    }
  }
  if (node["pull_max_bytes_per_second"]) {
    const YAML::Node& rate = node["pull_max_bytes_per_second"];
    auto bytes = rate.IsScalar() ? ParseByteSize(rate.Scalar())
                                 : absl::InvalidArgumentError(absl::StrCat(
                                       "expected a size such as \"10MiB\", got ", Describe(rate)));
    if (!bytes.ok()) {
      return error("artifacts.pull_max_bytes_per_second", std::string(bytes.status().message()));
    }
    artifacts.pull_max_bytes_per_second = static_cast<double>(*bytes);
  }
  return absl::OkStatus();
}

absl::Status ParseSecurity(const YAML::Node& node, const std::string& base_dir,
                           const KeyError& error, SecurityConfig& security) {
  if (!node.IsMap()) {
    return error("security", absl::StrCat("expected a mapping, got ", Describe(node)));
  }
  NIBBLE_RETURN_IF_ERROR(CheckKeys(node, "security",
                                   {"tls_cert_file", "tls_key_file", "tls_client_ca_file",
                                    "tokens_file", "insecure"},
                                   error));
  const auto file = [&](const char* key, std::string& out) -> absl::Status {
    if (!node[key]) return absl::OkStatus();
    const std::string full = absl::StrCat("security.", key);
    NIBBLE_ASSIGN_OR_RETURN(std::string path, GetString(node[key], full, error));
    if (path.empty()) return error(full, "is empty (a file path)");
    out = ResolvePath(path, base_dir);
    return absl::OkStatus();
  };
  NIBBLE_RETURN_IF_ERROR(file("tls_cert_file", security.tls_cert_file));
  NIBBLE_RETURN_IF_ERROR(file("tls_key_file", security.tls_key_file));
  NIBBLE_RETURN_IF_ERROR(file("tls_client_ca_file", security.tls_client_ca_file));
  NIBBLE_RETURN_IF_ERROR(file("tokens_file", security.tokens_file));
  if (node["insecure"]) {
    const YAML::Node& insecure = node["insecure"];
    const std::string value = insecure.IsScalar() ? insecure.Scalar() : "";
    if (value != "true" && value != "false") {
      return error("security.insecure",
                   absl::StrCat("expected true or false, got ", Describe(insecure)));
    }
    security.insecure = value == "true";
  }
  if (security.tls_cert_file.empty() != security.tls_key_file.empty()) {
    return error(security.tls_cert_file.empty() ? "security.tls_cert_file"
                                                : "security.tls_key_file",
                 "missing: TLS needs both tls_cert_file and tls_key_file");
  }
  if (!security.tls_client_ca_file.empty() && security.tls_cert_file.empty()) {
    return error("security.tls_client_ca_file",
                 "mutual TLS needs TLS: set tls_cert_file and tls_key_file too");
  }
  return absl::OkStatus();
}

absl::StatusOr<ServerConfig> ParseRoot(const YAML::Node& root, const std::string& source,
                                       const std::string& base_dir) {
  const KeyError error(source);
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a mapping of keys at the top, got ", Describe(root)));
  }
  NIBBLE_RETURN_IF_ERROR(CheckKeys(
      root, "",
      {"listen", "metrics_listen", "drain_grace_seconds", "max_request_bytes", "models", "engine",
       "roles", "state_dir", "quantizer", "artifacts", "memory_budget", "security"},
      error));
  ServerConfig config;
  if (root["listen"]) {
    NIBBLE_ASSIGN_OR_RETURN(config.listen_address, GetString(root["listen"], "listen", error));
    if (config.listen_address.empty()) return error("listen", "is empty (host:port)");
  }
  if (root["metrics_listen"]) {
    const YAML::Node& metrics = root["metrics_listen"];
    if (metrics.IsNull()) {
      config.metrics_address.clear();
    } else {
      NIBBLE_ASSIGN_OR_RETURN(config.metrics_address, GetString(metrics, "metrics_listen", error));
    }
  }
  if (root["drain_grace_seconds"]) {
    NIBBLE_ASSIGN_OR_RETURN(config.drain_grace_seconds,
                            GetDouble(root["drain_grace_seconds"], "drain_grace_seconds", error));
    if (config.drain_grace_seconds < 0 || config.drain_grace_seconds > 86400) {
      return error("drain_grace_seconds",
                   absl::StrCat("must be in [0, 86400], got ", config.drain_grace_seconds));
    }
  }
  if (root["max_request_bytes"]) {
    const YAML::Node& size = root["max_request_bytes"];
    auto bytes = size.IsScalar() ? ParseByteSize(size.Scalar())
                                 : absl::InvalidArgumentError(absl::StrCat(
                                       "expected a size such as \"1MiB\", got ", Describe(size)));
    if (!bytes.ok()) return error("max_request_bytes", std::string(bytes.status().message()));
    constexpr int64_t kMin = 1024;
    constexpr int64_t kMax = std::numeric_limits<int32_t>::max();  // gRPC's limit is an int
    if (*bytes < kMin || *bytes > kMax) {
      return error("max_request_bytes",
                   absl::StrCat("must be in [", kMin, ", ", kMax, "] bytes, got ", *bytes));
    }
    config.max_request_bytes = *bytes;
  }
  // `models:` may be absent or empty: a daemon that loads its models later (Models.Load).
  const YAML::Node models = root["models"] ? root["models"] : YAML::Node(YAML::NodeType::Sequence);
  if (!models.IsSequence() && !models.IsNull()) {
    return error("models", absl::StrCat("expected a list, got ", Describe(models)));
  }
  std::set<std::string> names;
  for (size_t i = 0; i < models.size(); ++i) {
    ModelSpec spec;
    const std::string path = absl::StrCat("models[", i, "]");
    NIBBLE_RETURN_IF_ERROR(ParseModel(models[i], path, base_dir, error, spec));
    if (!names.insert(spec.name).second) {
      return error(path + ".name", absl::StrCat("\"", spec.name, "\" is used twice"));
    }
    config.models.push_back(std::move(spec));
  }
  if (root["engine"]) NIBBLE_RETURN_IF_ERROR(ParseEngine(root["engine"], error, config.engine));
  if (root["state_dir"]) {
    NIBBLE_ASSIGN_OR_RETURN(std::string dir, GetString(root["state_dir"], "state_dir", error));
    if (dir.empty()) return error("state_dir", "is empty");
    config.state_dir = ResolvePath(dir, base_dir);
  }
  if (root["roles"]) {
    NIBBLE_RETURN_IF_ERROR(ParseRoles(root["roles"], error, config.roles));
    if (config.roles.quantizer && config.state_dir.empty()) {
      return error("state_dir", "missing: the quantizer role keeps its jobs and artifacts there");
    }
  } else if (config.state_dir.empty()) {
    config.roles.quantizer = false;  // the default roles: the quantizer needs a state_dir
  }
  if (root["quantizer"]) {
    NIBBLE_RETURN_IF_ERROR(ParseQuantizer(root["quantizer"], base_dir, error, config.quantizer));
  }
  if (root["security"]) {
    NIBBLE_RETURN_IF_ERROR(ParseSecurity(root["security"], base_dir, error, config.security));
  }
  if (root["artifacts"]) {
    NIBBLE_RETURN_IF_ERROR(ParseArtifacts(root["artifacts"], base_dir, error, config.artifacts));
  }
  if (root["memory_budget"]) {
    const YAML::Node& budget = root["memory_budget"];
    auto bytes = budget.IsScalar() ? ParseByteSize(budget.Scalar())
                                   : absl::InvalidArgumentError(absl::StrCat(
                                         "expected a size such as \"6GiB\", got ", Describe(budget)));
    if (!bytes.ok()) return error("memory_budget", std::string(bytes.status().message()));
    config.memory_budget_bytes = *bytes;
  }
  return config;
}

}  // namespace

absl::StatusOr<int64_t> ParseByteSize(std::string_view text) {
  std::string s(absl::StripAsciiWhitespace(absl::string_view(text.data(), text.size())));
  size_t digits = 0;
  while (digits < s.size() && (absl::ascii_isdigit(s[digits]) || s[digits] == '.')) ++digits;
  const std::string number = s.substr(0, digits);
  const std::string unit(absl::StripAsciiWhitespace(s.substr(digits)));
  static const std::pair<const char*, double> kUnits[] = {
      {"", 1},       {"B", 1},          {"KB", 1e3},        {"MB", 1e6},
      {"GB", 1e9},   {"TB", 1e12},      {"KiB", 1024.0},    {"MiB", 1048576.0},
      {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
  double value = 0;
  if (number.empty() || !absl::SimpleAtod(number, &value) || !std::isfinite(value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", s, "\" is not a size (a number of bytes, or with B, KiB, MiB, GiB, "
                     "TiB, KB, MB, GB, TB)"));
  }
  for (const auto& [name, scale] : kUnits) {
    if (unit == name) {
      const double bytes = value * scale;
      if (bytes > 9.0e18) return absl::InvalidArgumentError(absl::StrCat("\"", s, "\" is too large"));
      return static_cast<int64_t>(bytes);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "\"", s, "\": unknown unit \"", unit, "\" (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"));
}

absl::StatusOr<ServerConfig> ParseServerConfig(std::string_view yaml_text,
                                               const std::string& source,
                                               const std::string& base_dir) {
  try {
    const YAML::Node root = YAML::Load(std::string(yaml_text));
    return ParseRoot(root, source, base_dir);
  } catch (const YAML::Exception& e) {
    // e.mark names the line and column (0-based in yaml-cpp).
    return absl::InvalidArgumentError(absl::StrCat(source, ":", e.mark.line + 1, ":",
                                                   e.mark.column + 1, ": not valid YAML: ", e.msg));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
}

absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the config file"));
  std::ostringstream text;
  text << in.rdbuf();
  const std::string base_dir =
      std::filesystem::absolute(std::filesystem::path(path)).parent_path().string();
  return ParseServerConfig(text.str(), path, base_dir);
}

}  // namespace nibble::server
