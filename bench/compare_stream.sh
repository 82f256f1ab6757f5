#!/usr/bin/env bash
# bench/compare_stream.sh: issue 4's benchmark 3 (larger than memory), in one
# run.
#
# A --tokens-token session (default 32768) with synthetic KV (`mnemo-bench
# synth`, no prefill) decodes --max-tokens greedy tokens after a restart:
#   streamed  mnemod with --t0-budget + --t1-budget = --fraction (default
#             10%) of the session's KV: its committed pages stream through a
#             ring of layer slots every step;
#   resident  the same session (a fork: same T2 blocks) with a T0 that holds
#             it whole;
#   I/O bound the session's KV bytes (read once per generated token) at the
#             bandwidth fio reaches reading the session's own slab files with
#             io_uring and O_DIRECT: at the page size the ring reads (random,
#             queue depth 32) and sequentially at 1 MiB.
# Decode rates are the daemon's own (Done.decode_tokens_per_s: after the
# first token). Target: streamed >= 0.8 x min(resident, I/O bound). Prints
# JSON; the machine is shared: compare figures of one invocation only.
#
#   bench/compare_stream.sh [--model M] [--tokens 32768] [--max-tokens 8]
#       [--fraction 0.10] [--threads 2] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
TOKENS=32768
MAX_TOKENS=8
FRACTION=0.10
THREADS=2
DIR=${TMPDIR:-/var/tmp}
QD=32
die() { echo "compare_stream: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --fraction) FRACTION=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done
source "$(dirname "$0")/lib.sh"
data=$work/data
sock=$work/mnemod.sock
# 23 KiB of KV per token for the default model: size T2 with room to spare.
KV_BYTES=$((TOKENS * 30 * 16 * 3 * 64 * 2 * 2 / 16))
T2_BUDGET=$(( (KV_BYTES * 3 / 2 + (512 << 20)) >> 20 ))M
common=(--model "$MODEL" --socket "$sock" --data-dir "$data" --threads "$THREADS" --t2-budget "$T2_BUDGET"
        --max-context $((TOKENS + 1024)) --log-level info)

load_start=$(cut -d' ' -f1 /proc/loadavg)
echo "compare_stream: synth $TOKENS tokens" >&2
"$BENCH" synth --session big --tokens "$TOKENS" "${common[@]}" --json > "$work/synth.json"
start_daemon "${common[@]}" --t0-budget 64M --t1-budget 0
"$CLI" --socket "$sock" fork big streamed > /dev/null
"$CLI" --socket "$sock" fork big resident > /dev/null
stop_daemon

gen() {  # session -> Done JSON of one greedy turn
  "$CLI" --socket "$sock" gen "$1" "Continue." --max-tokens "$MAX_TOKENS" --temperature 0 --json
}
read -r KV_READ < <(python3 -c "import json; print(json.load(open('$work/synth.json'))['kv_bytes'])")
T0=$(python3 -c "print(int($KV_READ * $FRACTION * 0.8) >> 20)")M
T1=$(python3 -c "print(int($KV_READ * $FRACTION * 0.2) >> 20)")M
echo "compare_stream: streamed (t0 $T0, t1 $T1)" >&2
start_daemon "${common[@]}" --t0-budget "$T0" --t1-budget "$T1"
gen streamed > "$work/streamed.json"
"$CLI" --socket "$sock" --json stats > "$work/streamed_stats.json"
stop_daemon
echo "compare_stream: resident" >&2
start_daemon "${common[@]}" --t0-budget $(( (KV_READ * 2 + (256 << 20)) >> 20 ))M --t1-budget 0
gen resident > "$work/resident.json"
stop_daemon

PAGE=$((16 * 3 * 64 * 2 * 2))
# fio reads the session's own slab files (read-only): the same bytes on the
# same part of the disk the ring reads.
slabs=$(ls "$data"/pages/slab-* | tr '\n' ':' | sed 's/:$//')
fio --name=pages --filename="$slabs" --readonly --rw=randread --bs="$PAGE" --size="$KV_READ" --ioengine=io_uring \
  --direct=1 --iodepth="$QD" --output-format=json > "$work/fio_pages.json"
fio --name=seq --filename="$slabs" --readonly --rw=read --bs=1M --size="$KV_READ" --ioengine=io_uring \
  --direct=1 --iodepth="$QD" --output-format=json > "$work/fio_seq.json"
load_end=$(cut -d' ' -f1 /proc/loadavg)
grep -i "streaming" "$work/mnemod.log" >&2 || true

python3 - "$work" "$KV_READ" "$load_start" "$load_end" "$T0" "$T1" <<'PY'
import json, sys
work, kv, l0, l1, t0, t1 = sys.argv[1:]
kv = int(kv)
load = lambda n: json.load(open(f"{work}/{n}"))
s, r = load("streamed.json"), load("resident.json")
bw_pages = load("fio_pages.json")["jobs"][0]["read"]["bw_bytes"]
bw_seq = load("fio_seq.json")["jobs"][0]["read"]["bw_bytes"]
io_pages, io_seq = bw_pages / kv, bw_seq / kv
sp, rp = s["decode_tokens_per_s"], r["decode_tokens_per_s"]
stats = load("streamed_stats.json")
out = {
    "session": {"tokens": load("synth.json").get("tokens"), "kv_bytes": kv},
    "budgets": {"t0": t0, "t1": t1},
    "streamed_tokens_per_s": sp, "resident_tokens_per_s": rp,
    "streamed_same_tokens_as_resident": s.get("token_ids") == r.get("token_ids"),
    "io_bound_tokens_per_s": {"fio_random_pages": io_pages, "fio_sequential_1m": io_seq},
    "fio_bytes_per_s": {"random_pages": bw_pages, "sequential_1m": bw_seq},
    "streamed_over_min_resident_io_pages": sp / min(rp, io_pages),
    "streamed_over_min_resident_io_sequential": sp / min(rp, io_seq),
    "target": ">= 0.8",
    "load_average_1m": [float(l0), float(l1)],
    "streamed_tier_stats": stats.get("tiers", stats),
}
print(json.dumps(out, indent=2))
PY
