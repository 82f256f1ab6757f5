#!/usr/bin/env bash
# bench/compare_resume.sh: issue 4's benchmark 2, in one run.
#
# Time to first token of a persisted session resumed after a daemon restart
# (its pages only on T2, T1 empty: a fresh process), for a new message of
# --message-tokens tokens, against
#   (a) re-prefilling: a fresh session given the same history plus the same
#       message, time to first token (target: resume >= 20x faster);
#   (b) reading the session's KV bytes with fio at the T2 block size and
#       queue depth, io_uring, O_DIRECT, on the data directory's file system
#       (target: resume <= 1.5x that time).
# Steps: start mnemod; `mnemo-bench resume create` (a real ~8k-token first
# turn, then (a), then one fork of the session per repetition: forks share
# its T2 blocks, so every repetition resumes the same KV cold); stop. Then
# per repetition: start mnemod again on the data directory, `mnemo-bench
# resume turn` on the next fork (through the real client), the same turn
# once more with fio reading the same bytes beside it (the compute share
# under I/O: on a VM whose disk I/O costs CPU time, the floor of an
# overlapped resume), stop, and a fio read of the same bytes right after.
# Medians over repetitions; prints JSON.
#
# --synthetic N: `mnemo-bench synth` writes an N-token session instead (no
# prefill; (a) is not measured). A session larger than --t0-budget is
# streamed through T0 (see compare_stream.sh for that case).
#
# --t0-reserve SIZE is passed to mnemod: that much of T0 is backed by memory
# before the daemon is ready (its cost shows in daemon_start_s), so the
# resumed pages land in memory that needs no page faults.
#
#   bench/compare_resume.sh [--model M] [--threads 2] [--history-tokens 8192]
#       [--message-tokens 32] [--reps 5] [--prefill-reps 2] [--synthetic N]
#       [--t0-budget SIZE] [--t0-reserve SIZE] [--t2-budget SIZE] [--dir DIR]
#
# MNEMOD, MNEMO_BENCH, MNEMO_CLI override the binaries (build/...). The
# machine is shared: compare only figures of one invocation.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS=2
HISTORY=8192
MESSAGE=32
REPS=5
PREFILL_REPS=2
SYNTH=0
T0_BUDGET=""
T0_RESERVE=""
T2_BUDGET=""
DIR=${TMPDIR:-/var/tmp}
QD=32  # tiering::TierOptions::queue_depth, mnemod's T2 ring depth
die() { echo "compare_resume: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --history-tokens) HISTORY=$2; shift 2 ;;
    --message-tokens) MESSAGE=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --prefill-reps) PREFILL_REPS=$2; shift 2 ;;
    --synthetic) SYNTH=$2; shift 2 ;;
    --t0-budget) T0_BUDGET=$2; shift 2 ;;
    --t0-reserve) T0_RESERVE=$2; shift 2 ;;
    --t2-budget) T2_BUDGET=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
done
source "$(dirname "$0")/lib.sh"

TOKENS=$HISTORY
((SYNTH > 0)) && TOKENS=$SYNTH
# KV of the default model: 22.5 KiB a token; room for the session, the
# re-prefill sessions and the turns, rounded up.
[[ -z "$T2_BUDGET" ]] && T2_BUDGET=$((TOKENS * 45 / 1024 + 1024))M

data=$work/data
sock=$work/mnemod.sock
daemon_args=(--model "$MODEL" --socket "$sock" --data-dir "$data" --threads "$THREADS"
             --t2-budget "$T2_BUDGET" --max-context $((TOKENS + 4096)) --log-level warn)
[[ -n "$T0_BUDGET" ]] && daemon_args+=(--t0-budget "$T0_BUDGET")
[[ -n "$T0_RESERVE" ]] && daemon_args+=(--t0-reserve "$T0_RESERVE")
load_start=$(cut -d' ' -f1 /proc/loadavg)
if ((SYNTH > 0)); then
  echo "compare_resume: synth $SYNTH tokens" >&2
  "$BENCH" synth --session resume --tokens "$SYNTH" "${daemon_args[@]}" --json > "$work/synth.json"
  start_daemon "${daemon_args[@]}"
  "$BENCH" resume fork --socket "$sock" --model "$MODEL" --session resume --forks "$REPS" --json > "$work/create.json"
else
  echo '{}' > "$work/synth.json"
  start_daemon "${daemon_args[@]}"
  echo "compare_resume: first turn of ~$HISTORY tokens, then (a) x$PREFILL_REPS" >&2
  "$BENCH" resume create --socket "$sock" --model "$MODEL" --session resume --history-tokens "$HISTORY" \
    --message-tokens "$MESSAGE" --forks "$REPS" --prefill-reps "$PREFILL_REPS" --json > "$work/create.json"
fi
stop_daemon

read -r BYTES BLOCK < <(python3 -c "import json; h = json.load(open('$work/create.json'))['history']; \
print(h['t2_read_bytes'], h['block_bytes'])")
((BYTES > 0)) || die "the session has no KV on T2"
FIO=(fio --name=resume-read --filename="$work/fio.dat" --rw=read --bs="$BLOCK" --size="$BYTES"
     --ioengine=io_uring --direct=1 --iodepth="$QD" --output-format=json)
fio --name=layout --filename="$work/fio.dat" --rw=write --bs=1M --size="$BYTES" --ioengine=io_uring \
  --direct=1 --iodepth="$QD" --output-format=json > /dev/null

