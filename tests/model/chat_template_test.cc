// Chat templates: family detection as llama.cpp does it, rendering checked
// against llama.cpp's own expected outputs (tests/test-chat-template.cpp of
// the vendored llama.cpp), SmolLM2's default system prompt, and continuation
// rendering for sessions that grow turn by turn.
#include "model/chat_template.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "model/gguf.h"
#include "model/gguf_writer.h"
#include "model/tokenizer.h"

namespace mnemo::model {
namespace {

using Family = ChatTemplate::Family;
using Msgs = std::vector<ChatMessage>;

// SmolLM2-135M-Instruct's tokenizer.chat_template, verbatim.
constexpr char kSmolLmTemplate[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\n' }}{% endif %}";
constexpr char kSmolLmSystem[] =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

// llama.cpp's test conversation.
const Msgs kConversation = {
    {"system", "You are a helpful assistant"},
    {"user", "Hello"},
    {"assistant", "Hi there"},
    {"user", "Who are you"},
    {"assistant", "   I am an assistant   "},
    {"user", "Another question"},
};

struct LlamaCppCase {
  const char* name;
  const char* tmpl;
  const char* expected;  // with add_generation_prompt
};

// From llama.cpp's tests/test-chat-template.cpp (families rendered here).
const LlamaCppCase kLlamaCppCases[] = {
    {"teknium/OpenHermes-2.5-Mistral-7B",
     "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
     "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
     "'<|im_start|>assistant\\n' }}{% endif %}",
     "<|im_start|>system\nYou are a helpful "
     "assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi "
     "there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n   I am an "
     "assistant   <|im_end|>\n<|im_start|>user\nAnother "
     "question<|im_end|>\n<|im_start|>assistant\n"},
    {"mistralai/Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 without a system prompt)",
     "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
     "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
     "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ "
     "'[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
     "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
     "are supported!') }}{% endif %}{% endfor %}",
     "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I "
     "am an assistant   </s>[INST] Another question [/INST]"},
    {"TheBloke/FusionNet_34Bx2_MoE-AWQ",
     "{%- for idx in range(0, messages|length) -%}\n{%- if messages[idx]['role'] == 'user' "
     "-%}\n{%- if idx > 1 -%}\n{{- bos_token + '[INST] ' + messages[idx]['content'] + ' [/INST]' "
     "-}}\n{%- else -%}\n{{- messages[idx]['content'] + ' [/INST]' -}}\n{%- endif -%}\n{% elif "
     "messages[idx]['role'] == 'system' %}\n{{- '[INST] <<SYS>>\\n' + messages[idx]['content'] + "
     "'\\n<</SYS>>\\n\\n' -}}\n{%- elif messages[idx]['role'] == 'assistant' -%}\n{{- ' '  + "
     "messages[idx]['content'] + ' ' + eos_token -}}\n{% endif %}\n{% endfor %}",
     "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s><s>[INST] "
     "Who are you [/INST]   I am an assistant   </s><s>[INST] Another question [/INST]"},
    {"bofenghuang/vigogne-2-70b-chat",
     "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] "
     "%}{% set system_message = messages[0]['content'] %}{% elif true == true and not '<<SYS>>' in "
     "messages[0]['content'] %}{% set loop_messages = messages %}{% set system_message = 'Vous "
     "êtes Vigogne, un assistant IA créé par Zaion Lab. Vous suivez extrêmement bien les "
     "instructions. Aidez autant que vous le pouvez.' %}{% else %}{% set loop_messages = messages "
     "%}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
     "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
     "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 "
     "and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
     "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] "
     "%}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' "
     "}}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + content.strip() + "
     "'\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' "
     "' + eos_token }}{% endif %}{% endfor %}",
     "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who "
     "are you [/INST]I am an assistant</s>[INST] Another question [/INST]"},
    {"Llama-3",
     "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
     "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
     "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif "
     "%}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}",
     "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
     "assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_"
     "id|>assistant<|end_header_id|>\n\nHi "
     "there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are "
     "you<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am an "
     "assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother "
     "question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system prompt)",
     "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = "
     "messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- "
     "set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in "
     "loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n      "
     "  {{- raise_exception('After the optional system message, conversation roles must alternate "
     "user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == "
     "'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' "
     "[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else "
     "%}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n  "
     "  {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + "
     "eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are "
     "supported, with the exception of an initial optional system message!') }}\n    {%- endif "
     "%}\n{%- endfor %}\n",
     " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST] "
     "   I am an assistant   </s> [INST] Another question [/INST]"},
    {"Mistral-Large-Instruct-2407 (mistralai 'v3' template; modified to have system prompt at "
     "start)",
     "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = "
     "messages[0][\"content\"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    "
     "{%- set loop_messages = messages %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- "
     "set tools = none %}\n{%- endif %}\n{%- set user_messages = loop_messages | "
     "selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n{#- This block checks for "
     "alternating user/assistant messages, skipping tool calling messages #}\n{%- set ns = "
     "namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n    {%- if not "
     "(message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is "
     "defined and message.tool_calls is not none)) %}\n        {%- if (message[\"role\"] == "
     "\"user\") != (ns.index % 2 == 0) %}\n            {{- raise_exception(\"After the optional "
     "system message, conversation roles must alternate user/assistant/user/assistant/...\") }}\n  "
     "      {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor "
     "%}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == "
     "\"user\" %}\n        {%- if tools is not none and (message == user_messages[-1]) %}\n        "
     "    {{- \"[AVAILABLE_TOOLS] [\" }}\n            {%- for tool in tools %}\n                "
     "{%- set tool = tool.function %}\n                {{- '{\"type\": \"function\", \"function\": "
     "{' }}\n                {%- for key, val in tool.items() if key != \"return\" %}\n            "
     "        {%- if val is string %}\n                        {{- '\"' + key + '\": \"' + val + "
     "'\"' }}\n                    {%- else %}\n                        {{- '\"' + key + '\": ' + "
     "val|tojson }}\n                    {%- endif %}\n                    {%- if not loop.last "
     "%}\n                        {{- \", \" }}\n                    {%- endif %}\n                "
     "{%- endfor %}\n                {{- \"}}\" }}\n                {%- if not loop.last %}\n      "
     "              {{- \", \" }}\n                {%- else %}\n                    {{- \"]\" }}\n "
     "               {%- endif %}\n            {%- endfor %}\n            {{- "
     "\"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n        {%- if loop.last and "
     "system_message is defined %}\n            {{- \"[INST] \" + system_message + \"\\n\\n\" + "
     "message[\"content\"] + \"[/INST]\" }}\n        {%- else %}\n            {{- \"[INST] \" + "
     "message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n    {%- elif message.tool_calls "
     "is defined and message.tool_calls is not none %}\n        {{- \"[TOOL_CALLS] [\" }}\n        "
     "{%- for tool_call in message.tool_calls %}\n            {%- set out = "
     "tool_call.function|tojson %}\n            {{- out[:-1] }}\n            {%- if not "
     "tool_call.id is defined or tool_call.id|length != 9 %}\n                {{- "
     "raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n        "
     "    {%- endif %}\n            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n            {%- "
     "if not loop.last %}\n                {{- \", \" }}\n            {%- else %}\n                "
     "{{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n    {%- elif "
     "message[\"role\"] == \"assistant\" %}\n        {{- \" \" + message[\"content\"]|trim + "
     "eos_token}}\n    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == "
     "\"tool\" %}\n        {%- if message.content is defined and message.content.content is "
     "defined %}\n            {%- set content = message.content.content %}\n        {%- else %}\n  "
     "          {%- set content = message.content %}\n        {%- endif %}\n        {{- "
     "'[TOOL_RESULTS] {\"content\": ' + content|string + \", \" }}\n        {%- if not "
     "message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n            {{- "
     "raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n        "
     "{%- endif %}\n        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' "
     "}}\n    {%- else %}\n        {{- raise_exception(\"Only user and assistant roles are "
     "supported, with the exception of an initial optional system message!\") }}\n    {%- endif "
     "%}\n{%- endfor %}\n",
     "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST] I "
     "am an assistant</s>[INST] Another question[/INST]"},
    {"Mistral-Nemo-Instruct-2407 (mistralai 'v3-tekken' template; modified to have system prompt "
     "at start)",
     "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = "
     "messages[0][\"content\"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    "
     "{%- set loop_messages = messages %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- "
     "set tools = none %}\n{%- endif %}\n{%- set user_messages = loop_messages | "
     "selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n{#- This block checks for "
     "alternating user/assistant messages, skipping tool calling messages #}\n{%- set ns = "
     "namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n    {%- if not "
     "(message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is "
     "defined and message.tool_calls is not none)) %}\n        {%- if (message[\"role\"] == "
     "\"user\") != (ns.index % 2 == 0) %}\n            {{- raise_exception(\"After the optional "
     "system message, conversation roles must alternate user/assistant/user/assistant/...\") }}\n  "
     "      {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor "
     "%}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == "
     "\"user\" %}\n        {%- if tools is not none and (message == user_messages[-1]) %}\n        "
     "    {{- \"[AVAILABLE_TOOLS][\" }}\n            {%- for tool in tools %}\n                {%- "
     "set tool = tool.function %}\n                {{- '{\"type\": \"function\", \"function\": {' "
     "}}\n                {%- for key, val in tool.items() if key != \"return\" %}\n               "
     "     {%- if val is string %}\n                        {{- '\"' + key + '\": \"' + val + '\"' "
     "}}\n                    {%- else %}\n                        {{- '\"' + key + '\": ' + "
     "val|tojson }}\n                    {%- endif %}\n                    {%- if not loop.last "
     "%}\n                        {{- \", \" }}\n                    {%- endif %}\n                "
     "{%- endfor %}\n                {{- \"}}\" }}\n                {%- if not loop.last %}\n      "
     "              {{- \", \" }}\n                {%- else %}\n                    {{- \"]\" }}\n "
     "               {%- endif %}\n            {%- endfor %}\n            {{- "
     "\"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n        {%- if loop.last and "
     "system_message is defined %}\n            {{- \"[INST]\" + system_message + \"\\n\\n\" + "
     "message[\"content\"] + \"[/INST]\" }}\n        {%- else %}\n            {{- \"[INST]\" + "
     "message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n    {%- elif "
     "(message.tool_calls is defined and message.tool_calls is not none) %}\n        {{- "
     "\"[TOOL_CALLS][\" }}\n        {%- for tool_call in message.tool_calls %}\n            {%- "
     "set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n            {%- if not "
     "tool_call.id is defined or tool_call.id|length != 9 %}\n                {{- "
     "raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n        "
     "    {%- endif %}\n            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n            {%- "
     "if not loop.last %}\n                {{- \", \" }}\n            {%- else %}\n                "
     "{{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n    {%- elif "
     "message[\"role\"] == \"assistant\" %}\n        {{- message[\"content\"] + eos_token}}\n    "
     "{%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n        "
     "{%- if message.content is defined and message.content.content is defined %}\n            {%- "
     "set content = message.content.content %}\n        {%- else %}\n            {%- set content = "
     "message.content %}\n        {%- endif %}\n        {{- '[TOOL_RESULTS]{\"content\": ' + "
     "content|string + \", \" }}\n        {%- if not message.tool_call_id is defined or "
     "message.tool_call_id|length != 9 %}\n            {{- raise_exception(\"Tool call IDs should "
     "be alphanumeric strings with length 9!\") }}\n        {%- endif %}\n        {{- "
     "'\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n    {%- else %}\n        "
     "{{- raise_exception(\"Only user and assistant roles are supported, with the exception of an "
     "initial optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n",
     "[INST]You are a helpful assistant\n\nHello[/INST]Hi there</s>[INST]Who are you[/INST]   I am "
     "an assistant   </s>[INST]Another question[/INST]"},
    {"mistralai/Mistral-Large-Instruct-2411 (mistralai 'v7' template)",
     "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
     "message['content'] + '[/INST]' }}{% elif message['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' "
     "+ message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'assistant' %}{{ ' ' "
     "+ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user, system and "
     "assistant roles are supported!') }}{% endif %}{% endfor %}",
     "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi "
     "there</s>[INST] Who are you[/INST]    I am an assistant   </s>[INST] Another "
     "question[/INST]"},
};

TEST(ChatTemplate, MatchesLlamaCppExpectedOutputs) {
  for (const LlamaCppCase& c : kLlamaCppCases) {
    auto t = ChatTemplate::Create(c.tmpl);
    ASSERT_TRUE(t.ok()) << c.name << ": " << t.status().ToString();
    auto out = (*t)->Render(kConversation, /*add_generation_prompt=*/true);
    ASSERT_TRUE(out.ok()) << c.name;
    EXPECT_EQ(*out, c.expected) << c.name << " (" << (*t)->name() << ")";
    EXPECT_TRUE((*t)->default_system_prompt().empty()) << c.name;
  }
}

TEST(ChatTemplate, DetectsFamiliesLikeLlamaCpp) {
  auto family = [](std::string_view tmpl) {
    auto t = ChatTemplate::Create(tmpl);
    EXPECT_TRUE(t.ok()) << tmpl;
    return t.ok() ? (*t)->family() : Family::kChatMl;
  };
  EXPECT_EQ(family(kSmolLmTemplate), Family::kChatMl);
  EXPECT_EQ(family("chatml"), Family::kChatMl);
  EXPECT_EQ(family("llama3"), Family::kLlama3);
  EXPECT_EQ(family("mistral-v7-tekken"), Family::kMistralV7Tekken);
  EXPECT_EQ(family("{{ '<|start_header_id|>' + m + '<|end_header_id|>' }}"), Family::kLlama3);
  EXPECT_EQ(family("[INST] {{ x }} [/INST]"), Family::kLlama2);
  EXPECT_EQ(family("[INST] <<SYS>> {{ x }}"), Family::kLlama2Sys);
  EXPECT_EQ(family("{{ bos_token + '[INST] ' }} <<SYS>>"), Family::kLlama2SysBos);
  EXPECT_EQ(family("[INST] {{ content.strip() }}"), Family::kLlama2SysStrip);
  EXPECT_EQ(family("mistral anything"), Family::kLlama2);
  EXPECT_EQ(family("[SYSTEM_PROMPT] [INST]"), Family::kMistralV7);
}

TEST(ChatTemplate, UnknownOrUnsupportedTemplatesAreErrors) {
  auto st = ChatTemplate::Create("INVALID TEMPLATE").status();
  EXPECT_EQ(st.code(), StatusCode::kUnsupported);
  // Known to llama.cpp, not rendered here: the message names the family.
  st = ChatTemplate::Create("{{ '<start_of_turn>' + role }}").status();
  EXPECT_EQ(st.code(), StatusCode::kUnsupported);
  EXPECT_NE(st.message().find("gemma"), std::string_view::npos) << st.ToString();
  st = ChatTemplate::Create("<|im_start|>x<|im_sep|>").status();
  EXPECT_NE(st.message().find("phi4"), std::string_view::npos) << st.ToString();
  st = ChatTemplate::Create("<|im_start|><end_of_utterance>").status();  // SmolVLM: not ChatML
  EXPECT_NE(st.message().find("smolvlm"), std::string_view::npos) << st.ToString();
}

TEST(ChatTemplate, SmolLmDefaultSystemPromptComesFromTheTemplate) {
  auto t = ChatTemplate::Create(kSmolLmTemplate);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->default_system_prompt(), kSmolLmSystem);
  EXPECT_EQ(*(*t)->Render(Msgs{{"user", "Hi"}}, true),
            std::string("<|im_start|>system\n") + kSmolLmSystem +
                "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  // A conversation that brings its own system message keeps only that one.
  EXPECT_EQ(*(*t)->Render(Msgs{{"system", "Be brief."}, {"user", "Hi"}}, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(*(*t)->Render(Msgs{}, true), "<|im_start|>assistant\n");
}

TEST(ChatTemplate, DefaultSystemPromptWithEscapedNewlines) {
  // Qwen2.5 style: the template text carries "\\n" escapes inside the literal.
  auto t = ChatTemplate::Create(
      "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
      "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are "
      "Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif "
      "%}");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->default_system_prompt(),
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  auto plain = ChatTemplate::Create("chatml");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->default_system_prompt(), "");
}

TEST(ChatTemplate, FallbackChatMl) {
  auto t = ChatTemplate::ChatMl();
  EXPECT_EQ(t->family(), Family::kChatMl);
  EXPECT_EQ(*t->Render(Msgs{{"user", "x"}}, false), "<|im_start|>user\nx<|im_end|>\n");
  auto s = ChatTemplate::ChatMl("Sys");
  EXPECT_EQ(*s->Render(Msgs{{"user", "x"}}, false),
            "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nx<|im_end|>\n");
}

TEST(ChatTemplate, RejectsMessagesWithoutRole) {
  auto t = ChatTemplate::ChatMl();
  EXPECT_EQ(t->Render(Msgs{{"", "x"}}, false).status().code(), StatusCode::kInvalidArgument);
}

// A session grows by whole turns: rendering only the new messages must give
// the same text as rendering the whole conversation again.
TEST(ChatTemplate, AppendContinuesAConversation) {
  std::vector<std::unique_ptr<ChatTemplate>> templates;
  templates.push_back(std::move(ChatTemplate::Create(kSmolLmTemplate)).value());
  for (const LlamaCppCase& c : kLlamaCppCases) {
    templates.push_back(std::move(ChatTemplate::Create(c.tmpl)).value());
  }
  const Msgs history = {{"user", "Hello"}, {"assistant", "Hi there"}};
  const Msgs history_sys = {{"system", "S"}, {"user", "Hello"}, {"assistant", "Hi there"}};
  const Msgs next = {{"user", "Who are you"}};
  const Msgs next_two = {{"user", "Who are you"}, {"assistant", "Me"}, {"user", "Ok"}};
  for (const auto& t : templates) {
    for (const Msgs* h : {&history, &history_sys}) {
      for (const Msgs* n : {&next, &next_two}) {
        for (bool gen : {false, true}) {
          Msgs all = *h;
          all.insert(all.end(), n->begin(), n->end());
          const std::string whole = *t->Render(all, gen);
          const std::string prefix = *t->Render(*h, false);
          const std::string tail = *t->RenderAppend(*n, gen);
          EXPECT_EQ(prefix + tail, whole) << t->name();
          // The history's rendering ends with the assistant turn's closing text.
          const std::string_view end = t->assistant_end();
          EXPECT_EQ(prefix.substr(prefix.size() - end.size()), end) << t->name();
        }
      }
    }
  }
  auto smol = ChatTemplate::Create(kSmolLmTemplate);
  EXPECT_EQ(*(*smol)->RenderAppend(next, true),
            "<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, FromGguf) {
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  auto f = GgufFile::FromBytes(w.Serialize());
  ASSERT_TRUE(f.ok());
  auto none = ChatTemplateFromGguf(**f);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ((*none)->family(), Family::kChatMl);
  EXPECT_EQ((*none)->default_system_prompt(), "");

  w.SetString("tokenizer.chat_template", kSmolLmTemplate);
  f = GgufFile::FromBytes(w.Serialize());
  ASSERT_TRUE(f.ok());
  auto smol = ChatTemplateFromGguf(**f);
  ASSERT_TRUE(smol.ok());
  EXPECT_EQ((*smol)->default_system_prompt(), kSmolLmSystem);

  GgufWriter bad;
  bad.SetString("tokenizer.chat_template", "{{ something nobody knows }}");
  f = GgufFile::FromBytes(bad.Serialize());
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(ChatTemplateFromGguf(**f).status().code(), StatusCode::kUnsupported);
}

TEST(ChatTemplate, RealSmolLmModel) {
  const std::string path =
      std::string(MNEMO_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " absent (scripts/fetch-model)";
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(*(*f)->GetString("tokenizer.chat_template"), kSmolLmTemplate);
  auto t = ChatTemplateFromGguf(**f);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->family(), Family::kChatMl);
  EXPECT_EQ((*t)->default_system_prompt(), kSmolLmSystem);
}

// llama.cpp's greedy reference prompts (tests/data/ref/greedy.json) are the
// SmolLM2 template applied to one user message: the rendering, its token ids
// and the end-of-generation ids must all agree.
TEST(ChatTemplate, MatchesGreedyReferencePrompts) {
  const std::string root = MNEMO_SOURCE_DIR;
  const std::string model = root + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  const std::string ref = root + "/tests/data/ref/greedy.json";
  if (!std::filesystem::exists(model)) GTEST_SKIP() << model << " absent";
  std::ifstream in(ref);
  ASSERT_TRUE(in.good()) << ref << " missing (scripts/ref/make_reference.sh writes it)";
  const nlohmann::json doc = nlohmann::json::parse(in);
  auto f = GgufFile::Open(model);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  auto chat = ChatTemplateFromGguf(**f);
  ASSERT_TRUE(chat.ok()) << chat.status().ToString();
  auto cfg = TokenizerConfigFromGguf(**f);
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  auto tok = Tokenizer::Create(std::move(*cfg));
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*chat)->default_system_prompt(), doc.at("system_prompt").get<std::string>());
  EXPECT_EQ((*tok)->eog_ids(), doc.at("eog_ids").get<std::vector<int32_t>>());
  int n = 0;
  for (const nlohmann::json& c : doc.at("cases")) {
    const Msgs msgs = {{"user", c.at("user").get<std::string>()}};
    auto prompt = (*chat)->Render(msgs, /*add_generation_prompt=*/true);
    ASSERT_TRUE(prompt.ok());
    EXPECT_EQ(*prompt, c.at("prompt").get<std::string>()) << c.at("name");
    EXPECT_EQ((*tok)->Encode(*prompt, /*add_special=*/true, /*parse_special=*/true),
              c.at("prompt_ids").get<std::vector<int32_t>>())
        << c.at("name");
    ++n;
  }
  EXPECT_GT(n, 0);
}

}  // namespace
}  // namespace mnemo::model
