// Engine: a loaded model with its tokenizer, chat template, compute backend
// and paged KV cache, plus a synchronous single-sequence generation loop
// (used by mnemo-bench and tests; the daemon's scheduler drives
// LlamaModel::Forward directly to batch many sequences).
//
// Thread-compatible: one thread uses an Engine at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "attention/kv_cache.h"
#include "common/status.h"
#include "kernels/backend.h"
#include "model/chat_template.h"
#include "model/gguf.h"
#include "model/llama.h"
#include "model/sampler.h"
#include "model/stop.h"
#include "model/tokenizer.h"

namespace mnemo::model {

struct EngineOptions {
  std::string model_path;
  int threads = 0;              // 0: all cores
  kernels::MathMode math = kernels::MathMode::kExact;
  int32_t page_tokens = kernels::kDefaultPageTokens;
  size_t kv_budget_bytes = size_t{1} << 30;
  // Bytes of the KV budget allocated and backed by memory at Open (see
  // PagePool::Reserve); 0: as pages are first used.
  size_t kv_reserve_bytes = 0;
  int32_t prefill_chunk = 512;  // tokens per forward step while prefilling
  int32_t max_context = 0;      // 0: the model's trained context
};

struct GenerateOptions {
  SamplingParams sampling;
  int32_t max_tokens = 128;
  std::vector<std::string> stop;
  // Called with each piece of text as it becomes safe to show, and the token
  // that produced it; returning false cancels.
  std::function<bool(int32_t token, std::string_view text)> on_token;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated (including a final EOG token)
  std::string text;             // streamed text (stop string excluded)
  FinishReason finish = FinishReason::kLength;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;    // after the first generated token
  double ttft_seconds = 0;      // prompt submitted to first token sampled
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> Open(const EngineOptions& options);

  LlamaModel& model() { return *model_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const ChatTemplate& chat_template() const { return *chat_; }
  attention::KvCache& kv() { return *kv_; }
  attention::PagePool& pool() { return *pool_; }
  kernels::Backend& backend() { return *backend_; }
  int32_t max_context() const { return max_context_; }

  // Tokenizes a raw prompt as llama.cpp does for this model (BOS as the file
  // says, special tokens parsed).
  std::vector<int32_t> TokenizePrompt(std::string_view text) const;
  // Renders one user message with the chat template (generation prompt
  // appended) and tokenizes it.
  Result<std::vector<int32_t>> TokenizeChat(std::string_view user_message) const;

  // Appends `prompt` to `seq` (prefilled in chunks), then samples up to
  // max_tokens tokens. Generated tokens are appended to the sequence too.
  Result<GenerateResult> Generate(attention::SeqId seq, std::span<const int32_t> prompt,
                                  const GenerateOptions& options);

  // Appends tokens to `seq` in chunks; returns the last token's logits.
  Result<std::vector<float>> Prefill(attention::SeqId seq, std::span<const int32_t> tokens);

 private:
  Engine() = default;

  EngineOptions options_;
  int32_t max_context_ = 0;
  std::unique_ptr<kernels::Backend> backend_;
  std::shared_ptr<GgufFile> file_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ChatTemplate> chat_;
  std::unique_ptr<attention::PagePool> pool_;
  std::unique_ptr<attention::KvCache> kv_;
};

}  // namespace mnemo::model
