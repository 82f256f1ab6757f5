// Chat templates: recognizes the template family of a GGUF
// tokenizer.chat_template the way llama.cpp's llm_chat_detect_template does
// and renders conversations with llama.cpp's built-in formatting for it.
// Unlike llama.cpp, ChatML honours a default system prompt found in the
// template text (SmolLM2, Qwen2.5), as the Jinja template itself does.
//
// ChatTemplate is immutable after construction: safe for concurrent use.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "common/status.h"

namespace mnemo::model {

class GgufFile;

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", ...
  std::string content;
};

class ChatTemplate {
 public:
  enum class Family {
    kChatMl,           // <|im_start|>role\ncontent<|im_end|>\n
    kLlama3,           // <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    kLlama2,           // [INST] ... [/INST], system text inlined
    kLlama2Sys,        // ... with <<SYS>> blocks
    kLlama2SysBos,     // ... and <s> before each later [INST]
    kLlama2SysStrip,   // ... and message contents trimmed
    kMistralV1,        // " [INST] ... [/INST]"
    kMistralV3,        // "[INST] ... [/INST]", assistant text trimmed
    kMistralV3Tekken,  // "[INST]...[/INST]"
    kMistralV7,        // [SYSTEM_PROMPT] ... [INST] ... with spaces
    kMistralV7Tekken,  // ... without
  };

  // `tmpl` is a Jinja template text or one of llama.cpp's template names
  // ("chatml", "llama3", "llama2", "mistral-v7"...). Unsupported when the
  // family is one this build does not render (the message names it) or
  // when llama.cpp would not recognize the template either.
  static Result<std::unique_ptr<ChatTemplate>> Create(std::string_view tmpl);
  // Plain ChatML with an optional default system prompt: the fallback for a
  // model without a template (llama.cpp falls back to ChatML too).
  static std::unique_ptr<ChatTemplate> ChatMl(std::string default_system_prompt = "");

  // The whole conversation. With add_generation_prompt the text ends where
  // the assistant's reply starts (the [INST] families always end there).
  Result<std::string> Render(std::span<const ChatMessage> messages,
                             bool add_generation_prompt) const;
  // Only `new_messages`, formatted as they continue a conversation whose
  // rendering so far ended with a complete assistant turn (its content
  // followed by assistant_end()): no default system prompt, no repeated
  // preamble. For such a conversation `history`,
  //   Render(history + new, g) == Render(history, false) + RenderAppend(new, g).
  Result<std::string> RenderAppend(std::span<const ChatMessage> new_messages,
                                   bool add_generation_prompt) const;

  // Text the template puts right after an assistant message's content
  // ("<|im_end|>\n", "<|eot_id|>", "</s>"). Generation normally stops on the
  // end-of-generation token that begins it; the session must still hold the
  // rest before RenderAppend's text follows.
  std::string_view assistant_end() const;

  Family family() const { return family_; }
  // llama.cpp's name of the family ("chatml", "llama3", "llama2-sys"...).
  std::string_view name() const;
  // Empty when the template has none.
  const std::string& default_system_prompt() const { return default_system_; }

 private:
  ChatTemplate(Family family, std::string default_system)
      : family_(family), default_system_(std::move(default_system)) {}
  Result<std::string> RenderImpl(std::span<const ChatMessage> messages, bool add_generation_prompt,
                                 bool continuation) const;

  // constant after construction
  Family family_;
  std::string default_system_;
};

// From tokenizer.chat_template; plain ChatML when the key is absent. An
// unknown or unsupported template is an Unsupported error: the caller may
// fall back to ChatTemplate::ChatMl().
Result<std::unique_ptr<ChatTemplate>> ChatTemplateFromGguf(const GgufFile& gguf);

}  // namespace mnemo::model
