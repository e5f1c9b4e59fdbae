#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "clients/cli/commands.h"
#include "clients/cli/connection_flags.h"
#include "clients/cli/model_options.h"
#include "clients/cli/remote_client.h"
#include "engine/generator.h"

namespace nibble::cli {
namespace {

struct GenerateOptions {
  ModelOptions model;
  std::string prompt;
  bool chat = false;
  std::string chat_template;
  SamplingFlags sampling;  // --max-tokens, --temperature, ... --ignore-eos
  bool json = false;
  std::string server;  // non-empty: ask this nibbled instead of loading --model
  std::optional<double> timeout;  // with --server
  rpc::ClientSecurityFlags security;  // with --server
};

// `nibble generate --server ADDR`: the same flags, answered by a daemon (--model names the
// served model; empty: the daemon's only one). Output matches the local command's.
int RunRemoteGenerate(const GenerateOptions& options) {
  if (!options.chat_template.empty()) {
    return ReportError("generate", absl::InvalidArgumentError(
                                       "--chat-template applies to local models only (a daemon "
                                       "renders with its model's template)"));
  }
  absl::StatusOr<rpc::ClientSecurity> security =
      rpc::ClientSecurityFromFlagsAndEnv(options.security);
  if (!security.ok()) return ReportError("generate", security.status());
  RemoteClient client(options.server, *security, options.timeout);
  const SamplingFlags& flags = options.sampling;
  std::string text;
  std::vector<int32_t> ids;
  nibble::v1::ChatChunk last;
  auto on_chunk = [&](const nibble::v1::ChatChunk& chunk) {
    text += chunk.text();
    ids.insert(ids.end(), chunk.token_ids().begin(), chunk.token_ids().end());
    last = chunk;
    if (!options.json) {
      std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
      std::fflush(stdout);
    }
  };
  if (!options.json) {
    std::fputs(options.chat ? "" : options.prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  absl::Status status;
  nibble::v1::TokenizeRequest tokenize;
  tokenize.set_model(options.model.dir);
  tokenize.set_add_bos(true);
  if (options.chat) {
    nibble::v1::ChatRequest request;
    request.set_model(options.model.dir);
    auto* message = request.add_messages();
    message->set_role("user");
    message->set_content(options.prompt);
    *tokenize.add_messages() = *message;
    request.set_return_token_ids(true);
    flags.Fill(request.mutable_sampling());
    status = client.Chat(request, on_chunk);
  } else {
    nibble::v1::GenerateRequest request;
    request.set_model(options.model.dir);
    request.set_prompt(options.prompt);
    tokenize.set_text(options.prompt);
    request.set_return_token_ids(true);
    flags.Fill(request.mutable_sampling());
    status = client.Generate(request, on_chunk);
  }
  if (!status.ok()) {
    if (!options.json) std::printf("\n");
    return ReportError("generate", status);
  }
  const double total = last.timing().total_seconds();
  if (options.json) {
    nibble::v1::TokenizeResponse prompt_ids;
    if (absl::Status s = client.Tokenize(tokenize, &prompt_ids); !s.ok()) {
      return ReportError("generate", s);
    }
    nlohmann::json out;
    out["prompt"] = options.prompt;
    out["prompt_ids"] = std::vector<int32_t>(prompt_ids.token_ids().begin(),
                                             prompt_ids.token_ids().end());
    out["generated_ids"] = ids;
    out["text"] = text;
    out["finish_reason"] = FinishReasonName(last.finish_reason());
    out["time_to_first_token_seconds"] = last.timing().first_token_seconds();
    out["total_seconds"] = total;
    out["seed"] = last.seed();
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
    std::fprintf(stderr,
                 "[%d prompt + %d generated tokens, %.1f tokens/s, seed %llu, finish: %s]\n",
                 last.usage().prompt_tokens(), last.usage().completion_tokens(),
                 total > 0 ? last.usage().completion_tokens() / total : 0.0,
                 static_cast<unsigned long long>(last.seed()),
                 FinishReasonName(last.finish_reason()).c_str());
  }
  return 0;
}

int RunGenerate(const GenerateOptions& options) {
  auto model = options.model.Load("generate");
  if (!model) return 1;
  const engine::Tokenizer& tokenizer = model->tokenizer();

  engine::ChatTemplate chat_template = model->chat_template();
  if (!options.chat_template.empty()) {
    auto kind = engine::ParseChatTemplateName(options.chat_template);
    if (!kind) {
      std::fprintf(stderr, "nibble generate: unknown chat template \"%s\" "
                   "(plain, internlm, internlm2, llama2)\n", options.chat_template.c_str());
      return 1;
    }
    chat_template = engine::ChatTemplate(*kind);
  }
  std::string prompt_text = options.prompt;
  if (options.chat) {
    auto rendered = chat_template.Render({{engine::ChatRole::kUser, options.prompt}});
    if (!rendered.ok()) {
      return ReportError("generate", rendered.status());
    }
    prompt_text = *rendered;
  }

  engine::GenerateRequest request;
  request.prompt_ids.push_back(tokenizer.BosId());
  if (!prompt_text.empty()) {
    const std::vector<int32_t> ids = tokenizer.Encode(prompt_text);
    request.prompt_ids.insert(request.prompt_ids.end(), ids.begin(), ids.end());
  }
  request.max_tokens = options.sampling.max_tokens;
  request.sampling = options.sampling.Local();
  request.stop_strings = options.sampling.stop;
  // --ignore-eos drops EOS, the template's stop tokens and (--chat) its stop words, as the
  // daemon does.
  if (!options.sampling.ignore_eos) {
    request.stop_token_ids = model->StopTokenIds();
    if (options.chat) {
      for (const std::string& word : chat_template.StopWords()) {
        request.stop_strings.push_back(word);
      }
    }
  }

  engine::TextCallback stream_to_terminal;
  if (!options.json) {
    // Text appears as it is produced: the prompt first, then each delta, flushed.
    std::fputs(options.chat ? "" : options.prompt.c_str(), stdout);
    std::fflush(stdout);
    stream_to_terminal = [](std::string_view delta) {
      std::fwrite(delta.data(), 1, delta.size(), stdout);
      std::fflush(stdout);
    };
  }
  auto result = engine::Generate(*model, request, stream_to_terminal);
  if (!result.ok()) {
    std::fprintf(stderr, "\nnibble generate: %s\n", std::string(result.status().message()).c_str());
    return 1;
  }
  const double decode_tokens = static_cast<double>(result->output_ids.size());
  const double tokens_per_second =
      result->decode_seconds > 0 ? decode_tokens / result->decode_seconds : 0.0;
  if (options.json) {
    nlohmann::json out;
    out["prompt"] = options.prompt;
    out["prompt_ids"] = request.prompt_ids;
    out["generated_ids"] = result->output_ids;
    out["text"] = result->text;
    out["finish_reason"] = std::string(engine::FinishReasonName(result->finish_reason));
    out["prefill_seconds"] = result->prefill_seconds;
    out["decode_seconds"] = result->decode_seconds;
    out["tokens_per_second"] = tokens_per_second;
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
    std::fprintf(stderr, "[%zu prompt + %zu generated tokens, %.1f tokens/s, finish: %s]\n",
                 request.prompt_ids.size(), result->output_ids.size(), tokens_per_second,
                 std::string(engine::FinishReasonName(result->finish_reason)).c_str());
  }
  return 0;
}

}  // namespace

CommandRunner RegisterGenerate(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a model, streaming it");
  auto options = std::make_shared<GenerateOptions>();
  options->model.Register(*cmd, /*required=*/false);
  cmd->add_option("--server", options->server,
                  "ask this nibbled (host:port) instead of loading --model locally");
  cmd->add_option("--prompt", options->prompt, "prompt text (empty: start from BOS alone)");
  cmd->add_flag("--chat", options->chat, "render --prompt as a user turn of the chat template");
  cmd->add_option("--chat-template", options->chat_template,
                  "plain, internlm, internlm2 or llama2 (default: from the architecture)");
  options->sampling.Register(*cmd);
  RegisterTimeout(*cmd, &options->timeout);
  RegisterSecurityFlags(*cmd, &options->security);
  cmd->add_flag("--json", options->json,
                "print one JSON object (prompt ids, generated ids, text) instead of streaming");
  return [options]() {
    absl::Status valid = engine::ValidateSamplingParams(options->sampling.Local());
    if (!valid.ok()) {
      return ReportError("generate", valid);
    }
    if (!options->server.empty()) return RunRemoteGenerate(*options);
    if (options->model.dir.empty()) {
      return ReportError("generate", absl::InvalidArgumentError(
                                         "--model is required (a model directory), or --server"));
    }
    return RunGenerate(*options);
  };
}

}  // namespace nibble::cli
