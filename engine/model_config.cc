#include "engine/model_config.h"

#include <cctype>
#include <cmath>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace nibble::engine {
namespace {

using Json = nlohmann::json;

absl::Status ConfigError(std::string_view source, std::string_view message) {
  // Debian's Abseil has its own string_view type, not std::string_view.
  return absl::InvalidArgumentError(absl::StrCat(absl::string_view(source.data(), source.size()),
                                                 ": ",
                                                 absl::string_view(message.data(), message.size())));
}

// Reads an integer key; `required` keys that are absent are an error.
absl::StatusOr<int64_t> GetInt(const Json& json, std::string_view source, const char* key,
                               std::optional<int64_t> fallback) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) {
    if (fallback) return *fallback;
    return ConfigError(source, absl::StrCat("missing key \"", key, "\""));
  }
  if (!it->is_number_integer()) {
    return ConfigError(source, absl::StrCat("key \"", key, "\" must be an integer, got ",
                                            it->dump()));
  }
  return it->get<int64_t>();
}

absl::StatusOr<double> GetNumber(const Json& json, std::string_view source, const char* key,
                                 double fallback) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_number()) {
    return ConfigError(source, absl::StrCat("key \"", key, "\" must be a number, got ",
                                            it->dump()));
  }
  return it->get<double>();
}

absl::StatusOr<bool> GetBool(const Json& json, std::string_view source, const char* key,
                             bool fallback) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return ConfigError(source, absl::StrCat("key \"", key, "\" must be true or false, got ",
                                            it->dump()));
  }
  return it->get<bool>();
}

absl::Status RequirePositive(std::string_view source, const char* key, int64_t value) {
  if (value > 0) return absl::OkStatus();
  return ConfigError(source, absl::StrCat("key \"", key, "\" must be positive, got ", value));
}

absl::StatusOr<AwqQuantization> ParseAwqQuantization(const Json& q, std::string_view source) {
  if (!q.is_object()) return ConfigError(source, "quantization_config must be an object");
  auto method = q.find("quant_method");
  if (method == q.end() || !method->is_string() || method->get<std::string>() != "awq") {
    return ConfigError(source, absl::StrCat("quantization_config: quant_method ",
                                            method == q.end() ? "missing" : method->dump(),
                                            " is not supported (only \"awq\")"));
  }
  // vLLM accepts both spellings: bits | w_bit, group_size | q_group_size.
  const char* bits_key = q.contains("bits") ? "bits" : "w_bit";
  NIBBLE_ASSIGN_OR_RETURN(int64_t bits, GetInt(q, source, bits_key, int64_t{4}));
  if (bits != 4) {
    return ConfigError(source, absl::StrCat("quantization_config: ", bits,
                                            "-bit weights are not supported (only 4)"));
  }
  AwqQuantization awq;
  const char* group_key = q.contains("group_size") ? "group_size" : "q_group_size";
  NIBBLE_ASSIGN_OR_RETURN(awq.group_size, GetInt(q, source, group_key, int64_t{128}));
  NIBBLE_RETURN_IF_ERROR(RequirePositive(source, group_key, awq.group_size));
  NIBBLE_ASSIGN_OR_RETURN(bool zero_point, GetBool(q, source, "zero_point", true));
  if (!zero_point) {
    return ConfigError(source, "quantization_config: zero_point false is not supported");
  }
  auto version = q.find("version");
  if (version != q.end() && !version->is_null()) {
    std::string v = version->is_string() ? version->get<std::string>() : version->dump();
    for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (v != "gemm") {
      return ConfigError(source, absl::StrCat("quantization_config: AWQ version \"", v,
                                              "\" is not supported (only gemm)"));
    }
  }
  auto skip = q.find("modules_to_not_convert");
  if (skip != q.end() && !skip->is_null()) {
    if (!skip->is_array()) {
      return ConfigError(source, "quantization_config: modules_to_not_convert must be a list");
    }
    for (const Json& m : *skip) {
      if (!m.is_string()) {
        return ConfigError(source, "quantization_config: modules_to_not_convert must be strings");
      }
      awq.modules_to_not_convert.push_back(m.get<std::string>());
    }
  }
  return awq;
}

}  // namespace

std::string_view ArchitectureName(Architecture arch) {
  switch (arch) {
    case Architecture::kLlama: return "LlamaForCausalLM";
    case Architecture::kInternLM: return "InternLMForCausalLM";
    case Architecture::kInternLM2: return "InternLM2ForCausalLM";
  }
  return "unknown";
}

