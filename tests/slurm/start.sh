#!/usr/bin/env bash
# Start a one-node Slurm cluster (munged, slurmctld, slurmd) for the tests, entirely inside DIR.
#   bash tests/slurm/start.sh DIR      then: export SLURM_CONF=DIR/slurm.conf
# Environment: CTLD_PORT, SLURMD_PORT (free ports; default 6817/6818), SLOTS (job slots, default 8).
# Runs as root, needs no systemd or cgroups, and never touches the system's munge or Slurm.
set -euo pipefail
dir=$(cd "$1" && pwd)
# munged insists that every directory above its socket is world-executable.
chmod 755 "$dir"
mkdir -p "$dir"/{munge,state,spool,log,run}
chmod 755 "$dir/munge"
[ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" --bits=1024
munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
  --log-file="$dir/munge/munged.log" --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed"

# More job slots than cores (config_overrides): array tasks of the tests then run side by side.
cat > "$dir/slurm.conf" <<CONF
ClusterName=fedmoe-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${CTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
MailProg=$(type -P true)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${SLOTS:-8} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 300); do
  if [ "$(sinfo -h -n localhost -o %t 2>>"$dir/log/sinfo.err")" = idle ]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.1
done
echo "the test Slurm cluster did not become idle; logs in $dir/log" >&2
exit 1
