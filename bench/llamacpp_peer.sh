#!/usr/bin/env bash
# Measures the llama.cpp peer (built by scripts/ref/make_reference.sh) on one
# GGUF at one thread count and prints one JSON object on stdout:
#   prefill: 512-token prompt from an empty context (llama-bench -p 512 -n 0)
#   decode:  128 tokens generated after a 512-token context
#            (llama-bench -p 0 -n 128 -d 512)
#
# Usage: bench/llamacpp_peer.sh --model M.gguf --threads T [--llama-bin DIR]
#          [--reps N]
# DIR defaults to the build under ${MNEMO_REF_DIR:-$HOME/.cache/mnemo-ref}.
set -euo pipefail

MODEL=""
THREADS=""
BIN=""
REPS=5
die() { echo "llamacpp_peer: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --llama-bin) BIN=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n "$MODEL" && -n "$THREADS" ]] || die "--model and --threads are required"
[[ -f "$MODEL" ]] || die "no model at $MODEL"

if [[ -z "$BIN" ]]; then
  ENV_SH="${MNEMO_REF_DIR:-$HOME/.cache/mnemo-ref}/env.sh"
  [[ -f "$ENV_SH" ]] || die "no $ENV_SH: run scripts/ref/make_reference.sh --build-only"
  # shellcheck source=/dev/null
  source "$ENV_SH"
  BIN=$LLAMA_CPP_BIN
fi
BENCH="$BIN/llama-bench"
[[ -x "$BENCH" ]] || die "no llama-bench in $BIN"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck source=bench/llama_extra_bufts.sh
source "$(dirname "$0")/llama_extra_bufts.sh"
repack=1
llama_extra_bufts_work "$BIN" "$MODEL" "$THREADS" || repack=0
loadavg=$(cut -d' ' -f1 /proc/loadavg)
# Separate runs so that prefill is measured at depth 0 and decode at depth 512.
"$BENCH" -m "$MODEL" -t "$THREADS" -r "$REPS" --repack "$repack" -p 512 -n 0 -o json \
  >"$tmp/pp.json" 2>"$tmp/pp.err" || { cat "$tmp/pp.err" >&2; die "llama-bench pp failed"; }
"$BENCH" -m "$MODEL" -t "$THREADS" -r "$REPS" --repack "$repack" -p 0 -n 128 -d 512 -o json \
  >"$tmp/tg.json" 2>"$tmp/tg.err" || { cat "$tmp/tg.err" >&2; die "llama-bench tg failed"; }

python3 - "$tmp/pp.json" "$tmp/tg.json" "$MODEL" "$THREADS" "$BENCH" "$loadavg" "$repack" <<'EOF'
import json, os, sys
pp_path, tg_path, model, threads, bench, loadavg, repack = sys.argv[1:]
pp = json.load(open(pp_path))[0]
tg = json.load(open(tg_path))[0]
print(json.dumps({
    "peer": "llama.cpp",
    "llama_bench": bench,
    "build_commit": pp.get("build_commit"),
    "cpu_info": pp.get("cpu_info"),
    "backends": pp.get("backends"),
    "model": os.path.basename(model),
    "model_type": pp.get("model_type"),
    "threads": int(threads),
    "reps": len(pp["samples_ts"]),
    "flash_attn": pp.get("flash_attn"),
    # 0: llama.cpp's extra buffer types (AMX) could not run here; see
    # bench/llama_extra_bufts.sh.
    "repack": int(repack),
    # Other load on the host skews these; the 1-minute load average before
    # the runs is there to judge that.
    "loadavg_1m": float(loadavg),
    "prefill": {"n_prompt": pp["n_prompt"], "n_depth": pp["n_depth"],
                "tokens_per_s": pp["avg_ts"], "stddev": pp["stddev_ts"],
                "samples": pp["samples_ts"]},
    "decode": {"n_gen": tg["n_gen"], "n_depth": tg["n_depth"],
               "tokens_per_s": tg["avg_ts"], "stddev": tg["stddev_ts"],
               "samples": tg["samples_ts"]},
}, indent=1))
EOF