double ModelConfig::RopeBaseForLength(int64_t length) const {
  if (rope_scaling != RopeScaling::kDynamicNtk || length <= max_position_embeddings) {
    return rope_theta;
  }
  const double ratio = rope_scaling_factor * static_cast<double>(length) /
                           static_cast<double>(max_position_embeddings) -
                       (rope_scaling_factor - 1.0);
  const double d = static_cast<double>(head_dim);
  return rope_theta * std::pow(ratio, d / (d - 2.0));
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text, std::string_view source) {
  const Json json = Json::parse(json_text.begin(), json_text.end(), nullptr,
                                /*allow_exceptions=*/false);
  if (json.is_discarded()) return ConfigError(source, "not valid JSON");
  if (!json.is_object()) return ConfigError(source, "not a JSON object");

  ModelConfig config;
  auto archs = json.find("architectures");
  if (archs == json.end() || !archs->is_array() || archs->empty() ||
      !(*archs)[0].is_string()) {
    return ConfigError(source, "missing \"architectures\" (a list naming the model class)");
  }
  const std::string arch = (*archs)[0].get<std::string>();
  if (arch == "LlamaForCausalLM") {
    config.architecture = Architecture::kLlama;
  } else if (arch == "InternLMForCausalLM") {
    config.architecture = Architecture::kInternLM;
  } else if (arch == "InternLM2ForCausalLM") {
    config.architecture = Architecture::kInternLM2;
  } else {
    return ConfigError(source, absl::StrCat("unknown architecture \"", arch,
                                            "\"; nibble supports LlamaForCausalLM, "
                                            "InternLMForCausalLM and InternLM2ForCausalLM"));
  }

#define NIBBLE_CONFIG_INT(field, key, fallback) \
  NIBBLE_ASSIGN_OR_RETURN(config.field, GetInt(json, source, key, fallback))
  NIBBLE_CONFIG_INT(hidden_size, "hidden_size", std::nullopt);
  NIBBLE_CONFIG_INT(intermediate_size, "intermediate_size", std::nullopt);
  NIBBLE_CONFIG_INT(num_layers, "num_hidden_layers", std::nullopt);
  NIBBLE_CONFIG_INT(num_heads, "num_attention_heads", std::nullopt);
  NIBBLE_CONFIG_INT(num_kv_heads, "num_key_value_heads", config.num_heads);
  NIBBLE_CONFIG_INT(vocab_size, "vocab_size", std::nullopt);
  NIBBLE_CONFIG_INT(max_position_embeddings, "max_position_embeddings", int64_t{2048});
  int64_t bos = 0;
  NIBBLE_ASSIGN_OR_RETURN(bos, GetInt(json, source, "bos_token_id", int64_t{1}));
  config.bos_token_id = static_cast<int32_t>(bos);
#undef NIBBLE_CONFIG_INT

  // InternLM v1 configs carry no rope keys; its code defaults are θ=10000 (PROVENANCE.md).
  NIBBLE_ASSIGN_OR_RETURN(config.rope_theta, GetNumber(json, source, "rope_theta", 10000.0));
  NIBBLE_ASSIGN_OR_RETURN(config.rms_norm_eps, GetNumber(json, source, "rms_norm_eps", 1e-6));
  NIBBLE_ASSIGN_OR_RETURN(config.tie_word_embeddings,
                          GetBool(json, source, "tie_word_embeddings", false));
  if (config.architecture == Architecture::kInternLM) {
    // configuration_internlm.py defaults bias to true.
    NIBBLE_ASSIGN_OR_RETURN(config.attention_bias, GetBool(json, source, "bias", true));
  } else if (config.architecture == Architecture::kLlama) {
    NIBBLE_ASSIGN_OR_RETURN(config.attention_bias,
                            GetBool(json, source, "attention_bias", false));
  } else {
    NIBBLE_ASSIGN_OR_RETURN(bool bias, GetBool(json, source, "bias", false));
    if (bias) return ConfigError(source, "InternLM2 with \"bias\": true is not supported");
  }

  auto eos = json.find("eos_token_id");
  if (eos != json.end() && !eos->is_null()) {
    config.eos_token_ids.clear();
    if (eos->is_number_integer()) {
      config.eos_token_ids.push_back(eos->get<int32_t>());
    } else if (eos->is_array()) {
      for (const Json& id : *eos) {
        if (!id.is_number_integer()) return ConfigError(source, "eos_token_id must be integers");
        config.eos_token_ids.push_back(id.get<int32_t>());
      }
    } else {
      return ConfigError(source, "eos_token_id must be an integer or a list of integers");
    }
  }
  auto dtype = json.find("torch_dtype");
  if (dtype != json.end() && dtype->is_string()) config.torch_dtype = dtype->get<std::string>();

  auto scaling = json.find("rope_scaling");
  if (scaling != json.end() && !scaling->is_null()) {
    if (!scaling->is_object()) return ConfigError(source, "rope_scaling must be an object");
    auto type = scaling->find("type");
    if (type == scaling->end()) type = scaling->find("rope_type");
    if (type == scaling->end() || !type->is_string()) {
      return ConfigError(source, "rope_scaling needs a \"type\"");
    }
    NIBBLE_ASSIGN_OR_RETURN(config.rope_scaling_factor,
                            GetNumber(*scaling, source, "factor", 1.0));
    const std::string name = type->get<std::string>();
    if (name == "dynamic") {
      config.rope_scaling = RopeScaling::kDynamicNtk;
    } else if (name == "linear") {
      config.rope_scaling = RopeScaling::kLinear;
    } else if (name == "default") {
      config.rope_scaling = RopeScaling::kNone;
    } else {
      return ConfigError(source, absl::StrCat("rope_scaling type \"", name,
                                              "\" is not supported (dynamic, linear)"));
    }
    if (!(config.rope_scaling_factor >= 1.0)) {
      return ConfigError(source, "rope_scaling factor must be >= 1");
    }
  }

  auto quant = json.find("quantization_config");
  if (quant != json.end() && !quant->is_null()) {
    NIBBLE_ASSIGN_OR_RETURN(config.awq, ParseAwqQuantization(*quant, source));
  }

  // Dimensions must fit together before anything is allocated from them.
  NIBBLE_RETURN_IF_ERROR(RequirePositive(source, "hidden_size", config.hidden_size));
  NIBBLE_RETURN_IF_ERROR(RequirePositive(source, "intermediate_size", config.intermediate_size));
  NIBBLE_RETURN_IF_ERROR(RequirePositive(source, "num_hidden_layers", config.num_layers));
  NIBBLE_RETURN_IF_ERROR(RequirePositive(source, "num_attention_heads", config.num_heads));
  NIBBLE_RETURN_IF_ERROR(RequirePositive(source, "num_key_value_heads", config.num_kv_heads));
  NIBBLE_RETURN_IF_ERROR(RequirePositive(source, "vocab_size", config.vocab_size));
  NIBBLE_RETURN_IF_ERROR(
      RequirePositive(source, "max_position_embeddings", config.max_position_embeddings));
  if (config.hidden_size % config.num_heads != 0) {
    return ConfigError(source, absl::StrFormat("hidden_size %d is not divisible by "
                                               "num_attention_heads %d",
                                               config.hidden_size, config.num_heads));
  }
  if (config.num_heads % config.num_kv_heads != 0) {
    return ConfigError(source, absl::StrFormat("num_attention_heads %d is not divisible by "
                                               "num_key_value_heads %d",
                                               config.num_heads, config.num_kv_heads));
  }
  config.head_dim = config.hidden_size / config.num_heads;
  NIBBLE_ASSIGN_OR_RETURN(config.head_dim,
                          GetInt(json, source, "head_dim", config.head_dim));
  if (config.head_dim <= 0 || config.head_dim % 2 != 0) {
    return ConfigError(source, absl::StrFormat("head dimension %d must be even and positive "
                                               "(RoPE rotates pairs)",
                                               config.head_dim));
  }
  if (config.bos_token_id < 0 || config.bos_token_id >= config.vocab_size) {
    return ConfigError(source, absl::StrFormat("bos_token_id %d is outside the vocabulary of %d",
                                               config.bos_token_id, config.vocab_size));
  }
  if (!(config.rms_norm_eps > 0)) return ConfigError(source, "rms_norm_eps must be positive");
  if (!(config.rope_theta > 0)) return ConfigError(source, "rope_theta must be positive");
  return config;
}