for ((rep = 1; rep <= REPS; rep++)); do
  echo "compare_resume: restart $rep/$REPS" >&2
  start_daemon "${daemon_args[@]}"
  rc=0
  "$BENCH" resume turn --socket "$sock" --model "$MODEL" --session "resume-$rep" --message-tokens "$MESSAGE" \
    --max-tokens 2 --json > "$work/turn_$rep.json" || rc=$?
  # The same compute once more (KV now in T0) while fio reads the same bytes
  # beside it: where storage I/O costs CPU time (a VM's emulated disk: here
  # a concurrent read slows compute by up to 2x), this is what a resume
  # whose reads all overlap its compute can reach at best.
  "${FIO[@]}" --time_based --runtime=3 > "$work/fio_bg_$rep.json" &
  fio_pid=$!
  sleep 0.3
  "$BENCH" resume turn --socket "$sock" --model "$MODEL" --session "resume-$rep" --message-tokens "$MESSAGE" \
    --max-tokens 2 --json > "$work/io_turn_$rep.json" || rc=$?
  wait "$fio_pid" || rc=$?
  stop_daemon
  echo "{\"start_s\": $START_S, \"rc\": $rc}" > "$work/start_$rep.json"
  "${FIO[@]}" > "$work/fio_$rep.json"
done
load_end=$(cut -d' ' -f1 /proc/loadavg)

python3 - "$work" "$REPS" "$FSTYPE" "$DIR" "$load_start" "$load_end" "$SYNTH" "$(nproc)" "${FIO[*]}" "${T0_RESERVE:-0}" <<'PY'
import json, statistics, sys
work, reps, fstype, d, l0, l1, synth, cores, fio_cmd, t0_reserve = sys.argv[1:]
reps, synth = int(reps), int(synth)
load = lambda name: json.load(open(f"{work}/{name}"))
med = lambda xs: statistics.median(xs) if xs else None
create, synth_out = load("create.json"), load("synth.json")
turns = [load(f"turn_{r}.json") for r in range(1, reps + 1)]
starts = [load(f"start_{r}.json") for r in range(1, reps + 1)]
fios = [load(f"fio_{r}.json")["jobs"][0]["read"] for r in range(1, reps + 1)]
io_turns = [load(f"io_turn_{r}.json") for r in range(1, reps + 1)]
io_ttft = med([t["turn"]["client_ttft_ms"] for t in io_turns if "turn" in t])
fio_bg = med([load(f"fio_bg_{r}.json")["jobs"][0]["read"]["bw_bytes"] for r in range(1, reps + 1)])
hist = create["history"]
ok = [t for t in turns if "turn" in t]
errors = [t["error"] for t in turns if "error" in t]
ttft = med([t["turn"]["client_ttft_ms"] for t in ok])
fio_bw = med([f["bw_bytes"] for f in fios])
b_ms = hist["t2_read_bytes"] / fio_bw * 1e3 if fio_bw else None
prefill = create.get("prefill", [])
a_ms = med([p["client_ttft_ms"] for p in prefill])
out = {
    "mode": "synthetic" if synth else "real prefill",
    "t0_reserve": t0_reserve,
    "machine": {"cores": int(cores), "load_average_1m_start": float(l0), "load_average_1m_end": float(l1),
                "fs": fstype, "dir": d},
    "session": {"tokens": hist["tokens"], "t2_pages": hist["t2_pages"], "kv_read_bytes": hist["t2_read_bytes"],
                "block_bytes": hist["block_bytes"]},
    "resume": {
        "client_ttft_ms_median": ttft,
        "server_ttft_ms_median": med([t["turn"]["server_ttft_ms"] for t in ok]),
        "prompt_tokens": sorted({t["turn"]["prompt_tokens"] for t in ok}),
        "pages_only_on_t2": all(t["pages_only_on_t2"] for t in turns),
        "daemon_start_s_median": med([s["start_s"] for s in starts]),
        "runs_client_ttft_ms": [t["turn"]["client_ttft_ms"] for t in ok],
        # The same message right after, KV in T0: the compute share.
        "warm_client_ttft_ms_median": med([t["warm_turn"]["client_ttft_ms"] for t in ok if "warm_turn" in t]),
        # The same again while fio reads beside it (its read rate then).
        "warm_under_fio_client_ttft_ms_median": io_ttft,
        "runs_warm_under_fio_client_ttft_ms": [t["turn"]["client_ttft_ms"] for t in io_turns if "turn" in t],
        "fio_beside_bytes_per_s_median": fio_bg,
        "errors": errors,
    },
    "a_reprefill": {"client_ttft_ms_median": a_ms, "server_ttft_ms_median": med([p["server_ttft_ms"] for p in prefill]),
                    "prompt_tokens": [p["prompt_tokens"] for p in prefill],
                    "runs_client_ttft_ms": [p["client_ttft_ms"] for p in prefill]} if prefill else None,
    "b_fio": {"read_bytes_per_s_median": fio_bw, "read_ms": b_ms, "runs_bytes_per_s": [f["bw_bytes"] for f in fios],
              "command": fio_cmd},
    "first_turn": create.get("first_turn"),
    "synth": synth_out or None,
    "reprefill_over_resume": a_ms / ttft if a_ms and ttft else None,
    "reprefill_target": ">= 20",
    "resume_over_fio_read": ttft / b_ms if ttft and b_ms else None,
    # The compute share alone (KV already in T0) against the same read time:
    # what resume / (b) would be with a load that cost nothing.
    "warm_over_fio_read": (lambda w: w / b_ms if w and b_ms else None)(
        med([t["warm_turn"]["client_ttft_ms"] for t in ok if "warm_turn" in t])),
    "fio_target": "<= 1.5",
    # Against the compute share slowed by a concurrent read of the same
    # bytes: near 1.0 when the resume overlaps its reads with compute.
    "resume_over_warm_under_fio": ttft / io_ttft if ttft and io_ttft else None,
}
print(json.dumps(out, indent=2))
sys.exit(0 if ok and not errors else 1)
PY
