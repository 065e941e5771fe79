#!/usr/bin/env bash
# slurm-down.sh - stop the daemons that ci/infra/slurm-up.sh started, by their PID files only
# (a PID is signalled only if /proc/PID/comm is the expected daemon). Idempotent.
#   --keep-munge   leave munged running (used by slurm-up.sh when it rewrites the config)
#   --purge        also delete controller state, spool dirs and logs (next start is pristine)
# Running/pending jobs are cancelled first (scancel), so no slurmstepd is left behind.
set -uo pipefail

KEEP_MUNGE=0; PURGE=0
for a in "$@"; do
  case $a in
    --keep-munge) KEEP_MUNGE=1 ;;
    --purge) PURGE=1 ;;
    *) echo "usage: $0 [--keep-munge] [--purge]" >&2; exit 2 ;;
  esac
done
RUN=/run/slurm
rc=0

# gone PID -> the process has exited (a zombie awaiting its reaper counts as exited)
gone() { [ ! -d "/proc/$1" ] || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
# stop COMM PIDFILE...: SIGTERM to all of them, wait up to 15 s, then SIGKILL
stop() {
  local comm=$1 f pid i pids=() files=()
  shift
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if [ -z "$pid" ] || [ ! -r "/proc/$pid/comm" ] || [ "$(cat "/proc/$pid/comm")" != "$comm" ] ||
       grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
      echo "slurm-down: $f: pid '$pid' is not a running $comm (stale pid file removed)"
      rm -f "$f"; continue
    fi
    kill -TERM "$pid" && pids+=("$pid") && files+=("$f")
  done
  [ ${#pids[@]} = 0 ] && return 0
  for i in $(seq 1 75); do
    alive=0; for pid in "${pids[@]}"; do gone "$pid" || alive=1; done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if ! gone "$pid"; then
      echo "slurm-down: $comm (pid $pid) ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid"; sleep 0.5
    fi
    if ! gone "$pid"; then echo "slurm-down: could not stop $comm pid $pid" >&2; rc=1
    else rm -f "${files[$i]}"; echo "slurm-down: stopped $comm (pid $pid)"; fi
  done
}

# 1. cancel all jobs while the controller still answers, so their steps end cleanly
if [ -s $RUN/slurmctld.pid ] && timeout 5 scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "slurm-down: cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for i in $(seq 1 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# 2. compute daemons, controller, munge
stop slurmd $RUN/slurmd-*.pid
stop slurmctld $RUN/slurmctld.pid
[ "$KEEP_MUNGE" = 1 ] || stop munged /run/slurm-munge/munged.pid

# 3. report (do not kill) any job step daemons that survived
left=$(for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = slurmstepd ] && echo "${p#/proc/}"; done | tr '\n' ' ')
[ -n "${left// /}" ] && echo "slurm-down: WARNING: slurmstepd still running: pids $left" >&2

if [ "$PURGE" = 1 ]; then
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/* /var/log/slurm/* /var/log/slurm-munge/* $RUN/hosts
  echo "slurm-down: purged state, spool and logs"
fi
exit $rc
