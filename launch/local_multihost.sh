#!/usr/bin/env bash
# Runs N processes of `python -m micle_jax.main` on this machine, joined by jax.distributed with
# CPU (gloo) collectives: a local stand-in for a multi-host TPU slice, to test multi-process code.
#
#   launch/local_multihost.sh 2 -- --config=configs/cxr.py:demo --workdir=workdirs/mh
#
# Process i gets MICLE_COORDINATOR=localhost:$PORT, MICLE_NUM_PROCESSES=N, MICLE_PROCESS_ID=i
# (read by micle_jax/runtime/distributed.py) and DEVICES_PER_PROCESS host CPU devices, and writes its
# output to $LOG_DIR/process_i.log. The script waits for all of them; when one fails, it stops
# the others and exits with the failing status.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local_multihost.sh N [-- ARGS...]

Starts N local processes of `$PYTHON -m $MODULE ARGS...` (one jax.distributed job, CPU devices).

Settings (environment):
  MODULE               module to run (default micle_jax.main)
  PYTHON               interpreter (default: the project's .venv/bin/python where `make`
                       made it, else python)
  DEVICES_PER_PROCESS  host CPU devices per process (default 4)
  PORT                 coordinator port on localhost (default: a free port)
  LOG_DIR              where process_<i>.log go (default: a new temporary directory)
  KILL_GRACE_S         seconds between SIGTERM and SIGKILL when stopping processes (default 10)
EOF
}

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || {
  usage >&2
  exit 2
}
NUM_PROCESSES=$1
shift
if [[ $# -gt 0 && "$1" == -- ]]; then
  shift
fi

MODULE=${MODULE:-micle_jax.main}
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python
  [[ -x "$REPO_ROOT/.venv/bin/python" ]] && PYTHON="$REPO_ROOT/.venv/bin/python"
fi
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
KILL_GRACE_S=${KILL_GRACE_S:-10}
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS=$DEVICES_PER_PROCESS"
[[ "$KILL_GRACE_S" =~ ^[0-9]+$ ]] || die "KILL_GRACE_S=$KILL_GRACE_S is not a number of seconds"
if [[ -z "${PORT:-}" ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT=$PORT is not a port number"
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/micle_multihost.XXXXXX")}
mkdir -p "$LOG_DIR"

# Our device count replaces any inherited one; other XLA flags are kept.
# shellcheck disable=SC2001
xla_flags=$(sed 's/--xla_force_host_platform_device_count=[0-9]*//g' <<<"${XLA_FLAGS:-}")
xla_flags="$xla_flags --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

pids=()

# stop_all: SIGTERM to every process still running, SIGKILL after KILL_GRACE_S.
stop_all() {
  local pid waited=0 running
  for pid in ${pids[@]+"${pids[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  while [[ $waited -lt $((KILL_GRACE_S * 10)) ]]; do
    running=0
    for pid in ${pids[@]+"${pids[@]}"}; do
      if kill -0 "$pid" 2>/dev/null; then running=1; fi
    done
    [[ $running -eq 1 ]] || return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in ${pids[@]+"${pids[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
}

trap 'info "interrupted: stopping all processes"; stop_all; exit 130' INT TERM

info "$NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator localhost:$PORT," \
  "logs in $LOG_DIR: $(shell_join "$PYTHON" -m "$MODULE" "$@")"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env MICLE_COORDINATOR="localhost:$PORT" MICLE_NUM_PROCESSES="$NUM_PROCESSES" \
    MICLE_PROCESS_ID="$i" XLA_FLAGS="${xla_flags# }" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
    PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m "$MODULE" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done

# Waits for every process; the first failure stops the others. (Polling, not `wait -n`, so that
# bash 3.2 runs it; bash reaps exited children itself, so `kill -0` fails once one has ended.)
remaining=$NUM_PROCESSES
status=0
done_flags=()
for ((i = 0; i < NUM_PROCESSES; i++)); do done_flags+=(0); done
while [[ $remaining -gt 0 ]]; do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ ${done_flags[i]} -eq 0 ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    done_flags[i]=1
    remaining=$((remaining - 1))
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      info "process $i failed (exit $rc); stopping the others. Last lines of its log:"
      tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
      stop_all
    fi
  done
  [[ $remaining -eq 0 ]] || sleep 0.2
done
if [[ $status -eq 0 ]]; then
  info "all $NUM_PROCESSES processes finished; logs in $LOG_DIR"
fi
exit "$status"
