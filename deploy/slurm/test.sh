#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, started from nothing and stopped at
# the end: munged, slurmctld and slurmd from Debian's packages (slurmctld, slurmd,
# slurm-client, munge), each with files of its own in a temporary folder and
# never the machine's /etc/slurm. Through it, the subset job is trained twice
# with `sbatch --wait`:
#   1. hetero-run.sbatch: 2 tasks, each a `hetero run` rank;
#   2. hetero-cluster.sbatch: Hetero's own coordinator and agent started by srun.
# Each must exit 0 and leave a run summary with 2 workers.
#
#   deploy/slurm/test.sh [HETERO_BINARY]     (default: target/release/hetero)
#
# Exit 0: both trained. Any other: what failed is printed, with the daemons' logs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
hetero=$(realpath "${1:-$repo/target/release/hetero}")
for tool in munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 2; }
done
[ -x "$hetero" ] || { echo "no hetero binary at $hetero" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "the test cluster's daemons run as root (SlurmUser=root)" >&2; exit 2; }

# The munge key must never be readable by anyone else, not even for a moment.
umask 077
dir=$(mktemp -d /tmp/hetero-slurm.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ctld_port=$(free_port)
slurmd_port=$(free_port)
# The jobs' own ports: free ones, not the recipes' defaults.
export HETERO_PORT=$(free_port)
export SLURM_CONF=$dir/slurm.conf

stop() {
  local rc=$?
  for pidfile in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  for pidfile in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -s "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  if [ "$rc" != 0 ]; then
    for log in "$dir"/*.log "$dir"/work/*.out; do
      [ -f "$log" ] && { echo "---- $log"; tail -n 40 "$log"; }
    done
  fi
  rm -rf "$dir"
  exit "$rc"
}
trap stop EXIT

# munge with a key and a socket of its own (root needs --force).
head -c 1024 /dev/urandom >"$dir/munge.key"
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge.seed"

mkdir -p "$dir/state" "$dir/spool" "$dir/work"
cat >"$SLURM_CONF" <<CONF
ClusterName=hetero-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 1 60); do
  state=$(sinfo -h -o %T 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] || { echo "the Slurm node did not come up (state: '${state}')" >&2; exit 1; }
echo "slurm: one node up ($(sinfo -h -o '%P %D %C'))"

# The subset job, its runs under this folder.
spec=$dir/work/job.toml
cat >"$spec" <<SPEC
name = "slurm-subset"
[model]
kind = "mlp"
[dataset]
path = "$repo/data/fashion-mnist-subset"
[training]
epochs = 1
global_batch_size = 64
[cluster]
workers = 2
[output]
dir = "$dir/work/runs"
SPEC

check() { # NAME SUMMARY
  python3 - "$2" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["workers"] == 2, s["workers"]
print(f"{sys.argv[2]}: {s['workers']} workers, {sum(w['samples'] for w in s['per_worker'])} samples, "
      f"test accuracy {100 * s['test_accuracy']:.1f} %")
PY
}

cd "$dir/work"
echo "== sbatch --wait hetero-run.sbatch (2 tasks, each a hetero run rank)"
HETERO=$hetero sbatch --wait --time=10 --ntasks=2 --output="$dir/work/run-%j.out" \
  "$repo/deploy/slurm/hetero-run.sbatch" "$spec"
cat "$dir"/work/run-*.out | grep -E "hetero run: rank|job job-|succeeded" || true
check "hetero run under srun" "$dir/work/runs/job-000001/summary.json"
rm -rf "$dir/work/runs"

echo "== sbatch --wait hetero-cluster.sbatch (Hetero's own coordinator and agent, started by srun)"
HETERO=$hetero HETERO_STATE=$dir/work/cluster sbatch --wait --time=10 --output="$dir/work/cluster-%j.out" \
  "$repo/deploy/slurm/hetero-cluster.sbatch" "$spec"
cat "$dir"/work/cluster-*.out | grep -E "alive|job job-|succeeded" || true
check "hetero's own cluster under srun" "$dir/work/runs/job-000001/summary.json"
echo "slurm: both paths trained"
