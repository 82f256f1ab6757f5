# Shared by the bench/compare_*.sh scripts that drive a real mnemod on the
# disk: source it after the script's own options are parsed. It expects
# MODEL and DIR, and a die() of the script's own; it sets MNEMOD, BENCH, CLI,
# FSTYPE and `work` (a fresh directory under DIR, removed on exit with any
# mnemod still running), and gives start_daemon / stop_daemon.

MNEMOD=${MNEMOD:-build/daemon/mnemod}
BENCH=${MNEMO_BENCH:-build/bench/mnemo-bench}
CLI=${MNEMO_CLI:-build/client/mnemo}
for bin in "$MNEMOD" "$BENCH" "$CLI"; do
  [[ -x "$bin" ]] || die "$bin is missing: build first"
done
[[ -f "$MODEL" ]] || die "no model at $MODEL (scripts/fetch-model)"
command -v fio > /dev/null || die "fio not found (scripts/setup installs it)"
mkdir -p "$DIR"
FSTYPE=$(df -T "$DIR" | awk 'NR==2 {print $2}')
[[ "$FSTYPE" == tmpfs ]] && die "$DIR is on tmpfs; give --dir on the disk to measure"

work=$(mktemp -d "$DIR/mnemo-$(basename "$0" .sh).XXXXXX")
daemon_pid=""
bench_cleanup() {
  if [[ -n "$daemon_pid" ]]; then kill -KILL "$daemon_pid" 2> /dev/null || true; wait "$daemon_pid" 2> /dev/null || true; fi
  rm -rf "$work"
}
trap bench_cleanup EXIT

bench_now() { date +%s.%N; }

# start_daemon ARGS...: mnemod with ARGS (its log in $work/mnemod.log) on
# socket $sock; returns once it answers Health. START_S: seconds it took.
start_daemon() {
  local t0 i
  t0=$(bench_now)
  "$MNEMOD" "$@" >> "$work/mnemod.log" 2>&1 &
  daemon_pid=$!
  for ((i = 0; i < 7200; i++)); do
    if "$CLI" health --socket "$sock" > /dev/null 2>&1; then
      START_S=$(python3 -c "print(f'{$(bench_now) - $t0:.3f}')")
      return 0
    fi
    kill -0 "$daemon_pid" 2> /dev/null || break
    sleep 0.05
  done
  echo "$(basename "$0"): mnemod did not become healthy; its log:" >&2
  tail -20 "$work/mnemod.log" >&2
  exit 1
}

# stop_daemon: SIGTERM, and wait for it to exit.
stop_daemon() {
  kill -TERM "$daemon_pid"
  wait "$daemon_pid" 2> /dev/null || true
  daemon_pid=""
}
