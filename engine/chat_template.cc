#include "engine/chat_template.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace nibble::engine {
namespace {

// LMDeploy's InternLMChat7B.meta_instruction, inherited unchanged by InternLM2Chat7B (MODELS.md
// §3). It ends with '\n', so a blank line (InternLM) or a '\n' before <|im_end|> (InternLM2)
// follows it in the prompt.
constexpr std::string_view kInternLMSystem =
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by "
    "the user such as English and 中文.\n";

// LMDeploy's Llama2.default_sys_prompt (Meta's DEFAULT_SYSTEM_PROMPT); no trailing newline.
constexpr std::string_view kLlama2System =
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't "
    "share false information.";

std::string_view RoleName(ChatRole role) {
  switch (role) {
    case ChatRole::kSystem: return "system";
    case ChatRole::kUser: return "user";
    case ChatRole::kAssistant: return "assistant";
  }
  return "unknown";
}

absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// The markup one role's turn is wrapped in, as LMDeploy's BaseModel subclasses spell it:
// `prefix` + content + `suffix`.
struct TurnMarkup {
  std::string_view prefix;
  std::string_view suffix;
};

struct MarkupTemplate {
  std::string_view default_system;
  TurnMarkup system;
  TurnMarkup user;
  TurnMarkup assistant;
  std::string_view generation_prefix;  // opens the assistant's next reply
};

// InternLMChat7B: system '<|System|>:', eosys '\n', user '<|User|>:', eoh '\n',
// assistant '<|Bot|>:', eoa '<eoa>', separator '\n'.
constexpr MarkupTemplate kInternLMMarkup = {
    kInternLMSystem,
    {"<|System|>:", "\n"},
    {"<|User|>:", "\n"},
    {"<|Bot|>:", "<eoa>\n"},
    "<|Bot|>:",
};

// InternLM2Chat7B: the same scheme with ChatML-style markers.
constexpr MarkupTemplate kInternLM2Markup = {
    kInternLMSystem,
    {"<|im_start|>system\n", "<|im_end|>\n"},
    {"<|im_start|>user\n", "<|im_end|>\n"},
    {"<|im_start|>assistant\n", "<|im_end|>\n"},
    "<|im_start|>assistant\n",
};

// LMDeploy's messages2prompt for InternLM and InternLM2: the default system turn when the
// conversation has none, each message wrapped in its role's markup, then the assistant prefix.
// An explicit system message replaces the default one, even when its content is empty.
std::string RenderMarkup(const MarkupTemplate& t, const std::vector<ChatMessage>& messages) {
  std::string out;
  if (messages.front().role != ChatRole::kSystem) {
    absl::StrAppend(&out, AbslView(t.system.prefix), AbslView(t.default_system),
                    AbslView(t.system.suffix));
  }
  for (const ChatMessage& m : messages) {
    const TurnMarkup& markup = m.role == ChatRole::kSystem ? t.system
                               : m.role == ChatRole::kUser ? t.user
                                                           : t.assistant;
    absl::StrAppend(&out, AbslView(markup.prefix), m.content, AbslView(markup.suffix));
  }
  absl::StrAppend(&out, AbslView(t.generation_prefix));
  return out;
}

// LMDeploy's Llama2.messages2prompt (Meta's chat format):
//   [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1}</s><s>[INST] {q2} [/INST] 
// An empty system message falls back to the default prompt, as LMDeploy's `if not system`
// does. The template never writes the leading <s>: the tokenizer's BOS provides it.
absl::StatusOr<std::string> RenderLlama2(const std::vector<ChatMessage>& messages) {
  size_t first = 0;
  std::string_view system = kLlama2System;
  if (messages.front().role == ChatRole::kSystem) {
    if (!messages.front().content.empty()) system = messages.front().content;
    first = 1;
  }
  // Each [INST] block pairs one user message with the assistant's reply to it, so the turns
  // after the system message must alternate user, assistant, ..., user.
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatRole expected = (i - first) % 2 == 0 ? ChatRole::kUser : ChatRole::kAssistant;
    if (messages[i].role != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          "llama2 chat template: message ", i, " is from the ", AbslView(RoleName(messages[i].role)),
          " but the llama2 format needs user and assistant messages to alternate, starting "
          "with the user"));
    }
  }
  std::string out = absl::StrCat("[INST] <<SYS>>\n", AbslView(system), "\n<</SYS>>\n\n");
  for (size_t i = first; i < messages.size(); i += 2) {
    if (i != first) out += "[INST] ";
    absl::StrAppend(&out, messages[i].content, " [/INST] ");
    if (i + 1 < messages.size()) absl::StrAppend(&out, messages[i + 1].content, "</s><s>");
  }
  return out;
}

