#!/usr/bin/env bash
# bench/compare_fio.sh: the T2 page store against fio on the same disk.
#
# Runs `mnemo-bench t2` (UringPageStore: O_DIRECT, registered buffers and
# files, queue depth --qd) and fio (ioengine=io_uring, direct=1, fixedbufs,
# registerfiles, same directory, block size, depth and size) for the same
# three patterns — sequential block writes, sequential block reads, random
# single-page reads — one pattern at a time, back to back, alternating which
# goes first, --reps times, and prints
# the median of each side, every run, and mnemo/fio (target: >= 0.9).
# fio's reads go to the page store's own slab files (--fio-reads store, the
# default): the same blocks of the same disk, so where each file happened to
# land (measured: up to 20% apart on a virtual disk) is out of the ratio;
# --fio-reads own reads the file fio wrote.
#
#   bench/compare_fio.sh [--dir DIR] [--size 2G] [--block 1M] [--page 48K]
#                        [--qd 16] [--rand-ops N] [--reps 2] [--fio-reads store|own]
#                        [--json]
#
# MNEMO_BENCH overrides the binary (default build/bench/mnemo-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${TMPDIR:-/var/tmp}/mnemo-t2-compare
SIZE=2G
BLOCK=1M
PAGE=48K  # one KV page of the default model (64 tokens)
QD=16
RAND_OPS=""
REPS=2
FIO_READS=store
JSON=0
BENCH=${MNEMO_BENCH:-build/bench/mnemo-bench}

die() { echo "compare_fio: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --block) BLOCK=$2; shift 2 ;;
    --page) PAGE=$2; shift 2 ;;
    --qd) QD=$2; shift 2 ;;
    --rand-ops) RAND_OPS=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --fio-reads) FIO_READS=$2; shift 2 ;;
    --json) JSON=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
done
[[ "$FIO_READS" == store || "$FIO_READS" == own ]] || die "--fio-reads is store or own"
command -v fio >/dev/null || die "fio not found (scripts/setup installs it)"
[ -x "$BENCH" ] || die "$BENCH not built (cmake --build build --target mnemo-bench)"
mkdir -p "$DIR"
FSTYPE=$(df -T "$DIR" | awk 'NR==2 {print $2}')
[ "$FSTYPE" = tmpfs ] && die "$DIR is on tmpfs; give --dir on the disk to measure"

bytes() {  # 2G / 360K / 1M -> bytes (binary units, as fio and mnemo-bench read them)
  python3 -c 'import re,sys; m=re.fullmatch(r"([0-9.]+)([KMGkmg]?)(i?[Bb]?)", sys.argv[1]); \
print(int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " ")))' "$1"
}
SIZE_B=$(bytes "$SIZE")
BLOCK_B=$(bytes "$BLOCK")
PAGE_B=$(bytes "$PAGE")
if [ -z "$RAND_OPS" ]; then
  RAND_OPS=$((SIZE_B / PAGE_B / 4))
  ((RAND_OPS > 65536)) && RAND_OPS=65536
fi
# Both sides move whole blocks: the store holds floor(size / block) of them.
DATA_B=$((SIZE_B / BLOCK_B * BLOCK_B))

OUT=$(mktemp -d)
trap 'rm -rf "$OUT" "$DIR/mnemo-t2-bench" "$DIR/fio-t2.dat"' EXIT

MNEMO_CMD=("$BENCH" t2 --dir "$DIR" --size "$SIZE" --block "$BLOCK" --page "$PAGE" --qd "$QD"
           --rand-ops "$RAND_OPS" --json)
FIO_COMMON=(--ioengine=io_uring --direct=1 --fixedbufs=1 --registerfiles=1
            --iodepth="$QD" --lat_percentiles=1 --output-format=json --group_reporting)

# One pattern at a time, mnemo and fio back to back (alternating which goes
# first), so both see the same moment of a shared, host-cached disk.
mnemo() { "${MNEMO_CMD[@]}" --keep --phase "$1"; }
fio_job() {
  local name=$1; shift
  fio --name="$name" "${FIO_COMMON[@]}" "$@"
}
# The files fio reads: the store's slabs (in slot order) or its own file.
fio_read_files() {
  if [ "$FIO_READS" = store ]; then
    local slabs=("$DIR"/mnemo-t2-bench/slab-*)
    [ -e "${slabs[0]}" ] || die "no slab files in $DIR/mnemo-t2-bench"
    (IFS=:; echo "--filename=${slabs[*]}")
  else
    echo "--filename=$DIR/fio-t2.dat"
  fi
}
fio_phase() {
  case "$1" in
    write) rm -f "$DIR/fio-t2.dat"
           fio_job seqwrite --filename="$DIR/fio-t2.dat" --rw=write --bs="$BLOCK_B" --size="$DATA_B" ;;
    read) fio_job seqread "$(fio_read_files)" --readonly --file_service_type=sequential --rw=read \
            --bs="$BLOCK_B" --size="$DATA_B" ;;
    rand) fio_job randread "$(fio_read_files)" --readonly --rw=randread --bs="$PAGE_B" --size="$DATA_B" \
            --norandommap --randrepeat=1 --io_size=$((RAND_OPS * PAGE_B)) ;;
  esac
}

