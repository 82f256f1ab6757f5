// mnemo-bench synth: writes a session of N tokens straight into a mnemod
// data directory, without prefilling it, so that sessions of 100k to 1M
// tokens (~23 GB of KV for the default model) can be persisted, resumed and
// decoded on a machine that could never prefill them in reasonable time.
//
// Everything goes through the code mnemod runs: its flags and config file
// (ParseDaemonArgs), its engine and storage options (daemon/setup.h), its
// data directory lock, and tiering::TierManager::Persist, turn-sized batch
// by batch, each committed like a real turn. Only the KV values are
// synthetic:
//   - the token history is real token ids: a text tokenized and repeated,
//     rendered with the model's chat template as a user/assistant history,
//     so a later chat message appends to it as to any session;
//   - the KV is deterministic pseudo-random fp16 in the exact T0 page
//     layout, drawn per layer, K/V, head and dimension from the mean and
//     spread that a real prefill of the history's first tokens produces.
// Memory stays bounded by two batches of pages (--turn-tokens), the token
// history (4 bytes a token) and the model, whatever N is.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "bench/bench_util.h"
#include "daemon/config.h"
#include "daemon/setup.h"
#include "model/engine.h"
#include "tiering/page_store.h"
#include "tiering/tier_manager.h"

namespace mnemo::bench {

int CmdSynth(int argc, char** argv);

namespace {

using nlohmann::json;


uint64_t UnixMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

size_t PeakRssBytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<size_t>(ru.ru_maxrss) * 1024;
}

[[noreturn]] void Die(const Status& s) {
  DieAs("mnemo-bench synth", s.ToString(), s.code() == StatusCode::kInvalidArgument ? 2 : 1);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; values beyond the fp16 range saturate to +-65504
// (synthetic KV has no business being infinite).
uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (!(a < 65504.0f)) return sign | 0x7bff;
  if (a < 6.103515625e-05f) {  // subnormal half
    return sign | static_cast<uint16_t>(std::lrint(a / 5.9604644775390625e-08f));
  }
  uint32_t ax = x & 0x7fffffff;
  const uint32_t round = 0xfff + ((ax >> 13) & 1);
  ax += round;
  return sign | static_cast<uint16_t>(((ax >> 23) - 127 + 15) << 10 | ((ax >> 13) & 0x3ff));
}

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The standard normal at the midpoints of 16 equal-probability bins,
// rescaled to unit variance: 4 random bits per value give a bell-shaped,
// zero-mean, unit-spread sample.
constexpr float kNormal16[16] = {-1.8627f, -1.3180f, -1.0100f, -0.7764f, -0.5791f, -0.4013f, -0.2372f, -0.0784f,
                                 0.0784f,  0.2372f,  0.4013f,  0.5791f,  0.7764f,  1.0100f,  1.3180f,  1.8627f};
constexpr float kNormal16Scale = 1.0405f;  // 1 / sqrt(mean of squares above)

struct SynthOptions {
  std::string session;
  uint64_t tokens = 0;
  uint32_t uid = 0;
  uint64_t turn_tokens = 4096;
  uint64_t seed = 1;
  std::string text_file;
  bool json = false;
  uint32_t calibration_tokens = 512;
  daemon::DaemonConfig cfg;
};

uint64_t ParseCount(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const double d = std::strtod(v.c_str(), &end);
  uint64_t mult = 1;
  std::string unit(end ? end : "");
  if (unit == "k" || unit == "K") {
    mult = 1000;
  } else if (unit == "m" || unit == "M") {
    mult = 1000 * 1000;
  } else if (!unit.empty() || end == v.c_str() || !(d >= 0)) {
    Die(Status::InvalidArgument("--" + flag + " expects a count like 300, 100k or 1M, got '" + v + "'"));
  }
  return static_cast<uint64_t>(std::llround(d * static_cast<double>(mult)));
}

// Synth's own flags; everything else goes to mnemod's parser, so the data
// directory, model, page size and budgets mean what they mean to mnemod.
SynthOptions ParseOptions(int argc, char** argv) {
  SynthOptions o;
  o.uid = static_cast<uint32_t>(getuid());
  std::vector<const char*> rest = {"mnemod"};
  bool have_tokens = false;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Die(Status::InvalidArgument(a + " needs a value"));
      return argv[++i];
    };
    if (a == "--session") {
      o.session = value();
    } else if (a == "--tokens") {
      o.tokens = ParseCount("tokens", value());
      have_tokens = true;
    } else if (a == "--uid") {
      o.uid = static_cast<uint32_t>(ParseCount("uid", value()));
    } else if (a == "--turn-tokens") {
      o.turn_tokens = ParseCount("turn-tokens", value());
    } else if (a == "--seed") {
      o.seed = ParseCount("seed", value());
    } else if (a == "--calibration-tokens") {
      o.calibration_tokens = static_cast<uint32_t>(ParseCount("calibration-tokens", value()));
    } else if (a == "--text-file") {
      o.text_file = value();
    } else if (a == "--json") {
      o.json = true;
    } else {
      rest.push_back(argv[i]);
    }
  }
  Result<daemon::ParsedArgs> parsed = daemon::ParseDaemonArgs(static_cast<int>(rest.size()), rest.data());
  if (!parsed.ok()) Die(parsed.status());
  if (parsed->exit_now) std::exit(parsed->exit_code);
  o.cfg = parsed->config;
  if (o.session.empty()) Die(Status::InvalidArgument("--session NAME is required"));
  if (!have_tokens || o.tokens == 0) Die(Status::InvalidArgument("--tokens N (> 0) is required"));
  if (o.tokens > tiering::kMaxManifestTokens)
    Die(Status::InvalidArgument("--tokens " + std::to_string(o.tokens) + " is over the manifest limit of " +
                                std::to_string(tiering::kMaxManifestTokens)));
  if (o.cfg.t2_budget_bytes == 0) Die(Status::InvalidArgument("--t2-budget 0 leaves nowhere to write the session"));
  return o;
}

