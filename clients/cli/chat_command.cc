// `nibble chat --server ADDR`: a conversation with a model served by nibbled. Interactive
// (lines from stdin, the reply streamed as it comes) or one shot with --prompt; --json prints
// one JSON object per chunk for scripts. The conversation keeps a session id, so the daemon
// reuses its KV cache from turn to turn.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "clients/cli/commands.h"
#include "clients/cli/remote_client.h"

namespace nibble::cli {
namespace {

struct ChatOptions {
  std::string server;
  std::string model;
  std::string prompt;
  std::string system;
  std::string session_id;
  bool json = false;
  RemoteSamplingFlags sampling;
};

nlohmann::json ChunkJson(const nibble::v1::ChatChunk& chunk) {
  nlohmann::json out;
  out["text"] = chunk.text();
  out["token_ids"] = std::vector<int32_t>(chunk.token_ids().begin(), chunk.token_ids().end());
  if (chunk.finish_reason() != nibble::v1::FINISH_REASON_UNSPECIFIED) {
    out["finish_reason"] = FinishReasonName(chunk.finish_reason());
    out["usage"] = {{"prompt_tokens", chunk.usage().prompt_tokens()},
                    {"cached_prompt_tokens", chunk.usage().cached_prompt_tokens()},
                    {"completion_tokens", chunk.usage().completion_tokens()}};
    out["time_to_first_token_seconds"] = chunk.timing().first_token_seconds();
    out["total_seconds"] = chunk.timing().total_seconds();
  }
  return out;
}

std::string NewSessionId() {
  std::random_device device;
  std::mt19937_64 random(device());
  char id[40];
  std::snprintf(id, sizeof(id), "cli-%016llx", static_cast<unsigned long long>(random()));
  return id;
}

int RunChat(const ChatOptions& options) {
  RemoteClient client(options.server);
  nibble::v1::ChatRequest request;
  request.set_model(options.model);
  request.set_session_id(options.session_id.empty() ? NewSessionId() : options.session_id);
  request.set_return_token_ids(options.json);
  options.sampling.Fill(request.mutable_sampling());
  if (!options.system.empty()) {
    auto* message = request.add_messages();
    message->set_role("system");
    message->set_content(options.system);
  }
  const bool interactive = options.prompt.empty();
  const bool show_prompt = interactive && isatty(STDIN_FILENO) && !options.json;
  std::string line;
  while (true) {
    if (interactive) {
      if (show_prompt) {
        std::fputs("> ", stderr);
        std::fflush(stderr);
      }
      if (!std::getline(std::cin, line)) break;
      if (line.empty()) continue;
    } else {
      line = options.prompt;
    }
    auto* user = request.add_messages();
    user->set_role("user");
    user->set_content(line);
    std::string reply;
    nibble::v1::ChatChunk last;
    absl::Status status = client.Chat(request, [&](const nibble::v1::ChatChunk& chunk) {
      reply += chunk.text();
      if (options.json) {
        std::printf("%s\n", ChunkJson(chunk)
                                .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                                .c_str());
      } else {
        std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
      }
      std::fflush(stdout);
      last = chunk;
    });
    if (!status.ok()) {
      if (!options.json) std::printf("\n");
      return ReportError("chat", status);
    }
    if (!options.json) {
      std::printf("\n");
      std::fprintf(stderr, "[%d prompt (%d cached) + %d generated tokens, finish: %s]\n",
                   last.usage().prompt_tokens(), last.usage().cached_prompt_tokens(),
                   last.usage().completion_tokens(),
                   FinishReasonName(last.finish_reason()).c_str());
    }
    auto* assistant = request.add_messages();
    assistant->set_role("assistant");
    assistant->set_content(reply);
    if (!interactive) break;
  }
  return 0;
}

int RunModelsList(const std::string& server, bool json) {
  RemoteClient client(server);
  nibble::v1::ListModelsResponse response;
  if (absl::Status status = client.ListModels(&response); !status.ok()) {
    return ReportError("models list", status);
  }
  if (json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& m : response.models()) {
      out.push_back({{"name", m.name()},
                     {"architecture", m.architecture()},
                     {"quantization", m.quantization().method()},
                     {"context_length", m.context_length()},
                     {"session_len", m.cache().session_len()},
                     {"device", m.device()},
                     {"state", nibble::v1::ModelState_Name(m.state())}});
    }
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("%-24s %-22s %-6s %8s %8s %-6s %s\n", "NAME", "ARCHITECTURE", "QUANT", "CONTEXT",
              "SESSION", "DEVICE", "STATE");
  for (const auto& m : response.models()) {
    std::printf("%-24s %-22s %-6s %8lld %8lld %-6s %s\n", m.name().c_str(),
                m.architecture().c_str(), m.quantization().method().c_str(),
                static_cast<long long>(m.context_length()),
                static_cast<long long>(m.cache().session_len()), m.device().c_str(),
                nibble::v1::ModelState_Name(m.state()).c_str());
  }
  return 0;
}

}  // namespace

void RemoteSamplingFlags::Register(CLI::App& command) {
  command.add_option("--max-tokens", max_tokens, "tokens to generate at most")
      ->check(CLI::NonNegativeNumber);
  command.add_option("--temperature", temperature, "0: greedy");
  command.add_option("--top-k", top_k, "0: no limit");
  command.add_option("--top-p", top_p, "nucleus mass in (0, 1]");
  command.add_option("--repetition-penalty", repetition_penalty, "1: none");
  command.add_option("--seed", seed, "random seed for sampling");
  command.add_option("--stop", stop, "stop string (repeatable)");
  command.add_flag("--ignore-eos", ignore_eos, "do not stop at EOS or template stop tokens");
}

void RemoteSamplingFlags::Fill(nibble::v1::SamplingParams* out) const {
  out->set_max_tokens(max_tokens);
  out->set_temperature(temperature);
  out->set_top_k(top_k);
  out->set_top_p(top_p);
  out->set_repetition_penalty(repetition_penalty);
  out->set_seed(seed);
  for (const std::string& s : stop) out->add_stop(s);
  out->set_ignore_eos(ignore_eos);
}

CommandRunner RegisterChat(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("chat", "Chat with a model served by nibbled");
  auto options = std::make_shared<ChatOptions>();
  cmd->add_option("--server", options->server, "nibbled address host:port")->required();
  cmd->add_option("--model", options->model, "model name (default: the daemon's only model)");
  cmd->add_option("--prompt", options->prompt, "one user message, one reply (else: read stdin)");
  cmd->add_option("--system", options->system, "system message");
  cmd->add_option("--session-id", options->session_id,
                  "session id (default: a new random one per run)");
  cmd->add_flag("--json", options->json, "print one JSON object per streamed chunk");
  options->sampling.Register(*cmd);
  return [options]() { return RunChat(*options); };
}

CommandRunner RegisterModels(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("models", "The models a nibbled daemon serves");
  cmd->require_subcommand(1);
  CLI::App* list = cmd->add_subcommand("list", "List the models");
  auto server = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  list->add_option("--server", *server, "nibbled address host:port")->required();
  list->add_flag("--json", *json, "print JSON");
  return [server, json]() { return RunModelsList(*server, *json); };
}

}  // namespace nibble::cli