for ((rep = 1; rep <= REPS; rep++)); do
  echo "compare_fio: rep $rep/$REPS" >&2
  for phase in write read rand; do
    if ((rep % 2)); then
      mnemo "$phase" >"$OUT/mnemo_${phase}_$rep.json"; fio_phase "$phase" >"$OUT/fio_${phase}_$rep.json"
    else
      fio_phase "$phase" >"$OUT/fio_${phase}_$rep.json"; mnemo "$phase" >"$OUT/mnemo_${phase}_$rep.json"
    fi
  done
  rm -rf "$DIR/mnemo-t2-bench" "$DIR/fio-t2.dat"
done

python3 - "$OUT" "$REPS" "$JSON" "$FSTYPE" "$DIR" "${MNEMO_CMD[*]}" "fio ${FIO_COMMON[*]}" "$FIO_READS" <<'EOF'
import json, statistics, sys
out, reps, as_json, fstype, d, mnemo_cmd, fio_cmd, fio_reads = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", *sys.argv[4:]
load = lambda name: json.load(open(f"{out}/{name}"))
runs = lambda side, phase: [load(f"{side}_{phase}_{r}.json") for r in range(1, reps + 1)]
mw, mr, mx = runs("mnemo", "write"), runs("mnemo", "read"), runs("mnemo", "rand")
m = mw
fw = [x["jobs"][0]["write"] for x in runs("fio", "write")]
fr = [x["jobs"][0]["read"] for x in runs("fio", "read")]
fx = [x["jobs"][0]["read"] for x in runs("fio", "rand")]
pct = lambda x, p: x["lat_ns"]["percentile"][p] / 1e3
# Per pattern: every run of each side; the report uses the median (the disk
# is shared and cached by the host, so single runs swing).
rows = [
    ("seq write", [x["seq_write_bytes_per_s"] for x in mw], [x["bw_bytes"] for x in fw], "B/s"),
    ("seq read", [x["seq_read_bytes_per_s"] for x in mr], [x["bw_bytes"] for x in fr], "B/s"),
    ("rand read", [x["rand_read_bytes_per_s"] for x in mx], [x["bw_bytes"] for x in fx], "B/s"),
    ("rand read p50 us", [x["rand_read_lat_us_p50"] for x in mx], [pct(x, "50.000000") for x in fx], "us"),
    ("rand read p99 us", [x["rand_read_lat_us_p99"] for x in mx], [pct(x, "99.000000") for x in fx], "us"),
]
med = statistics.median
# mnemo/fio for throughput; fio/mnemo for latency (lower is better): above 1 favours mnemo either way.
ratio = lambda a, b, u: a / b if u == "B/s" else b / a
g = m[0]
if as_json:
    print(json.dumps({"fs": fstype, "dir": d, "size_bytes": g["size_bytes"], "block_bytes": g["block_bytes"],
                      "page_bytes": g["page_bytes"], "qd": g["qd"], "reps": reps, "fio_reads": fio_reads,
                      "rows": [{"pattern": p, "mnemo": med(a), "fio": med(b), "unit": u,
                                "ratio": ratio(med(a), med(b), u), "mnemo_runs": a, "fio_runs": b}
                               for p, a, b, u in rows]}))
    sys.exit(0)
fmt = lambda v, u: f"{v / 1e9:.3f}" if u == "B/s" else f"{v:.0f}"
print(f"T2 page store vs fio on {d} ({fstype}): {g['size_bytes'] / 2**30:.2f} GiB, block {g['block_bytes'] // 1024} KiB, "
      f"page {g['page_bytes'] // 1024} KiB, queue depth {g['qd']}; median of {reps} (GB/s or us)")
print(f"  {'pattern':<18} {'mnemo':>8} {'fio':>8} {'ratio':>6}   runs: mnemo | fio")
for p, a, b, u in rows:
    runs = " ".join(fmt(v, u) for v in a) + " | " + " ".join(fmt(v, u) for v in b)
    print(f"  {p:<18} {fmt(med(a), u):>8} {fmt(med(b), u):>8} {ratio(med(a), med(b), u):>6.2f}   {runs}")
print("  ratio: mnemo/fio for throughput, fio/mnemo for latency (>= 1 favours mnemo)")
print(f"  mnemo: {mnemo_cmd} --keep --phase write|read|rand")
print(f"  fio:   {fio_cmd} (--rw=write|read --bs=block / --rw=randread --bs=page --norandommap)")
print("  fio reads " + ("the store's slab files (same blocks as mnemo)" if fio_reads == "store" else "its own file"))
EOF