const char* kPassage =
    "The history of computing is a story of ideas that took decades to mature. Early machines filled rooms and "
    "consumed enormous amounts of power, yet they could only perform a few thousand operations per second. "
    "Engineers learned to build memory from magnetic cores, then from transistors, and finally from integrated "
    "circuits that packed billions of switches onto a sliver of silicon. Storage followed a similar path: punched "
    "cards gave way to magnetic tape, tape to spinning disks, and disks to flash memory that answers in "
    "microseconds. Each step changed which problems were worth solving. When memory was scarce, programmers "
    "counted every byte; when it became plentiful, they built layers of abstraction that traded efficiency for "
    "speed of development. Networks tied the machines together, first within a building and then across the "
    "world, and the questions shifted again, from how fast one computer could run to how many of them could "
    "cooperate without losing track of the truth. ";

// The session's token history: a user/assistant chat rendered with the
// model's template, exactly `n` tokens, as the scheduler would have built it
// turn by turn (close_text and chat_open say how the last turn ended).
struct History {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> turn_ends;  // token count after each complete turn
  std::string close_text;
  bool chat_open = false;
};

Result<History> BuildHistory(const model::Engine& e, uint64_t n, const std::string& text) {
  const model::Tokenizer& tok = e.tokenizer();
  const model::ChatTemplate& tmpl = e.chat_template();
  const std::vector<int32_t> words = tok.Encode(text, /*add_special=*/false, /*parse_special=*/false);
  if (words.size() < 64) return Status::InvalidArgument("the text must give at least 64 tokens");
  const std::vector<int32_t> end = tok.Encode(tmpl.assistant_end(), false, /*parse_special=*/true);
  History h;
  h.tokens.reserve(n);
  size_t cursor = 0;
  auto take = [&](size_t k, std::vector<int32_t>* out) {
    for (size_t i = 0; i < k; ++i) {
      out->push_back(words[cursor]);
      cursor = (cursor + 1) % words.size();
    }
  };
  for (uint64_t turn = 0; h.tokens.size() < n; ++turn) {
    // User messages of 24..87 tokens, replies of 160..415 (deterministic).
    const uint64_t r = SplitMix64(turn);
    const bool first = h.tokens.empty();
    const uint64_t have = h.tokens.size();
    std::vector<int32_t> prefix;
    // A shorter message when a short session could not hold this one.
    for (uint64_t user_len = 24 + (r & 63);; user_len /= 2) {
      const size_t saved = cursor;
      std::vector<int32_t> user_ids;
      take(user_len, &user_ids);
      const std::vector<model::ChatMessage> msgs = {{"user", tok.Decode(user_ids, false)}};
      MNEMO_ASSIGN_OR_RETURN(std::string rendered, first ? tmpl.Render(msgs, true) : tmpl.RenderAppend(msgs, true));
      prefix = tok.Encode(rendered, /*add_special=*/first, /*parse_special=*/true);
      if (have + prefix.size() + 1 <= n || user_len == 1) break;
      cursor = saved;
    }
    if (have + prefix.size() + 1 > n) {
      if (first)
        return Status::InvalidArgument("--tokens " + std::to_string(n) + " cannot hold one chat turn (at least " +
                                       std::to_string(prefix.size() + 1) + " tokens)");
      // Not reached: the previous turn filled the rest (see below).
      break;
    }
    uint64_t reply = 160 + ((r >> 8) & 255);
    // The next turn needs room for its prompt and a token of reply; when
    // there is none, this turn is the last and fills the rest.
    const uint64_t next_min = prefix.size() + 96 + end.size() + 1;
    const bool last = have + prefix.size() + reply + end.size() + next_min > n;
    h.tokens.insert(h.tokens.end(), prefix.begin(), prefix.end());
    if (last) {
      const uint64_t room = n - h.tokens.size();
      if (room >= end.size() + 1) {
        take(room - end.size(), &h.tokens);
        h.tokens.insert(h.tokens.end(), end.begin(), end.end());
        h.turn_ends.push_back(h.tokens.size());
      } else {
        // A reply cut by the length limit: the next message closes it.
        take(room, &h.tokens);
        h.turn_ends.push_back(h.tokens.size());
        h.close_text = std::string(tmpl.assistant_end());
      }
      break;
    }
    take(reply, &h.tokens);
    h.tokens.insert(h.tokens.end(), end.begin(), end.end());
    h.turn_ends.push_back(h.tokens.size());
  }
  if (h.tokens.size() != n) return Status::Internal("history has " + std::to_string(h.tokens.size()) + " tokens");
  return h;
}

