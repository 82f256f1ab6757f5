#!/usr/bin/env bash
# bench/compare_scale.sh: issue 4's benchmark 4 (scale), in one run.
#
# A --tokens-token session (default 1,000,000: ~23 GB of KV for the default
# model) with synthetic KV is created (`mnemo-bench synth`: written and
# persisted through the tiering library, no prefill), mnemod is restarted on
# the data directory, and the session is resumed and decodes --max-tokens
# greedy tokens with a T0 of --t0-budget and a T1 of --t1-budget: its
# committed pages stream through a ring of layer slots every step. Prints
# the creation time, mnemod's start-up time (to Health), the peak RSS of
# mnemod (VmHWM) against T0 + T1 + model file + 256 MiB, and the decode step
# time against the I/O bound (the session's KV bytes at the bandwidth fio
# reaches reading random 12 KiB pages of the session's own slab files,
# io_uring, O_DIRECT, depth 32, sampled over --fio-size bytes). With
# --export, the session is first exported to a file (`mnemo export`, before
# the resume, so mnemod's VmHWM then is the export's): its time against the
# KV bytes at fio's sequential 1 MiB read bandwidth of the same slab files,
# and the peak RSS of mnemod and of the CLI (both bounded whatever the
# session's size). Everything it writes is removed at the end. Prints JSON.
#
#   bench/compare_scale.sh [--model M] [--tokens 1000000] [--max-tokens 4]
#       [--t0-budget 1G] [--t1-budget 256M] [--fio-size 2G] [--dir DIR] [--export]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
TOKENS=1000000
MAX_TOKENS=4
T0=1G
T1=256M
FIO_SIZE=2G
THREADS=2
DIR=${TMPDIR:-/var/tmp}
QD=32
EXPORT=0
die() { echo "compare_scale: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --t0-budget) T0=$2; shift 2 ;;
    --t1-budget) T1=$2; shift 2 ;;
    --fio-size) FIO_SIZE=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --export) EXPORT=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done
source "$(dirname "$0")/lib.sh"
KV_BYTES=$((TOKENS / 16 * 368640 + 368640))
avail=$(df --output=avail -B1 "$DIR" | tail -1)
((avail > KV_BYTES * (11 + 10 * EXPORT) / 10 + (4 << 30))) || die "$DIR has $((avail >> 30)) GiB free; the session needs $((KV_BYTES >> 30)) GiB"

sock=$work/mnemod.sock
# slab_list N: the first N slab files of the store, joined by ':' (fio's
# file list). A glob, not `ls | head`: under pipefail, head closing the pipe
# early fails the script with SIGPIPE once the list passes a pipe write
# (a 1M-token session has ~90 slabs).
slab_list() {
  local files=("$work"/data/pages/slab-*)
  local IFS=:
  echo "${files[*]:0:$1}"
}
T2_BUDGET=$(( (KV_BYTES + (1 << 30)) >> 20 ))M
common=(--model "$MODEL" --socket "$sock" --data-dir "$work/data" --threads "$THREADS" --t2-budget "$T2_BUDGET"
        --max-context $((TOKENS + 1024)) --log-level info)

load_start=$(cut -d' ' -f1 /proc/loadavg)
echo "compare_scale: synth $TOKENS tokens" >&2
t0=$(bench_now)
"$BENCH" synth --session big --tokens "$TOKENS" "${common[@]}" --turn-tokens 16384 --json > "$work/synth.json"
create_s=$(python3 -c "print($(bench_now) - $t0)")

