// Chat templates against prompts rendered by LMDeploy's own model.py (v0.2.6 and v0.6.0), read
// from ../shared/models/configs/chat_templates_rendered.txt: the expected strings come from that
// file, parsed here from their Python repr() form, never copied into this test.
#include "engine/chat_template.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "tests/testing/test_support.h"

namespace nibble::engine {
namespace {

// ---- A parser for the Python repr() strings and lists of the rendered file. ----

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Parses one Python str literal as repr() writes it, starting at text[*pos] (the opening quote);
// advances *pos past the closing quote. nullopt on malformed input.
std::optional<std::string> ParsePyStr(const std::string& text, size_t* pos) {
  if (*pos >= text.size()) return std::nullopt;
  const char quote = text[*pos];
  if (quote != '\'' && quote != '"') return std::nullopt;
  std::string out;
  size_t i = *pos + 1;
  while (i < text.size()) {
    const char c = text[i];
    if (c == quote) {
      *pos = i + 1;
      return out;
    }
    if (c != '\\') {
      out.push_back(c);  // repr() leaves printable non-ASCII as raw UTF-8
      ++i;
      continue;
    }
    if (i + 1 >= text.size()) return std::nullopt;
    const char e = text[i + 1];
    i += 2;
    int hex_digits = 0;
    switch (e) {
      case 'n': out.push_back('\n'); break;
      case 't': out.push_back('\t'); break;
      case 'r': out.push_back('\r'); break;
      case '\\': out.push_back('\\'); break;
      case '\'': out.push_back('\''); break;
      case '"': out.push_back('"'); break;
      case 'x': hex_digits = 2; break;
      case 'u': hex_digits = 4; break;
      case 'U': hex_digits = 8; break;
      default: return std::nullopt;
    }
    if (hex_digits > 0) {
      if (i + hex_digits > text.size()) return std::nullopt;
      uint32_t cp = 0;
      for (int k = 0; k < hex_digits; ++k) {
        const char h = text[i + k];
        int v;
        if (h >= '0' && h <= '9') v = h - '0';
        else if (h >= 'a' && h <= 'f') v = h - 'a' + 10;
        else if (h >= 'A' && h <= 'F') v = h - 'A' + 10;
        else return std::nullopt;
        cp = cp * 16 + static_cast<uint32_t>(v);
      }
      i += hex_digits;
      AppendUtf8(cp, &out);
    }
  }
  return std::nullopt;  // no closing quote
}

// Parses a whole line's value that is exactly one repr() string.
std::optional<std::string> ParsePyStrValue(const std::string& value) {
  size_t pos = 0;
  std::optional<std::string> s = ParsePyStr(value, &pos);
  if (!s || pos != value.size()) return std::nullopt;
  return s;
}

// Parses "None" (an empty list) or "['a', 'b']".
std::optional<std::vector<std::string>> ParsePyStrList(const std::string& value) {
  if (value == "None") return std::vector<std::string>{};
  if (value.size() < 2 || value.front() != '[' || value.back() != ']') return std::nullopt;
  std::vector<std::string> out;
  size_t pos = 1;
  while (pos < value.size() - 1) {
    std::optional<std::string> s = ParsePyStr(value, &pos);
    if (!s) return std::nullopt;
    out.push_back(*s);
    if (value.compare(pos, 2, ", ") == 0) pos += 2;
  }
  return out;
}

TEST(PyReprParserTest, HandlesQuotesAndEscapes) {
  EXPECT_EQ(ParsePyStrValue(R"('a\nb')"), "a\nb");
  EXPECT_EQ(ParsePyStrValue(R"("don't")"), "don't");
  EXPECT_EQ(ParsePyStrValue(R"('it\'s \\ \x41\u00e9')"), "it's \\ A\xC3\xA9");
  EXPECT_EQ(ParsePyStrValue("'书生'"), "书生");
  EXPECT_EQ(ParsePyStrValue("'unterminated"), std::nullopt);
  EXPECT_EQ(ParsePyStrValue("'a' trailing"), std::nullopt);
  EXPECT_EQ(ParsePyStrList("None"), std::vector<std::string>{});
  EXPECT_EQ(ParsePyStrList("['<eoa>']"), std::vector<std::string>{"<eoa>"});
  EXPECT_EQ(ParsePyStrList("['<|im_end|>', '<|action_end|>']"),
            (std::vector<std::string>{"<|im_end|>", "<|action_end|>"}));
}

// ---- The rendered file. ----

struct RenderedTemplate {
  std::string name;     // "internlm", "internlm2", "llama2"
  std::string source;   // "model_v026.py"
  std::vector<std::string> stop_words;
  std::string conversation;  // messages2prompt([user Hi, assistant Hello!, user How are you?])
  std::string first_turn;    // get_prompt('Hi', sequence_start=True)
};

// Reads and parses chat_templates_rendered.txt; records a test failure and returns an empty
// list when the shared directory or the file is missing or malformed.
std::vector<RenderedTemplate> LoadRenderedTemplates() {
  const std::string shared = ::nibble::testing::SharedDir();
  if (shared.empty()) return {};
  const std::string path = shared + "/models/configs/chat_templates_rendered.txt";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot open " << path;
    return {};
  }
  std::vector<RenderedTemplate> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line.rfind("=== ", 0) == 0) {
      // "=== internlm (model_v026.py) stop_words=['<eoa>']"
      RenderedTemplate t;
      const size_t open = line.find(" (");
      const size_t close = line.find(") stop_words=");
      if (open == std::string::npos || close == std::string::npos) {
        ADD_FAILURE() << path << ": malformed section header: " << line;
        return {};
      }
      t.name = line.substr(4, open - 4);
      t.source = line.substr(open + 2, close - open - 2);
      auto stops = ParsePyStrList(line.substr(close + std::string(") stop_words=").size()));
      if (!stops) {
        ADD_FAILURE() << path << ": malformed stop_words in: " << line;
        return {};
      }
      t.stop_words = *stops;
      out.push_back(t);
      continue;
    }
    const size_t colon = line.find(": ");
    if (colon == std::string::npos || out.empty()) {
      ADD_FAILURE() << path << ": unexpected line: " << line;
      return {};
    }
    const std::string key = line.substr(0, colon);
    auto value = ParsePyStrValue(line.substr(colon + 2));
    if (!value) {
      ADD_FAILURE() << path << ": malformed string in: " << line;
      return {};
    }
    if (key == "messages2prompt") out.back().conversation = *value;
    else if (key == "get_prompt(first turn)") out.back().first_turn = *value;
    // "get_prompt(next turn)" is LMDeploy's incremental prompt for an interactive session,
    // which nibble does not have: it always renders the whole conversation.
  }
  return out;
}

std::vector<ChatMessage> Conversation() {
  return {{ChatRole::kUser, "Hi"}, {ChatRole::kAssistant, "Hello!"},
          {ChatRole::kUser, "How are you?"}};
}

TEST(ChatTemplateTest, MatchesLmdeployRenderingsByteForByte) {
  const std::vector<RenderedTemplate> rendered = LoadRenderedTemplates();
  ASSERT_EQ(rendered.size(), 6u) << "expected internlm, internlm2, llama2 for v0.2.6 and v0.6.0";
  for (const RenderedTemplate& r : rendered) {
    SCOPED_TRACE(r.name + " from " + r.source);
    ASSERT_FALSE(r.conversation.empty());
    ASSERT_FALSE(r.first_turn.empty());
    const std::optional<ChatTemplateKind> kind = ParseChatTemplateName(r.name);
    ASSERT_TRUE(kind.has_value());
    const ChatTemplate tmpl(*kind);

    absl::StatusOr<std::string> conversation = tmpl.Render(Conversation());
    ASSERT_TRUE(conversation.ok()) << conversation.status();
    EXPECT_EQ(*conversation, r.conversation);

    absl::StatusOr<std::string> first = tmpl.Render({{ChatRole::kUser, "Hi"}});
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(*first, r.first_turn);

    EXPECT_EQ(tmpl.StopWords(), r.stop_words);
  }
}

TEST(ChatTemplateTest, ExplicitSystemMessageReplacesTheDefault) {
  const std::vector<ChatMessage> messages = {{ChatRole::kSystem, "Be brief."},
                                             {ChatRole::kUser, "Hi"},
                                             {ChatRole::kAssistant, "Hello!"},
                                             {ChatRole::kUser, "Why?"}};
  EXPECT_EQ(*ChatTemplate(ChatTemplateKind::kInternLM).Render(messages),
            "<|System|>:Be brief.\n<|User|>:Hi\n<|Bot|>:Hello!<eoa>\n<|User|>:Why?\n<|Bot|>:");
  EXPECT_EQ(*ChatTemplate(ChatTemplateKind::kInternLM2).Render(messages),
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nWhy?<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(*ChatTemplate(ChatTemplateKind::kLlama2).Render(messages),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello!</s><s>[INST] Why? [/INST] ");
  EXPECT_EQ(*ChatTemplate(ChatTemplateKind::kPlain).Render(messages), "Be brief.\nHi\nHello!\nWhy?");
}

TEST(ChatTemplateTest, SystemMessageAppearsInPlaceOfTheDefaultInTheRenderedFile) {
  // The rendered conversation with a custom system message must differ from LMDeploy's only in
  // the system text: cut the default system text out of LMDeploy's rendering and compare.
  const std::vector<RenderedTemplate> rendered = LoadRenderedTemplates();
  ASSERT_FALSE(rendered.empty());
  const std::string custom = "SYSTEM-TEXT";
  for (const RenderedTemplate& r : rendered) {
    SCOPED_TRACE(r.name + " from " + r.source);
    const ChatTemplate tmpl(*ParseChatTemplateName(r.name));
    std::vector<ChatMessage> messages = Conversation();
    messages.insert(messages.begin(), {ChatRole::kSystem, custom});
    absl::StatusOr<std::string> with_custom = tmpl.Render(messages);
    ASSERT_TRUE(with_custom.ok()) << with_custom.status();
    const size_t at = with_custom->find(custom);
    ASSERT_NE(at, std::string::npos);
    const std::string head = with_custom->substr(0, at);
    const std::string tail = with_custom->substr(at + custom.size());
    ASSERT_GE(r.conversation.size(), head.size() + tail.size());
    EXPECT_EQ(r.conversation.substr(0, head.size()), head);
    EXPECT_EQ(r.conversation.substr(r.conversation.size() - tail.size()), tail);
    // What LMDeploy had in the cut-out place is its default system prompt.
    const std::string default_system =
        r.conversation.substr(head.size(), r.conversation.size() - head.size() - tail.size());
    EXPECT_GT(default_system.size(), 100u);
  }
}

TEST(ChatTemplateTest, PlainTemplateJoinsContentsWithNewlines) {
  const ChatTemplate plain(ChatTemplateKind::kPlain);
  EXPECT_EQ(*plain.Render({{ChatRole::kUser, "Once upon a time"}}), "Once upon a time");
  EXPECT_EQ(*plain.Render(Conversation()), "Hi\nHello!\nHow are you?");
  EXPECT_TRUE(plain.StopWords().empty());
}

TEST(ChatTemplateTest, EmptyContentsAreKept) {
  EXPECT_EQ(*ChatTemplate(ChatTemplateKind::kInternLM2)
                 .Render({{ChatRole::kSystem, ""}, {ChatRole::kUser, ""}}),
            "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
            "<|im_start|>assistant\n");
  // LMDeploy's Llama2 treats an empty system prompt as absent (`if not system`).
  const ChatTemplate llama2(ChatTemplateKind::kLlama2);
  EXPECT_EQ(*llama2.Render({{ChatRole::kSystem, ""}, {ChatRole::kUser, "Hi"}}),
            *llama2.Render({{ChatRole::kUser, "Hi"}}));
}

TEST(ChatTemplateTest, RejectsMalformedConversations) {
  for (ChatTemplateKind kind : {ChatTemplateKind::kPlain, ChatTemplateKind::kInternLM,
                                ChatTemplateKind::kInternLM2, ChatTemplateKind::kLlama2}) {
    SCOPED_TRACE(std::string(ChatTemplateName(kind)));
    const ChatTemplate tmpl(kind);

    absl::StatusOr<std::string> empty = tmpl.Render({});
    EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(empty.status().message().find("no messages"), absl::string_view::npos)
        << empty.status();

    absl::StatusOr<std::string> late_system =
        tmpl.Render({{ChatRole::kUser, "Hi"}, {ChatRole::kSystem, "x"}, {ChatRole::kUser, "Hi"}});
    EXPECT_EQ(late_system.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(late_system.status().message().find("system"), absl::string_view::npos)
        << late_system.status();

    absl::StatusOr<std::string> ends_with_assistant =
        tmpl.Render({{ChatRole::kUser, "Hi"}, {ChatRole::kAssistant, "Hello!"}});
    EXPECT_EQ(ends_with_assistant.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(ends_with_assistant.status().message().find("last message"),
              absl::string_view::npos)
        << ends_with_assistant.status();

    absl::StatusOr<std::string> only_system = tmpl.Render({{ChatRole::kSystem, "x"}});
    EXPECT_EQ(only_system.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(ChatTemplateTest, Llama2NeedsAlternatingTurns) {
  const ChatTemplate llama2(ChatTemplateKind::kLlama2);
  absl::StatusOr<std::string> two_users =
      llama2.Render({{ChatRole::kUser, "Hi"}, {ChatRole::kUser, "Anyone?"}});
  EXPECT_EQ(two_users.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(two_users.status().message().find("alternate"), absl::string_view::npos)
      << two_users.status();
  absl::StatusOr<std::string> assistant_first = llama2.Render(
      {{ChatRole::kAssistant, "Hello!"}, {ChatRole::kUser, "Hi"}});
  EXPECT_EQ(assistant_first.status().code(), absl::StatusCode::kInvalidArgument);
  // InternLM's formats mark every turn with its role, so they render any order.
  EXPECT_TRUE(ChatTemplate(ChatTemplateKind::kInternLM2)
                  .Render({{ChatRole::kUser, "Hi"}, {ChatRole::kUser, "Anyone?"}})
                  .ok());
}

TEST(ChatTemplateTest, ParsesRolesAndTemplateNames) {
  EXPECT_EQ(ParseChatRole("system"), ChatRole::kSystem);
  EXPECT_EQ(ParseChatRole("user"), ChatRole::kUser);
  EXPECT_EQ(ParseChatRole("assistant"), ChatRole::kAssistant);
  EXPECT_EQ(ParseChatRole("User"), std::nullopt);
  EXPECT_EQ(ParseChatRole("tool"), std::nullopt);
  EXPECT_EQ(ParseChatRole(""), std::nullopt);

  for (ChatTemplateKind kind : {ChatTemplateKind::kPlain, ChatTemplateKind::kInternLM,
                                ChatTemplateKind::kInternLM2, ChatTemplateKind::kLlama2}) {
    EXPECT_EQ(ParseChatTemplateName(ChatTemplateName(kind)), kind);
  }
  EXPECT_EQ(ParseChatTemplateName("chatml"), std::nullopt);
  EXPECT_EQ(ParseChatTemplateName("InternLM2"), std::nullopt);
}

TEST(ChatTemplateTest, DefaultTemplateFollowsTheArchitecture) {
  EXPECT_EQ(DefaultChatTemplateFor("InternLMForCausalLM", 103168), ChatTemplateKind::kInternLM);
  EXPECT_EQ(DefaultChatTemplateFor("InternLM2ForCausalLM", 92544), ChatTemplateKind::kInternLM2);
  EXPECT_EQ(DefaultChatTemplateFor("LlamaForCausalLM", 32000), ChatTemplateKind::kLlama2);
  EXPECT_EQ(DefaultChatTemplateFor("LlamaForCausalLM", 512), ChatTemplateKind::kPlain);
  EXPECT_EQ(DefaultChatTemplateFor("MistralForCausalLM", 32000), ChatTemplateKind::kPlain);
}

}  // namespace
}  // namespace nibble::engine