// Per layer, K/V, KV head and dimension: 16 fp16 values mean + spread * z,
// from a real prefill of the history's first tokens.
struct KvTables {
  int32_t n_layers = 0, n_kv_heads = 0, head_dim = 0;
  std::vector<uint16_t> values;  // [layer][kv][head][dim][16]
  std::vector<double> rms;       // [layer][kv] over heads and dims, for the report
  size_t Offset(int32_t l, int kv, int32_t h) const {
    return ((static_cast<size_t>(l) * 2 + kv) * n_kv_heads + h) * head_dim * 16;
  }
  const uint16_t* At(int32_t l, int kv, int32_t h) const { return values.data() + Offset(l, kv, h); }
};

Result<KvTables> Calibrate(model::Engine& e, std::span<const int32_t> tokens) {
  attention::KvCache& kv = e.kv();
  const attention::SeqId seq = kv.CreateSeq();
  Result<std::vector<float>> logits = e.Prefill(seq, tokens);
  if (!logits.ok()) {
    (void)kv.FreeSeq(seq);
    return logits.status().WithContext("calibration prefill");
  }
  const kernels::KvLayout& lay = e.pool().layout();
  KvTables t;
  t.n_layers = e.model().config().n_layers;
  t.n_kv_heads = lay.n_kv_heads;
  t.head_dim = lay.head_dim;
  t.values.resize(static_cast<size_t>(t.n_layers) * 2 * t.n_kv_heads * t.head_dim * 16);
  t.rms.resize(static_cast<size_t>(t.n_layers) * 2);
  const attention::SeqKv* s = kv.Get(seq);
  const int64_t n = s->n_tokens;
  for (int32_t l = 0; l < t.n_layers; ++l) {
    for (int k = 0; k < 2; ++k) {
      double sq_all = 0;
      for (int32_t h = 0; h < t.n_kv_heads; ++h) {
        for (int32_t d = 0; d < t.head_dim; ++d) {
          double sum = 0, sq = 0;
          for (int64_t p = 0; p < n; ++p) {
            const auto* page = static_cast<const uint16_t*>(e.pool().Data(s->layers[l][p / lay.page_tokens]));
            const int slot = static_cast<int>(p % lay.page_tokens);
            const size_t off = (k == 0 ? lay.k_offset(h, slot) : lay.v_offset(h, slot)) + d;
            const double v = HalfToFloat(page[off]);
            sum += v;
            sq += v * v;
          }
          const double mean = sum / static_cast<double>(n);
          const double sd = std::sqrt(std::max(0.0, sq / static_cast<double>(n) - mean * mean));
          sq_all += sq / static_cast<double>(n);
          uint16_t* out = t.values.data() + t.Offset(l, k, h) + static_cast<size_t>(d) * 16;
          for (int q = 0; q < 16; ++q)
            out[q] = FloatToHalf(static_cast<float>(mean + sd * kNormal16[q] * kNormal16Scale));
        }
      }
      t.rms[static_cast<size_t>(l) * 2 + k] = std::sqrt(sq_all / (t.n_kv_heads * t.head_dim));
    }
  }
  (void)kv.FreeSeq(seq);
  return t;
}