// Base models have no chat format: the prompt is the messages' contents joined by '\n', with
// no trailing newline, so a single user message is exactly its text and the model continues
// it ("Once upon a time" -> " there was ...").
std::string RenderPlain(const std::vector<ChatMessage>& messages) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i != 0) out += '\n';
    out += messages[i].content;
  }
  return out;
}

}  // namespace

std::optional<ChatRole> ParseChatRole(std::string_view name) {
  if (name == "system") return ChatRole::kSystem;
  if (name == "user") return ChatRole::kUser;
  if (name == "assistant") return ChatRole::kAssistant;
  return std::nullopt;
}

std::optional<ChatTemplateKind> ParseChatTemplateName(std::string_view name) {
  if (name == "plain") return ChatTemplateKind::kPlain;
  if (name == "internlm") return ChatTemplateKind::kInternLM;
  if (name == "internlm2") return ChatTemplateKind::kInternLM2;
  if (name == "llama2") return ChatTemplateKind::kLlama2;
  return std::nullopt;
}

std::string_view ChatTemplateName(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::kPlain: return "plain";
    case ChatTemplateKind::kInternLM: return "internlm";
    case ChatTemplateKind::kInternLM2: return "internlm2";
    case ChatTemplateKind::kLlama2: return "llama2";
  }
  return "unknown";
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages) const {
  if (messages.empty()) {
    return absl::InvalidArgumentError("chat template: the conversation has no messages");
  }
  for (size_t i = 1; i < messages.size(); ++i) {
    if (messages[i].role == ChatRole::kSystem) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chat template: message ", i, " is a system message; only the first may be"));
    }
  }
  if (messages.back().role != ChatRole::kUser) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chat template: the last message is from the ",
        AbslView(RoleName(messages.back().role)),
        "; a prompt must end with a user message for the assistant to answer"));
  }
  switch (kind_) {
    case ChatTemplateKind::kPlain: return RenderPlain(messages);
    case ChatTemplateKind::kInternLM: return RenderMarkup(kInternLMMarkup, messages);
    case ChatTemplateKind::kInternLM2: return RenderMarkup(kInternLM2Markup, messages);
    case ChatTemplateKind::kLlama2: return RenderLlama2(messages);
  }
  return absl::InternalError("chat template: unknown template kind");
}

std::vector<std::string> ChatTemplate::StopWords() const {
  switch (kind_) {
    case ChatTemplateKind::kInternLM: return {"<eoa>"};
    case ChatTemplateKind::kInternLM2: return {"<|im_end|>", "<|action_end|>"};
    // Llama-2 chat and base models stop on the tokenizer's EOS only.
    case ChatTemplateKind::kLlama2:
    case ChatTemplateKind::kPlain: return {};
  }
  return {};
}

ChatTemplateKind DefaultChatTemplateFor(std::string_view architecture, int vocab_size) {
  if (architecture == "InternLMForCausalLM") return ChatTemplateKind::kInternLM;
  if (architecture == "InternLM2ForCausalLM") return ChatTemplateKind::kInternLM2;
  if (architecture == "LlamaForCausalLM" && vocab_size == 32000) return ChatTemplateKind::kLlama2;
  return ChatTemplateKind::kPlain;
}

}  // namespace nibble::engine
