#!/usr/bin/env bash
# bench/profile_resume.sh: where a resume's time goes, for development.
#
# Writes a synthetic session of --tokens tokens (`mnemo-bench synth`, no
# prefill) and --turns forks of it, then per turn: starts mnemod on the data
# directory, sends a --message-tokens message on the next fork (resumed from
# T2, pipelined), then the same message again with the KV in T0 (the warm
# turn: the compute share), and stops mnemod. Prints both times to first
# token per turn and mnemod's pipelined-resume debug line (request to step,
# step, layers waited for). --perf records each daemon with `perf record -g`
# (threads are named: mnemo-sched, mnemo-cpu-N, mnemo-load, mnemo-uring) into
# the work directory, kept with --keep.
#
#   bench/profile_resume.sh [--model M] [--tokens 8118] [--turns 3]
#       [--message-tokens 32] [--threads 2] [--page-tokens N] [--perf] [--keep]
#       [--dir DIR]
#
# Not a benchmark against a peer: compare_resume.sh is. Compare figures of
# one invocation only.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
TOKENS=8118
TURNS=3
MESSAGE=32
THREADS=2
PAGE_TOKENS=""
PERF=0
KEEP=0
DIR=${TMPDIR:-/var/tmp}
die() { echo "profile_resume: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --turns) TURNS=$2; shift 2 ;;
    --message-tokens) MESSAGE=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --page-tokens) PAGE_TOKENS=$2; shift 2 ;;
    --perf) PERF=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
done
((PERF)) && ! command -v perf > /dev/null && die "perf not found"
source "$(dirname "$0")/lib.sh"
if ((KEEP)); then
  trap 'if [[ -n "$daemon_pid" ]]; then kill -KILL "$daemon_pid" 2> /dev/null || true; fi; echo "profile_resume: kept $work" >&2' EXIT
fi

data=$work/data
sock=$work/mnemod.sock
args=(--model "$MODEL" --socket "$sock" --data-dir "$data" --threads "$THREADS"
      --t2-budget $((TOKENS * 45 / 1024 + 1024))M --max-context $((TOKENS + 4096)) --t0-reserve 256M)
[[ -n "$PAGE_TOKENS" ]] && args+=(--page-tokens "$PAGE_TOKENS")
"$BENCH" synth --session resume --tokens "$TOKENS" "${args[@]}" --json > "$work/synth.json"
start_daemon "${args[@]}" --log-level warn
"$BENCH" resume fork --socket "$sock" --model "$MODEL" --session resume --forks "$TURNS" --json > "$work/forks.json"
stop_daemon

for ((n = 1; n <= TURNS; n++)); do
  : > "$work/mnemod.log"
  start_daemon "${args[@]}" --log-level debug
  perf_pid=""
  if ((PERF)); then
    perf record -e cpu-clock -g -p "$daemon_pid" -o "$work/perf.$n" 2> /dev/null &
    perf_pid=$!
    sleep 0.3
  fi
  "$BENCH" resume turn --socket "$sock" --model "$MODEL" --session "resume-$n" --message-tokens "$MESSAGE" \
    --max-tokens 2 --json > "$work/turn.$n.json"
  if [[ -n "$perf_pid" ]]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  stop_daemon
  python3 - "$work/turn.$n.json" "$n" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print(f"turn {sys.argv[2]}: resume TTFT {t['turn']['client_ttft_ms']:.0f} ms "
      f"(pages only on T2: {t['pages_only_on_t2']}), warm TTFT {t['warm_turn']['client_ttft_ms']:.0f} ms, "
      f"{t['turn']['prompt_tokens']} prompt tokens")
PY
  grep -o "resumed .* pipelined: .*" "$work/mnemod.log" || true
  ((PERF)) && echo "  perf report -i $work/perf.$n --sort pid,sym"
done