echo "compare_scale: start mnemod (T0 $T0, T1 $T1)" >&2
start_daemon "${common[@]}" --t0-budget "$T0" --t1-budget "$T1"
start_s=$START_S
"$CLI" --socket "$sock" --json show big > "$work/show.json"
echo '{}' > "$work/export.json"
if ((EXPORT)); then
  echo "compare_scale: export the session" >&2
  hwm0=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
  /usr/bin/time -f "%M %e" -o "$work/export.time" "$CLI" --socket "$sock" --json export big "$work/big.mnemo" \
    > "$work/export.out"
  hwm1=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
  export_bytes=$(stat -c %s "$work/big.mnemo")
  rm -f "$work/big.mnemo"
  fio --name=seq --filename="$(slab_list 64)" --readonly \
    --rw=read --bs=1M --io_size="$FIO_SIZE" --file_service_type=sequential --ioengine=io_uring --direct=1 \
    --iodepth=16 --output-format=json > "$work/fio_seq.json"
  read -r client_kb export_s < "$work/export.time"
  python3 -c "import json,sys; print(json.dumps({'bytes': $export_bytes, 'seconds': $export_s,
    'client_peak_rss_bytes': $client_kb * 1024, 'mnemod_vmhwm_before_bytes': $hwm0 * 1024,
    'mnemod_vmhwm_after_bytes': $hwm1 * 1024,
    'fio_seq_1m_bytes_per_s': json.load(open('$work/fio_seq.json'))['jobs'][0]['read']['bw_bytes']}))" \
    > "$work/export.json"
fi
echo "compare_scale: resume and decode $MAX_TOKENS tokens" >&2
t0=$(bench_now)
"$CLI" --socket "$sock" gen big "Continue." --max-tokens "$MAX_TOKENS" --temperature 0 --json > "$work/gen.json"
turn_s=$(python3 -c "print($(bench_now) - $t0)")
hwm_kb=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
stop_daemon
grep -i "streaming" "$work/mnemod.log" >&2 || true

# fio reads the session's own slab files (read-only, random reads of one
# layer page, --fio-size bytes in all): the same data on the same part of
# the disk.
# (the first slabs that hold --fio-size: fio's file list has a length limit)
fio_bytes=$(numfmt --from=iec "$FIO_SIZE")
slab_bytes=$(stat -c %s "$(slab_list 1)")
n_slabs=$(( (fio_bytes + slab_bytes - 1) / slab_bytes ))
slabs=$(slab_list "$n_slabs")
page_bytes=$(python3 -c "import json; print(json.load(open('$work/synth.json'))['page_bytes'])")
fio --name=scale --filename="$slabs" --readonly --rw=randread --bs="$page_bytes" --size="$FIO_SIZE" --ioengine=io_uring \
  --direct=1 --iodepth="$QD" --output-format=json > "$work/fio.json"
load_end=$(cut -d' ' -f1 /proc/loadavg)

python3 - "$work" "$MODEL" "$T0" "$T1" "$create_s" "$start_s" "$turn_s" "$hwm_kb" "$load_start" "$load_end" <<'PY'
import json, os, sys
work, model, t0, t1, create_s, start_s, turn_s, hwm_kb, l0, l1 = sys.argv[1:]
size = lambda v: int(float(v[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[v[-1].upper()]) if v[-1].isalpha() else int(v)
synth, gen, show, export = (json.load(open(f"{work}/{n}.json")) for n in ("synth", "gen", "show", "export"))
bw = json.load(open(f"{work}/fio.json"))["jobs"][0]["read"]["bw_bytes"]
kv = synth["kv_bytes"]
limit = size(t0) + size(t1) + os.path.getsize(model) + (256 << 20)
rss = int(hwm_kb) * 1024
step_s = 1 / gen["decode_tokens_per_s"] if gen.get("decode_tokens_per_s") else None
io_s = kv / bw
print(json.dumps({
    "session": {"tokens": synth.get("tokens"), "kv_bytes": kv, "create_s": float(create_s), "synth": synth},
    "startup_s": float(start_s),
    "show": show,
    "turn": {k: gen.get(k) for k in ("prompt_tokens", "generated_tokens", "ttft_ms", "decode_tokens_per_s",
                                      "finish_reason", "persisted", "persist_error")},
    "turn_wall_s": float(turn_s),
    "peak_rss_bytes": rss, "rss_limit_bytes": limit, "rss_within_limit": rss <= limit,
    "decode_step_s": step_s, "io_bound_step_s": io_s, "fio_random_page_bytes_per_s": bw,
    "fio_page_bytes": synth["page_bytes"],
    "step_over_io_bound": step_s / io_s if step_s else None,
    "load_average_1m": [float(l0), float(l1)],
    **({"export": {**export, "kv_bytes_at_fio_seq_s": kv / export["fio_seq_1m_bytes_per_s"],
                   "export_over_fio_seq": export["seconds"] / (kv / export["fio_seq_1m_bytes_per_s"])}}
       if export else {}),
}, indent=2))
PY