// Fills one T0 page (layer l, token span `span`) with the synthetic KV of
// its tokens; slots at or past `n_tokens` stay zero, as in a real pool page.
void FillPage(const KvTables& t, const kernels::KvLayout& lay, uint64_t seed, int32_t l, uint64_t span,
              uint64_t n_tokens, uint16_t* page) {
  uint64_t state = SplitMix64(seed ^ SplitMix64(span * 4096 + static_cast<uint64_t>(l)));
  const uint64_t pos0 = span * static_cast<uint64_t>(lay.page_tokens);
  for (int k = 0; k < 2; ++k) {
    for (int32_t h = 0; h < lay.n_kv_heads; ++h) {
      const uint16_t* tab = t.At(l, k, h);
      for (int32_t slot = 0; slot < lay.page_tokens; ++slot) {
        uint16_t* row = page + (k == 0 ? lay.k_offset(h, slot) : lay.v_offset(h, slot));
        if (pos0 + static_cast<uint64_t>(slot) >= n_tokens) {
          std::memset(row, 0, static_cast<size_t>(lay.head_dim) * 2);
          continue;
        }
        for (int32_t d = 0; d < lay.head_dim; d += 16) {
          // xorshift64*: 64 bits, 4 per value.
          state ^= state >> 12;
          state ^= state << 25;
          state ^= state >> 27;
          const uint64_t r = state * 0x2545f4914f6cdd1dull;
          const int32_t lanes = std::min<int32_t>(16, lay.head_dim - d);
          for (int32_t j = 0; j < lanes; ++j) row[d + j] = tab[(d + j) * 16 + ((r >> (4 * j)) & 15)];
        }
      }
    }
  }
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Die(Status::NotFound("cannot read --text-file " + path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

int CmdSynth(int argc, char** argv) {
  SynthOptions o = ParseOptions(argc, argv);
  // The tiering library logs; stdout is for the report.
  spdlog::set_default_logger(spdlog::stderr_color_mt("synth"));
  const double t_start = Now();
  // The daemon must not run on this directory meanwhile: take its lock.
  Result<int> lock = daemon::LockDataDir(o.cfg.data_dir);
  if (!lock.ok()) {
    Die(lock.status().code() == StatusCode::kAlreadyExists
            ? Status::FailedPrecondition(std::string(lock.status().message()) + "; stop it before synth")
            : lock.status());
  }
  // The page size mnemod would use on this directory (its own, unless
  // --page-tokens says otherwise); whole pages per batch, so that only the
  // session's last block is ever partial.
  if (Status s = daemon::AdoptDataDirPageTokens(o.cfg); !s.ok()) Die(s);
  {
    const uint64_t page = static_cast<uint64_t>(o.cfg.page_tokens);
    o.turn_tokens = std::max<uint64_t>(page, o.turn_tokens / page * page);
  }

  // The engine mnemod would run (its KV pool is allocated lazily: only the
  // calibration tokens' pages are).
  model::EngineOptions eo = daemon::EngineOptionsFor(o.cfg);
  eo.max_context = 0;
  Result<std::unique_ptr<model::Engine>> opened = model::Engine::Open(eo);
  if (!opened.ok()) Die(opened.status().WithContext("loading " + o.cfg.model_path));
  model::Engine& e = **opened;
  tiering::TierOptions to = daemon::TierOptionsFor(o.cfg, e);
  to.t1_budget_bytes = 0;  // nothing reads the blocks back here
  Result<std::unique_ptr<tiering::TierManager>> tier_or = tiering::TierManager::Open(to);
  if (!tier_or.ok()) Die(tier_or.status().WithContext("opening session storage in " + o.cfg.data_dir));
  tiering::TierManager& tier = **tier_or;
  {
    Result<std::vector<tiering::Manifest>> existing = tier.LoadManifests();
    if (!existing.ok()) Die(existing.status());
    for (const tiering::Manifest& m : *existing)
      if (m.owner_uid == o.uid && m.name == o.session)
        Die(Status::AlreadyExists(tiering::SessionLabel(o.uid, o.session) + " already exists in " +
                                  o.cfg.data_dir));
  }

  const std::string text = o.text_file.empty() ? std::string(kPassage) : ReadFileOrDie(o.text_file);
  Result<History> hist = BuildHistory(e, o.tokens, text);
  if (!hist.ok()) Die(hist.status());
  const size_t calib_n = std::min<size_t>({hist->tokens.size(), o.calibration_tokens,
                                           static_cast<size_t>(std::max(1, e.max_context()))});
  Result<KvTables> tables = Calibrate(e, std::span<const int32_t>(hist->tokens.data(), calib_n));
  if (!tables.ok()) Die(tables.status());

  const kernels::KvLayout& lay = e.pool().layout();
  const tiering::BlockLayout& bl = tier.layout();
  const int32_t n_layers = bl.n_layers;
  const uint64_t pt = static_cast<uint64_t>(lay.page_tokens);
  const uint64_t n = o.tokens;
  const uint64_t spans_total = tiering::BlocksForTokens(n, lay.page_tokens);
  const uint64_t batch_spans = o.turn_tokens / pt;
  const size_t page_bytes = lay.page_bytes();

  // Two batches of pages: one being persisted while the next is generated.
  std::vector<Result<tiering::AlignedBuffer>> bufs;
  for (int i = 0; i < 2; ++i) {
    bufs.push_back(tiering::AlignedBuffer::Allocate(batch_spans * n_layers * page_bytes));
    if (!bufs.back().ok()) Die(bufs.back().status());
  }
  // Pages of spans already committed: Persist keeps their blocks and never
  // reads them, but the page table must still cover them.
  Result<tiering::AlignedBuffer> zero_page = tiering::AlignedBuffer::Allocate(page_bytes);
  if (!zero_page.ok()) Die(zero_page.status());
  std::memset(zero_page->data(), 0, page_bytes);

  tiering::Manifest base;
  base.owner_uid = o.uid;
  base.name = o.session;
  base.created_unix_ms = UnixMs();

  tiering::CommittedKv committed;
  std::optional<std::future<std::pair<Status, tiering::CommittedKv>>> inflight;
  double gen_s = 0, wait_s = 0;
  uint64_t batches = 0;
  const double t_write0 = Now();
  auto collect = [&]() {
    const double t0 = Now();
    auto [st, c] = inflight->get();
    wait_s += Now() - t0;
    inflight.reset();
    if (!st.ok()) Die(st.WithContext("persisting " + tiering::SessionLabel(o.uid, o.session)));
    committed = std::move(c);
  };
  for (uint64_t span0 = 0; span0 < spans_total; span0 += batch_spans) {
    const uint64_t span1 = std::min(spans_total, span0 + batch_spans);
    const uint64_t end_tokens = std::min(n, span1 * pt);
    uint8_t* buf = bufs[batches % 2]->data();
    const double t0 = Now();
    for (uint64_t s = span0; s < span1; ++s)
      for (int32_t l = 0; l < n_layers; ++l)
        FillPage(*tables, lay, o.seed, l, s, n,
                 reinterpret_cast<uint16_t*>(buf + ((s - span0) * n_layers + l) * page_bytes));
    gen_s += Now() - t0;
    if (inflight) collect();  // the previous batch: `committed` is what this one extends
    tiering::PersistJob job;
    job.manifest = base;
    job.manifest.tokens.assign(hist->tokens.begin(), hist->tokens.begin() + static_cast<ptrdiff_t>(end_tokens));
    job.manifest.turns = static_cast<uint32_t>(
        std::upper_bound(hist->turn_ends.begin(), hist->turn_ends.end(), end_tokens) - hist->turn_ends.begin());
    job.manifest.last_used_unix_ms = UnixMs();
    if (end_tokens == n) {
      job.manifest.close_text = hist->close_text;
      job.manifest.chat_open = hist->chat_open;
    }
    job.previous = committed;
    job.kv_tokens = end_tokens;
    job.pages.assign(n_layers, std::vector<const void*>(span1, zero_page->data()));
    for (uint64_t s = span0; s < span1; ++s)
      for (int32_t l = 0; l < n_layers; ++l) job.pages[l][s] = buf + ((s - span0) * n_layers + l) * page_bytes;
    auto promise = std::make_shared<std::promise<std::pair<Status, tiering::CommittedKv>>>();
    inflight = promise->get_future();
    tier.Persist(std::move(job), [promise](Status st, tiering::CommittedKv c) {
      promise->set_value({std::move(st), std::move(c)});
    });
    ++batches;
  }
  if (inflight) collect();
  const double write_s = Now() - t_write0;
  const uint64_t kv_bytes = committed.blocks.size() * bl.block_bytes;
  const size_t peak_rss = PeakRssBytes();
  tier_or->reset();  // closes the index before the report
  ::close(*lock);

  double k_rms = 0, v_rms = 0;
  for (int32_t l = 0; l < n_layers; ++l) {
    k_rms += tables->rms[static_cast<size_t>(l) * 2] / n_layers;
    v_rms += tables->rms[static_cast<size_t>(l) * 2 + 1] / n_layers;
  }
  json j{{"session", o.session},
         {"uid", o.uid},
         {"data_dir", o.cfg.data_dir},
         {"model", o.cfg.model_path},
         {"tokens", n},
         {"kv_tokens", committed.kv_tokens},
         {"turns", hist->turn_ends.size()},
         {"batches", batches},
         {"turn_tokens", o.turn_tokens},
         {"blocks", committed.blocks.size()},
         {"block_bytes", bl.block_bytes},
         {"page_bytes", bl.page_bytes},
         {"n_layers", n_layers},
         {"kv_bytes", kv_bytes},
         {"write_s", write_s},
         {"write_bytes_per_s", write_s > 0 ? static_cast<double>(kv_bytes) / write_s : 0.0},
         {"generate_s", gen_s},
         {"persist_wait_s", wait_s},
         {"elapsed_s", Now() - t_start},
         {"peak_rss_bytes", peak_rss},
         {"calibration_tokens", calib_n},
         {"k_rms", k_rms},
         {"v_rms", v_rms},
         // mnemod's --max-context must exceed this for a message to fit.
         {"model_context", e.model().config().context_length}};
  if (o.json) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("synth: %s of uid %u: %llu tokens (%zu turns), %llu blocks, %.3f GB of KV written in %.2f s "
                "(%.3f GB/s; generating %.2f s), peak RSS %.1f MiB\n",
                o.session.c_str(), o.uid, static_cast<unsigned long long>(n), hist->turn_ends.size(),
                static_cast<unsigned long long>(committed.blocks.size()), static_cast<double>(kv_bytes) / 1e9,
                write_s, write_s > 0 ? static_cast<double>(kv_bytes) / write_s / 1e9 : 0.0, gen_s,
                static_cast<double>(peak_rss) / (1 << 20));
  }
  return 0;
}

}  // namespace mnemo::bench
