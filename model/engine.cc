// The synchronous generation loop over one sequence.
#include "model/engine.h"

#include <chrono>

namespace mnemo::model {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

Result<std::unique_ptr<Engine>> Engine::Open(const EngineOptions& options) {
  std::unique_ptr<Engine> e(new Engine());
  e->options_ = options;
  if (options.page_tokens <= 0 || options.page_tokens > 4096)
    return Status::InvalidArgument("page_tokens must be in [1, 4096]");
  if (options.prefill_chunk <= 0) return Status::InvalidArgument("prefill_chunk must be > 0");
  e->backend_ = kernels::MakeCpuBackend(options.threads, options.math);
  MNEMO_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(options.model_path));
  e->file_ = std::move(file);
  MNEMO_ASSIGN_OR_RETURN(e->model_, LlamaModel::Load(e->file_, e->backend_.get()));
  MNEMO_ASSIGN_OR_RETURN(TokenizerConfig tc, TokenizerConfigFromGguf(*e->file_));
  MNEMO_ASSIGN_OR_RETURN(e->tokenizer_, Tokenizer::Create(std::move(tc)));
  Result<std::unique_ptr<ChatTemplate>> chat = ChatTemplateFromGguf(*e->file_);
  if (chat.ok()) {
    e->chat_ = std::move(chat).value();
  } else if (chat.status().code() == StatusCode::kUnsupported) {
    // Raw prompts still work; chat requests use ChatML, the most common
    // format of instruction-tuned GGUFs, rather than refusing the model.
    e->chat_ = ChatTemplate::ChatMl();
  } else {
    return chat.status();
  }
  const LlamaConfig& c = e->model_->config();
  e->max_context_ = options.max_context > 0 ? options.max_context : c.context_length;
  MNEMO_ASSIGN_OR_RETURN(e->pool_, attention::PagePool::Create(
                                       e->backend_.get(), c.KvLayoutFor(options.page_tokens),
                                       options.kv_budget_bytes));
  if (options.kv_reserve_bytes > 0)
    MNEMO_RETURN_IF_ERROR(e->pool_->Reserve(options.kv_reserve_bytes).WithContext("reserving the KV pool"));
  e->kv_ = std::make_unique<attention::KvCache>(e->pool_.get(), c.n_layers);
  return e;
}

std::vector<int32_t> Engine::TokenizePrompt(std::string_view text) const {
  return tokenizer_->Encode(text, /*add_special=*/true, /*parse_special=*/true);
}

Result<std::vector<int32_t>> Engine::TokenizeChat(std::string_view user_message) const {
  std::vector<ChatMessage> msgs = {{"user", std::string(user_message)}};
  MNEMO_ASSIGN_OR_RETURN(std::string text, chat_->Render(msgs, /*add_generation_prompt=*/true));
  // The rendered template carries its own special tokens: no extra BOS
  // unless the model asks for one.
  return tokenizer_->Encode(text, /*add_special=*/true, /*parse_special=*/true);
}

Result<std::vector<float>> Engine::Prefill(attention::SeqId seq, std::span<const int32_t> tokens) {
  MNEMO_ASSIGN_OR_RETURN(int64_t len, kv_->Length(seq));
  if (len + static_cast<int64_t>(tokens.size()) > max_context_)
    return Status::OutOfRange("prompt of " + std::to_string(tokens.size()) + " tokens after " +
                              std::to_string(len) + " exceeds the context limit of " +
                              std::to_string(max_context_) + " tokens");
  std::vector<float> logits;
  for (size_t i = 0; i < tokens.size(); i += options_.prefill_chunk) {
    const size_t n = std::min<size_t>(options_.prefill_chunk, tokens.size() - i);
    BatchSeq b{seq, tokens.subspan(i, n), false};
    MNEMO_RETURN_IF_ERROR(model_->Forward({&b, 1}, kv_.get(), &logits));
  }
  return logits;
}

Result<GenerateResult> Engine::Generate(attention::SeqId seq, std::span<const int32_t> prompt,
                                        const GenerateOptions& options) {
  MNEMO_RETURN_IF_ERROR(options.sampling.Validate());
  if (prompt.empty()) return Status::InvalidArgument("empty prompt");
  if (options.max_tokens < 0) return Status::InvalidArgument("max_tokens must be >= 0");
  MNEMO_ASSIGN_OR_RETURN(StopMatcher stop, StopMatcher::Create(options.stop));
  Sampler sampler(options.sampling, model_->config().vocab_size);

  GenerateResult r;
  r.prompt_tokens = static_cast<int64_t>(prompt.size());
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  const double t0 = Now();
  MNEMO_ASSIGN_OR_RETURN(std::vector<float> logits, Prefill(seq, prompt));
  const double t1 = Now();
  r.prefill_seconds = t1 - t0;
  double t_first = 0;
  std::string piece;
  r.finish = FinishReason::kLength;
  for (int32_t i = 0; i < options.max_tokens; ++i) {
    const int32_t tok = sampler.Sample(logits, history);
    if (i == 0) {
      t_first = Now();
      r.ttft_seconds = t_first - t0;
    }
    r.tokens.push_back(tok);
    history.push_back(tok);
    if (tokenizer_->IsEog(tok)) {
      r.finish = FinishReason::kEos;
      break;
    }
    piece.clear();
    const bool stopped = stop.Feed(tokenizer_->TokenToPiece(tok, /*render_special=*/false), &piece);
    r.text += piece;
    if (options.on_token && !options.on_token(tok, piece)) {
      r.finish = FinishReason::kCancelled;
      break;
    }
    if (stopped) {
      r.finish = FinishReason::kStop;
      break;
    }
    if (i + 1 == options.max_tokens) break;
    MNEMO_ASSIGN_OR_RETURN(int64_t len, kv_->Length(seq));
    if (len + 1 > max_context_) {
      r.finish = FinishReason::kContextFull;
      break;
    }
    BatchSeq b{seq, std::span<const int32_t>(&r.tokens.back(), 1), false};
    MNEMO_RETURN_IF_ERROR(model_->Forward({&b, 1}, kv_.get(), &logits));
  }
  if (r.finish != FinishReason::kStop) {
    piece.clear();
    stop.Flush(&piece);
    r.text += piece;
    if (!piece.empty() && options.on_token) options.on_token(-1, piece);
  }
  r.decode_seconds = r.tokens.empty() ? 0 : Now() - t_first;
  return r;
}

}  // namespace mnemo::model
