// Chat template detection (llama.cpp's llm_chat_detect_template order) and
// rendering of the supported families.
#include "model/chat_template.h"

#include <cctype>
#include <vector>

#include "model/gguf.h"

namespace mnemo::model {
namespace {

using Family = ChatTemplate::Family;

struct FamilyName {
  Family family;
  std::string_view name;
};

constexpr FamilyName kSupported[] = {
    {Family::kChatMl, "chatml"},
    {Family::kLlama3, "llama3"},
    {Family::kLlama2, "llama2"},
    {Family::kLlama2Sys, "llama2-sys"},
    {Family::kLlama2SysBos, "llama2-sys-bos"},
    {Family::kLlama2SysStrip, "llama2-sys-strip"},
    {Family::kMistralV1, "mistral-v1"},
    {Family::kMistralV3, "mistral-v3"},
    {Family::kMistralV3Tekken, "mistral-v3-tekken"},
    {Family::kMistralV7, "mistral-v7"},
    {Family::kMistralV7Tekken, "mistral-v7-tekken"},
};

// Every name llama.cpp accepts in place of a template text.
constexpr std::string_view kLlamaCppNames[] = {
    "chatml",      "llama2",        "llama2-sys",        "llama2-sys-bos", "llama2-sys-strip",
    "mistral-v1",  "mistral-v3",    "mistral-v3-tekken", "mistral-v7",     "mistral-v7-tekken",
    "phi3",        "phi4",          "falcon3",           "zephyr",         "monarch",
    "gemma",       "orion",         "openchat",          "vicuna",         "vicuna-orca",
    "deepseek",    "deepseek2",     "deepseek3",         "deepseek-ocr",   "command-r",
    "llama3",      "chatglm3",      "chatglm4",          "glmedge",        "minicpm",
    "exaone3",     "exaone4",       "exaone-moe",        "rwkv-world",     "granite",
    "granite-4.0", "granite-4.1",   "gigachat",          "megrez",         "yandex",
    "bailing",     "bailing-think", "bailing2",          "llama4",         "smolvlm",
    "hunyuan-moe", "gpt-oss",       "hunyuan-dense",     "hunyuan-vl",     "kimi-k2",
    "seed_oss",    "grok-2",        "pangu-embedded",    "solar-open",
};

// llama.cpp's family name for a template text, or "" when it knows none. The
// checks and their order are llm_chat_detect_template's.
std::string_view DetectFamilyName(std::string_view t) {
  for (std::string_view name : kLlamaCppNames) {
    if (t == name) return name;
  }
  auto has = [&](std::string_view s) { return t.find(s) != std::string_view::npos; };
  if (has("<|im_start|>")) {
    if (has("<|im_sep|>")) return "phi4";
    if (has("<end_of_utterance>")) return "smolvlm";  // <|im_start|> as BOS, not ChatML
    return "chatml";
  }
  if (t.rfind("mistral", 0) == 0 || has("[INST]")) {
    if (has("[SYSTEM_PROMPT]")) return "mistral-v7";
    if (has("' [INST] ' + system_message") || has("[AVAILABLE_TOOLS]")) {
      if (has(" [INST]")) return "mistral-v1";
      if (has("\"[INST]\"")) return "mistral-v3-tekken";
      return "mistral-v3";
    }
    if (has("content.strip()")) return "llama2-sys-strip";
    if (has("bos_token + '[INST]")) return "llama2-sys-bos";
    if (has("<<SYS>>")) return "llama2-sys";
    return "llama2";
  }
  if (has("<|assistant|>") && has("<|end|>")) return "phi3";
  if (has("[gMASK]<sop>")) return "chatglm4";
  if (has("<|assistant|>") && has("<|user|>")) {
    if (has("<|tool_declare|>")) return "exaone-moe";
    return has("</s>") ? "falcon3" : "glmedge";
  }
  if (has("<|{{ item['role'] }}|>") && has("<|begin_of_image|>")) return "glmedge";
  if (has("<|user|>") && has("<|endoftext|>")) return "zephyr";
  if (has("bos_token + message['role']")) return "monarch";
  if (has("<start_of_turn>")) return "gemma";
  if (has("'\\n\\nAssistant: ' + eos_token")) return "orion";
  if (has("GPT4 Correct ")) return "openchat";
  if (has("USER: ") && has("ASSISTANT: ")) return has("SYSTEM: ") ? "vicuna-orca" : "vicuna";
  if (has("### Instruction:") && has("<|EOT|>")) return "deepseek";
  if (has("<|START_OF_TURN_TOKEN|>") && has("<|USER_TOKEN|>")) return "command-r";
  if (has("<|start_header_id|>") && has("<|end_header_id|>")) return "llama3";
  if (has("[gMASK]sop")) return "chatglm3";
  if (has("<用户>")) return "minicpm";
  if (has("'Assistant: ' + message['content'] + eos_token")) return "deepseek2";
  if (has("<｜Assistant｜>") && has("<｜User｜>") && has("<｜end▁of▁sentence｜>")) {
    return "deepseek3";
  }
  if (has("[|system|]") && has("[|assistant|]") && has("[|endofturn|]")) {
    return has("[|tool|]") ? "exaone4" : "exaone3";
  }
  if (has("rwkv-world") || has("{{- 'User: ' + message['content']|trim + '\\n\\n' -}}")) {
    return "rwkv-world";
  }
  if (has("<|start_of_role|>")) {
    if (has("<tool_call>") || has("<tools>")) {
      return has("g4_default_system_message") ? "granite-4.0" : "granite-4.1";
    }
    return "granite";
  }
  if (has("message['role'] + additional_special_tokens[0] + message['content'] + "
          "additional_special_tokens[1]")) {
    return "gigachat";
  }
  if (has("<|role_start|>")) return "megrez";
  if (has(" Ассистент:")) return "yandex";
  if (has("<role>ASSISTANT</role>") && has("'HUMAN'")) return "bailing";
  if (has("<role>ASSISTANT</role>") && has("\"HUMAN\"") && has("<think>")) return "bailing-think";
  if (has("<role>ASSISTANT</role>") && has("<role>HUMAN</role>") && has("<|role_end|>")) {
    return "bailing2";
  }
  if (has("<|header_start|>") && has("<|header_end|>")) return "llama4";
  if (has("<|endofuserprompt|>")) return "dots1";
  if (has("<|extra_0|>") && has("<|extra_4|>")) return "hunyuan-moe";
  if (has("<|start|>") && has("<|channel|>")) return "gpt-oss";
  if (has("<｜hy_Assistant｜>") && has("<｜hy_begin▁of▁sentence｜>")) return "hunyuan-vl";
  if (has("<｜hy_Assistant｜>") && has("<｜hy_place▁holder▁no▁3｜>")) return "hunyuan-dense";
  if (has("<|im_assistant|>assistant<|im_middle|>")) return "kimi-k2";
  if (has("<seed:bos>")) return "seed_oss";
  if (has("'Assistant: '  + message['content'] + '<|separator|>")) return "grok-2";
  if (has("[unused9]系统：[unused10]")) return "pangu-embedded";
  if (has("<|begin|>") && has("<|end|>") && has("<|content|>")) return "solar-open";
  return "";
}

// The string literals inside {{ }} and {% %} blocks of a Jinja template,
// with Python-style escapes decoded.
std::vector<std::string> JinjaStringLiterals(std::string_view t) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i + 1 < t.size()) {
    if (t[i] != '{' || (t[i + 1] != '{' && t[i + 1] != '%')) {
      ++i;
      continue;
    }
    const std::string_view close = t[i + 1] == '{' ? "}}" : "%}";
    i += 2;
    while (i < t.size() && t.compare(i, 2, close) != 0) {
      const char q = t[i];
      if (q != '\'' && q != '"') {
        ++i;
        continue;
      }
      std::string lit;
      ++i;
      while (i < t.size() && t[i] != q) {
        if (t[i] == '\\' && i + 1 < t.size()) {
          const char e = t[i + 1];
          switch (e) {
            case 'n':
              lit += '\n';
              break;
            case 't':
              lit += '\t';
              break;
            case 'r':
              lit += '\r';
              break;
            case '\\':
              lit += '\\';
              break;
            case '\'':
              lit += '\'';
              break;
            case '"':
              lit += '"';
              break;
            default:
              lit += '\\';
              lit += e;
              break;
          }
          i += 2;
        } else {
          lit += t[i++];
        }
      }
      ++i;  // closing quote
      out.push_back(std::move(lit));
    }
    i += 2;
  }
  return out;
}

