#!/usr/bin/env bash
# Runs N processes of one command on this machine (CPU), as a multi-host job would on a pod.
#
#   launch/local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-t TIMEOUT_S] [-l LOG_DIR] [-w] -- COMMAND...
#   launch/local.sh -n 2 -d 2 -- muse-jax train --config shapes --workdir /tmp/w --config.mesh.data=-1
#
# Each process gets MUSE_COORDINATOR_ADDRESS=127.0.0.1:<free port>, MUSE_NUM_PROCESSES, MUSE_PROCESS_ID
# (read by muse_jax/distributed.py), JAX_PLATFORMS=cpu and XLA_FLAGS forcing D CPU devices, so the
# job has N*D devices. Process 0's output goes to the terminal, all outputs to LOG_DIR/process_<i>.log.
# If any process fails, the others are stopped and the script exits with that process's code
# (-w: let them end by themselves, as JAX's heartbeat makes them; used by tests/test_multihost.py);
# after TIMEOUT_S (default 0 = none) all are stopped (exit 124). Rerun to resume from the last checkpoint.
set -euo pipefail

n=2; d=1; timeout_s=0; log_dir=""; stop_others=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -d) d="$2"; shift 2 ;;
    -t) timeout_s="$2"; shift 2 ;;
    -l) log_dir="$2"; shift 2 ;;
    -w) stop_others=0; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "local.sh: unknown option $1 (put the command after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "local.sh: no command given (usage: local.sh -n 2 -d 2 -- muse-jax ...)" >&2; exit 2; fi
python_bin="${PYTHON:-python3}"
port="$("$python_bin" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log_dir="${log_dir:-$(mktemp -d -t muse-jax-local.XXXXXX)}"
mkdir -p "$log_dir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < n; i++)); do
  (
    export MUSE_COORDINATOR_ADDRESS="127.0.0.1:${port}" MUSE_NUM_PROCESSES="$n" MUSE_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${d}"
    if [[ $i -eq 0 ]]; then
      exec "$@" > >(tee "$log_dir/process_$i.log") 2>&1
    else
      exec "$@" > "$log_dir/process_$i.log" 2>&1
    fi
  ) &
  pids+=($!)
done
echo "local.sh: $n processes x $d CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2

start=$(date +%s); status=0; failed=""
while :; do
  running=0
  for idx in "${!pids[@]}"; do
    pid="${pids[$idx]}"
    if kill -0 "$pid" 2>/dev/null; then running=$((running + 1)); continue; fi
    if wait "$pid"; then rc=0; else rc=$?; fi
    unset "pids[$idx]"
    if [[ $rc -ne 0 ]]; then failed="$failed process $idx (code $rc, $log_dir/process_$idx.log);"; status=$rc; fi
  done
  if [[ -n "$failed" && $stop_others -eq 1 ]]; then
    echo "local.sh: failed:$failed stopping the others" >&2
    cleanup; wait 2>/dev/null || true; exit "$status"
  fi
  [[ $running -eq 0 ]] && break
  if [[ $timeout_s -gt 0 && $(( $(date +%s) - start )) -ge $timeout_s ]]; then
    echo "local.sh: timeout after ${timeout_s}s; stopping all processes" >&2
    cleanup; wait 2>/dev/null || true; exit 124
  fi
  sleep 0.5
done
if [[ -n "$failed" ]]; then echo "local.sh: failed:$failed" >&2; exit "$status"; fi
echo "local.sh: all $n processes finished" >&2