std::string ModelConfigToJson(const ModelConfig& config) {
  Json json = Json::object();
  json["architectures"] = {std::string(ArchitectureName(config.architecture))};
  switch (config.architecture) {
    case Architecture::kLlama: json["model_type"] = "llama"; break;
    case Architecture::kInternLM:
      json["model_type"] = "internlm";
      json["bias"] = config.attention_bias;
      break;
    case Architecture::kInternLM2: json["model_type"] = "internlm2"; json["bias"] = false; break;
  }
  json["hidden_act"] = "silu";
  json["hidden_size"] = config.hidden_size;
  json["intermediate_size"] = config.intermediate_size;
  json["num_hidden_layers"] = config.num_layers;
  json["num_attention_heads"] = config.num_heads;
  json["num_key_value_heads"] = config.num_kv_heads;
  json["vocab_size"] = config.vocab_size;
  json["max_position_embeddings"] = config.max_position_embeddings;
  json["rms_norm_eps"] = config.rms_norm_eps;
  json["rope_theta"] = config.rope_theta;
  if (config.rope_scaling != RopeScaling::kNone) {
    json["rope_scaling"] = {
        {"type", config.rope_scaling == RopeScaling::kDynamicNtk ? "dynamic" : "linear"},
        {"factor", config.rope_scaling_factor}};
  }
  json["tie_word_embeddings"] = config.tie_word_embeddings;
  json["bos_token_id"] = config.bos_token_id;
  if (config.eos_token_ids.size() == 1) {
    json["eos_token_id"] = config.eos_token_ids[0];
  } else {
    json["eos_token_id"] = config.eos_token_ids;
  }
  if (!config.torch_dtype.empty()) json["torch_dtype"] = config.torch_dtype;
  if (config.awq) {
    // AutoAWQ's keys (LMDeploy's auto_awq writes the same).
    json["quantization_config"] = {
        {"quant_method", "awq"},
        {"zero_point", true},
        {"group_size", config.awq->group_size},
        {"bits", 4},
        {"version", "gemm"},
        {"modules_to_not_convert", config.awq->modules_to_not_convert.empty()
                                       ? Json(nullptr)
                                       : Json(config.awq->modules_to_not_convert)}};
  }
  return json.dump(2) + "\n";
}

}  // namespace nibble::engine