// The system turn a ChatML template emits by itself, e.g. SmolLM2's
// '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n'.
std::string ChatMlDefaultSystem(std::string_view tmpl) {
  constexpr std::string_view kBegin = "<|im_start|>system\n";
  constexpr std::string_view kEnd = "<|im_end|>";
  for (const std::string& lit : JinjaStringLiterals(tmpl)) {
    if (lit.rfind(kBegin, 0) != 0) continue;
    std::string_view body(lit);
    body.remove_prefix(kBegin.size());
    if (!body.empty() && body.back() == '\n') body.remove_suffix(1);
    if (body.size() < kEnd.size() || body.substr(body.size() - kEnd.size()) != kEnd) continue;
    body.remove_suffix(kEnd.size());
    if (body.find("<|im_") != std::string_view::npos) continue;  // not one plain turn
    return std::string(body);
  }
  return std::string();
}

// llama.cpp's trim(): ASCII whitespace at both ends.
std::string Trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

}  // namespace

Result<std::unique_ptr<ChatTemplate>> ChatTemplate::Create(std::string_view tmpl) {
  const std::string_view name = DetectFamilyName(tmpl);
  if (name.empty()) {
    return Status::Unsupported(
        "chat template not recognized (llama.cpp would not recognize it "
        "either); use ChatML or a supported family");
  }
  for (const FamilyName& f : kSupported) {
    if (f.name != name) continue;
    std::string system = f.family == Family::kChatMl ? ChatMlDefaultSystem(tmpl) : "";
    return std::unique_ptr<ChatTemplate>(new ChatTemplate(f.family, std::move(system)));
  }
  return Status::Unsupported("chat template family '" + std::string(name) +
                             "' (as llama.cpp detects it) is not supported; supported: chatml, "
                             "llama3, llama2 and mistral variants");
}

