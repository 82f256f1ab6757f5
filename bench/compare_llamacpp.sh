#!/usr/bin/env bash
# Runs mnemo and llama.cpp on the same GGUF with the same thread count, one
# after the other in one run, and prints the ratios as one JSON object:
#   prefill of a 512-token prompt            (target mnemo/llama.cpp >= 1.0)
#   decode of 128 tokens after 512 of context (target >= 1.1)
#   decode against the memory-bandwidth ceiling (weight bytes per token /
#     single-thread read bandwidth measured now)
#   batched decode: 16 sequences together vs one (target >= 2.5)
#   peak RSS of the 512+128 generation vs model size + 64 MiB
# The machine is shared and noisy: each side runs --reps times and the best
# run counts; compare only figures from the same invocation.
#
# Usage: bench/compare_llamacpp.sh [--model M] [--threads T] [--reps N]
#          [--llama-bin DIR]   (llama.cpp from scripts/ref/make_reference.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS=2
REPS=3
LLAMA_BIN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --llama-bin) LLAMA_BIN=$2; shift 2 ;;
    *) echo "compare_llamacpp: unknown argument $1" >&2; exit 2 ;;
  esac
done
BENCH=${MNEMO_BENCH:-build/bench/mnemo-bench}
[[ -x "$BENCH" ]] || { echo "compare_llamacpp: build first (scripts/setup)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for i in $(seq "$REPS"); do
  "$BENCH" generate --model "$MODEL" --prompt-tokens 512 --max-tokens 128 --ignore-eos \
    --temperature 0 --threads "$THREADS" --json > "$tmp/mnemo.$i.json"
done
"$BENCH" batch --model "$MODEL" --seqs 16 --ctx 128 --steps 32 --reps "$REPS" --threads "$THREADS" --json > "$tmp/batch.json"
"$BENCH" membw --json > "$tmp/membw.json"
peer_args=(--model "$MODEL" --threads "$THREADS" --reps "$REPS")
[[ -n "$LLAMA_BIN" ]] && peer_args+=(--llama-bin "$LLAMA_BIN")
bench/llamacpp_peer.sh "${peer_args[@]}" > "$tmp/peer.json"

python3 - "$tmp" "$REPS" <<'PY'
import json, sys
tmp, reps = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{tmp}/mnemo.{i}.json")) for i in range(1, reps + 1)]
peer = json.load(open(f"{tmp}/peer.json"))
batch = json.load(open(f"{tmp}/batch.json"))
bw = json.load(open(f"{tmp}/membw.json"))["read_bytes_per_s"]
m_pre = max(r["prefill_tokens_per_s"] for r in runs)
m_dec = max(r["decode_tokens_per_s"] for r in runs)
p_pre = max(peer["prefill"]["samples"])
p_dec = max(peer["decode"]["samples"])
wbytes = runs[0]["weight_bytes_per_token"]
ceiling = bw / wbytes
rss = max(r["peak_rss_bytes"] for r in runs)
limit = runs[0]["model_bytes"] + 64 * 2**20
out = {
    "threads": runs[0]["threads"],
    "prefill_512": {"mnemo_tokens_per_s": m_pre, "llama_cpp_tokens_per_s": p_pre,
                    "ratio": m_pre / p_pre, "target": 1.0},
    "decode_128_at_512": {"mnemo_tokens_per_s": m_dec, "llama_cpp_tokens_per_s": p_dec,
                          "ratio": m_dec / p_dec, "target": 1.1},
    "decode_vs_bandwidth_ceiling": {"weight_bytes_per_token": wbytes, "read_bytes_per_s": bw,
                                    "ceiling_tokens_per_s": ceiling, "fraction": m_dec / ceiling},
    "batched_decode_16": {"single_tokens_per_s": batch["single_tokens_per_s"],
                          "batched_tokens_per_s": batch["batched_tokens_per_s"],
                          "ratio": batch["ratio"], "target": 2.5},
    "peak_rss": {"bytes": rss, "limit_bytes": limit, "ok": rss <= limit},
}
print(json.dumps(out, indent=2))
PY
