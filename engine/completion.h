// What happens to each sampled token at the end of a generation: its text is streamed
// (TextStream: UTF-8 safe, stop strings held back), and the generation ends on a stop token,
// a stop string, max_tokens or a full context. Shared by Generate (generator.h) and the
// serving engine (inference_engine.h), so that both end a generation at the same token for
// the same reason.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/text_stream.h"
#include "engine/tokenizer.h"

namespace nibble::engine {

enum class FinishReason {
  kLength,       // max_tokens reached
  kStopToken,    // EOS or a template stop token
  kStopString,   // a requested stop string appeared in the text
  kContextFull,  // the model's max_position_embeddings (the engine: session_len) reached
};
std::string_view FinishReasonName(FinishReason reason);  // "length", "stop", ...

// One per generated sequence; not thread-safe. The tokenizer must outlive it.
class Completion {
 public:
  // `context`: the most tokens the KV cache may hold (prompt and output).
  Completion(const Tokenizer& tokenizer, std::vector<int32_t> stop_token_ids,
             std::vector<std::string> stop_strings, int32_t max_tokens, int64_t context);

  struct Step {
    std::string text;                   // text that became final with this token
    std::optional<FinishReason> finish;  // set: the generation ends with this token
  };
  // Takes one sampled token. `cache_length`: the tokens in the KV cache when it was sampled
  // (the prompt and the output before it). After a step with `finish`, call Finish once and
  // Accept no more.
  Step Accept(int32_t token, int64_t cache_length);
  // The text held back until the end (a partial stop string, an unfinished character).
  std::string Finish();

  const std::vector<int32_t>& output_ids() const { return output_ids_; }
  const std::string& text() const { return stream_.text(); }

 private:
  std::vector<int32_t> stop_token_ids_;
  int32_t max_tokens_;
  int64_t context_;
  TextStream stream_;
  std::vector<int32_t> output_ids_;
};

}  // namespace nibble::engine