std::unique_ptr<ChatTemplate> ChatTemplate::ChatMl(std::string default_system_prompt) {
  return std::unique_ptr<ChatTemplate>(
      new ChatTemplate(Family::kChatMl, std::move(default_system_prompt)));
}

std::string_view ChatTemplate::name() const {
  for (const FamilyName& f : kSupported) {
    if (f.family == family_) return f.name;
  }
  return "";
}

std::string_view ChatTemplate::assistant_end() const {
  switch (family_) {
    case Family::kChatMl:
      return "<|im_end|>\n";
    case Family::kLlama3:
      return "<|eot_id|>";
    default:
      return "</s>";
  }
}

Result<std::string> ChatTemplate::Render(std::span<const ChatMessage> messages,
                                         bool add_generation_prompt) const {
  return RenderImpl(messages, add_generation_prompt, /*continuation=*/false);
}

Result<std::string> ChatTemplate::RenderAppend(std::span<const ChatMessage> new_messages,
                                               bool add_generation_prompt) const {
  return RenderImpl(new_messages, add_generation_prompt, /*continuation=*/true);
}

Result<std::string> ChatTemplate::RenderImpl(std::span<const ChatMessage> messages,
                                             bool add_generation_prompt, bool continuation) const {
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].role.empty()) {
      return Status::InvalidArgument("chat message " + std::to_string(i) + " has no role");
    }
  }
  std::string out;
  switch (family_) {
    case Family::kChatMl:
      if (!continuation && !messages.empty() && messages[0].role != "system" &&
          !default_system_.empty()) {
        out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
      }
      for (const ChatMessage& m : messages) {
        out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;

    case Family::kLlama3:
      for (const ChatMessage& m : messages) {
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + Trim(m.content) +
               "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;

    case Family::kLlama2:
    case Family::kLlama2Sys:
    case Family::kLlama2SysBos:
    case Family::kLlama2SysStrip: {
      const bool system_block = family_ != Family::kLlama2;
      const bool bos_inside = family_ == Family::kLlama2SysBos;
      const bool strip = family_ == Family::kLlama2SysStrip;
      // The opening [INST] of a conversation comes without <s>: the tokenizer
      // adds BOS. A continuation opens a new turn after "</s>".
      bool inside_turn = !continuation;
      if (!continuation) out += "[INST] ";
      for (const ChatMessage& m : messages) {
        const std::string content = strip ? Trim(m.content) : m.content;
        if (!inside_turn) {
          inside_turn = true;
          out += bos_inside ? "<s>[INST] " : "[INST] ";
        }
        if (m.role == "system") {
          out += system_block ? "<<SYS>>\n" + content + "\n<</SYS>>\n\n" : content + "\n";
        } else if (m.role == "user") {
          out += content + " [/INST]";
        } else {
          out += content + "</s>";
          inside_turn = false;
        }
      }
      break;
    }

    case Family::kMistralV1:
    case Family::kMistralV3:
    case Family::kMistralV3Tekken: {
      const std::string lead = family_ == Family::kMistralV1 ? " " : "";
      const std::string trail = family_ == Family::kMistralV3Tekken ? "" : " ";
      const bool trim_assistant = family_ == Family::kMistralV3;
      bool inside_turn = false;
      for (const ChatMessage& m : messages) {
        if (!inside_turn) {
          out += lead + "[INST]" + trail;
          inside_turn = true;
        }
        if (m.role == "system") {
          out += m.content + "\n\n";
        } else if (m.role == "user") {
          out += m.content + lead + "[/INST]";
        } else {
          out += trail + (trim_assistant ? Trim(m.content) : m.content) + "</s>";
          inside_turn = false;
        }
      }
      break;
    }

    case Family::kMistralV7:
    case Family::kMistralV7Tekken: {
      const std::string sp = family_ == Family::kMistralV7 ? " " : "";
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += "[SYSTEM_PROMPT]" + sp + m.content + "[/SYSTEM_PROMPT]";
        } else if (m.role == "user") {
          out += "[INST]" + sp + m.content + "[/INST]";
        } else {
          out += sp + m.content + "</s>";
        }
      }
      break;
    }
  }
  return out;
}

Result<std::unique_ptr<ChatTemplate>> ChatTemplateFromGguf(const GgufFile& gguf) {
  if (!gguf.Has("tokenizer.chat_template")) return ChatTemplate::ChatMl();
  MNEMO_ASSIGN_OR_RETURN(std::string tmpl, gguf.GetString("tokenizer.chat_template"));
  return ChatTemplate::Create(tmpl);
}

}  // namespace mnemo::model
