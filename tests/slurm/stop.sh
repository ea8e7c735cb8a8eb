#!/usr/bin/env bash
# Stop the cluster that start.sh started in DIR (jobs first, then the daemons, by PID) and delete DIR.
set -uo pipefail
dir=$1
export SLURM_CONF=$dir/slurm.conf
err=$dir/log/stop.err
mkdir -p "$dir/log"
pid_of() { cat "$1" 2>>"$err"; }
# A zombie counts as gone: the container's init may reap the daemons late.
running() { local state; state=$(ps -o stat= -p "$1" 2>>"$err") && [ "${state:0:1}" != Z ]; }
ctld=$(pid_of "$dir/run/slurmctld.pid"); slurmd=$(pid_of "$dir/run/slurmd.pid"); munge=$(pid_of "$dir/munge/munged.pid")
if [ -n "$ctld" ]; then
  # Jobs outlive a stopped slurmd, so end them while the daemons still run.
  scancel --user="$(id -un)" --full --signal=KILL 2>>"$err"
  scancel --user="$(id -un)" 2>>"$err"
  for _ in $(seq 100); do [ -z "$(squeue -h 2>>"$err")" ] && break; sleep 0.1; done
fi
for p in $slurmd $ctld; do kill "$p" 2>>"$err"; done
for p in $slurmd $ctld; do for _ in $(seq 100); do running "$p" || break; sleep 0.1; done; done
if [ -n "$munge" ]; then
  kill "$munge" 2>>"$err"
  for _ in $(seq 50); do running "$munge" || break; sleep 0.1; done
fi
rm -rf "$dir"
