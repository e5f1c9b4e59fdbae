// Chat prompt templates, rendered byte-for-byte as LMDeploy's model.py (v0.2.6 = v0.6.0)
// renders them (../shared/models/configs/chat_templates_rendered.txt, MODELS.md §3).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble::engine {

enum class ChatRole { kSystem, kUser, kAssistant };

struct ChatMessage {
  ChatRole role;
  std::string content;
};

// Parses "system" / "user" / "assistant"; nullopt for anything else.
std::optional<ChatRole> ParseChatRole(std::string_view name);

enum class ChatTemplateKind {
  kPlain,      // messages' contents joined by newlines, no markup; no stop words
  kInternLM,   // InternLM v1: <|User|>: ... <eoa>
  kInternLM2,  // InternLM2: <|im_start|>user ... <|im_end|>
  kLlama2,     // Llama-2 chat: [INST] <<SYS>> ... [/INST]
};

// "plain", "internlm", "internlm2", "llama2"; nullopt for anything else.
std::optional<ChatTemplateKind> ParseChatTemplateName(std::string_view name);
std::string_view ChatTemplateName(ChatTemplateKind kind);

class ChatTemplate {
 public:
  explicit ChatTemplate(ChatTemplateKind kind) : kind_(kind) {}
  ChatTemplateKind kind() const { return kind_; }

  // The whole conversation as a prompt ending where the assistant's next reply begins.
  // Without a system message the template's default system prompt is used (as LMDeploy
  // does). Errors: empty message list, a system message that is not first, a conversation
  // that does not end with a user message.
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages) const;

  // Strings that end the assistant's reply ("<eoa>"; "<|im_end|>", "<|action_end|>").
  std::vector<std::string> StopWords() const;

 private:
  ChatTemplateKind kind_;
};

// The template a model's architecture implies: InternLMForCausalLM -> internlm,
// InternLM2ForCausalLM -> internlm2, LlamaForCausalLM -> llama2 when the vocabulary is
// Llama-2's (32000 pieces), plain otherwise (base models such as stories260K).
ChatTemplateKind DefaultChatTemplateFor(std::string_view architecture, int vocab_size);

}  // namespace nibble::engine
