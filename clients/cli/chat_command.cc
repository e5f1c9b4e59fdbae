// `nibble chat --server ADDR`: a conversation with a model served by nibbled. Interactive
// (lines from stdin, the reply streamed as it comes) or one shot with --prompt; --json prints
// one JSON object per chunk for scripts. An interactive conversation keeps a session id, so
// the daemon reuses its KV cache from turn to turn, and ends the session (EndSession) when
// it exits. A one-shot run keeps no session unless --session-id names one.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "clients/cli/commands.h"
#include "clients/cli/connection_flags.h"
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
  SamplingFlags sampling;
  std::optional<double> timeout;
  rpc::ClientSecurityFlags security;
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
    out["seed"] = chunk.seed();
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

// One reply streamed to stdout; `last` gets the final chunk, `reply` the text.
absl::Status StreamReply(RemoteClient& client, const ChatOptions& options,
                         const nibble::v1::ChatRequest& request, std::string* reply,
                         nibble::v1::ChatChunk* last) {
  return client.Chat(request, [&](const nibble::v1::ChatChunk& chunk) {
    *reply += chunk.text();
    if (options.json) {
      std::printf("%s\n", ChunkJson(chunk)
                              .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                              .c_str());
    } else {
      std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
    }
    std::fflush(stdout);
    *last = chunk;
  });
}

int RunChat(const ChatOptions& options) {
  absl::StatusOr<rpc::ClientSecurity> security =
      rpc::ClientSecurityFromFlagsAndEnv(options.security);
  if (!security.ok()) return ReportError("chat", security.status());
  RemoteClient client(options.server, *security, options.timeout);
  const bool interactive = options.prompt.empty();
  nibble::v1::ChatRequest request;
  request.set_model(options.model);
  // One shot: no session unless asked (a kept cache nobody continues only takes blocks).
  if (interactive || !options.session_id.empty()) {
    request.set_session_id(options.session_id.empty() ? NewSessionId() : options.session_id);
  }
  request.set_return_token_ids(options.json);
  options.sampling.Fill(request.mutable_sampling());
  if (!options.system.empty()) {
    auto* message = request.add_messages();
    message->set_role("system");
    message->set_content(options.system);
  }
  const bool show_prompt = interactive && isatty(STDIN_FILENO) && !options.json;
  bool session_used = false;
  int exit_code = 0;
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
    session_used = true;
    if (absl::Status status = StreamReply(client, options, request, &reply, &last);
        !status.ok()) {
      if (!options.json) std::printf("\n");
      exit_code = ReportError("chat", status);
      break;
    }
    if (!options.json) {
      std::printf("\n");
      std::fprintf(stderr, "[%d prompt (%d cached) + %d generated tokens, seed %llu, finish: %s]\n",
                   last.usage().prompt_tokens(), last.usage().cached_prompt_tokens(),
                   last.usage().completion_tokens(),
                   static_cast<unsigned long long>(last.seed()),
                   FinishReasonName(last.finish_reason()).c_str());
    }
    auto* assistant = request.add_messages();
    assistant->set_role("assistant");
    assistant->set_content(reply);
    if (!interactive) break;
  }
  // The conversation is over (EOF): the daemon may drop its cache now.
  if (interactive && session_used) {
    if (absl::Status status = client.EndSession(options.model, request.session_id());
        !status.ok() && exit_code == 0) {
      exit_code = ReportError("chat", status);
    }
  }
  return exit_code;
}

int RunModelsList(const std::string& server, bool json, std::optional<double> timeout,
                  const rpc::ClientSecurityFlags& security_flags) {
  absl::StatusOr<rpc::ClientSecurity> security =
      rpc::ClientSecurityFromFlagsAndEnv(security_flags);
  if (!security.ok()) return ReportError("models list", security.status());
  RemoteClient client(server, *security, timeout);
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

void SamplingFlags::Register(CLI::App& command) {
  command.add_option("--max-tokens", max_tokens, "tokens to generate at most")
      ->check(CLI::NonNegativeNumber);
  command.add_option("--temperature", temperature, "0: greedy");
  command.add_option("--top-k", top_k, "0: no limit");
  command.add_option("--top-p", top_p, "nucleus mass in (0, 1]");
  command.add_option("--repetition-penalty", repetition_penalty, "1: none");
  command.add_option("--seed", seed,
                     "random seed for sampling (default: 0 locally; a daemon picks one at random "
                     "and reports it)");
  command.add_option("--stop", stop, "stop string (repeatable)");
  command.add_flag("--ignore-eos", ignore_eos,
                   "do not stop at EOS, the template's stop tokens or its stop words");
}

void SamplingFlags::Fill(nibble::v1::SamplingParams* out) const {
  out->set_max_tokens(max_tokens);
  out->set_temperature(temperature);
  out->set_top_k(top_k);
  out->set_top_p(top_p);
  out->set_repetition_penalty(repetition_penalty);
  if (seed) out->set_seed(*seed);
  for (const std::string& s : stop) out->add_stop(s);
  out->set_ignore_eos(ignore_eos);
}

engine::SamplingParams SamplingFlags::Local() const {
  engine::SamplingParams params;
  params.temperature = temperature;
  params.top_k = top_k;
  params.top_p = top_p;
  params.repetition_penalty = repetition_penalty;
  params.seed = seed.value_or(0);
  return params;
}

void RegisterTimeout(CLI::App& command, std::optional<double>* timeout) {
  command.add_option("--timeout", *timeout,
                     "seconds each call to the daemon may take, a streamed reply included "
                     "(default: none)")
      ->check(CLI::PositiveNumber);
}

CommandRunner RegisterChat(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("chat", "Chat with a model served by nibbled");
  auto options = std::make_shared<ChatOptions>();
  cmd->add_option("--server", options->server, "nibbled address host:port")->required();
  cmd->add_option("--model", options->model, "model name (default: the daemon's only model)");
  cmd->add_option("--prompt", options->prompt, "one user message, one reply (else: read stdin)");
  cmd->add_option("--system", options->system, "system message");
  cmd->add_option("--session-id", options->session_id,
                  "session id (default: interactive, a new random one per run, ended at exit; "
                  "with --prompt, none)");
  cmd->add_flag("--json", options->json, "print one JSON object per streamed chunk");
  options->sampling.Register(*cmd);
  RegisterTimeout(*cmd, &options->timeout);
  RegisterSecurityFlags(*cmd, &options->security);
  return [options]() { return RunChat(*options); };
}

CommandRunner RegisterModels(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("models", "The models a nibbled daemon serves");
  cmd->require_subcommand(1);
  CLI::App* list = cmd->add_subcommand("list", "List the models");
  auto server = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto timeout = std::make_shared<std::optional<double>>();
  list->add_option("--server", *server, "nibbled address host:port")->required();
  list->add_flag("--json", *json, "print JSON");
  RegisterTimeout(*list, timeout.get());
  auto security = std::make_shared<rpc::ClientSecurityFlags>();
  RegisterSecurityFlags(*list, security.get());
  CommandRunner hot_loading = RegisterModelsHotLoading(*cmd);  // load, unload
  return [server, json, timeout, security, list, hot_loading]() {
    if (!list->parsed()) return hot_loading();
    return RunModelsList(*server, *json, *timeout, *security);
  };
}

}  // namespace nibble::cli
